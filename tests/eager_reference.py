"""The reference Coeff-Tuning is checked against: each model's own eager attention, maps exposed.

The model's eager attention function (from its modeling file) keeps everything the model does to
its scores (soft-capping, sinks, position bias, sliding-window masks); the reference only takes
the maps its output is made of and mixes them head by head in loops, ``O_h = Σ_k C[h, k] A_k V_{g(h)}`` with
``C = I + α``. A module that computes attention in its own code (no eager function to expose) runs
its own forward with each softmax output shaped as its heads' maps replaced by the loop mix (a weaker
reference: it finds the maps where the hook does, so it checks the mixing, not where the maps are).
Used by the tests and by benchmarks/coeff_coverage.py.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from structpeft.attention.anatomy import routes_through_interface
from structpeft.attention.maps import SOFTMAXES, as_head_maps, softmax_dim


def _loop_mixed(maps: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``Â_h = Σ_k C[h, k] A_k``, one head and one map at a time; maps (B, H, N, M)."""
    heads = maps.shape[1]
    mixing = torch.eye(heads, dtype=alpha.dtype) + alpha
    return torch.stack([sum(mixing[h, k] * maps[:, k] for k in range(heads)) for h in range(heads)], 1)


def mix_maps_per_head(maps: torch.Tensor, value: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``O_h = Σ_k C[h, k] A_k V_{g(h)}``, one head at a time; maps (B, H, N, M)."""
    heads = maps.shape[1]
    group = heads // value.shape[1]
    mixed = _loop_mixed(maps, alpha)
    return torch.stack([mixed[:, h] @ value[:, h // group] for h in range(heads)], dim=1)  # (B, H, N, d)


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


class _OwnCodeReference(TorchFunctionMode):
    """For a module that computes attention in its own code: its softmax outputs shaped as its heads'
    maps, (B, H, N, M) or (B·H, N, M), are replaced by their per-head loop mixes; a direct
    ``scaled_dot_product_attention`` call is written out (scores, mask, softmax, mixed maps times values)."""

    def __init__(self, alpha: torch.Tensor) -> None:
        super().__init__()
        self.alpha, self.heads = alpha, alpha.shape[0]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._written_out(*args, **kwargs)
        out = func(*args, **kwargs)
        maps = as_head_maps(out, softmax_dim(args, kwargs), self.heads) if func in SOFTMAXES else None
        return out if maps is None else _loop_mixed(maps, self.alpha).view(out.shape)

    def _written_out(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        n, m = query.shape[2], key.shape[2]
        keys = key.repeat_interleave(query.shape[1] // key.shape[1], 1)
        scores = query @ keys.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scale is None else scale)
        if is_causal:
            attn_mask = torch.ones(n, m, dtype=torch.bool).tril()
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask is not None:
            scores = scores + attn_mask
        return mix_maps_per_head(scores.softmax(-1), value, self.alpha)


def _own_code_reference(module: nn.Module, alpha: torch.Tensor) -> list:
    """Hooks that run ``module``'s forward under :class:`_OwnCodeReference`; returns their handles."""
    mode = _OwnCodeReference(alpha)

    def enter(*_) -> None:  # a pre-hook's return value would replace the module's arguments
        mode.__enter__()

    def leave(*_) -> None:
        mode.__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]


@contextlib.contextmanager
def mixing_reference(reference: nn.Module, alphas: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``reference`` (an eager model) mixes the maps of module ``path`` by a copy of
    ``alphas[path]`` (the copies, leaves with gradients, are yielded). ``nn.MultiheadAttention``
    modules are left alone: they have no eager function to expose."""
    copies, patched, handles = {}, {}, []
    try:
        for path, alpha in alphas.items():
            module = reference.get_submodule(path)
            if isinstance(module, nn.MultiheadAttention):
                continue
            modeling = importlib.import_module(type(module).__module__)
            own = getattr(modeling, "eager_attention_forward", None)
            copies[path] = module.reference_alpha = alpha.detach().clone().requires_grad_(True)
            if own is None or not routes_through_interface(module):  # attention in its own code
                handles += _own_code_reference(module, copies[path])
                continue
            if not getattr(own, "mixes_maps", False):
                patched[modeling] = own
                modeling.eager_attention_forward = _maps_mixed(own)
        yield copies
    finally:
        for modeling, own in patched.items():
            modeling.eager_attention_forward = own
        for handle in handles:
            handle.remove()
        for path in copies:
            del reference.get_submodule(path).reference_alpha
