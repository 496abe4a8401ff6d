"""Kernel-mix deltas on the q, v and o projections of an attention block (arXiv 2205.03720).

Per block, with H query heads of width d, Hkv key/value heads and model width D:

- Q, head-wise:  ``ΔQ_h = Drop(X) A_q[h]^T B_q[h]^T + c_q[h]``; A_q (H, r_q, D), B_q (H, d, r_q).
- V, head-wise and driven by the head's keys: ``ΔV_g = K_g A_v[g]^T B_v[g]^T + c_v[g]``; A_v (Hkv, r_v, d).
  ``K_g = X W_k^g + b_k^g`` is linear, so this is a LoRA on W_v whose down-projection is
  ``A_v[g] W_k^g``, formed on the fly from the frozen key weights (pre-RoPE keys).
- O, head-wise: head outputs ``O_h`` go through A_o[h] (r_v, d), then B_o (D, H·r_v), plus c_o.
- Shared: a LoRA of rank r_q_shared on W_q, of rank r_v_shared on W_v and on W_o.

Everything is linear in the layer inputs, so each delta also gives ΔW and Δb and merges.
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


class SharedLoRA(nn.Module):
    """``ΔW = B A`` with A (r, d_in), B (d_out, r), scale 1."""

    def __init__(self, d_in: int, d_out: int, r: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d_in))
        self.B = nn.Parameter(torch.empty(d_out, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.T) @ self.B.T  # (..., d_out)

    def weight(self) -> torch.Tensor:
        return self.B @ self.A  # (d_out, d_in)


class HeadwiseQuery(nn.Module):
    """``ΔQ_h = X A[h]^T B[h]^T + c[h]`` for every head h."""

    def __init__(self, d_in: int, heads: int, head_dim: int, r: int, bias: bool) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(heads, r, d_in))
        self.B = nn.Parameter(torch.empty(heads, head_dim, r))
        self.c = nn.Parameter(torch.empty(heads * head_dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads, head_dim, r = self.B.shape
        u = (x @ self.A.flatten(0, 1).T).unflatten(-1, (heads, r))  # (..., H, r)
        out = torch.einsum("...hr,hdr->...hd", u, self.B).flatten(-2)  # (..., H·d)
        return out if self.c is None else out + self.c

    def weight(self) -> torch.Tensor:
        return torch.einsum("hdr,hri->hdi", self.B, self.A).flatten(0, 1)  # (H·d, d_in)


class HeadwiseKeyDriven(nn.Module):
    """``ΔV_g = K_g A[g]^T B[g]^T + c[g]`` per key/value head g, with ``K = X W_k^T + b_k`` frozen."""

    def __init__(self, kv_heads: int, head_dim: int, r: int, bias: bool) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(kv_heads, r, head_dim))
        self.B = nn.Parameter(torch.empty(kv_heads, head_dim, r))
        self.c = nn.Parameter(torch.empty(kv_heads * head_dim)) if bias else None

    def _down(self, w_k: torch.Tensor, b_k: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The down-projection ``A[g] W_k^g`` (Hkv·r, d_in) and its bias ``A[g] b_k^g`` (Hkv·r)."""
        kv_heads, _, head_dim = self.A.shape
        w = torch.einsum("grk,gki->gri", self.A, w_k.to(self.A.dtype).view(kv_heads, head_dim, -1)).flatten(0, 1)
        if b_k is None:
            return w, None
        return w, torch.einsum("grk,gk->gr", self.A, b_k.to(self.A.dtype).view(kv_heads, head_dim)).flatten()

    def _up(self, u: torch.Tensor) -> torch.Tensor:
        kv_heads, _, r = self.B.shape
        return torch.einsum("...gr,gdr->...gd", u.unflatten(-1, (kv_heads, r)), self.B).flatten(-2)

    def forward(self, x: torch.Tensor, w_k: torch.Tensor, b_k: torch.Tensor | None) -> torch.Tensor:
        out = self._up(F.linear(x, *self._down(w_k, b_k)))  # (..., Hkv·d)
        return out if self.c is None else out + self.c

    def weight(self, w_k: torch.Tensor) -> torch.Tensor:
        return self._up(self._down(w_k, None)[0].T).T  # (Hkv·d, d_in)

    def bias(self, w_k: torch.Tensor, b_k: torch.Tensor | None) -> torch.Tensor | None:
        if b_k is None:
            return self.c
        out = self._up(self._down(w_k, b_k)[1])
        return out if self.c is None else out + self.c


