"""What the commands do: ``finetune``, ``evaluate``, ``generate`` and ``budget`` on a run spec.

Everything a user can get wrong is checked by :func:`check_spec` before any data or model loads.
A run's folder holds ``run.json`` (the spec, written first), the adapter in HF PEFT's layout
(``adapter_config.json`` + ``adapter_model.safetensors``; baselines: ``trainable.safetensors``),
``metrics.json`` and ``curves.png``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import structpeft as sp
from structpeft.core import atomic_write_file, method_cards
from structpeft.workflow import recipes, results
from structpeft.workflow.checkpointing import CHECKPOINT_DIR
from structpeft.workflow.distributed import Processes, launched_processes
from structpeft.workflow.models import QUANTIZATIONS, LoadedModel, check_model_ref, load_model
from structpeft.workflow.tasks import TASK_TYPES, Task, TaskError, check_rows, check_task_ref, load_task, prompt_ids
from structpeft.workflow.train import (
    RunLog,
    TrainSettings,
    bar_mode,
    evaluate,
    fit,
    peak_memory_mib,
    reset_peak_memory,
    resolve_device,
)

BASELINE_WEIGHTS = "trainable.safetensors"


class UsageError(ValueError):
    """Bad input found before any work: one line for the user, exit code 2."""


class RunFailed(RuntimeError):
    """A failure once training had started; the run folder holds what there was (exit code 1)."""


@dataclass
class RunSpec:
    model: str = "minilm"
    task: str = "rotten-tomatoes"
    method: str = "lora"
    settings: dict[str, str] = field(default_factory=dict)  # --set key=value
    epochs: int = 1
    lr: float | None = None  # None: the recipe's
    batch_size: int = 32
    grad_accum: int = 1
    max_length: int = 64
    image_size: int | None = None
    val_size: float = 0.1
    seed: int = 0
    bf16: bool = False
    quantize: str | None = None  # load the base quantized: nf4, fp4 or int8 (bitsandbytes)
    quantize_embeddings: bool = False  # and its input embedding (and a tied LM head) in the same 4 bits
    device: str = "auto"
    compile: bool = False
    train_size: int | None = None
    test_size: int | None = None
    text_column: str | None = None
    label_column: str | None = None
    task_type: str | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    out: str | None = None
    results: str = "runs/results.jsonl"
    progress: str = "auto"
    save_every: int | None = None  # optimizer steps between training checkpoints (and each epoch's end)
    resume: bool = False
    score_test: bool = True  # False: the test split is left for later (the bench's lr-search runs)
    chat_template: str = "auto"  # causal LM: auto (when the tokenizer has one), on, off
    rouge_sample: int = 0  # causal LM: ROUGE-L of greedy completions of this many test prompts
    score_base: bool = True  # causal LM: score the base model on validation before the first step


def check_spec(spec: RunSpec) -> None:
    """Every flag, the model and task references and the method, before anything loads."""
    positive = {
        "epochs": spec.epochs,
        "batch_size": spec.batch_size,
        "grad_accum": spec.grad_accum,
        "max_length": spec.max_length,
    }
    for name, value in {
        **positive,
        "image_size": spec.image_size,
        "train_size": spec.train_size,
        "test_size": spec.test_size,
    }.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    for name, value, low in (
        ("lr", spec.lr, 0.0),
        ("weight-decay", spec.weight_decay, None),
        ("max-grad-norm", spec.max_grad_norm, None),
    ):
        if value is None:
            continue
        if not math.isfinite(value) or (low is not None and value <= low) or value < 0:
            raise UsageError(f"--{name} must be a finite number{' > 0' if low is not None else ' >= 0'}, got {value}")
    if spec.rouge_sample < 0:
        raise UsageError(f"--rouge-sample must be a number of test examples >= 0, got {spec.rouge_sample}")
    if spec.rouge_sample and importlib.util.find_spec("rouge_score") is None:
        raise UsageError('--rouge-sample needs the rouge-score package: pip install "structpeft[cli]"')
    if spec.save_every is not None and spec.save_every < 1:
        raise UsageError(f"--save-every must be a positive number of steps, got {spec.save_every}")
    if spec.resume and (spec.out is None or not (Path(spec.out) / CHECKPOINT_DIR).is_dir()):
        raise UsageError(f"--resume needs --out naming a run folder with a {CHECKPOINT_DIR}/ (written by --save-every)")
    if not 0 <= spec.warmup_ratio < 1:
        raise UsageError(f"--warmup-ratio must be in [0, 1), got {spec.warmup_ratio}")
    if not (0 < spec.val_size < 1 or (spec.val_size >= 1 and float(spec.val_size).is_integer())):
        raise UsageError(f"--val-size must be a fraction in (0, 1) or a whole number of examples, got {spec.val_size}")
    if spec.task_type is not None and spec.task_type not in TASK_TYPES:
        raise UsageError(f"--task-type must be one of {', '.join(TASK_TYPES)}, got {spec.task_type!r}")
    checked_device(spec.device)
    if spec.quantize is not None:
        if spec.quantize not in QUANTIZATIONS:
            raise UsageError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {spec.quantize!r}")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UsageError('--quantize needs bitsandbytes: pip install "structpeft[quantized]"')
    if spec.quantize_embeddings and spec.quantize not in ("nf4", "fp4"):
        raise UsageError("--quantize-embeddings stores the embedding in 4 bits: it needs --quantize nf4 or fp4")
    if spec.chat_template not in CHAT_TEMPLATE_CHOICES:
        raise UsageError(
            f"--chat-template must be one of {', '.join(CHAT_TEMPLATE_CHOICES)}, got {spec.chat_template!r}"
        )
    if spec.bf16 and spec.device == "cpu" and not torch.cpu._is_avx512_bf16_supported():
        print("note: --bf16 on a CPU without native bf16 runs in emulation (slower than fp32)", file=sys.stderr)
    if spec.out is not None and Path(spec.out).exists() and not Path(spec.out).is_dir():
        raise UsageError(f"--out {spec.out} is a file; give a folder (it is created if missing)")
    if Path(spec.results).is_dir():
        raise UsageError(f"--results {spec.results} is a folder; give a file path (JSON lines are appended)")
    for check in (
        lambda: check_model_ref(spec.model),
        lambda: check_task_ref(spec.task),
        lambda: recipes.check_method(spec.method, spec.settings),
    ):
        try:
            check()
        except ValueError as e:
            raise UsageError(str(e)) from e


CHAT_TEMPLATE_CHOICES = ("auto", "on", "off")


def uses_chat_template(choice: str, loaded: LoadedModel, task: Task) -> bool:
    """Whether a causal-LM run renders its rows with the tokenizer's chat template: chat rows always (and need
    one); prompt/completion rows with ``on``, or ``auto`` when the tokenizer has a template; text rows never."""
    if task.kind != "causal-lm":
        return False
    has_template = bool(getattr(loaded.tokenizer, "chat_template", None))
    fields = set(task.source.get("fields", ()))
    if "messages" in fields:
        if choice == "off":
            raise UsageError(f"--chat-template off: {task.name} holds chat rows ('messages'), which need the template")
        if not has_template:
            raise UsageError(
                f"{task.name} holds chat rows ('messages') and {loaded.ref}'s tokenizer has no chat template: "
                "use a model with one, or give prompt/completion rows"
            )
        return True
    if choice == "on":
        if "completion" not in fields:
            raise UsageError(f"--chat-template on needs prompt/completion or messages rows; {task.name} has text rows")
        if not has_template:
            raise UsageError(f"--chat-template on: {loaded.ref}'s tokenizer has no chat template")
        return True
    return choice == "auto" and has_template and "completion" in fields


def _load(spec: RunSpec) -> tuple[Task, LoadedModel]:
    task = load_task(
        spec.task,
        task_type=spec.task_type,
        text_column=spec.text_column,
        label_column=spec.label_column,
        val_size=int(spec.val_size) if spec.val_size >= 1 else spec.val_size,
        seed=spec.seed,
        train_size=spec.train_size,
        test_size=spec.test_size,
    )
    torch.manual_seed(spec.seed)  # the new head's initialisation
    loaded = load_model(spec.model, task, spec.quantize, compute_dtype=torch.bfloat16 if spec.bf16 else None)
    if spec.quantize_embeddings:
        try:
            saved = sp.quantize_embeddings(loaded.model, spec.quantize)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--quantize-embeddings: {e}") from e
        print(
            f"--quantize-embeddings: the vocabulary table in {spec.quantize}, {saved / 2**20:.1f} MiB less",
            file=sys.stderr,
        )
    return task, loaded


def _settings(spec: RunSpec, recipe: recipes.Recipe) -> TrainSettings:
    return TrainSettings(
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        grad_accum=spec.grad_accum,
        lr=spec.lr or recipe.lr,
        lr_by_method=recipe.lr_by_method,
        weight_decay=spec.weight_decay,
        warmup_ratio=spec.warmup_ratio,
        max_grad_norm=spec.max_grad_norm or None,
        max_length=spec.max_length,
        image_size=spec.image_size,
        seed=spec.seed,
        bf16=spec.bf16,
        device=spec.device,
        compile=spec.compile,
        progress=spec.progress,
    )


def _versions() -> dict[str, str]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "structpeft": sp.__version__,
    }


def checked_device(name: str) -> torch.device:
    """The device ``--device`` names, or a usage error that says why it cannot be used."""
    try:
        return resolve_device(name)
    except (RuntimeError, ValueError) as e:
        raise UsageError(str(e).replace("Expected one of", "--device: expected one of")) from e


def save_trained(model: nn.Module, out: Path) -> None:
    """The adapter (PEFT layout), or a baseline's trainable tensors."""
    if isinstance(model, sp.PeftModel):
        model.save_pretrained(out)
        return
    from safetensors.torch import save

    from structpeft.workflow.checkpointing import trained_tensors

    # with the running statistics of the batch norms it trained (full fine-tuning of a convnet)
    tensors = {n: t.detach().cpu().contiguous() for n, t in trained_tensors(model).items()}
    atomic_write_file(out / BASELINE_WEIGHTS, save(tensors))


