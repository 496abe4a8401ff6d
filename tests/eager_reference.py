"""The reference Coeff-Tuning is checked against: each model's own eager attention, maps exposed.

The model's eager attention function (from its modeling file) keeps everything the model does to
its scores (soft-capping, sinks, position bias, sliding-window masks); the reference only takes
the maps its output is made of and mixes them head by head in loops, ``O_h = Σ_k C[h, k] A_k V_{g(h)}`` with
``C = I + α``. Used by the tests and by benchmarks/coeff_coverage.py.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
from torch import nn


def mix_maps_per_head(maps: torch.Tensor, value: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``O_h = Σ_k C[h, k] A_k V_{g(h)}``, one head and one map at a time; maps (B, H, N, M)."""
    heads = maps.shape[1]
    group = heads // value.shape[1]
    mixing = torch.eye(heads, dtype=alpha.dtype) + alpha
    out = []
    for h in range(heads):
        mixed = sum(mixing[h, k] * maps[:, k] for k in range(heads))  # (B, N, M)
        out.append(mixed @ value[:, h // group])
    return torch.stack(out, dim=1)  # (B, H, N, d)


def effective_maps(own_eager, module, query, key, value, attention_mask, *args, **kwargs) -> torch.Tensor:
    """The maps the eager function's output is made of, ``out_h = E_h V_{g(h)}``: its outputs for
    the columns of the identity as values (attention is linear in them), fed d at a time so that
    the values keep their width (GPT-2 scales by it). Unlike the maps it returns, these carry
    whatever it does after the softmax too (granite_swa scales outputs by its sinks)."""
    batch, kv_heads, m, d = value.shape
    blocks = -(-m // d)
    identity = torch.eye(m, blocks * d, dtype=value.dtype)  # (M, d·blocks), zero-padded columns
    columns = []
    for block in identity.split(d, dim=1):
        out, _ = own_eager(module, query, key, block.expand(batch, kv_heads, m, d), attention_mask, *args, **kwargs)
        columns.append(out)  # (B, N, H, d)
    return torch.cat(columns, dim=-1)[..., :m].transpose(1, 2)  # (B, H, N, M)


def _maps_mixed(own_eager):
    def forward(module, query, key, value, attention_mask, *args, **kwargs):
        alpha = getattr(module, "reference_alpha", None)
        out, maps = own_eager(module, query, key, value, attention_mask, *args, **kwargs)
        if alpha is None:
            return out, maps
        effective = effective_maps(own_eager, module, query, key, value, attention_mask, *args, **kwargs)
        return mix_maps_per_head(effective, value, alpha).transpose(1, 2).contiguous(), maps

    forward.mixes_maps = True
    return forward


@contextlib.contextmanager
def mixing_reference(reference: nn.Module, alphas: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``reference`` (an eager model) mixes the maps of module ``path`` by a copy of
    ``alphas[path]`` (the copies, leaves with gradients, are yielded). ``nn.MultiheadAttention``
    modules are left alone: they have no eager function to expose."""
    copies, patched = {}, {}
    try:
        for path, alpha in alphas.items():
            module = reference.get_submodule(path)
            if isinstance(module, nn.MultiheadAttention):
                continue
            modeling = importlib.import_module(type(module).__module__)
            own = getattr(modeling, "eager_attention_forward", None)
            if own is None:
                raise LookupError(f"{modeling.__name__} has no eager_attention_forward to take maps from")
            copies[path] = module.reference_alpha = alpha.detach().clone().requires_grad_(True)
            if not getattr(own, "mixes_maps", False):
                patched[modeling] = own
                modeling.eager_attention_forward = _maps_mixed(own)
        yield copies
    finally:
        for modeling, own in patched.items():
            modeling.eager_attention_forward = own
        for path in copies:
            del reference.get_submodule(path).reference_alpha
