"""FLoRA configuration (Si et al., ICLR 2025, arXiv 2405.14739)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from structpeft.core.config import AdapterConfig, check_probability, register_method
from structpeft.core.layers import LayerGeometry


@register_method
@dataclass
class FloraConfig(AdapterConfig):
    """FLoRA: ``ΔW = (alpha / r_1) · G ×_1 U_1 ... ×_N U_N`` over the weight's own N modes.

    Not to be confused with the other methods also called "FLoRA": this is arXiv 2405.14739.

    r: one rank per mode of the weight (C_out, C_in/groups, *kernel), or an int. An int gives
        the two channel modes rank r and each kernel mode min(r, kernel size), i.e. a full-rank
        spatial factor (our choice; the authors' vision code uses (16, 16, 2, 2) on 3x3 kernels).
    alpha: scale numerator; the scale is ``alpha / r_1`` (r_1 = output-channel rank), as LoRA's
        ``alpha / r`` for linear layers.
    factor_init: "kaiming" (uniform, as LoRA's A) or "orthogonal" for the factors U_n; the core G
        starts at zero, so the model starts exactly at the base.
    """

    peft_type = "FLORA"

    r: int | list[int] = 8
    alpha: float = 8.0
    dropout: float = 0.0
    factor_init: str = "orthogonal"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, tuple):
            self.r = list(self.r)
        ranks = self.r if isinstance(self.r, list) else [self.r]
        if not ranks or any(r <= 0 for r in ranks):
            raise ValueError(f"FLoRA ranks must be positive integers, got r={self.r!r}")
        check_probability(self, "dropout")
        if self.factor_init not in ("kaiming", "orthogonal"):
            raise ValueError(f"factor_init must be 'kaiming' or 'orthogonal', got {self.factor_init!r}")

    def ranks_for(self, geometry: LayerGeometry, name: str) -> tuple[int, ...]:
        modes = geometry.weight_shape
        if isinstance(self.r, int):
            return (self.r, self.r, *(min(self.r, k) for k in modes[2:]))
        if len(self.r) != len(modes):
            raise ValueError(
                f"FLoRA r={self.r} gives {len(self.r)} ranks but module {name!r} has a {len(modes)}-mode "
                f"weight {tuple(modes)} (C_out, C_in/groups, *kernel): give {len(modes)} ranks or an int"
            )
        return tuple(self.r)

    def create_delta(self, layer: nn.Module, name: str):
        from structpeft.methods.flora.layer import FloraDelta

        return FloraDelta(layer, name, self)
