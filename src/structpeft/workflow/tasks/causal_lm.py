"""Causal-LM fine-tuning data: rows of ``prompt`` + ``completion`` (loss on the completion only) or
of ``text`` (loss on every token)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from structpeft.workflow.tasks.base import Task, TaskError, make_task

IGNORE_INDEX = -100  # positions the loss skips: prompt tokens and padding


def causal_lm(splits: dict[str, Any], path: Path, **kw: Any) -> Task:
    columns = list(splits["train"].column_names)
    if {"prompt", "completion"} <= set(columns):
        fields = ("prompt", "completion")
    elif "text" in columns:
        fields = ("text",)
    else:
        raise TaskError(
            f"{path}: a causal-LM file needs 'prompt' and 'completion' columns, or 'text' "
            f"(columns: {', '.join(columns)})"
        )
    examples = {}
    for split in ("train", "test"):
        if split in splits:
            rows = splits[split].select_columns(list(fields)).to_list()
            if any(not isinstance(row[f], str) for row in rows for f in fields):
                raise TaskError(f"{path}: every {' and '.join(fields)} value must be a string")
            examples[split] = rows
    return make_task(
        path.name,
        "causal-lm",
        examples["train"],
        examples.get("test"),
        source={"path": str(path), "fields": fields},
        **kw,
    )


def collate_causal_lm(examples: list[dict[str, str]], tokenizer: Any, max_length: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` (the ids, IGNORE_INDEX on prompt and padding),
    padded on the right to the batch's longest row."""
    rows = []
    for example in examples:
        if "completion" in example:
            prompt = tokenizer(example["prompt"], add_special_tokens=True)["input_ids"]
            completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                completion = completion + [tokenizer.eos_token_id]  # so generation learns to stop
            ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
        else:
            ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"]
            labels = list(ids)
        rows.append((ids[:max_length], labels[:max_length]))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, labels in rows:
        gap = width - len(ids)
        batch["input_ids"].append(ids + [pad] * gap)
        batch["attention_mask"].append([1] * len(ids) + [0] * gap)
        batch["labels"].append(labels + [IGNORE_INDEX] * gap)
    return {k: torch.tensor(v) for k, v in batch.items()}
