"""Hooks that let a method change how attention combines its heads' maps.

A delta that mixes heads is a :class:`HeadMixer`: it lives in the attention module's
:class:`~structpeft.core.layers.ModuleAdapters` host and gives an (H, H) term ``Δ`` per forward;
the active terms add up to ``C = I + Σ Δ`` and attention runs with mixed maps
(:func:`~structpeft.attention.maps.mixed_head_attention`). With no active term (none attached,
adapters disabled) the module runs exactly the attention it ran before, without structpeft code.

- transformers models: their attention modules look the function up by
  ``config._attn_implementation`` in the ``AttentionInterface`` their forward reads
  (``ALL_ATTENTION_FUNCTIONS``; every private name of transformers this touches is read and checked in
  :mod:`structpeft.attention.transformers_interface`). While a mixer is active, a forward pre-hook on the hooked module
  puts the mixed attention under that very name in the interface's local mapping, for the length
  of that module's forward only; a forward hook (run on errors too) takes it out again. Nothing
  is renamed: the model builds its masks and takes its branches for the implementation it runs,
  a later ``set_attn_implementation`` is honoured at the next forward (or refused there if it
  forms no maps), and a module that did not look its attention up there raises rather than
  silently dropping the mixing. Unhooked modules and other models never run structpeft code: the
  mapping is process-wide, so the mixed path checks that the module calling it is the one it was
  put there for, and hands any other the function it stands in for.
- Modules that compute attention in their own code (BLOOM, GPT-J, CodeGen, MPT, a user's own
  module): found by running them once (:func:`~structpeft.attention.anatomy.forms_own_maps`); for
  the length of their forward a torch function mode mixes each softmax shaped as their heads'
  maps, and runs a direct ``F.scaled_dot_product_attention`` call (Falcon) as mixed attention. A
  forward that forms no maps raises, as above.
- ``torch.nn.MultiheadAttention``: its forward is replaced on the instance.

All bookkeeping lives on the hooked module: its hooks and its adapter host.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from structpeft.attention import transformers_interface
from structpeft.attention.anatomy import declared_heads, forms_own_maps, routes_through_interface
from structpeft.attention.maps import SOFTMAXES, as_head_maps, mix_head_maps, mixed_head_attention, softmax_dim
from structpeft.core.layers import module_host

MIXABLE_IMPLEMENTATIONS = ("sdpa", "eager")
# Keyword arguments transformers' attention modules pass that carry no maths the mixed path must
# reproduce: positions and cache bookkeeping (tensors), the window sdpa and eager masks carry, and the
# Trainer's loss normaliser.
_INERT_KWARGS = frozenset(
    {
        "position_ids",
        "cache_position",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "sliding_window",
        "is_causal",
        "num_items_in_batch",
    }
)
# Keyword arguments whose maths the mixed path reproduces ("sinks": Inkling 2's per-query sink logits).
_MATHS_KWARGS = frozenset({"position_bias", "softcap", "s_aux", "sinks"})
# Where the pre-hook leaves what it put in the interface, for the forward hook to take out.
_ROUTED = "_structpeft_routed_attention"
_MISSING = object()


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
def is_attention_module(module: nn.Module) -> bool:
    """True for modules whose head maps a :class:`HeadMixer` can reach: ``nn.MultiheadAttention``,
    transformers modules that call the AttentionInterface and declare their heads, and modules that take
    their maps' softmax in their own code (found by running them once:
    :func:`~structpeft.attention.anatomy.forms_own_maps`). A module that calls the interface with no heads
    (Inkling 2's block attention residual attends over the depth, per position) is not head attention."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    if routes_through_interface(module):
        return declared_heads(module) is not None
    return forms_own_maps(module) is True


def num_heads(module: nn.Module) -> int:
    """The number of query heads of an attention module, by the anatomy's one rule
    (:func:`~structpeft.attention.anatomy.declared_heads`)."""
    heads = declared_heads(module)
    if heads is None:
        raise ValueError(
            f"cannot tell the number of heads of {type(module).__name__}: it has no num_heads / num_attention_heads "
            "attribute, nor a per-head attribute (head_dim...) beside a config that gives the head count"
        )
    return heads


# -- transformers ---------------------------------------------------------------------------
def _causal(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether attention without a mask is causal: the call's flag, else the module's; unknown means
    not causal (an encoder must not be made causal because it forgot to say)."""
    flag = kwargs.get("is_causal")
    if flag is None:
        flag = getattr(module, "is_causal", None)
    if flag is None:
        flag = getattr(getattr(module, "config", None), "is_decoder", False)
    return bool(flag)


def _mixed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    route: _Route,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stands in for ``route.replaced`` (sdpa or eager) and takes the same arguments, with mixed maps.

    Reproduced: masks as ``replaced`` builds them (sliding windows included), ``softcap`` (tanh
    on the scores before the mask, as eager does), ``s_aux`` / ``sinks`` (sink logits joining the
    softmax denominator), ``position_bias`` (added to the scores). Anything else is refused by name.
    """
    if module is not route.owner:  # another module calling the interface during the owner's forward
        return route.fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    route.ran = True
    # Flags, counts and cache objects pass through; a tensor or a float is maths we would drop.
    unknown = sorted(
        k for k, v in kwargs.items() if isinstance(v, (torch.Tensor, float)) and k not in _INERT_KWARGS | _MATHS_KWARGS
    )
    if unknown:
        raise NotImplementedError(
            f"head mixing cannot reproduce the attention of {type(module).__name__}: it passes "
            f"{', '.join(unknown)} to the attention function, which the mixed path does not implement. "
            "Leave this module out of target_modules."
        )
    return _mixed_attention(module, query, key, value, attention_mask, scaling, dropout, route.replaced, kwargs)


def _mixed_attention(module, query, key, value, attention_mask, scaling, dropout, replaced, kwargs):
    mixers = active_mixers(module)
    heads = query.shape[1]
    # No mixer: only as the eager fallback of a module that is not hooked.
    identity = torch.eye(heads, dtype=query.dtype, device=query.device)
    mixing = head_mixing(mixers, heads, module) if mixers else identity
    n, m = query.shape[2], key.shape[2]
    position_bias = kwargs.get("position_bias")
    if attention_mask is None and replaced == "sdpa" and n > 1 and _causal(module, kwargs):
        # SDPA leaves causality implicit (is_causal), top-left aligned: keys past the queries are an empty cache.
        key, value = key[:, :, :n], value[:, :, :n]
        position_bias = None if position_bias is None else position_bias[..., :n]
        attention_mask = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
    elif attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[..., :m]  # eager attention slices masks to the key length too
    sinks = kwargs.get("s_aux") if kwargs.get("s_aux") is not None else kwargs.get("sinks")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out, maps = mixed_head_attention(
        query,
        key,
        value,
        attention_mask,
        mixing,
        scaling,
        dropout,
        module.training,
        mixers[0].chunk_size if mixers else None,
        bias=position_bias,
        softcap=kwargs.get("softcap"),
        sinks=sinks,
    )
    return out.transpose(1, 2).contiguous(), maps  # (B, N, H, d) as transformers expects


class _Route:
    """What the pre-hook put in an interface for one forward of ``owner``, to take out after."""

    def __init__(self, owner: nn.Module, interface: Any, replaced: str) -> None:
        self.owner, self.interface, self.replaced, self.ran = owner, interface, replaced, False
        self.saved = transformers_interface.local_entry(interface, replaced, _MISSING)
        self.fallback = (
            self.saved
            if self.saved is not _MISSING
            else transformers_interface.global_entry(interface, replaced)
            or functools.partial(_eager_fallback, replaced=replaced)
        )
        mixed = functools.partial(_mixed_attention_forward, route=self)
        transformers_interface.set_local_entry(interface, replaced, mixed)

    def close(self) -> None:
        if self.saved is _MISSING:
            transformers_interface.remove_local_entry(self.interface, self.replaced)
        else:
            transformers_interface.set_local_entry(self.interface, self.replaced, self.saved)

    def missed(self) -> str:
        return (
            f"{type(self.owner).__name__} did not look its {self.replaced!r} attention up in transformers' "
            "AttentionInterface, so head mixing could not act; run the model with attn_implementation='sdpa'"
        )


def _eager_fallback(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, replaced, **kwargs):
    return _mixed_attention(module, query, key, value, attention_mask, scaling, dropout, replaced, kwargs)


def _implementation(config: Any) -> str:
    """The attention implementation a module runs; one without a transformers config runs its own code."""
    return getattr(config, "_attn_implementation", None) or "eager"  # None: transformers runs eager


# -- attention in a module's own code -------------------------------------------------------
class _OwnCodeMixing(TorchFunctionMode):
    """For one forward of ``owner``, a module that computes attention in its own code: every softmax
    it takes shaped as its heads' maps (B, H, N, M) comes out mixed, ``Â = C · A``, and a call to
    ``F.scaled_dot_product_attention`` runs as mixed-map attention. Whatever the module does to its
    scores before the softmax (ALiBi, relative positions, masks) is in the maps; what it does after
    (dropout, a head mask, the product with its values) acts on the mixed maps."""

    def __init__(self, owner: nn.Module, mixers: list[HeadMixer]) -> None:
        super().__init__()
        self.owner, self.mixers, self.heads, self.ran = owner, mixers, num_heads(owner), False
        self._mixing: torch.Tensor | None = None
        self.__enter__()

    def mixing(self) -> torch.Tensor:
        if self._mixing is None:  # once per forward: one α-dropout mask for all its maps
            self._mixing = head_mixing(self.mixers, self.heads, self.owner)
        return self._mixing

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        out = func(*args, **kwargs)
        if func in SOFTMAXES and isinstance(out, torch.Tensor):
            maps = as_head_maps(out, softmax_dim(args, kwargs), self.heads)
            if maps is not None:
                self.ran = True
                return mix_head_maps(maps, self.mixing()).view(out.shape)
        return out

    def _attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.dim() != 4 or query.shape[1] != self.heads:
            raise NotImplementedError(
                f"{type(self.owner).__name__} calls scaled_dot_product_attention on queries of shape "
                f"{tuple(query.shape)}, not (batch, {self.heads} heads, tokens, head dim): head mixing cannot "
                "read its heads. Leave this module out of target_modules."
            )
        if is_causal:  # SDPA's implicit causal mask is aligned top-left
            attn_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        self.ran = True
        training = dropout_p > 0  # SDPA drops whenever dropout_p > 0
        chunks = self.mixers[0].chunk_size
        out, _ = mixed_head_attention(query, key, value, attn_mask, self.mixing(), scale, dropout_p, training, chunks)
        return out

    def close(self) -> None:
        self.__exit__(None, None, None)

    def missed(self) -> str:
        return (
            f"{type(self.owner).__name__} took no softmax shaped as its {self.heads} heads' attention maps in this "
            "forward (it may have run a fused kernel), so head mixing could not act; run the model with "
            "attn_implementation='eager'"
        )


def _refuse_unmixable(module: nn.Module, current: str, name: str = "") -> None:
    if current not in MIXABLE_IMPLEMENTATIONS:
        raise ValueError(
            f"module {name or '?'!r} ({type(module).__name__}) runs {current!r} attention, which never forms "
            "the attention maps head mixing needs; load the model with attn_implementation='sdpa' or 'eager' "
            "(or call model.set_attn_implementation('sdpa'))"
        )


def _route_through_mixing(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: while a mixer is active, this module's attention lookup finds the mixed path."""
    if not active_mixers(module) or _ROUTED in module.__dict__:  # none, or re-entered
        return
    current = _implementation(getattr(module, "config", None))
    _refuse_unmixable(module, current)
    module.__dict__[_ROUTED] = (
        _Route(module, transformers_interface.interface_of(module), current)
        if routes_through_interface(module)
        else _OwnCodeMixing(module, active_mixers(module))
    )


def _end_route(module: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook (always called, errors too): take the mixed path out of the interface again."""
    route = module.__dict__.pop(_ROUTED, None)
    if route is None:
        return
    route.close()
    if not route.ran:
        raise RuntimeError(route.missed())


def check_hookable(module: nn.Module, name: str = "") -> None:
    """Raise, naming the module and the fix, unless :func:`install` can hook ``module``."""
    if isinstance(module, nn.MultiheadAttention):
        return
    # A module named by the user whose forward the probe cannot run (None) is taken: its first forward
    # raises if it forms no maps.
    if not routes_through_interface(module) and forms_own_maps(module) is False:
        raise TypeError(
            f"module {name or '?'!r} is a {type(module).__name__}, which head mixing cannot hook: it needs a "
            "transformers attention module (one that calls the AttentionInterface), torch.nn.MultiheadAttention, "
            "or a module that declares its heads (num_heads, num_attention_heads, n_head or n_heads) and takes "
            "its maps' softmax in its own forward. Target the attention modules, or leave target_modules=None to "
            "take all of them."
        )
    _refuse_unmixable(module, _implementation(getattr(module, "config", None)), name)


def _our_hooks(hooks: dict) -> list[int]:
    return [key for key, hook in hooks.items() if hook in (_route_through_mixing, _end_route)]


def is_hooked(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return "forward" in vars(module)
    return bool(_our_hooks(module._forward_pre_hooks))


def install(module: nn.Module, name: str = "") -> None:
    """Route ``module``'s attention through the mixing hook (once, however many mixers it holds)."""
    check_hookable(module, name)
    if is_hooked(module):
        return
    if isinstance(module, nn.MultiheadAttention):
        # A partial of a module-level function, unlike a bound method, survives pickling and deepcopy.
        module.forward = functools.partial(_mixed_mha_forward, module)
        return
    module.register_forward_pre_hook(_route_through_mixing)
    module.register_forward_hook(_end_route, always_call=True)


def uninstall(module: nn.Module, leaving: HeadMixer | None = None) -> None:
    """Take the hook off ``module`` unless a mixer other than ``leaving`` still lives in its host."""
    host = module_host(module)
    others = [] if host is None else [d for d in host.modules() if isinstance(d, HeadMixer) and d is not leaving]
    if others:
        return
    if isinstance(module, nn.MultiheadAttention):
        vars(module).pop("forward", None)
        return
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in _our_hooks(hooks):
            del hooks[key]
            module._forward_hooks_always_called.pop(key, None)


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