def finetune(spec: RunSpec, command: list[str] | None = None) -> dict[str, Any]:
    check_spec(spec)
    processes = launched_processes()
    if processes.distributed and spec.out is None:
        raise UsageError("give --out when launching several processes (they must agree on one run folder)")
    if spec.resume and spec.save_every is None:  # go on saving as the interrupted run did
        spec.save_every = _spec_of(Path(spec.out)).save_every
    task, loaded = _load(spec)
    recipe = recipes.build_recipe(spec.method, loaded.family, spec.settings, loaded.model, loaded.head)
    model = recipe.adapt(loaded.model, loaded.head)
    settings = _settings(spec, recipe)
    settings.chat = uses_chat_template(spec.chat_template, loaded, task)
    if task.kind == "causal-lm":
        _check_rows(task, loaded, settings)
    if spec.rouge_sample and spec.score_test:
        _check_generation_task(task)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = Path(spec.out or f"runs/{Path(spec.model).name}-{task.name}-{spec.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    device = resolve_device(spec.device, processes)
    if processes.is_main:
        out.mkdir(parents=True, exist_ok=True)
    lrs = ", ".join([f"lr {settings.lr:g}"] + [f"{k} lr {v:g}" for k, v in settings.lr_by_method.items()])
    where = f"{device}" + (f" x {processes.world} processes" if processes.distributed else "")
    if processes.is_main:
        print(
            f"{spec.method} on {loaded.ref} ({loaded.family}) | {task.name}: {task.kind}, "
            f"train {len(task.train)} / val {len(task.val)} / test {len(task.test)} | trainable {trainable:,} | "
            f"{lrs} | {where} -> {out}",
            flush=True,
        )
    row: dict[str, Any] = {
        "status": "running",
        "model": loaded.ref,
        "family": loaded.family,
        "task": task.name,
        "kind": task.kind,
        "method": spec.method,
        "seed": spec.seed,
        "lr": settings.lr,
        "lr_by_method": settings.lr_by_method,
        "recipe": recipe.describe(),
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "train_examples": len(task.train),
        "val_examples": len(task.val),
        "test_examples": len(task.test),
        "labels": task.label_names,
        "data": task.source,
        "data_fingerprint": task.fingerprint(),
        "device": str(device),
        "processes": processes.world,
        "versions": _versions(),
        "command": shlex.join(command) if command is not None else None,
        "spec": dataclasses.asdict(spec),
    }
    if task.kind == "causal-lm" and spec.resume and (earlier := _earlier_base_validation(out)):
        row["base_val"] = earlier
    if processes.is_main:
        results.write_json(out / results.RUN_FILE, row)
    log = RunLog()
    peak_reset = reset_peak_memory(device)  # the peak of this run, not of the process
    try:
        if task.kind == "causal-lm" and "base_val" not in row and spec.score_base:
            row["base_val"] = _base_validation(model, loaded, task, settings, processes)
            if processes.is_main:
                results.write_json(out / results.RUN_FILE, row)
        show = processes.is_main and bar_mode(settings.progress) == "bar"
        if recipe.trains:
            fit(
                model,
                loaded,
                task,
                settings,
                log,
                on_best=lambda epoch: save_trained(model, out),
                checkpoint=out / CHECKPOINT_DIR,
                save_every=spec.save_every,
                resume=spec.resume,
                processes=processes,
            )
        else:  # zero-shot: the model as it is, scored like a trained one
            log.best_val = row.get("base_val") or evaluate(model, loaded, task, "val", settings, processes=processes)
            if processes.is_main:
                save_trained(model, out)
        if spec.score_test:
            row["test"] = evaluate(
                model, loaded, task, "test", settings, progress=show, processes=processes, generations=spec.rouge_sample
            )
        row["status"] = "finished"
    except BaseException as e:
        row.update(
            status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed", error=f"{type(e).__name__}: {e}"
        )
        if isinstance(e, Exception):
            raise RunFailed(f"{type(e).__name__}: {e} (after {log.steps} steps; what there was is in {out})") from e
        raise
    finally:
        row.update(log.summary(), history=log.history, val=log.best_val, **peak_memory_mib(device, peak_reset))
        if processes.is_main:
            results.write_json(out / results.METRICS_FILE, row)
            if log.losses or log.history:
                results.plot_curves(log.losses, log.history, out / results.CURVES_FILE)
    if not processes.is_main:
        return row
    results.append_result(Path(spec.results), {**row, "out": str(out)})
    metric, value = results.headline(row)
    scored = f"test {metric} {value:.2f}" if value is not None else "test not scored"
    if "base_val" in row and log.best_val and recipe.trains:
        scored = f"val loss {row['base_val']['loss']:.4f} before training -> {log.best_val['loss']:.4f} | {scored}"
    which = f"epoch {log.best_epoch}, best on validation" if recipe.trains else "untrained"
    print(
        f"{scored} ({which}) | trainable {trainable:,} | train {log.train_seconds:.0f}s | {out}",
        flush=True,
    )
    return row


ROWS_CHECKED = 256  # per split, before training: enough to meet a template's refusal or a common overflow


def _check_rows(task: Task, loaded: LoadedModel, settings: TrainSettings) -> None:
    for split in ("train", "val"):
        rows = list(task.split(split)[:ROWS_CHECKED])
        try:
            note = check_rows(rows, loaded.tokenizer, settings.max_length, settings.chat)
        except TaskError as e:
            raise UsageError(f"{task.name} ({split} split): {e}") from e
        if note:
            print(f"note: {task.name} ({split} split): {note}", file=sys.stderr, flush=True)


def _check_generation_task(task: Task) -> None:
    """--rouge-sample compares completions with references: prompt/completion rows of a causal-LM task."""
    fields = set(task.source.get("fields", ()))
    if task.kind != "causal-lm" or not {"prompt", "completion"} <= fields:
        kind = task.kind if task.kind != "causal-lm" else f"causal-lm with {', '.join(sorted(fields)) or 'text'} rows"
        raise UsageError(
            f"--rouge-sample scores completions against references: {task.name} is {kind}, not prompt/completion rows"
        )


def _base_validation(
    model: nn.Module, loaded: LoadedModel, task: Task, settings: TrainSettings, processes: Processes
) -> dict[str, float]:
    """The validation scores of the model before its first step (the base model: adapters off), so every
    causal-LM run says what training changed."""
    show = processes.is_main and bar_mode(settings.progress) == "bar"
    # structpeft's and HF PEFT's wrappers (the hf-* references) both switch their adapters off this way
    context = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with context:
        scores = evaluate(model, loaded, task, "val", settings, progress=show, processes=processes)
    if processes.is_main:
        print(f"base model before training: val loss {scores['loss']:.4f}", flush=True)
    return scores


def _earlier_base_validation(out: Path) -> dict[str, float] | None:
    """What the interrupted start of a resumed run measured before its first step."""
    path = out / results.RUN_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("base_val")


def _spec_of(run_dir: Path) -> RunSpec:
    path = run_dir / results.RUN_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir}: no {results.RUN_FILE}; give a folder written by structpeft finetune")
    saved = json.loads(path.read_text(encoding="utf-8"))["spec"]
    saved.setdefault("chat_template", "off")  # runs made before the chat template existed trained without it
    known = {f.name for f in dataclasses.fields(RunSpec)}
    return RunSpec(**{k: v for k, v in saved.items() if k in known})


