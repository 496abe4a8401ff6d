"""Kernel-mix deltas on the q, v and o projections of an attention block (arXiv 2205.03720).

Per block, with H query heads of width d, Hkv key/value heads and model width D:

- Q, head-wise:  ``ΔQ_h = Drop(X) A_q[h]^T B_q[h]^T + c_q[h]``; A_q (H, r_q, D), B_q (H, d, r_q).
- V, head-wise and driven by the head's keys: ``ΔV_g = K_g A_v[g]^T B_v[g]^T + c_v[g]``; A_v (Hkv, r_v, d).
  ``K_g = X W_k^g + b_k^g`` is linear, so this is a LoRA on W_v whose down-projection is
  ``A_v[g] W_k^g``, formed on the fly from the frozen key weights (pre-RoPE keys).
- O, head-wise: head outputs ``O_h`` go through A_o[h] (r_v, d), then B_o (D, H·r_v), plus c_o.
- Shared: a LoRA of rank r_q_shared on W_q, of rank r_v_shared on W_v and on W_o.

Everything is linear in the layer inputs, so each delta also gives ΔW and Δb and merges. For
speed, each part is written as a factor pair (down (r, d_in), up (d_out, r)), the per-head factors
as block-diagonal matrices; a delta's parts then run as one low-rank product ``up · down · x``
(two matmuls) instead of a string of small per-head ones.

Where the heads' rows lie in a projection comes from :func:`~structpeft.attention.attention_anatomy`:
a part whose rows are not its layer's whole output in order (a fused q|k|v projection, GPT-NeoX's
rows interleaved per head) writes its up factor and bias into those rows, zeros elsewhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from structpeft.attention import AttentionAnatomy, attention_anatomy
from structpeft.core.layers import AdapterDelta, layer_geometry
from structpeft.core.quantized import dense_weight, quant_backend
from structpeft.core.targets import get_submodule, unwrapped
from structpeft.methods.kernel_mix.config import KernelMixConfig


def _weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (d_out, d_in), whatever its storage (HF Conv1D stores the transpose; a quantized
    layer is dequantized). Read when a delta is made; a step reads a float key layer's weight directly."""
    return layer.weight.T if layer_geometry(layer).transposed else dense_weight(layer)


@torch.no_grad()
def _reset(down: list[nn.Parameter], up: list[nn.Parameter], config: KernelMixConfig) -> None:
    """``down`` are the A factors, ``up`` the B factors and biases that make the zero start."""
    if not config.init_weights or config.init == "paper":
        for p in down + up:  # init_weights=False: a clearly non-zero start, for tests
            nn.init.normal_(p, std=0.01 if config.init_weights else 0.1)
        return
    for p in down:  # LoRA's A init, per head: the fan-in is the last dimension
        bound = 1 / math.sqrt(p.shape[-1])
        nn.init.uniform_(p, -bound, bound)
    for p in up:
        nn.init.zeros_(p)


def _block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """(H, p, q) blocks -> the (H·p, H·q) block-diagonal matrix (differentiable)."""
    heads, p, q = blocks.shape
    eye = torch.eye(heads, dtype=blocks.dtype, device=blocks.device)
    return torch.einsum("hpq,hg->hpgq", blocks, eye).reshape(heads * p, heads * q)


