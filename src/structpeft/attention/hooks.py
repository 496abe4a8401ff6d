"""Hooks that let a method change how attention combines its heads' maps.

A delta that mixes heads is a :class:`HeadMixer`: it lives in the attention module's
:class:`~structpeft.core.layers.ModuleAdapters` host and gives an (H, H) term ``Δ`` per forward;
the active terms add up to ``C = I + Σ Δ`` and attention runs with mixed maps
(:func:`~structpeft.attention.maps.mixed_head_attention`). With no active term (none attached,
adapters disabled) the module runs exactly the attention it ran before.

- transformers models: their attention modules call the function that
  ``config._attn_implementation`` names in ``transformers.AttentionInterface``. :func:`install`
  registers ``structpeft+sdpa`` / ``structpeft+eager`` (attention and mask functions) and points
  the config there; the name keeps the implementation it replaces, which builds the masks and
  runs whenever no mixing is active.
- ``torch.nn.MultiheadAttention``: its forward is replaced on the instance.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from structpeft.attention.maps import mixed_head_attention
from structpeft.core.layers import module_host

PREFIX = "structpeft+"
MIXABLE_IMPLEMENTATIONS = ("sdpa", "eager")
# Attention variants whose maths the mixed path does not reproduce: refuse rather than approximate.
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "position_bias")


@runtime_checkable
class HeadMixer(Protocol):
    """A delta that adds ``mixing_delta()`` (H, H) to the identity head mixing of its module."""

    chunk_size: int | None

    def mixing_delta(self) -> torch.Tensor: ...


def active_mixers(module: nn.Module) -> list[HeadMixer]:
    host = module_host(module)
    return [] if host is None else [d for d in host.active_deltas() if isinstance(d, HeadMixer)]


def head_mixing(mixers: list[HeadMixer], heads: int, module: nn.Module) -> torch.Tensor:
    deltas = [m.mixing_delta() for m in mixers]
    for delta in deltas:
        if delta.shape != (heads, heads):
            raise ValueError(
                f"{type(module).__name__} ran {heads} heads but its head mixing is {tuple(delta.shape)}; "
                "was the adapter made for another model?"
            )
    return torch.eye(heads, device=deltas[0].device, dtype=deltas[0].dtype) + sum(deltas)


# -- which modules can be hooked ------------------------------------------------------------
@functools.cache
def _calls_attention_interface(cls: type) -> bool:
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def is_attention_module(module: nn.Module) -> bool:
    """True for modules whose head maps a :class:`HeadMixer` can reach."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    return hasattr(getattr(module, "config", None), "_attn_implementation") and _calls_attention_interface(type(module))


def num_heads(module: nn.Module) -> int:
    """The number of query heads of an attention module."""
    for attribute in ("num_heads", "num_attention_heads", "n_head"):
        value = getattr(module, attribute, None)
        if isinstance(value, int):
            return value
    value = getattr(getattr(module, "config", None), "num_attention_heads", None)
    if isinstance(value, int):
        return value
    raise ValueError(f"cannot tell the number of heads of {type(module).__name__}")


# -- transformers ---------------------------------------------------------------------------
def _model_eager_attention(module: nn.Module):
    """The eager attention of the module's own modeling file (what transformers runs for "eager")."""
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return own if own is not None else _generic_eager


def _generic_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    heads = query.shape[1]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    identity = torch.eye(heads, device=query.device, dtype=query.dtype)
    out, maps = mixed_head_attention(query, key, value, attention_mask, identity, scaling, dropout, module.training)
    return out.transpose(1, 2).contiguous(), maps