def restore(run_dir: Path, spec: RunSpec, task: Task, loaded: LoadedModel) -> nn.Module:
    """The trained model of a run folder, on a freshly loaded base."""
    if (run_dir / BASELINE_WEIGHTS).is_file():
        from safetensors.torch import load_file

        # a baseline's or an HF PEFT reference's tensors, named as in the model it trained: rebuild that model
        recipe = recipes.build_recipe(spec.method, loaded.family, spec.settings, loaded.model, loaded.head)
        model = recipe.adapt(loaded.model, loaded.head)
        tensors = load_file(str(run_dir / BASELINE_WEIGHTS))
        known = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        missing = set(tensors) - known
        if missing:
            raise UsageError(f"{run_dir}: weights {sorted(missing)[:3]} do not fit {loaded.ref} with {spec.method}")
        model.load_state_dict(tensors, strict=False)
        return model
    try:
        return sp.PeftModel.from_pretrained(loaded.model, run_dir)
    except sp.CheckpointError as e:
        raise UsageError(str(e)) from e


def evaluate_run(run_dir: Path, task_ref: str | None = None, split: str = "test", device: str | None = None) -> dict:
    spec = _spec_of(run_dir)
    if task_ref is not None:
        spec.task = task_ref
    if device is not None:
        spec.device = device
    check_spec(dataclasses.replace(spec, out=None))
    task, loaded = _load(spec)
    model = restore(run_dir, spec, task, loaded)
    settings = _settings(spec, recipes.Recipe(spec.method, [spec.method]))
    settings.chat = uses_chat_template(spec.chat_template, loaded, task)
    scores = evaluate(
        model, loaded, task, split, settings, progress=bar_mode(spec.progress) == "bar", generations=spec.rouge_sample
    )
    print(
        f"{task.name} {split} ({len(task.split(split))} examples): "
        + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
    )
    return scores


