"""FLoRA deltas: a Tucker core and one factor per weight mode (arXiv 2405.14739)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from structpeft.core.layers import AdapterDelta, conv_like, layer_geometry, pointwise_conv
from structpeft.methods.flora.config import FloraConfig


def tucker_to_tensor(core: torch.Tensor, factors: list[torch.Tensor | None]) -> torch.Tensor:
    """``core ×_1 U_1 ... ×_N U_N`` (each U_n of shape (I_n, r_n)); a ``None`` leaves its mode.

    One einsum rather than N mode products: on small kernels the per-call overhead of N
    tensordots (permutes, reshapes, Python) cost more than the arithmetic.
    """
    letters = "abcdefghijklmnopqrstuvwxyz"
    core_modes = letters[: core.dim()]
    out_modes = list(core_modes)
    operands, terms = [core], [core_modes]
    for mode, u in enumerate(factors):
        if u is not None:
            new = letters[core.dim() + mode].upper()
            operands.append(u.to(core.dtype))  # einsum under autocast would mix dtypes otherwise
            terms.append(new + core_modes[mode])
            out_modes[mode] = new
    return torch.einsum(f"{','.join(terms)}->{''.join(out_modes)}", *operands)


class FloraDelta(AdapterDelta):
    """``ΔW = s · G ×_1 U_out ×_2 U_in ×_3 U_k1 ...`` applied without building ΔW where possible.

    Linear/embedding: three thin matmuls. Conv with groups == 1: a 1x1 conv by U_in^T, the small
    (r_out, r_in, k..) kernel ``G ×_3 U_k1 ...`` with the base's stride/padding/dilation, then a 1x1
    conv by U_out; exact, since zero padding commutes with channel mixing. Where it costs fewer
    FLOPs (1x1 kernels, few input channels) U_in is folded into the small kernel instead, leaving
    two convs. Grouped convs use the dense (C_out, C_in/groups, k..) delta.
    """

    def __init__(self, layer: nn.Module, name: str, config: FloraConfig) -> None:
        super().__init__()
        geo = layer_geometry(layer, name)
        self.kind = geo.kind
        self.groups = geo.groups
        self._stride = tuple(getattr(layer, "stride", ()))
        self._kernel_volume = math.prod(geo.weight_shape[2:])  # fixed; a product over the factors broke compile
        self.ranks = config.ranks_for(geo, name)
        self.scaling = config.alpha / self.ranks[0]
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.flora_core = nn.Parameter(torch.empty(self.ranks))  # G: (r_1, .., r_N)
        self.flora_factors = nn.ParameterList(  # U_n: (I_n, r_n)
            nn.Parameter(torch.empty(size, rank)) for size, rank in zip(geo.weight_shape, self.ranks)
        )
        self.reset_parameters(config.init_weights, config.factor_init)

    @torch.no_grad()
    def reset_parameters(self, zero_start: bool, factor_init: str) -> None:
        for u in self.flora_factors:
            nn.init.orthogonal_(u) if factor_init == "orthogonal" else nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        nn.init.zeros_(self.flora_core) if zero_start else nn.init.normal_(self.flora_core, std=0.1)

    def forward(self, x: torch.Tensor, result: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        # The scale goes on the small core, not on the full-size output.
        core, (u_out, u_in, *u_kernel) = self.flora_core * self.scaling, list(self.flora_factors)
        if self.kind == "embedding":
            h = F.embedding(x, u_in) @ core.T @ u_out.T  # (..., dim)
        elif self.kind == "linear":
            h = self.dropout(self.adapter_input(x)) @ u_in @ core.T @ u_out.T  # (..., d_out)
        elif self.groups == 1:
            x = self.dropout(self.adapter_input(x))
            if self._fold_input_factor(x):
                # One conv C_in -> r_out with the kernel G ×_2 U_in ×_3 U_k1 ... (like LoRA's A).
                kernel = tucker_to_tensor(core, [None, u_in, *u_kernel])  # (r_out, C_in, k..)
                h = conv_like(base_layer, x, kernel, groups=1)  # (B, r_out, ..')
            else:
                kernel = tucker_to_tensor(core, [None, None, *u_kernel])  # (r_out, r_in, k..)
                h = pointwise_conv(x, u_in.T)  # (B, r_in, ..)
                h = conv_like(base_layer, h, kernel, groups=1)  # (B, r_out, ..')
            h = pointwise_conv(h, u_out)  # (B, C_out, ..')
        else:
            dense = tucker_to_tensor(core, list(self.flora_factors))  # (C_out, C_in/groups, k..)
            h = conv_like(base_layer, self.dropout(self.adapter_input(x)), dense, self.groups)
        return result + h.to(result.dtype)

    def _fold_input_factor(self, x: torch.Tensor) -> bool:
        """Whether one C_in -> r_out conv costs fewer FLOPs than 1x1 (C_in -> r_in) then the core.

        Per output position the folded conv costs C_in·r_out·K (K = kernel volume); the split
        path costs C_in·r_in·(input/output positions, the 1x1 runs before any stride) +
        r_in·r_out·K. Small kernels (1x1) and small C_in favour folding; large 3x3 layers do not.
        """
        c_in, r_out, r_in = x.shape[1], self.ranks[0], self.ranks[1]
        kernel_volume, strides = self._kernel_volume, math.prod(self._stride)
        return c_in * r_out * kernel_volume <= c_in * r_in * strides + r_in * r_out * kernel_volume

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return self.scaling * tucker_to_tensor(self.flora_core, list(self.flora_factors))

    def low_rank_factors(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.kind != "linear":
            return None
        u_out, u_in = self.flora_factors
        return self.scaling * u_out @ self.flora_core, u_in.T  # (d_out, r_in), (r_in, d_in)
