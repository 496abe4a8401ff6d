"""LoRA deltas for linear, conv and embedding layers, with HF PEFT's parameter names."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from structpeft.core.layers import AdapterDelta, conv_like, layer_geometry, plain_conv_class, pointwise_conv
from structpeft.methods.lora.config import LoraConfig


class LoraDelta(AdapterDelta):
    """``y + (alpha/r) · B(A(drop(x)))`` (arXiv 2106.09685).

    Conv: A is a conv with the base's kernel, stride, padding and dilation into r channels, B a 1x1
    conv. For grouped convs the r filters of A are shared by every group and B is grouped, so ΔW
    keeps the base's (C_out, C_in/groups, k..) shape and merges; HF PEFT instead gives A all C_in
    channels, which cannot merge, so grouped-conv checkpoints differ in lora_A's shape.
    """

    def __init__(self, layer: nn.Module, name: str, config: LoraConfig) -> None:
        super().__init__()
        geo = layer_geometry(layer, name)
        r = config.r
        self.kind = geo.kind
        self.groups = geo.groups
        self.scaling = config.alpha / r
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if geo.kind == "embedding":
            # HF PEFT's names and orientation: A (r, num_embeddings), B (dim, r).
            self.lora_embedding_A = nn.Parameter(torch.empty(r, geo.in_features))
            self.lora_embedding_B = nn.Parameter(torch.empty(geo.out_features, r))
        elif geo.kind == "linear":
            self.lora_A = nn.Linear(geo.in_features, r, bias=False)
            self.lora_B = nn.Linear(r, geo.out_features, bias=False)
        else:
            conv = plain_conv_class(layer)
            self.lora_A = conv(geo.in_features // geo.groups, r, layer.kernel_size, bias=False)
            self.lora_B = conv(r, geo.out_features, 1, bias=False)
        self.reset_parameters(config.init_weights)

    @property
    def A(self) -> torch.Tensor:
        return self.lora_embedding_A if self.kind == "embedding" else self.lora_A.weight

    @property
    def B(self) -> torch.Tensor:
        return self.lora_embedding_B if self.kind == "embedding" else self.lora_B.weight

    @torch.no_grad()
    def reset_parameters(self, zero_start: bool) -> None:
        if self.kind == "embedding":  # as HF PEFT: A zero, B normal
            nn.init.zeros_(self.A) if zero_start else nn.init.normal_(self.A)
            nn.init.normal_(self.B)
            return
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B) if zero_start else nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, result: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if self.kind == "conv" and self.groups * self.A.shape[0] >= self.B.shape[0]:
            # A depthwise (or thinly grouped) conv: the factored path below would widen x to
            # groups*r channels, r times the output; ΔW is no larger than the base's own weight.
            h = conv_like(base_layer, self.dropout(self.adapter_input(x)), self.delta_weight(base_layer), self.groups)
            return result + h.to(result.dtype)
        # The scale goes on B (r columns), not on the (batch x d_out) output: one full-size op less.
        scaled_b = self.B.flatten(1) * self.scaling  # (d_out, r)
        if self.kind == "embedding":
            h = F.embedding(x, self.A.T) @ scaled_b.T  # (..., dim)
        elif self.kind == "linear":
            h = F.linear(self.lora_A(self.dropout(self.adapter_input(x))), scaled_b)  # (..., d_out)
        else:
            a = self.A.repeat(self.groups, *(1,) * (self.A.dim() - 1))  # (groups*r, C_in/groups, k..)
            h = conv_like(base_layer, self.dropout(self.adapter_input(x)), a, self.groups)  # (B, groups*r, ..)
            h = pointwise_conv(h, scaled_b, self.groups)  # (B, C_out, ..)
        return result + h.to(result.dtype)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        a = self.A.flatten(1)  # (r, C_in/groups * k..)
        dw = self.B.flatten(1) @ a  # (d_out, d_in/groups * k..)
        shape = (dw.shape[0], *self.A.shape[1:]) if self.kind == "conv" else dw.shape
        return self.scaling * dw.reshape(shape)

    def low_rank_factors(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.kind != "linear":
            return None
        return self.B * self.scaling, self.A  # (d_out, r), (r, d_in)