def generate(
    run_dir: Path,
    prompt: str,
    max_new_tokens: int = 64,
    device: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> str:
    """The run's model completing ``prompt``, through the chat template when the run trained with it;
    greedy at ``temperature`` 0, else sampled (nucleus ``top_p``)."""
    spec = _spec_of(run_dir)
    if device is not None:
        spec.device = device
    if spec.task_type not in (None, "causal-lm"):
        raise UsageError(f"{run_dir} was trained for {spec.task_type}; generate needs a causal-LM run")
    task, loaded = _load(spec)
    if task.kind != "causal-lm":
        raise UsageError(f"{run_dir} was trained on a {task.kind} task; generate needs a causal-LM run")
    device_ = resolve_device(spec.device)
    model = restore(run_dir, spec, task, loaded).to(device_).eval()
    chat = uses_chat_template(spec.chat_template, loaded, task)
    input_ids = torch.tensor([prompt_ids(loaded.tokenizer, prompt, chat)], device=device_)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    with torch.no_grad():
        ids = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=loaded.tokenizer.pad_token_id,
            **({"do_sample": False} | sampling),
        )
    return loaded.tokenizer.decode(ids[0, input_ids.shape[1] :], skip_special_tokens=True)


# -- budget ---------------------------------------------------------------------------------------
def size_knobs() -> dict[str, Callable[[int], dict[str, Any]]]:
    """Method name -> the fields of its k-th size (k = 1, 2, ...), from the method cards."""
    return {name: card.size for name, card in method_cards().items() if card.size is not None}