class Factors:
    """One part's factors: ``Δy = up · (down · x + down_bias)``; ``keys`` marks a part whose input
    is the layer input without adapter dropout (V's key-driven part)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, down_bias: torch.Tensor | None = None, keys=False):
        self.down, self.up, self.down_bias, self.keys = down, up, down_bias, keys


class SharedLoRA(nn.Module):
    """``ΔW = B A`` with A (r, d_in), B (d_out, r), scale 1."""

    def __init__(self, d_in: int, d_out: int, r: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d_in))
        self.B = nn.Parameter(torch.empty(d_out, r))

    def factors(self) -> Factors:
        return Factors(self.A, self.B)


class HeadwiseQuery(nn.Module):
    """``ΔQ_h = X A[h]^T B[h]^T + c[h]`` for every head h."""

    def __init__(self, d_in: int, heads: int, head_dim: int, r: int, bias: bool) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(heads, r, d_in))
        self.B = nn.Parameter(torch.empty(heads, head_dim, r))
        self.c = nn.Parameter(torch.empty(heads * head_dim)) if bias else None

    def factors(self) -> Factors:
        return Factors(self.A.flatten(0, 1), _block_diagonal(self.B))  # (H·r, d_in), (H·d, H·r)


class HeadwiseKeyDriven(nn.Module):
    """``ΔV_g = K_g A[g]^T B[g]^T + c[g]`` per key/value head g, with ``K = X W_k^T + b_k`` frozen."""

    def __init__(self, kv_heads: int, head_dim: int, r: int, bias: bool) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(kv_heads, r, head_dim))
        self.B = nn.Parameter(torch.empty(kv_heads, head_dim, r))
        self.c = nn.Parameter(torch.empty(kv_heads * head_dim)) if bias else None

    def factors(self, w_k: torch.Tensor, b_k: torch.Tensor | None) -> Factors:
        kv_heads, _, head_dim = self.A.shape
        # The down-projection A[g] W_k^g (Hkv·r, d_in) and its bias A[g] b_k^g: keys never formed.
        down = torch.einsum("grk,gki->gri", self.A, w_k.view(kv_heads, head_dim, -1)).flatten(0, 1)
        down_bias = None if b_k is None else torch.einsum("grk,gk->gr", self.A, b_k.view(kv_heads, head_dim)).flatten()
        return Factors(down, _block_diagonal(self.B), down_bias, keys=True)


class HeadwiseOutput(nn.Module):
    """Head outputs ``O_h`` through A[h] (r, d), then B (d_out, H·r), plus c."""

    def __init__(self, heads: int, head_dim: int, d_out: int, r: int, bias: bool) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(heads, r, head_dim))
        self.B = nn.Parameter(torch.empty(d_out, heads * r))
        self.c = nn.Parameter(torch.empty(d_out)) if bias else None

    def factors(self) -> Factors:
        return Factors(_block_diagonal(self.A), self.B)  # (H·r, H·d), (d_out, H·r)


def _low_rank(x: torch.Tensor, dropped: torch.Tensor, factors: list[Factors], bias: torch.Tensor | None):
    """``Σ_i up_i (down_i x_i + b_i) + bias`` as one product: the downs of each input stacked."""
    u, ups = [], []
    for keys in (True, False):
        group = [f for f in factors if f.keys == keys]
        if not group:
            continue
        biases = [f.down_bias for f in group]
        down_bias = None
        if any(b is not None for b in biases):
            down_bias = torch.cat(
                [b if b is not None else f.down.new_zeros(len(f.down)) for f, b in zip(group, biases)]
            )
        u.append(F.linear(x if keys else dropped, torch.cat([f.down for f in group]), down_bias))  # (..., Σr)
        ups += [f.up for f in group]
    return F.linear(torch.cat(u, -1) if len(u) > 1 else u[0], torch.cat(ups, 1), bias)  # (..., d_out)


def _merged_weight(factors: list[Factors]) -> torch.Tensor:
    return sum(f.up @ f.down for f in factors)


def _merged_bias(factors: list[Factors], bias: torch.Tensor | None) -> torch.Tensor | None:
    biases = [f.up @ f.down_bias for f in factors if f.down_bias is not None] + ([bias] if bias is not None else [])
    return sum(biases) if biases else None


def _row_index(rows: tuple[int, ...], out_features: int) -> torch.Tensor | None:
    """The rows a part writes in its layer's output; None where it fills the whole output in order."""
    return None if rows == tuple(range(out_features)) else torch.tensor(rows, dtype=torch.long)


class _LowRankParts(AdapterDelta):
    """A delta that is a sum of factor pairs plus a bias, in its layer's output coordinates
    (:meth:`placed`): one forward, one ΔW and one Δb for every Kernel-mix delta."""

    dropout: nn.Module

    def placed(self, base_layer: nn.Module) -> tuple[list[Factors], torch.Tensor | None]:
        raise NotImplementedError

    def forward(self, x, result, base_layer):
        x = self.adapter_input(x)
        return result + _low_rank(x, self.dropout(x), *self.placed(base_layer)).to(result.dtype)

    def delta_weight(self, base_layer):
        return _merged_weight(self.placed(base_layer)[0])

    def delta_bias(self, base_layer):
        return _merged_bias(*self.placed(base_layer))


