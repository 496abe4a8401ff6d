"""Coeff-Tuning's per-layer head mixing (arXiv 2503.18337)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from structpeft.attention import hooks
from structpeft.core.layers import AdapterDelta
from structpeft.methods.coeff.config import CoeffConfig


class CoeffDelta(AdapterDelta):
    """α (H x H) of one attention module; the attention hook mixes maps with ``I + Dropout(α)``.

    It acts inside attention, after the softmax, so it never folds into a weight.
    """

    mergeable = False
    acts_inside = True

    def __init__(self, module: nn.Module, name: str, config: CoeffConfig) -> None:
        super().__init__()
        hooks.check_hookable(module, name)
        heads = hooks.num_heads(module)
        self.dropout = config.dropout
        self.chunk_size = config.chunk_size
        self.coeff_alpha = nn.Parameter(torch.zeros(heads, heads))
        if not config.init_weights:
            nn.init.normal_(self.coeff_alpha, std=0.5)

    def mixing_delta(self) -> torch.Tensor:
        return F.dropout(self.coeff_alpha, p=self.dropout, training=self.training)  # (H, H)

    def on_attach(self, module: nn.Module) -> None:
        hooks.install(module)

    def on_detach(self, module: nn.Module) -> None:
        hooks.uninstall(module, leaving=self)

    def forward(self, *args, **kwargs):
        raise RuntimeError("CoeffDelta acts through the attention hook; it has no forward of its own")
