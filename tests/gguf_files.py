"""Tiny GGUF files written in the test with the ``gguf`` package, laid out as llama.cpp's converter lays
out a transformers checkpoint: metadata under llama.cpp's keys, tensors under its names (from ``gguf``'s own
name map), the query and key rows of a LLaMA permuted to llama.cpp's RoPE layout, and a byte-level BPE
vocabulary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SPECIALS = ["<|im_start|>", "<|im_end|>"]
MERGES = ["t h", "th e"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_vocabulary() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values()) + ["th", "the"] + SPECIALS


def llama_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder a LLaMA query or key weight's rows from transformers' rotate-half RoPE layout (each head's
    first half of dimensions, then its second) to llama.cpp's interleaved one (pairs side by side)."""
    out_features = weight.shape[0]
    return weight.reshape(heads, 2, out_features // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def tiny_llama_for_gguf(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(byte_level_vocabulary()),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        bos_token_id=len(byte_level_vocabulary()) - 2,
        eos_token_id=len(byte_level_vocabulary()) - 1,
    )
    return LlamaForCausalLM(config).eval()


def write_llama_gguf(model, path: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """``model`` (a transformers LLaMA) as a float32 GGUF that llama.cpp and transformers read."""
    import gguf

    config = model.config
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = byte_level_vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd
        tensor = tensor.detach().float()
        if name.endswith("q_proj.weight"):
            tensor = llama_rope_rows(tensor, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = llama_rope_rows(tensor, config.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
