"""The training loop: AdamW with warm-up and linear decay, gradient accumulation and clipping,
bf16 autocast, per-method learning rates, a validation pass each epoch that keeps the best epoch."""

from __future__ import annotations

import math
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

import structpeft as sp
from structpeft.workflow.checkpointing import (
    Position,
    has_checkpoint,
    load_checkpoint,
    load_trained,
    save_checkpoint,
    trained_tensors,
    trains_own_parameters,
)
from structpeft.workflow.distributed import ONE_PROCESS, GlobalBatches, Processes, global_count
from structpeft.workflow.models import LoadedModel
from structpeft.workflow.scoring import choice_scores, generation_scores
from structpeft.workflow.tasks import IGNORE_INDEX, Task, collate_causal_lm, collate_images


@dataclass
class TrainSettings:
    epochs: int = 1
    batch_size: int = 32
    grad_accum: int = 1  # optimizer steps see batch_size * grad_accum examples
    lr: float = 1e-3
    lr_by_method: dict[str, float] = field(default_factory=dict)  # method key -> lr (e.g. Coeff's α)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    max_length: int = 128
    image_size: int | None = None  # None: the model's own
    seed: int = 0
    bf16: bool = False
    device: str = "cpu"
    compile: bool = False
    eval_batch_size: int = 64
    progress: str = "auto"  # auto (a bar on a terminal, a line per epoch otherwise), bar, lines, none
    chat: bool = False  # causal LM: prompt/completion rows through the tokenizer's chat template


@dataclass
class RunLog:
    """What training has produced so far; the caller owns it, so a failure mid-run can still write it."""

    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch
    losses: list[tuple[int, float]] = field(default_factory=list)  # (optimizer step, train loss)
    best_epoch: int | None = None
    best_val: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    train_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "train_seconds": self.train_seconds,
            "step_time_ms": 1000 * statistics.median(self.step_seconds) if self.step_seconds else None,
            "best_epoch": self.best_epoch,
            "epochs_run": len(self.history),
        }


def resolve_device(name: str, processes: Processes = ONE_PROCESS) -> torch.device:
    """``auto``: CUDA when there is one (this process's GPU under torchrun), else CPU. Asking for
    CUDA without one is an error."""
    if name == "auto" or (name == "cuda" and processes.distributed):
        if torch.cuda.is_available():
            return torch.device("cuda", processes.local_rank)
        if name == "auto":
            return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: this machine has no CUDA device (torch {torch.__version__}); use --device cpu"
        )
    return device


def collate_fn(task: Task, loaded: LoadedModel, settings: TrainSettings) -> Callable[[list[dict]], dict]:
    if task.kind == "image-classification":
        size = settings.image_size or loaded.image_size or 224
        return lambda examples: collate_images(examples, size, loaded.image_mean, loaded.image_std)
    tokenizer = loaded.tokenizer
    if task.kind == "causal-lm":
        return lambda examples: collate_causal_lm(examples, tokenizer, settings.max_length, settings.chat)

    def collate_text(examples: list[dict]) -> dict[str, torch.Tensor]:
        texts = [e["text"] for e in examples]
        batch = tokenizer(texts, padding=True, truncation=True, max_length=settings.max_length, return_tensors="pt")
        return {**batch, "labels": torch.tensor([e["label"] for e in examples])}

    return collate_text


def loss_of(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> tuple[torch.Tensor, int]:
    """(mean loss, number of targets it averages): classes, or next tokens for causal LM."""
    if kind == "causal-lm":
        logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t + 1
        count = int((labels != IGNORE_INDEX).sum())
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )
        return loss, count
    return F.cross_entropy(logits.float(), labels), labels.numel()


