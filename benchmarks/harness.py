"""Side-by-side measurement: interleaved training steps, medians, and memory, all in one process.

Timings of a shared, noisy machine only mean something as ratios of runs interleaved step by step,
so every candidate takes one step per round and the report is median(candidate) / median(reference).
Memory on CUDA is the allocator's peak; on CPU (no allocator statistics) it is the bytes autograd
saves for the backward pass during one forward, counted once per storage: the activation memory
that the method adds, measured exactly rather than through the process's noisy RSS.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Candidate:
    name: str
    model: nn.Module
    loss: Callable[[nn.Module], torch.Tensor]
    optimizer: torch.optim.Optimizer = field(init=False)
    times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)

    def step(self) -> float:
        start = time.perf_counter()
        self.loss(self.model).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


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


def peak_memory(candidate: Candidate) -> int:
    if not torch.cuda.is_available():
        return saved_activation_bytes(candidate)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    candidate.step()
    return torch.cuda.max_memory_allocated()


def compare(candidates: list[Candidate], rounds: int, warmup: int = 3) -> dict[str, dict[str, float]]:
    """Median step time and memory of each candidate; rounds interleave the candidates."""
    for c in candidates:
        for _ in range(warmup):
            c.step()
    for r in range(rounds):
        order = candidates if r % 2 == 0 else candidates[::-1]  # no candidate always runs first
        for c in order:
            c.times.append(c.step())
    return {
        c.name: {"step_s": statistics.median(c.times), "memory": peak_memory(c), "trainable": c.trainable}
        for c in candidates
    }


def print_ratios(
    title: str, results: dict[str, dict[str, float]], pairs: list[tuple[str, str, float | None]]
) -> list[str]:
    """Print absolute figures, then ``a / b`` ratios with their targets; return failed targets."""
    print(f"\n## {title}")
    memory_unit = "peak CUDA MiB" if torch.cuda.is_available() else "saved-activation MiB"
    print(f"{'candidate':<28}{'trainable':>12}{'step ms':>10}{memory_unit:>22}")
    for name, r in results.items():
        print(f"{name:<28}{r['trainable']:>12,}{1000 * r['step_s']:>10.1f}{r['memory'] / 2**20:>22.1f}")
    missed = []
    for a, b, target in pairs:
        time_ratio = results[a]["step_s"] / results[b]["step_s"]
        mem_ratio = results[a]["memory"] / results[b]["memory"]
        verdict = ""
        if target is not None:
            ok = time_ratio <= target
            verdict = f"  target <= {target:.2f}x: {'met' if ok else 'MISSED'}"
            if not ok:
                missed.append(f"{title}: {a} / {b} = {time_ratio:.3f}x > {target:.2f}x")
        print(f"  {a} / {b}: step time {time_ratio:.3f}x, memory {mem_ratio:.3f}x{verdict}")
    return missed


def time_interleaved(functions: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, the calls interleaved round by round."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for r in range(warmup + rounds):
        items = list(functions.items())
        for name, fn in items if r % 2 == 0 else items[::-1]:
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
