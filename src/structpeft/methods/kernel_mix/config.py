"""Kernel-mix configuration (Chen et al., NAACL Findings 2022, arXiv 2205.03720)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from structpeft.core.config import AdapterConfig, check_probability, register_method

INITS = ("zero", "paper")


@register_method
@dataclass
class KernelMixConfig(AdapterConfig):
    """Kernel-wise adapters: every head gets its own small budget on its kernel (Q), its responses
    (V, driven by the head's own keys) and its read-out (O), beside small shared LoRA terms.

    target_modules: attention blocks, i.e. the modules that hold the q, k, v and o projections
        (BERT/RoBERTa/ViT ``attention``, LLaMA/DINOv2 ``self_attn``/``attention``, GPT-2 ``attn``);
        None takes every block whose projections structpeft can read (see
        :func:`~structpeft.attention.attention_anatomy`).
    r_q, r_v: head-wise ranks of Q and of V/O; r_q_shared, r_v_shared: ranks of the shared LoRA on
        W_q and on W_v, W_o. (1, 2, 2, 4) is the authors' RoBERTa-base setting.
    dropout: on the adapters' inputs (not on the keys that drive V).
    init: "zero" (default) starts every B factor and bias at 0, so the model starts as the base;
        "paper" draws every factor and bias from N(0, 0.01²) as the authors' code does.
    Scales are 1 throughout (head-wise and shared: our choice for the shared terms). Bias terms
    exist only where the projection has a bias, so everything merges into W_q, W_v, W_o.
    """

    peft_type = "KERNEL_MIX"

    r_q: int = 1
    r_v: int = 2
    r_q_shared: int = 2
    r_v_shared: int = 4
    dropout: float = 0.1
    init: str = "zero"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in INITS:
            raise ValueError(f"Kernel-mix init must be one of {INITS}, got {self.init!r}")
        check_probability(self, "dropout")
        ranks = {"r_q": self.r_q, "r_v": self.r_v, "r_q_shared": self.r_q_shared, "r_v_shared": self.r_v_shared}
        if any(r < 0 for r in ranks.values()) or self.r_q + self.r_q_shared + self.r_v + self.r_v_shared == 0:
            raise ValueError(f"Kernel-mix ranks must be >= 0 and not all 0, got {ranks}")

    def default_targets(self, model: nn.Module, exclude: set[str]) -> list[str]:
        from structpeft.attention import attention_blocks

        blocks = attention_blocks(model, exclude)
        if not blocks:
            raise ValueError(
                f"Kernel-mix found no attention block with q/k/v/o projections in this {type(model).__name__}; "
                "name them in target_modules"
            )
        return blocks

    def create_deltas(self, module: nn.Module, name: str):
        from structpeft.methods.kernel_mix.layer import kernel_mix_deltas

        return kernel_mix_deltas(module, name, self)