class _KernelMixDelta(_LowRankParts):
    """A delta made of Kernel-mix parts, each a :class:`Factors` pair, plus an output bias ``c``.

    ``rows``: where the parts' outputs go in the layer's output (a fused projection's query rows,
    say, GPT-NeoX's interleaved per head); None when they are the whole output, in order.
    """

    def __init__(self, config: KernelMixConfig, rows: torch.Tensor | None = None, out_features: int = 0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.out_features = out_features
        self.register_buffer("rows", rows, persistent=False)

    def parts(self) -> list[nn.Module]:
        return [m for m in self.children() if not isinstance(m, nn.Dropout | nn.Identity)]

    def _reset(self, config: KernelMixConfig) -> None:
        parts = self.parts()
        biases = [m.c for m in parts if getattr(m, "c", None) is not None]
        _reset([m.A for m in parts], [m.B for m in parts] + biases, config)

    def factors(self, base_layer: nn.Module) -> list[Factors]:
        return [m.factors() for m in self.parts()]

    def bias(self) -> torch.Tensor | None:
        return next((m.c for m in self.parts() if getattr(m, "c", None) is not None), None)

    def _placed(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (n, ...) written into ``rows`` of a zero (out_features, ...) tensor."""
        if self.rows is None:
            return t
        return t.new_zeros(self.out_features, *t.shape[1:]).index_copy(0, self.rows, t)

    def placed(self, base_layer: nn.Module) -> tuple[list[Factors], torch.Tensor | None]:
        """The factors and bias in the layer's output coordinates."""
        factors = [Factors(f.down, self._placed(f.up), f.down_bias, f.keys) for f in self.factors(base_layer)]
        bias = self.bias()
        return factors, None if bias is None else self._placed(bias)


class KernelMixQuery(_KernelMixDelta):
    """Q head-wise + shared, on the query rows of a projection."""

    def __init__(self, layer: nn.Module, anatomy: AttentionAnatomy, config: KernelMixConfig) -> None:
        geometry = layer_geometry(layer)
        super().__init__(config, _row_index(anatomy.query_rows, geometry.out_features), geometry.out_features)
        width = anatomy.heads * anatomy.head_dim
        bias = getattr(layer, "bias", None) is not None
        if config.r_q:
            self.q = HeadwiseQuery(geometry.in_features, anatomy.heads, anatomy.head_dim, config.r_q, bias)
        if config.r_q_shared:
            self.q_shared = SharedLoRA(geometry.in_features, width, config.r_q_shared)
        self._reset(config)


class KernelMixValue(_KernelMixDelta):
    """V head-wise (driven by frozen keys) + shared, on the value rows of a projection.

    The keys are ``anatomy.key_rows`` of ``key_layer``, or, when it is None, of the adapted layer
    itself (a fused projection). Those are copied at creation: another method's delta merged into
    the same fused layer changes them, and unmerging must see the keys this delta saw.
    """

    def __init__(
        self, layer: nn.Module, key_layer: nn.Module | None, anatomy: AttentionAnatomy, config: KernelMixConfig
    ) -> None:
        geometry = layer_geometry(layer)
        super().__init__(config, _row_index(anatomy.value_rows, geometry.out_features), geometry.out_features)
        width = anatomy.kv_heads * anatomy.head_dim
        bias = getattr(layer, "bias", None) is not None
        if key_layer is not None and quant_backend(key_layer) is not None:
            # A quantized key layer is dequantized once, here, not at every step: its key rows are kept as
            # a float copy (d_kv x d_in per layer), as for a fused projection.
            key_layer, layer_with_keys = None, key_layer
        else:
            layer_with_keys = layer
        self._key_layer = (key_layer,)  # a reference, not a submodule: the key layer is not ours
        if key_layer is None:
            key_out = layer_geometry(layer_with_keys).out_features
            key_rows = _row_index(anatomy.key_rows, key_out)
            key_rows = torch.arange(key_out) if key_rows is None else key_rows
            bias_k = getattr(layer_with_keys, "bias", None)
            key_bias = None if bias_k is None else bias_k[key_rows].detach().clone()
            key_weight = _weight(layer_with_keys)[key_rows].detach().clone()
            self.register_buffer("frozen_key_weight", key_weight, persistent=False)
            self.register_buffer("frozen_key_bias", key_bias, persistent=False)
        else:
            key_geometry = layer_geometry(key_layer)
            self._key_transposed = key_geometry.transposed  # fixed here: a step does no layer checks
            self.register_buffer("key_rows", _row_index(anatomy.key_rows, key_geometry.out_features), persistent=False)
        if config.r_v:
            self.v = HeadwiseKeyDriven(anatomy.kv_heads, anatomy.head_dim, config.r_v, bias)
        if config.r_v_shared:
            self.v_shared = SharedLoRA(geometry.in_features, width, config.r_v_shared)
        self._reset(config)

    def key_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = self._key_layer[0]
        if key is None:
            w, b = self.frozen_key_weight, self.frozen_key_bias
        else:
            w, b = (key.weight.T if self._key_transposed else key.weight), key.bias
            if self.key_rows is not None:
                w, b = w[self.key_rows], None if b is None else b[self.key_rows]
        dtype = self.compute_dtype  # the frozen keys meet the adapter's factors in the adapter's dtype
        return w.to(dtype), None if b is None else b.to(dtype)

    def factors(self, base_layer: nn.Module) -> list[Factors]:
        v = getattr(self, "v", None)
        shared = getattr(self, "v_shared", None)
        return ([v.factors(*self.key_weights())] if v is not None else []) + (
            [shared.factors()] if shared is not None else []
        )


class KernelMixOutput(_KernelMixDelta):
    """O head-wise + shared, on an output projection whose input is the heads' outputs."""

    def __init__(self, layer: nn.Module, anatomy: AttentionAnatomy, config: KernelMixConfig) -> None:
        super().__init__(config)
        d_out, width = layer_geometry(layer).out_features, anatomy.heads * anatomy.head_dim
        bias = getattr(layer, "bias", None) is not None
        if config.r_v:
            self.o = HeadwiseOutput(anatomy.heads, anatomy.head_dim, d_out, config.r_v, bias)
        if config.r_v_shared:
            self.o_shared = SharedLoRA(width, d_out, config.r_v_shared)
        self._reset(config)


class KernelMixFused(_LowRankParts):
    """Q and V parts on one projection that makes both (GPT-2's ``c_attn``, GPT-NeoX's
    ``query_key_value``, Phi-3's ``qkv_proj``): one low-rank product whose up factor is zero on the
    rows neither writes (the keys, which drive V)."""

    def __init__(
        self, layer: nn.Module, key_layer: nn.Module | None, anatomy: AttentionAnatomy, config: KernelMixConfig
    ) -> None:
        super().__init__()
        self.query = KernelMixQuery(layer, anatomy, config)
        self.value = KernelMixValue(layer, key_layer, anatomy, config)
        self.dropout = self.query.dropout

    def placed(self, base_layer: nn.Module) -> tuple[list[Factors], torch.Tensor | None]:
        (q_factors, q_bias), (v_factors, v_bias) = self.query.placed(base_layer), self.value.placed(base_layer)
        biases = [b for b in (q_bias, v_bias) if b is not None]
        return q_factors + v_factors, sum(biases) if biases else None


def kernel_mix_deltas(block: nn.Module, name: str, config: KernelMixConfig) -> dict[str, AdapterDelta]:
    """The Kernel-mix deltas of one attention block, keyed by the projections' paths within it."""
    anatomy = attention_anatomy(block, name)

    def layer(path: str) -> nn.Module:
        return unwrapped(get_submodule(block, path))

    # Keys in the value layer itself are copied by the delta; a separate key layer is read live.
    key_layer = None if anatomy.key == anatomy.value else layer(anatomy.key)
    adapts_q, adapts_v = bool(config.r_q or config.r_q_shared), bool(config.r_v or config.r_v_shared)
    deltas: dict[str, AdapterDelta] = {}
    if adapts_q and adapts_v and anatomy.query == anatomy.value:
        deltas[anatomy.query] = KernelMixFused(layer(anatomy.query), key_layer, anatomy, config)
    else:
        if adapts_q:
            deltas[anatomy.query] = KernelMixQuery(layer(anatomy.query), anatomy, config)
        if adapts_v:
            deltas[anatomy.value] = KernelMixValue(layer(anatomy.value), key_layer, anatomy, config)
    if adapts_v:
        deltas[anatomy.output] = KernelMixOutput(layer(anatomy.output), anatomy, config)
    return deltas
