"""Tiny models built in code, each with the inputs it takes and the configs that adapt it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 20)
        self.head = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class ConvNet(nn.Module):
    """A plain conv (stride, padding, dilation), a depthwise one and a grouped one, in N dims."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv = conv(3, 8, 3, stride=2, padding=1, dilation=1)
        self.depthwise = conv(8, 8, 3, padding=2, dilation=2, groups=8)
        self.grouped = conv(8, 6, 3, padding=1, groups=2, padding_mode="reflect")
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.grouped(torch.relu(self.depthwise(torch.relu(self.conv(x)))))
        return self.head(h.flatten(2).mean(-1))


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids).mean(1))


# A 2-layer, 4-head, 32-wide BERT-style encoder with a 2-class head.
_ENCODER = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    num_labels=2,
)


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(**_ENCODER))


def tiny_roberta() -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(**_ENCODER, pad_token_id=1))


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def tiny_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=28, patch_size=14
    )
    return ViTForImageClassification(cfg)


def tiny_dinov2() -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=28, patch_size=14
    )
    return Dinov2Model(cfg)


class MHANet(nn.Module):
    """torch's own attention: nn.MultiheadAttention called with a key padding mask."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.ff = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, _ = self.attn(h, h, h, key_padding_mask=padding, need_weights=False)
        return self.head(torch.relu(self.ff(h + a)).mean(1))


def _mha_inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, -2:] = True
    return {"x": torch.randn(2, 5, 6, generator=g), "padding": padding}


def _pixels(seed: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(seed))}


def _ids(seed: int, vocab: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask}


@dataclass
class Case:
    """A model factory, an input factory, and per method the target modules it adapts."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict[str, torch.Tensor]]
    targets: list[str] | str
    modules_to_save: list[str] | None = None
    flora_r: int | list[int] = 4
    linear_targets: list[str] | str | None = None  # for methods that adapt linear layers only (SURM)
    attention: str | None = None  # "hf" (transformers attention) or "mha" (nn.MultiheadAttention)
    # False where the base model's own output depends on autograd being needed: torch's
    # MultiheadAttention takes a fused fast path only when no input requires grad (equal to ~1e-7).
    bitwise: bool = True


def _tensor(shape: tuple[int, ...], key: str = "x") -> Callable[[int], dict[str, torch.Tensor]]:
    return lambda seed: {key: torch.randn(shape, generator=torch.Generator().manual_seed(seed))}


CASES = [
    Case("mlp", MLP, _tensor((4, 10)), ["lin0", "lin1"], modules_to_save=["head"], linear_targets=["lin0", "lin1"]),
    Case("conv1d", lambda: ConvNet(1), _tensor((2, 3, 12)), ["conv", "depthwise", "grouped"]),
    Case("conv2d", lambda: ConvNet(2), _tensor((2, 3, 10, 10)), ["conv", "depthwise", "grouped"]),
    Case("conv3d", lambda: ConvNet(3), _tensor((2, 3, 6, 6, 6)), ["conv", "depthwise", "grouped"]),
    Case(
        "embedding",
        EmbeddingNet,
        lambda s: {"ids": torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(s))},
        ["emb", "out"],
    ),
    Case(
        "bert",
        tiny_bert,
        _ids,
        ["query", "value", "attention.output.dense"],
        modules_to_save=["classifier"],
        linear_targets=["query", "value", "attention.output.dense"],
        attention="hf",
    ),
    Case("gpt2", tiny_gpt2, _ids, ["c_attn", "mlp.c_proj"], linear_targets=["c_attn", "mlp.c_proj"], attention="hf"),
    Case(
        "llama",
        tiny_llama,
        _ids,
        r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj|model\.embed_tokens",
        linear_targets=r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",  # k/v are 32 -> 16 (GQA)
        attention="hf",
    ),
    Case(
        "vit",
        tiny_vit,
        _pixels,
        ["q_proj", "v_proj", "patch_embeddings.projection"],
        modules_to_save=["classifier"],
        linear_targets=["q_proj", "v_proj"],
        attention="hf",
    ),
    Case("dinov2", tiny_dinov2, _pixels, ["q_proj", "o_proj"], linear_targets=["q_proj", "o_proj"], attention="hf"),
    Case(
        "mha",
        MHANet,
        _mha_inputs,
        ["embed", "ff"],
        modules_to_save=["head"],
        linear_targets=["ff"],
        attention="mha",
        bitwise=False,
    ),
]


def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    for field in ("logits", "last_hidden_state"):
        if hasattr(out, field):
            return getattr(out, field)
    return out


TINY_WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "ran",
    "far",
    "good",
    "bad",
    "yes",
    "no",
    "user",
    "assistant",
]


def tiny_tokenizer(chat_template: str | None = None):
    """A word-level tokenizer over ``TINY_WORDS`` (ids 3...), built offline; vocabulary fits tiny_llama's 100."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(TINY_WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer
