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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from structpeft.attention import AttentionAnatomy, attention_anatomy
from structpeft.core.layers import AdapterDelta, layer_geometry
from structpeft.core.targets import get_submodule, unwrapped
from structpeft.methods.kernel_mix.config import KernelMixConfig


def _weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (d_out, d_in), whatever its storage (HF Conv1D stores the transpose)."""
    return layer.weight.T if layer_geometry(layer).transposed else layer.weight


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


class _KernelMixDelta(AdapterDelta):
    """A delta made of Kernel-mix parts, each a :class:`Factors` pair, plus an output bias ``c``."""

    def __init__(self, config: KernelMixConfig) -> None:
        super().__init__()
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

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

    def delta(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return _low_rank(x, self.dropout(x), self.factors(base_layer), self.bias())

    def forward(self, x, result, base_layer):
        return result + self.delta(x.to(torch.float32), base_layer).to(result.dtype)

    def delta_weight(self, base_layer):
        return _merged_weight(self.factors(base_layer))

    def delta_bias(self, base_layer):
        return _merged_bias(self.factors(base_layer), self.bias())


class KernelMixQuery(_KernelMixDelta):
    """Q head-wise + shared, on a query projection."""

    def __init__(self, layer: nn.Module, anatomy: AttentionAnatomy, config: KernelMixConfig) -> None:
        super().__init__(config)
        d_in, width = layer_geometry(layer).in_features, anatomy.heads * anatomy.head_dim
        bias = getattr(layer, "bias", None) is not None
        if config.r_q:
            self.q = HeadwiseQuery(d_in, anatomy.heads, anatomy.head_dim, config.r_q, bias)
        if config.r_q_shared:
            self.q_shared = SharedLoRA(d_in, width, config.r_q_shared)
        self._reset(config)


class KernelMixValue(_KernelMixDelta):
    """V head-wise (driven by frozen keys) + shared, on a value projection.

    The keys come from ``key_layer``, or, when it is None, from ``key_rows`` of the adapted layer
    itself (a fused q|k|v projection). Those rows are copied at creation: another method's delta
    merged into the same fused layer changes them, and unmerging must see the keys this delta saw.
    """

    def __init__(
        self,
        layer: nn.Module,
        key_layer: nn.Module | None,
        anatomy: AttentionAnatomy,
        config: KernelMixConfig,
        key_rows: slice | None = None,
    ) -> None:
        super().__init__(config)
        d_in, width = layer_geometry(layer).in_features, anatomy.kv_heads * anatomy.head_dim
        bias = getattr(layer, "bias", None) is not None
        self._key_layer = (key_layer,)  # a reference, not a submodule: the key layer is not ours
        if key_layer is None:
            key_bias = None if layer.bias is None else layer.bias[key_rows].detach().clone()
            self.register_buffer("frozen_key_weight", _weight(layer)[key_rows].detach().clone(), persistent=False)
            self.register_buffer("frozen_key_bias", key_bias, persistent=False)
        if config.r_v:
            self.v = HeadwiseKeyDriven(anatomy.kv_heads, anatomy.head_dim, config.r_v, bias)
        if config.r_v_shared:
            self.v_shared = SharedLoRA(d_in, width, config.r_v_shared)
        self._reset(config)

    def key_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = self._key_layer[0]
        w, b = (self.frozen_key_weight, self.frozen_key_bias) if key is None else (_weight(key), key.bias)
        return w.float(), None if b is None else b.float()

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


class KernelMixFused(AdapterDelta):
    """Q and V parts on a fused q|k|v projection (GPT-2's ``c_attn``); its middle third, the keys,
    is left alone and drives V. Both run as one low-rank product whose up factor has zero key rows."""

    def __init__(self, layer: nn.Module, anatomy: AttentionAnatomy, config: KernelMixConfig) -> None:
        super().__init__()
        self.width = anatomy.heads * anatomy.head_dim
        self.query = KernelMixQuery(layer, anatomy, config)
        self.value = KernelMixValue(layer, None, anatomy, config, key_rows=slice(self.width, 2 * self.width))
        self.dropout = self.query.dropout

    def _factors(self) -> tuple[list[Factors], torch.Tensor | None]:
        """The parts with their up factors placed in the q and v thirds of the (3·D)-row output."""

        def place(f: Factors, third: int) -> Factors:
            up = f.up.new_zeros(3 * self.width, f.up.shape[1])
            up[third * self.width : (third + 1) * self.width] = f.up
            return Factors(f.down, up, f.down_bias, f.keys)

        factors = [place(f, 0) for f in self.query.factors(None)] + [place(f, 2) for f in self.value.factors(None)]
        q_bias, v_bias = self.query.bias(), self.value.bias()
        bias = None
        if q_bias is not None or v_bias is not None:
            zero = factors[0].up.new_zeros(self.width)
            bias = torch.cat([zero if q_bias is None else q_bias, zero, zero if v_bias is None else v_bias])
        return factors, bias

    def forward(self, x, result, base_layer):
        x = x.to(torch.float32)
        return result + _low_rank(x, self.dropout(x), *self._factors()).to(result.dtype)

    def delta_weight(self, base_layer):
        return _merged_weight(self._factors()[0])

    def delta_bias(self, base_layer):
        return _merged_bias(*self._factors())


def kernel_mix_deltas(block: nn.Module, name: str, config: KernelMixConfig) -> dict[str, AdapterDelta]:
    """The Kernel-mix deltas of one attention block, keyed by the projections' paths within it."""
    anatomy = attention_anatomy(block, name)

    def layer(path: str) -> nn.Module:
        return unwrapped(get_submodule(block, path))

    deltas: dict[str, AdapterDelta] = {}
    if anatomy.fused:
        deltas[anatomy.query] = KernelMixFused(layer(anatomy.query), anatomy, config)
    else:
        if config.r_q or config.r_q_shared:
            deltas[anatomy.query] = KernelMixQuery(layer(anatomy.query), anatomy, config)
        if config.r_v or config.r_v_shared:
            deltas[anatomy.value] = KernelMixValue(layer(anatomy.value), layer(anatomy.key), anatomy, config)
    if config.r_v or config.r_v_shared:
        deltas[anatomy.output] = KernelMixOutput(layer(anatomy.output), anatomy, config)
    return deltas
