"""``structpeft export``: a run's adapter, or any adapter folder (HF PEFT LoRA included), written as a plain
HF PEFT LoRA (vLLM, SGLang) or as a llama.cpp LoRA adapter GGUF (llama.cpp, ollama, LM Studio)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import structpeft as sp
from structpeft.core import CONFIG_NAME, ExportReport, check_rank_options, gguf_architecture
from structpeft.workflow import results
from structpeft.workflow.models import gguf_file, load_model
from structpeft.workflow.run import UsageError, _load, _spec_of, restore
from structpeft.workflow.tasks import Task

FORMATS = ("peft", "gguf")
GGUF_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def export(
    adapter_dir: Path,
    out: Path,
    *,
    fmt: str = "peft",
    rank: int | None = None,
    energy: float | None = None,
    uniform_rank: bool = False,
    lora_bias: bool = False,
    model_ref: str | None = None,
    dtype: str = "float32",
) -> ExportReport:
    """Every flag is checked before the base model loads; the export itself refuses what its format cannot
    carry before it writes anything."""
    if rank is not None and energy is not None:
        raise UsageError("give at most one of --rank R or --energy E")
    try:
        check_rank_options(rank, energy)  # here, not after the base model has loaded
    except ValueError as e:
        raise UsageError(str(e)) from e
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    if fmt == "gguf":
        if uniform_rank or lora_bias:
            raise UsageError("--uniform-rank and --lora-bias are for --format peft; a GGUF adapter takes neither")
        if dtype not in GGUF_DTYPES:
            raise UsageError(f"--dtype {dtype!r}: a GGUF adapter is {' or '.join(GGUF_DTYPES)}")
        if out.is_dir():
            raise UsageError(f"--out {out} is a folder; a GGUF adapter is one file (e.g. {out / 'adapter.gguf'})")
    elif out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; a PEFT LoRA is a folder")
    elif dtype != "float32":
        raise UsageError(f"--dtype {dtype} is for --format gguf; a PEFT LoRA is written in the adapter's float32")

    model, base_ref = _adapted_model(adapter_dir, model_ref)
    if fmt == "gguf":
        base_file = gguf_file(base_ref)
        arch = gguf_architecture(base_file) if base_file is not None else None
        report = sp.export_gguf(model, out, rank=rank, energy=energy, architecture=arch, dtype=GGUF_DTYPES[dtype])
    else:
        report = sp.export_lora(model, out, rank=rank, energy=energy, uniform_rank=uniform_rank, lora_bias=lora_bias)
    print(report)
    return report


def _adapted_model(adapter_dir: Path, model_ref: str | None) -> tuple[sp.PeftModel, str]:
    """The adapter on its base, and the base's reference: a run folder knows its base; an adapter folder
    (``save_pretrained``'s, or HF PEFT's) is put on ``model_ref`` or on its config's base model."""
    if (adapter_dir / results.RUN_FILE).is_file():
        spec = _spec_of(adapter_dir)
        if model_ref is not None and model_ref != spec.model:
            raise UsageError(f"{adapter_dir} is a run on {spec.model}; --model is for adapter folders without a run")
        task, loaded = _load(spec)
        model = restore(adapter_dir, spec, task, loaded)
        if not isinstance(model, sp.PeftModel):
            raise UsageError(
                f"{adapter_dir} is a {spec.method} run (a baseline or an HF PEFT reference): "
                "there is no structpeft adapter to export"
            )
        return model, spec.model
    config_file = adapter_dir / CONFIG_NAME
    if not config_file.is_file():
        raise UsageError(
            f"{adapter_dir}: neither a run folder ({results.RUN_FILE}) nor an adapter folder ({CONFIG_NAME})"
        )
    ref = model_ref or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not ref:
        raise UsageError(f"{config_file} names no base model: give it with --model (a preset, folder or .gguf)")
    # A bare causal-LM task: the base loads without a new head, as the adapter was trained.
    loaded = load_model(ref, Task(name="export", kind="causal-lm", train=[], val=[], test=[]))
    return sp.PeftModel.from_pretrained(loaded.model, adapter_dir), ref
