"""Side-by-side measurement: interleaved training steps, medians and memory, all in one process.

Timings on a shared, noisy machine only mean something as ratios of runs interleaved step by step,
so every candidate takes one step per round and the report is median(candidate) / median(reference).
On CUDA a step is timed with CUDA events and memory is the allocator's peak over one step; on CPU
(no allocator statistics) memory is the bytes autograd saves for the backward pass during one
forward, counted once per storage: the activation memory a method adds, measured exactly rather
than through the process's noisy resident set.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

Loss = Callable[[nn.Module], torch.Tensor]


def timed(work: Callable[[], object], device: torch.device) -> float:
    """Seconds ``work`` takes: CUDA events on a GPU (kernels run asynchronously), else the wall clock."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    start_s = time.perf_counter()
    work()
    return time.perf_counter() - start_s


def trainable_count(model: nn.Module) -> int:
    """Trainable parameters, each counted once (a compiled module shares those of the one it wraps)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


@dataclass
class Candidate:
    """A model (already on its device) and the loss of one training step on a fixed batch."""

    name: str
    model: nn.Module
    loss: Loss
    lr: float = 1e-4
    optimizer: torch.optim.Optimizer = field(init=False)
    times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=self.lr)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def trainable(self) -> int:
        return trainable_count(self.model)

    def _step(self) -> None:
        self.loss(self.model).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        """Seconds of one forward, backward and AdamW step."""
        return timed(self._step, self.device)


def saved_activation_bytes(candidate: Candidate) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = candidate.loss(candidate.model)
    loss.backward()
    candidate.optimizer.zero_grad(set_to_none=True)
    return sum(seen.values())


def step_memory(candidate: Candidate) -> int:
    """Bytes: the CUDA allocator's peak over one step, or on CPU the activations saved for backward."""
    if candidate.device.type != "cuda":
        return saved_activation_bytes(candidate)
    torch.cuda.synchronize(candidate.device)
    torch.cuda.reset_peak_memory_stats(candidate.device)
    candidate.step()
    return torch.cuda.max_memory_allocated(candidate.device)


def compare(candidates: list[Candidate], rounds: int, warmup: int = 3) -> dict[str, dict[str, float]]:
    """Median step time, memory and trainable count of each candidate; rounds interleave them."""
    for c in candidates:
        for _ in range(warmup):
            c.step()
    for r in range(rounds):
        for c in candidates if r % 2 == 0 else candidates[::-1]:  # no candidate always runs first
            c.times.append(c.step())
    return {
        c.name: {"step_s": statistics.median(c.times), "memory_bytes": step_memory(c), "trainable": c.trainable}
        for c in candidates
    }


def time_interleaved(
    functions: dict[str, Callable[[], object]], rounds: int, device: torch.device, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per call of each function, the calls interleaved round by round."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    items = list(functions.items())
    for r in range(warmup + rounds):
        for name, fn in items if r % 2 == 0 else items[::-1]:
            seconds = timed(fn, device)
            if r >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}
