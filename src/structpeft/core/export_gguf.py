"""Export an adapter as a llama.cpp LoRA adapter GGUF, for llama.cpp, ollama and LM Studio.

llama.cpp (``src/llama-adapter.cpp``, 2026-10) reads an adapter GGUF whose ``general.type`` is ``adapter``,
``general.architecture`` the base model's, ``adapter.type`` ``lora`` and ``adapter.lora.alpha`` a number; its
tensors come in pairs named after a base tensor, ``<tensor>.lora_a`` (A, stored (r, d_in)) and
``<tensor>.lora_b`` (B, stored (d_out, r)), and each pair adds ``(alpha / r) · B A x`` to that tensor's
product, r being B's column count, so one alpha serves layers of any rank. Here alpha is the commonest rank
and every other layer's B carries ``r / alpha``, which makes each layer's scale exactly ours.

The factors are those of :func:`structpeft.core.export.lora_factors`: a LoRA's own A and B, any other weight
method's ΔW by truncated SVD (the error per layer is reported). Tensor names come from the ``gguf``
package's map of transformers' module names to llama.cpp's. llama.cpp's converter stores a LLaMA's query and
key rows in its RoPE layout (each head's rotary pairs side by side, where transformers keeps each head's two
halves apart); the same permutation is applied to B's rows, as to a weight's.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from structpeft.core import distributed
from structpeft.core.atomic import atomic_replace
from structpeft.core.export import (
    ExportReport,
    _first,
    _layers_to_export,
    _pick_adapter,
    biased_layers,
    check_rank_options,
    lora_factors,
    refusal,
)

if TYPE_CHECKING:
    from structpeft.core.model import PeftModel

# transformers' model_type -> llama.cpp's architecture, for the architectures transformers' GGUF loader
# reads and whose linear weights llama.cpp keeps as transformers does (a LLaMA's q/k up to a row order).
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "stablelm": "stablelm",
    "starcoder2": "starcoder2",
    "nemotron": "nemotron",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "gpt2": "gpt2",
}
ROPE_PERMUTED_ARCHITECTURES = ("llama",)  # llama.cpp's converter reorders q and k rows for these
GGUF_DTYPES = (torch.float32, torch.float16)


def export_gguf(
    model: PeftModel,
    path: str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    adapter_name: str | None = None,
    architecture: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> ExportReport:
    """Write ``adapter_name`` (default: the only active adapter) as a llama.cpp LoRA adapter GGUF at ``path``.

    rank / energy: as in :func:`structpeft.export_lora` (a LoRA needs neither: its own factors are written).
    architecture: llama.cpp's name of the base (``general.architecture`` of the base GGUF); default from the
        model's ``model_type``.
    dtype: of the written tensors, float32 or float16.

    Refused, with the reason and before anything is written: deltas without a weight update (Coeff-Tuning,
    SURM adapters), ``modules_to_save`` copies, bias shifts, embedding and conv layers, an output head tied
    to the input embedding, and layers or architectures llama.cpp has no name for.
    """
    import gguf

    check_rank_options(rank, energy)
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"a GGUF adapter is written as float32 or float16, not {dtype}")
    if Path(path).is_dir():
        raise ValueError(f"{path} is a folder; a GGUF adapter is one file (give a path ending in .gguf)")
    adapter = _pick_adapter(model, adapter_name)
    if not hasattr(getattr(model.base_model, "config", None), "get_text_config"):
        raise ValueError("export_gguf writes adapters of transformers models (llama.cpp names their tensors)")
    config = model.base_model.config.get_text_config()
    arch = architecture or _architecture(config)
    layers = _layers_to_export(model, adapter, lora_bias=True)  # bias shifts: refused below, without PEFT's hint
    names = _tensor_names(gguf, arch, config.num_hidden_layers, list(layers))
    refused = _refusals(model, adapter, layers, names, tied=getattr(config, "tie_word_embeddings", False))
    if refused:
        raise ValueError(refusal(f"cannot export adapter {adapter!r} as a llama.cpp LoRA", refused))
    biased = biased_layers(model, layers, adapter)
    if biased:
        raise ValueError(
            f"adapter {adapter!r} also shifts the biases of {_first(biased)} (Kernel-mix's head biases), which a "
            "llama.cpp LoRA cannot carry. Nothing was written."
        )

    factors = lora_factors(model, adapter, layers, rank=rank, energy=energy, dtype=torch.float32)
    alpha = Counter(f.report.rank for f in factors.values()).most_common(1)[0][0]
    rope_heads = {
        "attn_q": config.num_attention_heads,
        "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    }
    tensors: dict[str, Any] = {}
    for name, f in factors.items():
        b = f.b * (f.report.rank / alpha)  # llama.cpp scales by alpha / r; ours is folded into B
        kind = names[name].rsplit(".", 1)[-1]  # blk.N.attn_q -> attn_q
        if arch in ROPE_PERMUTED_ARCHITECTURES and kind in rope_heads:
            b = llama_rope_rows(b, rope_heads[kind])
        tensors[f"{names[name]}.weight.lora_a"] = _array(f.a, dtype)
        tensors[f"{names[name]}.weight.lora_b"] = _array(b, dtype)
    if distributed.is_writer(model):
        _write(gguf, Path(path), arch, float(alpha), tensors)
    return ExportReport(Path(path), [f.report for f in factors.values()], target="llama.cpp LoRA (GGUF)")


def llama_rope_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """A LLaMA query or key output dimension reordered as llama.cpp's converter stores it: per head, from
    transformers' two halves (rotate-half RoPE) to interleaved pairs. ``rows`` is (d_out, ...)."""
    d_out = rows.shape[0]
    # (heads, 2, d_head/2, ...) -> (heads, d_head/2, 2, ...): dimension i of each half lands beside its partner
    return rows.reshape(heads, 2, d_out // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def gguf_architecture(path: str | os.PathLike) -> str:
    """``general.architecture`` of a GGUF file (llama.cpp's name of the model)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if field is None:
        raise ValueError(f"{path} has no general.architecture: it is not a llama.cpp model GGUF")
    return field.contents()


# -- checks ---------------------------------------------------------------------------------------
def _architecture(config: Any) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"no llama.cpp architecture known for model_type {model_type!r}; the GGUF export maps "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}. Pass architecture=... (the base GGUF's general.architecture) "
            "if llama.cpp stores this model's weights as transformers does"
        )
    return GGUF_ARCHITECTURES[model_type]


def _tensor_names(gguf: Any, arch: str, blocks: int, layers: list[str]) -> dict[str, str | None]:
    """llama.cpp's base tensor name (without ``.weight``) for each layer; None where it has none."""
    by_name = {name: member for member, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise ValueError(f"the gguf package knows no llama.cpp architecture {arch!r}")
    table = gguf.get_tensor_name_map(by_name[arch], blocks)
    found = {layer: table.get_name(f"{layer}.weight", try_suffixes=(".weight",)) for layer in layers}
    return {layer: None if name is None else name.removesuffix(".weight") for layer, name in found.items()}


def _refusals(
    model: PeftModel, adapter: str, layers: dict, names: dict[str, str | None], tied: bool
) -> dict[str, list[str]]:
    """What a llama.cpp LoRA cannot carry, reason -> the layers it holds for."""
    refused: dict[str, list[str]] = {}
    copies = [name for name, module in model.saved_modules() if adapter in module.copies]
    if copies:
        refused["a whole-module copy (modules_to_save), which a llama.cpp adapter cannot replace"] = copies
    for name, layer in layers.items():
        if names[name] is None:
            refused.setdefault("llama.cpp's architecture has no tensor for it", []).append(name)
        elif layer.geometry.kind != "linear":
            refused.setdefault(f"a {layer.geometry.kind} layer; the GGUF export writes linear layers", []).append(name)
        elif tied and names[name] == "output":
            why = "the output head is tied to the input embedding, and the base GGUF has no output tensor of its own"
            refused.setdefault(why, []).append(name)
    return refused


# -- writing --------------------------------------------------------------------------------------
def _array(tensor: torch.Tensor, dtype: torch.dtype) -> Any:
    return tensor.detach().to("cpu", dtype).contiguous().numpy()


def _write(gguf: Any, path: Path, arch: str, alpha: float, tensors: dict[str, Any]) -> None:
    with atomic_replace(path) as staging:
        writer = gguf.GGUFWriter(str(staging), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
