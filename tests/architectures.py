"""Tiny transformers models, one per architecture family the attention methods must handle.

Each :class:`Architecture` builds a small model with seeded weights (``build(attn_implementation)``)
and example inputs (``inputs(seed)``), and says what its attention is like: encoder or decoder,
causal, cross-attention, and the variant it exercises (sliding window, soft-capping, sinks,
position bias, grouped-query heads, fused projections).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

VOCAB = 96
SEQ = 7
IMAGE = 28


@dataclass(frozen=True)
class Architecture:
    name: str
    factory: Callable[[], nn.Module]  # builds the model from its tiny config (called after seeding)
    inputs: Callable[[int], dict[str, torch.Tensor]]
    kind: str  # "encoder", "decoder" or "encoder-decoder"
    causal: bool  # its self-attention is causal (decoders, the decoder side of encoder-decoders)
    cross_attention: bool = False
    variants: tuple[str, ...] = ()  # "gqa", "sliding_window", "softcap", "sinks", "position_bias", "fused_qkv"
    generates: bool = False  # a causal LM whose generate() can be compared with full-sequence runs
    # Implementations transformers runs correctly for it: Gemma 2's sdpa refuses soft-capping, gpt-oss has no sdpa.
    implementations: tuple[str, ...] = ("eager", "sdpa")

    def judged(self, inputs: dict[str, torch.Tensor], output: torch.Tensor) -> torch.Tensor:
        """The part of ``output`` that means something: decoders drop left-padded positions, whose
        fully masked rows each implementation fills differently."""
        if self.kind == "decoder" and "attention_mask" in inputs:
            return output[inputs["attention_mask"].bool()]
        return output

    def build(self, attn_implementation: str = "eager", seed: int = 0) -> nn.Module:
        """The model, eval mode, with weights from ``seed`` and the given attention implementation."""
        torch.manual_seed(seed)
        model = self.factory()
        set_implementation(model, attn_implementation)
        return model.eval()


def set_implementation(model: nn.Module, attn_implementation: str) -> None:
    """Point every config in ``model`` (composite models have several) at ``attn_implementation``."""
    seen = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen:
            seen.add(id(config))
            config._attn_implementation = attn_implementation


# -- inputs ---------------------------------------------------------------------------------
def token_inputs(seed: int, vocab: int = VOCAB, padded: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, SEQ), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, -2:] = 0  # right padding on the second row
    return {"input_ids": ids, "attention_mask": mask}


def causal_inputs(seed: int) -> dict[str, torch.Tensor]:
    """Decoder inputs: left padding on the second row, as generation pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def pixel_inputs(seed: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))}


def seq2seq_inputs(seed: int) -> dict[str, torch.Tensor]:
    inputs = token_inputs(seed)
    g = torch.Generator().manual_seed(seed + 1)
    inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=g)
    return inputs


def audio_inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_features": torch.randn(2, 16, 32, generator=g),  # (B, mel bins, 2 · max source positions)
        "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=g),
    }


# -- shared tiny sizes ----------------------------------------------------------------------
_BERT_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)
_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)
_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)


# -- encoders -------------------------------------------------------------------------------
def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(**_BERT_LIKE))


def roberta() -> nn.Module:
    from transformers import RobertaConfig, RobertaModel

    return RobertaModel(RobertaConfig(**_BERT_LIKE, pad_token_id=1))


def distilbert() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertModel

    return DistilBertModel(
        DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64)
    )


def electra() -> nn.Module:
    from transformers import ElectraConfig, ElectraModel

    return ElectraModel(ElectraConfig(**_BERT_LIKE, embedding_size=16))


def vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(**_VISION, image_size=IMAGE, patch_size=14), add_pooling_layer=False)


def dinov2() -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(**_VISION, image_size=IMAGE, patch_size=14))


def clip_text() -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**_BERT_LIKE, projection_dim=16, bos_token_id=1, eos_token_id=2))


def clip_vision() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(**_VISION, image_size=IMAGE, patch_size=14, projection_dim=16))


def siglip_vision() -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(SiglipVisionConfig(**_VISION, image_size=IMAGE, patch_size=14))


# -- encoder-decoders -----------------------------------------------------------------------
def whisper() -> nn.Module:
    from transformers import WhisperConfig, WhisperModel

    cfg = WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=16,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    return WhisperModel(cfg)


