"""Tiny GGUF files written in the test with the ``gguf`` package, laid out as llama.cpp's converter lays
out a transformers checkpoint: metadata under llama.cpp's keys, tensors under its names (from ``gguf``'s own
name map), the query and key rows of a LLaMA permuted to llama.cpp's RoPE layout, a Gemma's norm weights
stored as 1 + w (llama.cpp multiplies by the stored weight, transformers by 1 + w), and a byte-level BPE
vocabulary. Then the same model's next-token log-probs from llama.cpp (xllamacpp) and from transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from structpeft.core.export_gguf import llama_rope_rows

SPECIALS = ["<|im_start|>", "<|im_end|>"]
MERGES = ["t h", "th e"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_vocabulary() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values()) + ["th", "the"] + SPECIALS


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


def tiny_gemma3_for_gguf():
    """A two-layer Gemma 3 (both layers sliding-window, as llama.cpp's every-sixth-global pattern makes them),
    one RoPE base for both layer kinds, and the attention scale 1/sqrt(head_dim) llama.cpp uses below 27B."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    vocabulary = byte_level_vocabulary()
    config = Gemma3TextConfig(
        vocab_size=len(vocabulary),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=16,
        max_position_embeddings=64,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        bos_token_id=len(vocabulary) - 2,
        eos_token_id=len(vocabulary) - 1,
        pad_token_id=0,
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # transformers starts Gemma's norms at 0 (a gain of 1): give them a shape of their own
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.1)
    return model


def write_llama_gguf(model, path: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """``model`` (a transformers LLaMA) as a float32 GGUF that llama.cpp and transformers read."""
    return write_gguf(model, path, "llama", chat_template)


def write_gguf(model, path: Path, arch: str, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """``model`` (a transformers LLaMA or Gemma 3) as a float32 GGUF of llama.cpp architecture ``arch``."""
    import gguf

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)
        writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    else:
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        writer.add_rope_dimension_count(head_dim)
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
    by_name = {name: member for member, name in gguf.MODEL_ARCH_NAMES.items()}
    names = gguf.get_tensor_name_map(by_name[arch], config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd
        tensor = tensor.detach().float()
        if arch == "llama" and name.endswith("q_proj.weight"):
            tensor = llama_rope_rows(tensor, config.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            tensor = llama_rope_rows(tensor, config.num_key_value_heads)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            tensor = tensor + 1
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def float32_copy(path: Path, out: Path) -> Path:
    """A quantized GGUF with every tensor dequantized to float32 (what transformers computes with), its metadata
    kept: llama.cpp then runs on the same base weights as transformers."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    writer = gguf.GGUFWriter(str(out), reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    skipped = (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in skipped:
            continue
        kind = field.types[0]
        writer.add_key_value(
            name, field.contents(), kind, field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        )
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# -- running them in llama.cpp (xllamacpp) --------------------------------------------------------------
def non_ascii_tokens() -> list[int]:
    """The byte tokens above ASCII of the byte-level vocabulary: a piece of a UTF-8 character each."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [i for i, byte in enumerate(bytes_to_unicode()) if byte >= 0x80]


def llamacpp_top5(
    base, adapter, prompts: list[list[int]], scale: float = 1.0, banned: list[int] | None = None
) -> list[dict[int, float]]:
    """llama.cpp's top-5 next-token log-probs after each prompt, with ``adapter`` at ``scale`` (0: the base).

    llama.cpp's server holds back a token that ends inside a UTF-8 character, and its log-probs with it; the
    greedy pick is kept off ``banned`` tokens (default: the byte tokens above ASCII of the tiny models'
    vocabulary) by a logit bias, which leaves the reported log-probs (the model's, before sampling) as
    they are."""
    import pytest

    xllamacpp = pytest.importorskip("xllamacpp")
    params = xllamacpp.CommonParams()
    params.model.path = str(base)
    params.n_ctx = 64
    params.n_parallel = 1
    params.cpuparams.n_threads = 1
    # Attention in float32, as transformers computes it: llama.cpp's CPU flash attention takes q and k in
    # float16 and its default cache is float16 (an adapter that grows q 36-fold overflowed there, measured).
    params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
    params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(str(adapter), 1.0)]
    server = xllamacpp.Server(params)
    bias = [[i, False] for i in (non_ascii_tokens() if banned is None else banned)]
    out = []
    for ids in prompts:
        request = {"prompt": ids, "max_tokens": 1, "logprobs": 5, "temperature": 0, "cache_prompt": False}
        reply = server.handle_completions(request | {"lora": [{"id": 0, "scale": scale}], "logit_bias": bias})
        top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        out.append({t["id"]: t["logprob"] for t in top})
    del server
    return out


def torch_top5(model, prompts: list[list[int]]) -> list[dict[int, float]]:
    out = []
    with torch.no_grad():
        for ids in prompts:
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            values, indices = logprobs.topk(5)
            out.append(dict(zip(indices.tolist(), values.tolist(), strict=True)))
    return out


def assert_same_top5(got: list[dict[int, float]], want: list[dict[int, float]], atol: float = 2e-3) -> None:
    for g, w in zip(got, want, strict=True):
        assert max(g, key=g.get) == max(w, key=w.get)  # the top token
        assert set(g) == set(w)
        assert max(abs(g[i] - w[i]) for i in w) < atol, (g, w)


def top5_shift(model, base, prompts: list[list[int]]) -> float:
    """How far ``model`` moves its top-5 next-token log-probs from ``base``'s, the largest over the prompts (nats):
    an adapter that moves them well past a test's tolerance means a no-op export cannot pass."""
    with torch.no_grad():
        shifts = []
        for ids in prompts:
            x = torch.tensor([ids])
            a = torch.log_softmax(model(x).logits[0, -1].double(), -1)
            b = torch.log_softmax(base(x).logits[0, -1].double(), -1)
            top = a.topk(5).indices
            shifts.append((a[top] - b[top]).abs().max().item())
    return max(shifts)
