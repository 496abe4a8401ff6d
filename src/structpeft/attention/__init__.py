"""Attention-level machinery kept apart from weight adapters: mixed-map attention, the hooks that
put it into transformers' and torch's attention, and the anatomy of attention blocks."""

from structpeft.attention.anatomy import AttentionAnatomy, attention_anatomy, attention_blocks
from structpeft.attention.hooks import HeadMixer, is_attention_module, num_heads
from structpeft.attention.maps import mixed_head_attention

__all__ = [
    "AttentionAnatomy",
    "HeadMixer",
    "attention_anatomy",
    "attention_blocks",
    "is_attention_module",
    "mixed_head_attention",
    "num_heads",
]
