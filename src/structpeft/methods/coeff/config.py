"""Coeff-Tuning configuration (Miao et al., CVPR 2025, arXiv 2503.18337)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from structpeft.core.config import AdapterConfig, register_method


@register_method
@dataclass
class CoeffConfig(AdapterConfig):
    """Tune the filter subspace of attention: per attention layer an α (H x H) mixes the heads' maps,
    ``Â_h = Σ_k C[h, k] A_k`` with ``C = I + Dropout(α)``, α = 0 at start. Not mergeable.

    target_modules: None takes every attention module (transformers attention modules,
        torch.nn.MultiheadAttention, and modules that form their heads' maps in their own code);
        otherwise names them as any config does.
    dropout: on α only (inverted, one mask per forward); 0.2 is the paper's best.
    chunk_size: None materialises all maps (fastest); an int runs queries in chunks of that many,
        recomputing each chunk in the backward so memory stays bounded on long sequences.
    """

    peft_type = "COEFF"

    dropout: float = 0.2
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Coeff-Tuning dropout must be in [0, 1), got {self.dropout}")
        if self.chunk_size is not None and self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive number of queries or None, got {self.chunk_size}")

    def default_targets(self, model: nn.Module, exclude: set[str]) -> list[str]:
        from structpeft.attention import is_attention_module
        from structpeft.core.targets import named_modules, unwrapped, within

        names = [
            n for n, m in named_modules(model) if n and is_attention_module(unwrapped(m)) and not within(n, exclude)
        ]
        if not names:
            raise ValueError(
                f"Coeff-Tuning found no attention module in this {type(model).__name__}: it hooks transformers "
                "attention modules that call the AttentionInterface (sdpa or eager), torch.nn.MultiheadAttention, "
                "and modules that declare their heads (num_heads, num_attention_heads, n_head or n_heads) and form "
                "their maps with a softmax or scaled_dot_product_attention in their own forward, found by running "
                "each once on made-up hidden states. Name the attention modules in target_modules if their forward "
                "needs other inputs, or use a method that adapts the projections (LoRA, FLoRA, Kernel-mix)"
            )
        return names

    def create_delta(self, layer: nn.Module, name: str):
        from structpeft.methods.coeff.layer import CoeffDelta

        return CoeffDelta(layer, name, self)
