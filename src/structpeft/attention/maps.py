"""Attention with mixed head maps, as pure tensor code (Coeff-Tuning, arXiv 2503.18337).

Each head's map ``A_k = softmax(Q_k K_{g(k)}^T · s + M)`` is a filter; the output of head h uses
the mix ``Â_h = Σ_k C[h, k] A_k`` of all H maps: ``O_h = Â_h V_{g(h)}``, where ``g`` sends a query
head to its key/value head (grouped-query attention; g(h) = h without it).

Two paths give the same outputs and gradients:

- materialised: all maps at once; autograd keeps the (B, H, N, M) maps for the backward.
- query-chunked: queries in chunks, each chunk recomputed in the backward
  (``torch.utils.checkpoint``), so at most one chunk's maps are alive at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = attend) as 0 / most-negative values; float masks are already additive."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def mix_head_maps(maps: torch.Tensor, mixing: torch.Tensor) -> torch.Tensor:
    """``Â_h = Σ_k C[h, k] A_k``: maps (B, H, N, M) mixed over the head axis by ``mixing`` (H, H)."""
    batch, heads = maps.shape[:2]
    # One batched matmul: an explicit bmm was 2.4x faster, forward + backward, than matmul's
    # broadcasting of C (measured on DINOv2-S maps).
    mixing = mixing.to(maps.dtype).expand(batch, heads, heads)
    return mixing.bmm(maps.reshape(batch, heads, -1)).view(maps.shape)


# The functions attention code takes its maps' softmax with (nn.Softmax calls the first).
SOFTMAXES = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax})


def softmax_dim(args: tuple, kwargs: dict) -> int | None:
    """The ``dim`` of a call to one of :data:`SOFTMAXES` (``input, dim, ...`` in each)."""
    return args[1] if len(args) > 1 else kwargs.get("dim")


def as_head_maps(probabilities: torch.Tensor, dim: int | None, heads: int) -> torch.Tensor | None:
    """A softmax output seen as attention maps (B, H, N, M), or None when it cannot be ``heads`` heads'
    maps: it must be normalised over its last axis (the keys) and lay the heads out as (B, H, N, M)
    or, in older modelling code, as (B·H, N, M) (batch-major, as ``view(B * H, N, M)`` makes it)."""
    if not probabilities.is_floating_point() or dim is None or dim not in (-1, probabilities.dim() - 1):
        return None
    if probabilities.dim() == 4 and probabilities.shape[1] == heads:
        return probabilities
    if probabilities.dim() == 3 and probabilities.shape[0] % heads == 0:
        return probabilities.view(-1, heads, *probabilities.shape[1:])
    return None


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    mixing: torch.Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, n, d = query.shape  # (B, H, N, d)
    kv_heads, m = key.shape[1], key.shape[2]  # key, value: (B, Hkv, M, d)
    group = heads // kv_heads
    # Grouped heads share their key: fold the group into the query axis instead of copying keys.
    # The scale goes on the queries, (N, d) per head, not on the (N, M) scores: one map-sized op less.
    q = (query * scaling).reshape(batch, kv_heads, group * n, d)  # (B, Hkv, G·N, d)
    scores = (q @ key.transpose(-1, -2)).view(batch, heads, n, m)  # (B, H, N, M)
    if softcap is not None:  # Gemma 2: the cap bends the scaled scores, before bias and mask
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores + mask
    if sinks is not None:
        # gpt-oss: each head's sink logit joins the softmax denominator, and its column is dropped after.
        sink = sinks.to(scores.dtype)
        sink = (sink.view(1, heads, 1, 1) if sink.dim() == 1 else sink).expand(batch, heads, n, 1)
        logits = torch.cat([scores, sink], dim=-1)  # (B, H, N, M + 1)
        logits = logits - logits.amax(dim=-1, keepdim=True)
        maps = F.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)[..., :m].contiguous()
    elif scores.dtype in (torch.float16, torch.bfloat16):  # softmax in float32, as transformers' eager does
        maps = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    else:
        maps = F.softmax(scores, dim=-1)  # (B, H, N, M)
    mixed = mix_head_maps(maps, mixing)  # (B, H, N, M)
    if dropout_p > 0 and training:
        mixed = F.dropout(mixed, p=dropout_p)
    out = mixed.view(batch, kv_heads, group * n, m) @ value  # (B, Hkv, G·N, d)
    return out.view(batch, heads, n, value.shape[-1]), mixed


def mixed_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    mixing: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    chunk_size: int | None = None,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention whose head maps are mixed by ``mixing`` (H, H).

    query (B, H, N, d); key and value (B, Hkv, M, d) with H a multiple of Hkv; ``mask`` boolean
    (True = attend) or additive, broadcastable to (B, H, N, M). Returns the outputs (B, H, N, d)
    and, on the materialised path, the mixed maps (B, H, N, M) (None when chunked).

    The maps are those of the variants transformers' eager attention has: ``softcap`` caps the
    scaled scores (``c · tanh(s / c)``), ``bias`` (additive, like ``mask``: a relative position
    bias) is added to them, and ``sinks`` (H,) are per-head logits that join each row's softmax
    denominator without a value of their own (or (B, H, N, 1): one per query).
    """
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads or mixing.shape != (heads, heads):
        raise ValueError(
            f"head mixing {tuple(mixing.shape)} does not fit {heads} query heads over {kv_heads} key/value heads"
        )
    mask = additive_mask(mask, query.dtype)
    if mask is not None and mask.dim() == 4 and mask.shape[1] not in (1, heads):
        raise ValueError(f"attention mask with {mask.shape[1]} heads for {heads} query heads")
    n = query.shape[2]
    if chunk_size is None or chunk_size >= n:
        return _attend(query, key, value, mask, mixing, scaling, dropout_p, training, bias, softcap, sinks)

    outs = []
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        chunk_mask = mask if mask is None or mask.shape[-2] == 1 else mask[..., rows, :]
        chunk_bias = bias if bias is None or bias.shape[-2] == 1 else bias[..., rows, :]
        chunk_sinks = sinks if sinks is None or sinks.dim() == 1 or sinks.shape[-2] == 1 else sinks[..., rows, :]
        out, _ = checkpoint(
            _attend,
            query[:, :, rows],
            key,
            value,
            chunk_mask,
            mixing,
            scaling,
            dropout_p,
            training,
            chunk_bias,
            softcap,
            chunk_sinks,
            use_reentrant=False,
        )
        outs.append(out)
    return torch.cat(outs, dim=2), None