def _optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """One parameter group per learning rate: a method's own lr applies to its parameters (as the
    structpeft model lists them, :meth:`~structpeft.PeftModel.adapter_parameters`); everything else (the
    head too) takes ``lr``."""
    own_lr: dict[nn.Parameter, float] = {}
    if isinstance(model, sp.PeftModel):
        for method, lr in settings.lr_by_method.items():
            own_lr.update({p: lr for _, p in model.adapter_parameters(method=method)})
    elif settings.lr_by_method:
        raise ValueError(f"per-method learning rates {settings.lr_by_method} need a structpeft model")
    groups: dict[float, list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault(own_lr.get(p, settings.lr), []).append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters: did the method target anything?")
    return torch.optim.AdamW(
        [{"params": ps, "lr": lr} for lr, ps in groups.items()], lr=settings.lr, weight_decay=settings.weight_decay
    )


def train_mode(model: nn.Module) -> None:
    """Training mode, except for batch norms whose parameters are frozen: they keep normalising with
    their running statistics and stop updating them. Those statistics are buffers of the base model,
    not part of the saved adapter; updated here, the run's own scores would differ from those of its
    adapter loaded onto the base model (measured: MobileNetV2 + LoRA, 81.6% in the run, 56.0% reloaded)."""
    model.train()
    for norm in _batch_norms(model, trained=False):
        norm.eval()


def _batch_norms(model: nn.Module, trained: bool) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's batch norms whose own parameters train (``trained``), or the frozen ones."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and trains_own_parameters(m) == trained
    ]


def buffers_change_in_forward(model: nn.Module) -> bool:
    """Whether a training forward writes buffers: only batch norms whose own parameters train update their
    running statistics (:func:`train_mode` freezes the others). DistributedDataParallel syncs every buffer
    once when it wraps the model; broadcasting them again every step is needed only then, and otherwise
    sends, for one, the 4-bit vocabulary table (90 MiB on Gemma 3) at each step."""
    return any(norm.track_running_stats for norm in _batch_norms(model, trained=True))


T = TypeVar("T")
PRECISE_BN_EXAMPLES = 1024  # the training examples batch-norm statistics are recomputed over


@torch.no_grad()
def recompute_batch_norm_statistics(
    model: nn.Module, batches: Iterable[T], forward: Callable[[nn.Module, T], object]
) -> int:
    """Precise BN (Wu & Johnson, arXiv 2105.07576): the running statistics of the batch norms that
    train, recomputed as a plain average over ``batches`` (each run through ``forward(model, batch)``)
    with the weights as they are now. Returns how many batch norms that was (none: nothing is run).

    Why: a running average lags behind the weights it follows, and evaluation normalises with it.
    With a small momentum the lag is long: EfficientNet-Lite's batch norms (momentum 0.01, from the
    TensorFlow port) still hold about half of their pre-trained statistics after 63 steps."""
    norms = [m for m in _batch_norms(model, trained=True) if m.track_running_stats]
    if not norms:
        return 0
    modes, momenta = [(m, m.training) for m in model.modules()], [m.momentum for m in norms]
    model.eval()  # dropout off; only the batch norms gather statistics
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative (equal-weight) average
        norm.train()
    for batch in batches:
        forward(model, batch)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    for module, training in modes:
        module.train(training)
    return len(norms)


