"""What every data source hands the training loop: three splits of examples and how to batch them."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

TaskKind = Literal["text-classification", "image-classification", "causal-lm"]
CLASSIFICATION: tuple[TaskKind, ...] = ("text-classification", "image-classification")

# A single-file data source has no test split: one is carved with this fixed seed, so every run
# (whatever its --seed) is scored on the same held-out examples.
TEST_SEED = 0
TEST_FRACTION = 0.2


class TaskError(ValueError):
    """Data that cannot make a task: the message names the file and what is wrong."""


@dataclass
class Task:
    """Examples are plain dicts: ``{"text", "label"}``, ``{"image", "label"}`` (image a uint8
    (C, H, W) tensor or a file path), or ``{"prompt", "completion"}`` / ``{"text"}`` for causal LM.

    A causal-LM task with ``label_names`` is a choice between answers: each example's completion is
    ``label_names[label]``, and evaluation scores which answer the model finds likeliest."""

    name: str
    kind: TaskKind
    train: Sequence[dict[str, Any]]
    val: Sequence[dict[str, Any]]
    test: Sequence[dict[str, Any]]
    label_names: list[str] | None = None
    source: dict[str, Any] = field(default_factory=dict)  # what made it: path, columns, sizes

    @property
    def num_labels(self) -> int:
        return len(self.label_names or [])

    def split(self, name: str) -> Sequence[dict[str, Any]]:
        if name not in ("train", "val", "test"):
            raise TaskError(f"unknown split {name!r}: choose train, val or test")
        return getattr(self, name)

    def fingerprint(self) -> str:
        """A short hash of what was trained and scored on (sizes, labels, a sample of examples)."""
        digest = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            digest.update(str(len(split)).encode())
            for example in [split[i] for i in range(0, len(split), max(1, len(split) // 64))]:
                digest.update(json.dumps(_printable(example), sort_keys=True).encode())
        digest.update(json.dumps(self.label_names).encode())
        return digest.hexdigest()[:16]


def _printable(example: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in example.items():
        if hasattr(value, "numpy"):  # an image tensor: its bytes' hash stands for it
            value = hashlib.sha256(value.numpy().tobytes()).hexdigest()[:16]
        out[key] = value if isinstance(value, str | int | float | None) else str(value)
    return out


def carve(examples: Sequence, size: float | int, seed: int) -> tuple[list, list]:
    """(rest, carved): a seeded random ``size`` of ``examples`` (a fraction in (0, 1) or a count)."""
    n = round(size * len(examples)) if isinstance(size, float) and size < 1 else int(size)
    if not 0 < n < len(examples):
        raise TaskError(f"cannot carve {size} examples out of {len(examples)}: give a smaller --val-size")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    carved = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in carved], [examples[i] for i in sorted(carved)]


def subsample(examples: Sequence, n: int | None, seed: int) -> Sequence:
    """A seeded random ``n`` of ``examples`` (all of them if n is None or larger). Files are often
    grouped (by movie, by class), so a prefix would be biased."""
    if n is None or n >= len(examples):
        return examples
    return [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), n))]


def make_task(
    name: str,
    kind: TaskKind,
    train: Sequence[dict],
    test: Sequence[dict] | None,
    *,
    val_size: float | int,
    seed: int,
    label_names: list[str] | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    source: dict[str, Any] | None = None,
) -> Task:
    """The three splits: test from the source (or carved with a fixed seed), validation carved from
    train with the run's seed, then the optional subsets (test's fixed, so runs compare)."""
    if test is None:
        train, test = carve(train, TEST_FRACTION, TEST_SEED)
    train, val = carve(train, val_size, seed)
    train = subsample(train, train_size, seed)
    test = subsample(test, test_size, TEST_SEED)
    if kind in CLASSIFICATION or label_names is not None:  # a causal-LM task may name its answers
        _check_labels(name, label_names, (train, val, test))
    info = {**(source or {}), "train": len(train), "val": len(val), "test": len(test)}
    return Task(name, kind, train, val, test, label_names, info)


def _check_labels(name: str, label_names: list[str] | None, splits: tuple[Sequence[dict], ...]) -> None:
    if not label_names or len(label_names) < 2:
        raise TaskError(f"{name}: a classification task needs at least two classes, found {label_names or []}")
    seen = {e["label"] for split in splits for e in split}
    if not seen <= set(range(len(label_names))):
        raise TaskError(f"{name}: labels {sorted(seen - set(range(len(label_names))))} are not classes")
