"""Where the query, key, value and output projections of an attention block are, and its heads.

Methods that adapt projections head by head (Kernel-mix) need this; it reads the module tree of
the usual transformers layouts: BERT/RoBERTa/ViT (``query``/``key``/``value`` + ``output.dense``),
LLaMA/DINOv2 (``q_proj``..``o_proj``, grouped-query heads), GPT-2 (fused ``c_attn`` + ``c_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from structpeft.attention.hooks import is_attention_module, num_heads
from structpeft.core.layers import layer_geometry
from structpeft.core.targets import get_submodule, matches, named_modules, unwrapped, within

_ROLES = {
    "query": ("query", "q_proj"),
    "key": ("key", "k_proj"),
    "value": ("value", "v_proj"),
    "output": ("o_proj", "out_proj", "output.dense", "c_proj"),
    "fused": ("c_attn",),
}


@dataclass(frozen=True)
class AttentionAnatomy:
    """Paths relative to the block; with a fused projection, query = key = value = its path."""

    query: str
    key: str
    value: str
    output: str
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def fused(self) -> bool:
        return self.query == self.key == self.value


def _find(leaves: list[str], role: str) -> list[str]:
    return [p for p in leaves if any(matches(p, s) for s in _ROLES[role])]


def attention_anatomy(block: nn.Module, name: str = "") -> AttentionAnatomy:
    """The projections and head counts of ``block``, the module holding q, k, v and o."""
    block = unwrapped(block)
    leaves = [p for p, m in named_modules(block) if p and not list(unwrapped(m).children())]
    found = {role: _find(leaves, role) for role in _ROLES}
    fused = len(found["fused"]) == 1 and not any(found[r] for r in ("query", "key", "value"))
    roles = ("fused", "output") if fused else ("query", "key", "value", "output")
    bad = [r for r in roles if len(found[r]) != 1]
    attention = [m for _, m in named_modules(block) if is_attention_module(unwrapped(m))]
    if bad or len(attention) != 1:
        raise ValueError(
            f"module {name or '?'!r} ({type(block).__name__}) is not an attention block whose projections "
            f"structpeft can find (it needs one each of query/key/value/output and one attention module; "
            f"found {', '.join(f'{r}: {found[r]}' for r in roles)}). Target the module holding them, e.g. "
            "BERT's 'attention', LLaMA's 'self_attn', GPT-2's 'attn'."
        )
    module = attention[0]
    heads = num_heads(module)
    config = getattr(module, "config", None)
    kv_heads = getattr(module, "num_key_value_heads", None) or getattr(config, "num_key_value_heads", None) or heads
    q = found["fused"][0] if fused else found["query"][0]
    q_out = layer_geometry(unwrapped(get_submodule(block, q))).out_features
    head_dim = (q_out // 3 if fused else q_out) // heads
    if fused:
        return AttentionAnatomy(q, q, q, found["output"][0], heads, kv_heads, head_dim)
    return AttentionAnatomy(q, found["key"][0], found["value"][0], found["output"][0], heads, kv_heads, head_dim)


def attention_blocks(model: nn.Module, exclude: set[str] = frozenset()) -> list[str]:
    """Paths of the blocks holding each attention module's projections (the module or its parent)."""
    blocks = []
    for name, module in named_modules(model):
        if not name or isinstance(module, nn.MultiheadAttention) or not is_attention_module(unwrapped(module)):
            continue
        for candidate in (name, name.rpartition(".")[0]):
            try:
                attention_anatomy(get_submodule(model, candidate), candidate)
            except ValueError:
                continue
            if not within(candidate, exclude):
                blocks.append(candidate)
            break
    return blocks