def _precise_bn_batches(
    task: Task, loaded: LoadedModel, settings: TrainSettings, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """The first ``PRECISE_BN_EXAMPLES`` training examples in order: every process sees the same ones."""
    examples = Subset(task.train, range(min(len(task.train), PRECISE_BN_EXAMPLES)))
    for batch in DataLoader(examples, settings.batch_size, collate_fn=collate_fn(task, loaded, settings)):
        yield {k: v.to(device) for k, v in batch.items()}


def _worker_seeds() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def bar_mode(setting: str) -> str:
    if setting == "auto":
        return "bar" if sys.stderr.isatty() else "lines"
    return setting


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def fit(
    model: nn.Module,
    loaded: LoadedModel,
    task: Task,
    settings: TrainSettings,
    log: RunLog,
    on_best: Callable[[int], None] | None = None,
    checkpoint: Path | None = None,
    save_every: int | None = None,
    resume: bool = False,
    processes: Processes = ONE_PROCESS,
) -> RunLog:
    """Train on ``task.train``; score ``task.val`` after each epoch; end with the best epoch's
    trainable weights in ``model`` (``on_best(epoch)`` runs whenever a new best is reached).

    With ``checkpoint`` and ``save_every``, a training checkpoint is written every that many
    optimizer steps and at each epoch's end; ``resume`` goes on from the one found there, to the
    same result as an uninterrupted run (bit for bit on CPU).

    Under several ``processes`` each takes its share of every global batch of ``batch_size``; the
    gradients are averaged by DistributedDataParallel, weighted so that the step equals the
    one-process step; only the main process saves and shows progress.
    """
    loop = _Loop(model, loaded, task, settings, log, processes, checkpoint, save_every)
    if resume and checkpoint is not None and has_checkpoint(checkpoint):
        loop.restore()
    try:
        for epoch in range(loop.position.epoch, settings.epochs):
            epoch_loss, batches, epoch_start = loop.train_epoch(epoch)
            loop.end_epoch(epoch, epoch_loss / max(batches, 1), epoch_start, on_best)
    finally:
        loop.bar.close()
        log.train_seconds = time.perf_counter() - loop.start
    if loop.best_state is not None and log.best_epoch != len(log.history):
        load_trained(model, loop.best_state, "the best epoch's state")
    return log


class _Loop:
    """One :func:`fit`: the model and what trains it (data order, optimizer, schedule, progress), and where
    it stands (the position a checkpoint records, the best epoch's trained tensors)."""

    def __init__(
        self,
        model: nn.Module,
        loaded: LoadedModel,
        task: Task,
        settings: TrainSettings,
        log: RunLog,
        processes: Processes,
        checkpoint: Path | None,
        save_every: int | None,
    ) -> None:
        self.model, self.loaded, self.task, self.settings, self.log = model, loaded, task, settings, log
        self.processes, self.checkpoint, self.save_every = processes, checkpoint, save_every
        self.device = resolve_device(settings.device, processes)
        model.to(device := self.device)
        forward = model
        if processes.distributed:
            ids = [device.index] if device.type == "cuda" else None
            forward = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=ids, broadcast_buffers=buffers_change_in_forward(model)
            )
        self.forward = torch.compile(forward) if settings.compile else forward
        self.generator = torch.Generator().manual_seed(settings.seed)
        batches = GlobalBatches(len(task.train), settings.batch_size, self.generator, processes)
        # A loader draws a seed for its workers from its own generator, else from torch's global RNG,
        # which drives dropout: give it its own so that a resumed epoch sees the same dropout masks.
        collate = collate_fn(task, loaded, settings)
        self.loader = DataLoader(task.train, batch_sampler=batches, collate_fn=collate, generator=_worker_seeds())
        self.optimizer = _optimizer(model, settings)
        total = math.ceil(len(self.loader) / settings.grad_accum) * settings.epochs
        warmup = int(settings.warmup_ratio * total)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: min((s + 1) / max(warmup, 1), max(0.0, (total - s) / max(total - warmup, 1))),
        )
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.best_state: dict[str, torch.Tensor] | None = None
        self.position, self.restored = Position(0, 0, self.generator.get_state()), False
        self.mode = bar_mode(settings.progress) if processes.is_main else "none"
        self.bar = tqdm(
            total=total, initial=log.steps, desc="train", unit="step", disable=self.mode != "bar", dynamic_ncols=True
        )
        self.start = time.perf_counter() - log.train_seconds

    def restore(self) -> None:
        """Go on from the training checkpoint: weights, optimizer, schedule, log and data position."""
        self.position, self.best_state = load_checkpoint(
            self.checkpoint, self.model, self.optimizer, self.schedule, self.log
        )
        self.restored = True
        self.bar.n = self.log.steps
        self.start = time.perf_counter() - self.log.train_seconds
        print(f"resuming from {self.checkpoint} at step {self.log.steps} (epoch {self.position.epoch + 1})", flush=True)

    def save(self, epoch: int, batches_done: int, generator_state: torch.Tensor, epoch_loss: float) -> None:
        if self.checkpoint is not None and self.save_every and self.processes.is_main:
            state = Position(epoch, batches_done, generator_state, epoch_loss)
            save_checkpoint(
                self.checkpoint, self.model, self.optimizer, self.schedule, state, self.log, self.best_state
            )

    def train_epoch(self, epoch: int) -> tuple[float, int, float]:
        """One pass over the training data (the rest of it, in a resumed epoch): (summed loss, batches, start time)."""
        settings, log, position = self.settings, self.log, self.position
        train_mode(self.model)
        resumed_epoch = self.restored and epoch == position.epoch
        if resumed_epoch:  # the same shuffle as the interrupted epoch's
            self.generator.set_state(position.epoch_generator_state)
        resuming = resumed_epoch and position.batches_done > 0
        epoch_generator_state = self.generator.get_state()
        skip = position.batches_done if resuming else 0
        epoch_loss = position.epoch_loss if resuming else 0.0
        epoch_batches, epoch_start, step_start = skip, time.perf_counter(), time.perf_counter()
        for i, batch in enumerate(self.loader):
            if i < skip:
                continue
            loss = self._backward(batch)
            epoch_loss, epoch_batches = epoch_loss + loss, epoch_batches + 1
            if (i + 1) % settings.grad_accum and i + 1 != len(self.loader):
                continue
            self._step()
            log.step_seconds.append(time.perf_counter() - step_start)
            log.losses.append((log.steps, loss))
            step_start = time.perf_counter()
            self.bar.update()
            self.bar.set_postfix(
                epoch=epoch + 1,
                loss=f"{epoch_loss / epoch_batches:.4f}",
                ex_s=f"{(epoch_batches - skip) * settings.batch_size / (step_start - epoch_start):.1f}",
            )
            if self.save_every and log.steps % self.save_every == 0:
                log.train_seconds = time.perf_counter() - self.start
                self.save(epoch, i + 1, epoch_generator_state, epoch_loss)
        return epoch_loss, epoch_batches, epoch_start

    def _backward(self, batch: dict[str, torch.Tensor]) -> float:
        """The loss of one batch, its gradient accumulated; returns the loss."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with _autocast(self.device, self.settings.bf16):
            loss, count = loss_of(self.loaded.logits(self.forward, batch), batch["labels"], self.task.kind)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss.item()} at step {self.log.steps}: lower --lr")
        # DDP averages the ranks' gradients; weighting by this rank's share of the targets
        # makes that average the gradient of the global batch's mean loss.
        share = count * self.processes.world / global_count(count, self.processes, self.device)
        (loss * share / self.settings.grad_accum).backward()
        return loss.item()

    def _step(self) -> None:
        if self.settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.settings.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.log.steps += 1

    def end_epoch(self, epoch: int, train_loss: float, started: float, on_best: Callable[[int], None] | None) -> None:
        """Batch-norm statistics, the validation score, the history row, the best epoch and a checkpoint."""
        settings, log = self.settings, self.log
        with _autocast(self.device, settings.bf16):
            batches = _precise_bn_batches(self.task, self.loaded, settings, self.device)
            recompute_batch_norm_statistics(self.model, batches, self.loaded.logits)
        log.train_seconds = time.perf_counter() - self.start
        val = evaluate(
            self.model, self.loaded, self.task, "val", settings, self.mode == "bar", processes=self.processes
        )
        row = {"epoch": epoch + 1, "step": log.steps, "train_loss": train_loss}
        row.update({f"val_{k}": v for k, v in val.items()})
        log.history.append(row)
        if self.mode == "lines":
            print(
                f"epoch {epoch + 1}/{settings.epochs}: train loss {train_loss:.4f}, "
                + ", ".join(f"val {k} {v:.4f}" for k, v in val.items())
                + f", {time.perf_counter() - started:.0f}s",
                flush=True,
            )
        if log.best_epoch is None or _better(val, log.best_val):
            log.best_epoch, log.best_val = epoch + 1, val
            self.best_state = {n: t.detach().clone() for n, t in trained_tensors(self.model).items()}
            if on_best is not None and self.processes.is_main:
                on_best(epoch + 1)
        self.save(epoch + 1, 0, self.generator.get_state(), 0.0)


def _better(new: dict[str, float], old: dict[str, float]) -> bool:
    return new["accuracy"] > old["accuracy"] if "accuracy" in new else new["loss"] < old["loss"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loaded: LoadedModel,
    task: Task,
    split: str,
    settings: TrainSettings,
    progress: bool = False,
    processes: Processes = ONE_PROCESS,
    generations: int = 0,
) -> dict[str, float]:
    """Accuracy and loss for classification; loss and perplexity (per target token) for causal LM, with
    accuracy when the task names its answers (the likeliest answer is the prediction) and ROUGE-L of greedy
    completions of the split's first ``generations`` prompts (causal LM only). (Every process scores the
    whole split, so all agree on the best epoch.)"""
    device = resolve_device(settings.device, processes)
    model.to(device).eval()
    examples: Sequence[dict] = task.split(split)
    if task.kind == "causal-lm" and task.label_names:
        scores = _choices(model, loaded, task, examples, settings, device)
    else:
        scores = _scored_batches(model, loaded, task, examples, settings, device, progress, split)
    if generations and task.kind == "causal-lm":
        with _autocast(device, settings.bf16):
            scores |= generation_scores(
                model,
                loaded.tokenizer,
                examples[:generations],
                settings.chat,
                settings.max_length,
                settings.eval_batch_size,
                device,
            )
    return scores


def _scored_batches(
    model: nn.Module,
    loaded: LoadedModel,
    task: Task,
    examples: Sequence[dict],
    settings: TrainSettings,
    device: torch.device,
    progress: bool,
    split: str,
) -> dict[str, float]:
    loader = DataLoader(
        examples, settings.eval_batch_size, collate_fn=collate_fn(task, loaded, settings), generator=_worker_seeds()
    )
    total_loss, targets, correct = 0.0, 0, 0
    for batch in tqdm(loader, desc=split, unit="batch", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(device, settings.bf16):
            logits = loaded.logits(model, batch)
        loss, count = loss_of(logits, batch["labels"], task.kind)
        total_loss, targets = total_loss + loss.item() * count, targets + count
        if task.kind != "causal-lm":
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    loss = total_loss / max(targets, 1)
    if task.kind == "causal-lm":
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    return {"accuracy": correct / max(len(examples), 1), "loss": loss}


def _choices(
    model: nn.Module, loaded: LoadedModel, task: Task, examples: Sequence[dict], settings: TrainSettings, device
) -> dict[str, float]:
    with _autocast(device, settings.bf16):
        return choice_scores(
            model,
            task,
            examples,
            loaded.tokenizer,
            settings.max_length,
            settings.chat,
            settings.eval_batch_size,
            device,
        )


_CLEAR_REFS, _STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> bool:
    """Start the peak that :func:`peak_memory_mib` reads from now: the CUDA allocator's, or on Linux the
    process's resident-set high-water mark (``5`` written to ``/proc/self/clear_refs`` resets it). False
    where the CPU peak cannot be reset: it then stays the process's since it started."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_memory_mib(device: torch.device, since_reset: bool = False) -> dict[str, Any]:
    """CUDA: the allocator's peak; CPU: the process's peak resident set (includes the model and data),
    since :func:`reset_peak_memory` where that succeeded (``since_reset``), else since the process began."""
    if device.type == "cuda":
        return {"peak_cuda_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    high_water = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text()) if _STATUS.is_file() else None
    if high_water is None:
        return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_rss_since": "start"}
    return {"peak_rss_mib": int(high_water.group(1)) / 1024, "peak_rss_since": "run" if since_reset else "start"}