def adapter_params(model: nn.Module) -> int:
    """Trainable parameters of the adapter itself, not the new head's full copy (``modules_to_save``)."""
    if isinstance(model, sp.PeftModel):
        return sum(p.numel() for _, p in model.adapter_parameters() if p.requires_grad)
    # an HF PEFT reference: its head copies are the ``modules_to_save`` wrappers' parameters
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." not in n)


def load_for_sizing(model_ref: str, task_ref: str) -> LoadedModel:
    """The model with its new head for ``task_ref`` (read on a small subset): enough to size adapters."""
    return _load(RunSpec(model=model_ref, task=task_ref, train_size=64, test_size=8, val_size=8))[1]


def adapter_size(loaded: LoadedModel, method: str, settings: dict[str, str]) -> int:
    """Adapter parameters of ``method`` with ``settings`` on a copy of ``loaded``'s model."""
    model = copy.deepcopy(loaded.model)
    recipe = recipes.build_recipe(method, loaded.family, settings, model, loaded.head)
    return adapter_params(recipe.adapt(model, loaded.head))


def size_for(loaded: LoadedModel, method: str, params: int, settings: dict[str, str]) -> dict[str, Any]:
    """The size setting of ``method`` whose adapter on ``loaded`` comes closest to ``params`` parameters:
    ``{"method", "target", "settings" (the knob's fields), "adapter_params"}``."""
    parts = recipes.split_method(method)
    knobs = size_knobs()
    sized = [(name, fields) for name, fields in parts if name in knobs]
    if not sized:
        raise UsageError(f"{method}: no size to choose (sizeable methods: {', '.join(knobs)})")
    name = sized[0][0]
    counts: dict[int, int] = {}

    def count(k: int) -> int:
        if k not in counts:
            knob = {(f"{name}.{key}" if len(parts) > 1 else key): str(v) for key, v in knobs[name](k).items()}
            counts[k] = adapter_size(loaded, method, {**settings, **knob})
        return counts[k]

    low, high = 1, 1
    while count(high) < params and high < 4096:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if count(mid) < params else (low, mid)
    best = min((low, high), key=lambda k: abs(count(k) - params))
    return {"method": method, "target": params, "settings": knobs[name](best), "adapter_params": count(best)}


def budget(model_ref: str, method: str, params: int, task_ref: str, settings: dict[str, str]) -> dict[str, Any]:
    """The size setting of ``method`` whose adapter comes closest to ``params`` trainable parameters."""
    parts = recipes.split_method(method)
    knobs = size_knobs()
    if not any(name in knobs for name, _ in parts):
        raise UsageError(f"{method}: no size to choose (sizeable methods: {', '.join(knobs)})")
    check_spec(RunSpec(model=model_ref, task=task_ref, method=method, settings=settings))
    found = size_for(load_for_sizing(model_ref, task_ref), method, params, settings)
    sets = " ".join(f"--set {k}={v}" for k, v in found["settings"].items())
    print(f"{method} on {model_ref}: {sets} gives {found['adapter_params']:,} adapter parameters (target {params:,})")
    return found