def bart() -> nn.Module:
    from transformers import BartConfig, BartModel

    cfg = BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_position_embeddings=64,
        pad_token_id=1,
    )
    return BartModel(cfg)


def t5() -> nn.Module:
    from transformers import T5Config, T5Model

    cfg = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, pad_token_id=0
    )
    return T5Model(cfg)


# -- decoders -------------------------------------------------------------------------------
def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    )


def gpt_neox() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    return GPTNeoXForCausalLM(cfg)


def opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=48,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        pad_token_id=1,
    )
    return OPTForCausalLM(cfg)


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_DECODER))


def mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_DECODER, sliding_window=3))  # window shorter than SEQ


def qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # Layer 0 slides (window 3), layer 1 attends fully.
    cfg = Qwen2Config(**_DECODER, use_sliding_window=True, sliding_window=3, max_window_layers=1)
    return Qwen2ForCausalLM(cfg)


def qwen3() -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**_DECODER, head_dim=8))


def gemma2() -> nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        **_DECODER,
        head_dim=8,
        sliding_window=3,
        attn_logit_softcapping=5.0,
        initializer_range=0.3,  # scores of a few units, so the cap bends them
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=8,
    )
    return Gemma2ForCausalLM(cfg)


def phi3() -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**_DECODER, bos_token_id=1, eos_token_id=2))


def mixtral() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    return MixtralForCausalLM(cfg)


def gpt_oss() -> nn.Module:
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(
        **{**_DECODER, "intermediate_size": 32},
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return GptOssForCausalLM(cfg)


ARCHITECTURES = [
    Architecture("bert", bert, token_inputs, "encoder", causal=False),
    Architecture("roberta", roberta, token_inputs, "encoder", causal=False),
    Architecture("distilbert", distilbert, token_inputs, "encoder", causal=False),
    Architecture("electra", electra, token_inputs, "encoder", causal=False),
    Architecture("vit", vit, pixel_inputs, "encoder", causal=False),
    Architecture("dinov2", dinov2, pixel_inputs, "encoder", causal=False),
    Architecture("clip_text", clip_text, token_inputs, "encoder", causal=True),  # CLIP's text tower is causal
    Architecture("clip_vision", clip_vision, pixel_inputs, "encoder", causal=False),
    Architecture("siglip_vision", siglip_vision, pixel_inputs, "encoder", causal=False),
    Architecture("whisper", whisper, audio_inputs, "encoder-decoder", causal=True, cross_attention=True),
    Architecture("bart", bart, seq2seq_inputs, "encoder-decoder", causal=True, cross_attention=True),
    Architecture(
        "t5", t5, seq2seq_inputs, "encoder-decoder", causal=True, cross_attention=True, variants=("position_bias",)
    ),
    Architecture("gpt2", gpt2, causal_inputs, "decoder", causal=True, variants=("fused_qkv",), generates=True),
    Architecture("gpt_neox", gpt_neox, causal_inputs, "decoder", causal=True, variants=("fused_qkv",)),
    Architecture("opt", opt, causal_inputs, "decoder", causal=True),
    Architecture("llama", llama, causal_inputs, "decoder", causal=True, variants=("gqa",), generates=True),
    Architecture("mistral", mistral, causal_inputs, "decoder", causal=True, variants=("gqa", "sliding_window")),
    Architecture("qwen2", qwen2, causal_inputs, "decoder", causal=True, variants=("gqa", "sliding_window")),
    Architecture("qwen3", qwen3, causal_inputs, "decoder", causal=True, variants=("gqa",)),
    Architecture(
        "gemma2",
        gemma2,
        causal_inputs,
        "decoder",
        causal=True,
        variants=("gqa", "sliding_window", "softcap"),
        implementations=("eager",),
    ),
    Architecture("phi3", phi3, causal_inputs, "decoder", causal=True, variants=("gqa", "fused_qkv")),
    Architecture("mixtral", mixtral, causal_inputs, "decoder", causal=True, variants=("gqa",)),
    Architecture(
        "gpt_oss",
        gpt_oss,
        causal_inputs,
        "decoder",
        causal=True,
        variants=("gqa", "sliding_window", "sinks"),
        implementations=("eager",),
    ),
]
BY_NAME = {a.name: a for a in ARCHITECTURES}


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor a model's forward is judged by: logits, else the last hidden state."""
    out = model(**inputs)
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise TypeError(f"{type(model).__name__} returned neither logits nor last_hidden_state")
