"""SURM configuration (Sehanobish et al., NeurIPS 2024, arXiv 2406.17740)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from structpeft.core.config import AdapterConfig, check_probability, register_method

STRUCTURES = ("circulant", "toeplitz", "sym_toeplitz", "kronecker", "ldr")
MODES = ("lora", "adapter")
ACTIVATIONS = ("identity", "relu", "gelu", "tanh")


@register_method
@dataclass
class SurmConfig(AdapterConfig):
    """Structured unrestricted-rank matrices: few parameters, full rank, FFT-fast products.

    mode="lora": ``ΔW = alpha · S`` on Linear / Conv1D layers; mergeable.
    mode="adapter": ``h + act(S · drop(h)) + bias`` on the target modules' outputs (for BERT-style
        models target ``attention.output.dense`` and ``output.dense``: Houlsby placement);
        not mergeable.

    structure: "circulant" (n params), "toeplitz" (m + n - 1, rectangular natively),
        "sym_toeplitz" (n, square only), "kronecker" (A ⊗ B), "ldr" (``Σ_{i<=rank} Z_1(g_i) Z_-1(h_i)``,
        2·rank·n). Zero start as in the authors' code: circulant first column ``b ⊙ a``, Toeplitz
        ``T(b) T(a)``, Kronecker ``A ⊗ B`` and LDR ``h`` with b / B / h = 0.
    rank: LDR generators (``rank`` pairs); ignored by the other structures.
    kronecker_shape: the (rows, cols) of A, B then being (d_out/rows, d_in/cols); None picks the
        divisors nearest the square roots.
    rectangular: how circulant and ldr serve d_out != d_in. "block": a grid of circulant blocks of
        size gcd(d_in, d_out) (circulant only); "pad": one max(d_in, d_out) matrix, input zero-padded
        and output truncated. Toeplitz and Kronecker are rectangular natively.
    """

    peft_type = "SURM"

    structure: str = "circulant"
    mode: str = "lora"
    alpha: float = 1.0
    dropout: float = 0.0
    rank: int = 1
    kronecker_shape: list[int] | None = None
    rectangular: str = "block"
    activation: str = "identity"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, allowed in (
            ("structure", self.structure, STRUCTURES),
            ("mode", self.mode, MODES),
            ("rectangular", self.rectangular, ("block", "pad")),
            ("activation", self.activation, ACTIVATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"SurmConfig {name}={value!r}; choose one of {', '.join(allowed)}")
        check_probability(self, "dropout")
        if self.rank <= 0:
            raise ValueError(f"SurmConfig rank must be positive, got {self.rank}")
        if self.kronecker_shape is not None:
            self.kronecker_shape = list(self.kronecker_shape)

    def create_delta(self, layer: nn.Module, name: str):
        from structpeft.methods.surm.layer import SurmDelta

        return SurmDelta(layer, name, self)
