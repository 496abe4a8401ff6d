"""Rotten Tomatoes review snippets (Pang & Lee), fresh vs rotten, split by movie."""

from __future__ import annotations

import bz2
import csv
import hashlib
import random
from dataclasses import dataclass

from structpeft.zoo.assets import ROTTEN_TOMATOES

LABELS = ("rotten", "fresh")


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1 = fresh


def _is_test_movie(movie: str) -> bool:
    # Split by movie so that no movie's reviews are in both sets; md5 keeps it stable everywhere.
    return int(hashlib.md5(movie.encode()).hexdigest(), 16) % 5 == 0


def load_rotten_tomatoes() -> tuple[list[Example], list[Example]]:
    """(train, test): review rows only (no plot synopses), each text once, split by movie."""
    train: list[Example] = []
    test: list[Example] = []
    seen: set[str] = set()
    with bz2.open(ROTTEN_TOMATOES.path(), "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] not in LABELS or row["text"] in seen:
                continue
            seen.add(row["text"])
            example = Example(row["text"], LABELS.index(row["category"]))
            (test if _is_test_movie(row["movie_name"]) else train).append(example)
    return train, test


def subsample(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A seeded random ``n`` of ``examples`` (all of them if n is None). The file is grouped by
    movie, so a plain prefix would be a few movies' reviews only."""
    if n is None or n >= len(examples):
        return examples
    return random.Random(seed).sample(examples, n)