class HeadwiseOutput(nn.Module):
    """Head outputs ``O_h`` through A[h] (r, d), then B (d_out, H·r), plus c."""

    def __init__(self, heads: int, head_dim: int, d_out: int, r: int, bias: bool) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(heads, r, head_dim))
        self.B = nn.Parameter(torch.empty(d_out, heads * r))
        self.c = nn.Parameter(torch.empty(d_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads, _, head_dim = self.A.shape
        u = torch.einsum("...hd,hrd->...hr", x.unflatten(-1, (heads, head_dim)), self.A).flatten(-2)  # (..., H·r)
        out = u @ self.B.T  # (..., d_out)
        return out if self.c is None else out + self.c

    def weight(self) -> torch.Tensor:
        heads, r, head_dim = self.A.shape
        return torch.einsum("ohr,hrd->ohd", self.B.view(-1, heads, r), self.A).flatten(1)  # (d_out, H·d)


class _KernelMixDelta(AdapterDelta):
    """A delta made of Kernel-mix parts; each returns its input's update, ``weight()`` and ``c``."""

    def __init__(self, config: KernelMixConfig) -> None:
        super().__init__()
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def _reset(self, config: KernelMixConfig) -> None:
        parts = list(self.children())[1:]  # all but the dropout
        biases = [m.c for m in parts if getattr(m, "c", None) is not None]
        _reset([m.A for m in parts], [m.B for m in parts] + biases, config)


class KernelMixQuery(_KernelMixDelta):
    """Q head-wise + shared, on a query projection."""

    def __init__(self, layer: nn.Module, anatomy: AttentionAnatomy, config: KernelMixConfig) -> None:
        super().__init__(config)
        geo = layer_geometry(layer)
        width = anatomy.heads * anatomy.head_dim
        bias = getattr(layer, "bias", None) is not None
        if config.r_q:
            self.q = HeadwiseQuery(geo.in_features, anatomy.heads, anatomy.head_dim, config.r_q, bias)
        if config.r_q_shared:
            self.q_shared = SharedLoRA(geo.in_features, width, config.r_q_shared)
        self._reset(config)

    def parts(self) -> list[nn.Module]:
        return [m for m in (getattr(self, "q", None), getattr(self, "q_shared", None)) if m is not None]

    def query_delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        return sum(m(x) for m in self.parts())

    def forward(self, x, result, base_layer):
        return result + self.query_delta(x.to(torch.float32)).to(result.dtype)

    def delta_weight(self, base_layer):
        return sum(m.weight() for m in self.parts())

    def delta_bias(self, base_layer):
        return getattr(getattr(self, "q", None), "c", None)


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
        geo = layer_geometry(layer)
        width = anatomy.kv_heads * anatomy.head_dim
        bias = getattr(layer, "bias", None) is not None
        self._key_layer = (key_layer,)  # a reference, not a submodule: the key layer is not ours
        if key_layer is None:
            key_bias = None if layer.bias is None else layer.bias[key_rows].detach().clone()
            self.register_buffer("frozen_key_weight", _weight(layer)[key_rows].detach().clone(), persistent=False)
            self.register_buffer("frozen_key_bias", key_bias, persistent=False)
        if config.r_v:
            self.v = HeadwiseKeyDriven(anatomy.kv_heads, anatomy.head_dim, config.r_v, bias)
        if config.r_v_shared:
            self.v_shared = SharedLoRA(geo.in_features, width, config.r_v_shared)
        self._reset(config)

    def key_weights(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = self._key_layer[0]
        w, b = (self.frozen_key_weight, self.frozen_key_bias) if key is None else (_weight(key), key.bias)
        return w.float(), None if b is None else b.float()

    def value_delta(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        parts = []
        if hasattr(self, "v"):
            parts.append(self.v(x, *self.key_weights(base_layer)))  # keys carry no adapter dropout
        if hasattr(self, "v_shared"):
            parts.append(self.v_shared(self.dropout(x)))
        return sum(parts)

    def forward(self, x, result, base_layer):
        return result + self.value_delta(x.to(torch.float32), base_layer).to(result.dtype)

    def delta_weight(self, base_layer):
        parts = [self.v.weight(self.key_weights(base_layer)[0])] if hasattr(self, "v") else []
        return sum(parts + ([self.v_shared.weight()] if hasattr(self, "v_shared") else []))

    def delta_bias(self, base_layer):
        return self.v.bias(*self.key_weights(base_layer)) if hasattr(self, "v") else None


class KernelMixOutput(_KernelMixDelta):
    """O head-wise + shared, on an output projection whose input is the heads' outputs."""

    def __init__(self, layer: nn.Module, anatomy: AttentionAnatomy, config: KernelMixConfig) -> None:
        super().__init__(config)
        geo = layer_geometry(layer)
        width = anatomy.heads * anatomy.head_dim
        bias = getattr(layer, "bias", None) is not None
        if config.r_v:
            self.o = HeadwiseOutput(anatomy.heads, anatomy.head_dim, geo.out_features, config.r_v, bias)
        if config.r_v_shared:
            self.o_shared = SharedLoRA(width, geo.out_features, config.r_v_shared)
        self._reset(config)

    def parts(self) -> list[nn.Module]:
        return [m for m in (getattr(self, "o", None), getattr(self, "o_shared", None)) if m is not None]

    def forward(self, x, result, base_layer):
        x = self.dropout(x.to(torch.float32))
        return result + sum(m(x) for m in self.parts()).to(result.dtype)

    def delta_weight(self, base_layer):
        return sum(m.weight() for m in self.parts())

    def delta_bias(self, base_layer):
        return getattr(getattr(self, "o", None), "c", None)


class KernelMixFused(AdapterDelta):
    """Q and V parts on a fused q|k|v projection (GPT-2's ``c_attn``); its middle third, the keys,
    is left alone and drives V."""

    def __init__(self, layer: nn.Module, anatomy: AttentionAnatomy, config: KernelMixConfig) -> None:
        super().__init__()
        self.width = anatomy.heads * anatomy.head_dim
        self.query = KernelMixQuery(layer, anatomy, config)
        self.value = KernelMixValue(layer, None, anatomy, config, key_rows=slice(self.width, 2 * self.width))

    @staticmethod
    def _stack(q: torch.Tensor | int, v: torch.Tensor | int, zero: torch.Tensor, dim: int) -> torch.Tensor:
        """``[q; 0; v]`` along ``dim``; q or v is 0 when that part has no parameters."""
        return torch.cat([zero + q, zero, zero + v], dim=dim)

    def forward(self, x, result, base_layer):
        x = x.to(torch.float32)
        zero = x.new_zeros(*result.shape[:-1], self.width)
        delta = self._stack(self.query.query_delta(x), self.value.value_delta(x, base_layer), zero, -1)
        return result + delta.to(result.dtype)

    def delta_weight(self, base_layer):
        zero = _weight(base_layer).new_zeros(self.width, _weight(base_layer).shape[1], dtype=torch.float32)
        return self._stack(self.query.delta_weight(base_layer), self.value.delta_weight(base_layer), zero, 0)

    def delta_bias(self, base_layer):
        if getattr(base_layer, "bias", None) is None:
            return None
        q, v = self.query.delta_bias(base_layer), self.value.delta_bias(base_layer)
        zero = base_layer.bias.new_zeros(self.width, dtype=torch.float32)
        return self._stack(0 if q is None else q, 0 if v is None else v, zero, 0)


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