def _mixed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    replaced: str,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mixers = active_mixers(module)
    if not mixers:
        fallback = ALL_ATTENTION_FUNCTIONS.get_interface(replaced, _model_eager_attention(module))
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    unsupported = [k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if unsupported:
        raise NotImplementedError(
            f"head mixing cannot hook {type(module).__name__}: its attention uses {', '.join(unsupported)}"
        )
    n, m = query.shape[2], key.shape[2]
    if attention_mask is None and replaced == "sdpa" and n > 1:
        # SDPA masks leave causality implicit (``is_causal``), top-left aligned as sdpa_attention_forward has it.
        is_causal = kwargs.get("is_causal")
        if is_causal if is_causal is not None else getattr(module, "is_causal", True):
            key, value = key[:, :, :n], value[:, :, :n]
            attention_mask = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
    elif attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[..., :m]  # eager attention slices masks to the key length too
    mixing = head_mixing(mixers, query.shape[1], module)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out, maps = mixed_head_attention(
        query, key, value, attention_mask, mixing, scaling, dropout, module.training, mixers[0].chunk_size
    )
    return out.transpose(1, 2).contiguous(), maps  # (B, N, H, d) as transformers expects


@functools.cache
def _register_with_transformers() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for replaced in MIXABLE_IMPLEMENTATIONS:
        AttentionInterface.register(PREFIX + replaced, functools.partial(_mixed_attention_forward, replaced=replaced))
        AttentionMaskInterface.register(PREFIX + replaced, ALL_MASK_ATTENTION_FUNCTIONS[replaced])


# How many deltas use each hooked config (transformers) or module (MultiheadAttention); the hook
# comes off when the count falls to zero.
_USERS: dict[int, int] = {}


def _hooked_object(module: nn.Module) -> object:
    return module if isinstance(module, nn.MultiheadAttention) else module.config


def check_hookable(module: nn.Module, name: str = "") -> None:
    """Raise, naming the module and the fix, unless :func:`install` can hook ``module``."""
    if isinstance(module, nn.MultiheadAttention):
        return
    if not is_attention_module(module):
        raise TypeError(
            f"module {name or '?'!r} is a {type(module).__name__}, which head mixing cannot hook: it needs a "
            "transformers attention module (one that calls the AttentionInterface) or torch.nn.MultiheadAttention. "
            "Target the attention modules, or leave target_modules=None to take all of them."
        )
    current = (module.config._attn_implementation or "eager").removeprefix(PREFIX)
    if current not in MIXABLE_IMPLEMENTATIONS:
        raise ValueError(
            f"module {name or '?'!r} ({type(module).__name__}) runs {current!r} attention, which never forms "
            "the attention maps head mixing needs; load the model with attn_implementation='sdpa' or 'eager'"
        )


def install(module: nn.Module, name: str = "") -> None:
    """Route ``module``'s attention through the mixing hook; pair every call with :func:`uninstall`."""
    check_hookable(module, name)
    hooked = _hooked_object(module)
    if isinstance(module, nn.MultiheadAttention):
        module.forward = types.MethodType(_mixed_mha_forward, module)
    elif not (current := module.config._attn_implementation or "eager").startswith(PREFIX):
        _register_with_transformers()
        module.config._attn_implementation = PREFIX + current
    _USERS[id(hooked)] = _USERS.get(id(hooked), 0) + 1


def uninstall(module: nn.Module) -> None:
    """Undo one :func:`install`; the last one gives the module (or config) its own attention back."""
    hooked = _hooked_object(module)
    left = _USERS.get(id(hooked), 1) - 1
    if left > 0:
        _USERS[id(hooked)] = left
        return
    _USERS.pop(id(hooked), None)
    if isinstance(module, nn.MultiheadAttention):
        vars(module).pop("forward", None)
        return
    config = module.config
    if (config._attn_implementation or "").startswith(PREFIX):
        config._attn_implementation = config._attn_implementation.removeprefix(PREFIX)


# -- torch.nn.MultiheadAttention ------------------------------------------------------------
def _mha_projections(mha: nn.MultiheadAttention) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if mha._qkv_same_embed_dim:
        return mha.in_proj_weight.chunk(3)
    return mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight


def _mixed_mha_forward(
    mha: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    mixers = active_mixers(mha)
    if not mixers:
        return nn.MultiheadAttention.forward(
            mha, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
    if mha.bias_k is not None or mha.add_zero_attn:
        raise NotImplementedError("head mixing on nn.MultiheadAttention does not support add_bias_kv or add_zero_attn")
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    if not mha.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    batch, n, _ = query.shape
    m, heads = key.shape[1], mha.num_heads
    w_q, w_k, w_v = _mha_projections(mha)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    q = F.linear(query, w_q, b_q).view(batch, n, heads, -1).transpose(1, 2)  # (B, H, N, d)
    k = F.linear(key, w_k, b_k).view(batch, m, heads, -1).transpose(1, 2)  # (B, H, M, d)
    v = F.linear(value, w_v, b_v).view(batch, m, heads, -1).transpose(1, 2)  # (B, H, M, d)

    mask = torch.zeros(1, 1, n, m, dtype=q.dtype, device=q.device)  # additive, True/-inf = blocked in torch's MHA
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1)
    if attn_mask is not None:
        blocked = (
            attn_mask
            if attn_mask.dtype != torch.bool
            else torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
        )
        mask = mask + (blocked.view(batch, heads, n, m) if blocked.dim() == 3 else blocked)
    if key_padding_mask is not None:
        padding = key_padding_mask.to(torch.bool) if key_padding_mask.dtype == torch.bool else None
        padding = (
            torch.zeros(batch, m, dtype=q.dtype, device=q.device).masked_fill(padding, float("-inf"))
            if padding is not None
            else key_padding_mask.to(q.dtype)
        )
        mask = mask + padding.view(batch, 1, 1, m)

    mixing = head_mixing(mixers, heads, mha)
    scaling = q.shape[-1] ** -0.5
    dropout = mha.dropout if mha.training else 0.0
    out, maps = mixed_head_attention(q, k, v, mask, mixing, scaling, dropout, mha.training, mixers[0].chunk_size)
    out = mha.out_proj(out.transpose(1, 2).reshape(batch, n, -1))  # (B, N, D)
    if not mha.batch_first:
        out = out.transpose(0, 1)
    if not batched:
        out = out.squeeze(1)
    weights = None
    if need_weights and maps is not None:
        weights = maps.mean(1) if average_attn_weights else maps
        weights = weights if batched else weights.squeeze(0)
    return out, weights
