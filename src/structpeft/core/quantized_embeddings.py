"""A 4-bit vocabulary table: a causal LM's input embedding, and its LM head when the two are tied, stored once
in NF4 or FP4 (bitsandbytes' 4-bit formats, QLoRA, arXiv 2305.14314).

bitsandbytes and transformers quantize linear layers only. A model with a large vocabulary keeps most of its
weights in the embedding (Gemma 3 270M: 168M of its 268M parameters), so its 4-bit base stays large. Here the
table is quantized in blocks of 64 values along each row, and only the rows a step reads are dequantized: the
token ids' rows for the embedding, the vocabulary a chunk at a time for the head (forward, and again in
backward, so no full float table is ever held). The table is frozen; adapters never target it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 64  # values per absmax scale; a row of the table is a whole number of blocks
HEAD_CHUNK_ROWS = 16384  # vocabulary rows dequantized at a time by the tied head: 42 MB of float32 at d = 640


class QuantizedTable(nn.Module):
    """A (vocab, dim) float table stored in 4 bits: packed values and one float32 scale per block of a row."""

    def __init__(self, weight: torch.Tensor, quant_type: str) -> None:
        super().__init__()
        from bitsandbytes.functional import quantize_4bit

        vocab, dim = weight.shape
        if dim % BLOCK:
            raise ValueError(f"a 4-bit table needs rows of a multiple of {BLOCK} values; this one has {dim}")
        # no double quantization: its second-level scales span rows, and the table is read a few rows at a time
        packed, state = quantize_4bit(weight.detach().float(), blocksize=BLOCK, quant_type=quant_type)
        self.register_buffer("packed", packed.view(vocab, dim // 2))  # (V, d/2) uint8: two values a byte
        # The float32 scales and code book are kept as int32 bits, so that model.to(torch.bfloat16) or .half(),
        # which cast floating-point buffers, leave them exact (a CUDA kernel reads them as float32 regardless).
        self.register_buffer("absmax_bits", state.absmax.view(vocab, dim // BLOCK).view(torch.int32))  # (V, d/B)
        self.register_buffer("code_bits", state.code.float().view(torch.int32))  # the 16 values a code stands for
        state.absmax = state.code = None  # set per read, from the buffers (wherever .to() has moved them)
        self.state = state  # the format: quant_type, blocksize
        self.shape = (vocab, dim)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The float32 rows at ``index`` (any shape): (*index.shape, dim)."""
        from bitsandbytes.functional import dequantize_4bit

        dim = self.shape[1]
        state = copy.copy(self.state)
        state.code = self.code_bits.view(torch.float32)
        state.absmax = F.embedding(index.reshape(-1), self.absmax_bits).reshape(-1).view(torch.float32)
        state.shape = torch.Size((index.numel(), dim))
        state.dtype = torch.float32
        packed = F.embedding(index.reshape(-1), self.packed).reshape(-1, 1)
        return dequantize_4bit(packed, state).reshape(*index.shape, dim)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())


class QuantizedEmbedding(nn.Module):
    """An input embedding reading a :class:`QuantizedTable`, times ``scale`` where the model scales its
    embeddings (Gemma's ``embed_scale``)."""

    def __init__(self, table: QuantizedTable, scale: torch.Tensor | float | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.table, self.out_dtype = table, dtype
        self.register_buffer("scale", None if scale is None else torch.as_tensor(scale).detach().clone(), False)
        self.num_embeddings, self.embedding_dim = table.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.rows(input_ids)  # (B, T, d)
        if self.scale is not None:
            rows = rows * self.scale
        return rows.to(self.out_dtype)


class _TiedHeadProduct(torch.autograd.Function):
    """``hidden @ table.T`` with the table dequantized a chunk of rows at a time, in forward and in backward
    (the table is frozen: only the hidden states get a gradient)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, table: QuantizedTable) -> torch.Tensor:  # hidden: (..., d)
        ctx.table = table
        ctx.save_for_backward(hidden)
        vocab, logits = table.shape[0], None
        for start in range(0, vocab, HEAD_CHUNK_ROWS):
            span = _span(start, vocab, hidden.device)
            chunk = hidden @ table.rows(span).to(hidden.dtype).T  # (..., rows); bf16 under autocast
            if logits is None:  # written in place: a list of chunks and their cat would hold the logits twice
                logits = chunk.new_empty(*hidden.shape[:-1], vocab)
            logits[..., start : start + span.numel()] = chunk
        return logits  # (..., V)

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        (hidden,) = ctx.saved_tensors
        table, vocab = ctx.table, ctx.table.shape[0]
        # backward runs outside autocast: logits made in bf16 under it send a bf16 gradient to a float32 input
        grad_logits = grad_logits.to(hidden.dtype)
        grad = torch.zeros_like(hidden)
        for start in range(0, vocab, HEAD_CHUNK_ROWS):
            span = _span(start, vocab, hidden.device)
            grad += grad_logits[..., start : start + span.numel()] @ table.rows(span).to(hidden.dtype)
        return grad, None


def _span(start: int, vocab: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, min(start + HEAD_CHUNK_ROWS, vocab), device=device)


class TiedQuantizedHead(nn.Module):
    """An LM head whose weight is the (tied) input embedding's :class:`QuantizedTable`; no bias."""

    def __init__(self, table: QuantizedTable) -> None:
        super().__init__()
        self.table = table
        self.out_features, self.in_features = table.shape

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _TiedHeadProduct.apply(hidden, self.table)


def quantize_embeddings(model: nn.Module, quant_type: str = "nf4") -> int:
    """Store ``model``'s input embedding in 4 bits (``nf4`` or ``fp4``), and its LM head with it when the two
    are tied (the same parameter); an untied head is left as it is. Returns the bytes saved.

    Takes a plain ``nn.Embedding`` or a scaled one (an ``embed_scale`` attribute, as Gemma's); any other
    embedding class is refused by name, since its forward could do more than read rows."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, QuantizedEmbedding):
        return 0
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    plain = type(embedding) is nn.Embedding
    scale = getattr(embedding, "embed_scale", None)
    if not isinstance(embedding, nn.Embedding) or not (plain or scale is not None):
        raise TypeError(
            f"the input embedding is a {type(embedding).__name__}: structpeft quantizes a plain nn.Embedding or a "
            "scaled one (an embed_scale attribute); leave the embedding unquantized"
        )
    if embedding.max_norm is not None:
        raise TypeError("the input embedding renormalises its rows (max_norm): it cannot be read from 4 bits")
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embedding.weight
    if tied and getattr(head, "bias", None) is not None:
        raise TypeError("the LM head is tied to the embedding but has a bias: not supported")
    weight = embedding.weight
    before = weight.numel() * weight.element_size()
    table = QuantizedTable(weight, quant_type).to(weight.device)
    model.set_input_embeddings(QuantizedEmbedding(table, scale, weight.dtype))
    if tied:  # (a later tie_weights() fails loudly: neither module has a float weight to tie)
        model.set_output_embeddings(TiedQuantizedHead(table))
    return before - table.nbytes()
