"""Data sources behind one small :class:`Task`: presets, tables (CSV / JSON Lines / Parquet / a saved
HF dataset) and image folders. :func:`load_task` picks the source and the task type from ``ref``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from structpeft.workflow.tasks.base import CLASSIFICATION, Task, TaskError, TaskKind, carve, make_task, subsample
from structpeft.workflow.tasks.causal_lm import (
    IGNORE_INDEX,
    causal_lm,
    check_rows,
    collate_causal_lm,
    example_tokens,
    prompt_ids,
)
from structpeft.workflow.tasks.images import collate_images, fashion_mnist, image_folder, is_image_folder, mnist_5k
from structpeft.workflow.tasks.tables import (
    LABEL_COLUMNS,
    is_table,
    pick_column,
    read_table,
    rotten_tomatoes,
    rotten_tomatoes_generation,
    text_classification,
    wordnet_definitions,
)

PRESETS = {
    "rotten-tomatoes": rotten_tomatoes,
    "rotten-tomatoes-generation": rotten_tomatoes_generation,
    "fashion-mnist": fashion_mnist,
    "mnist-5k": mnist_5k,
    "wordnet-definitions": wordnet_definitions,
}
TASK_TYPES: tuple[TaskKind, ...] = ("text-classification", "image-classification", "causal-lm")

__all__ = [
    "CLASSIFICATION",
    "IGNORE_INDEX",
    "PRESETS",
    "TASK_TYPES",
    "Task",
    "TaskError",
    "TaskKind",
    "carve",
    "check_rows",
    "check_task_ref",
    "collate_causal_lm",
    "collate_images",
    "example_tokens",
    "load_task",
    "make_task",
    "prompt_ids",
    "subsample",
]


def check_task_ref(ref: str) -> None:
    """Fail fast (before any model loads) on a task that names nothing readable."""
    if ref in PRESETS:
        return
    path = Path(ref)
    if not path.exists():
        raise TaskError(f"unknown task {ref!r}: not a preset ({', '.join(PRESETS)}) and no such file or folder")
    if not (is_table(path) or is_image_folder(path)):
        raise TaskError(
            f"{ref}: not a task: give a CSV / JSONL / Parquet file, a folder of class subfolders of images, "
            f"or a folder written by datasets' save_to_disk"
        )


def load_task(
    ref: str,
    *,
    task_type: TaskKind | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    val_size: float | int = 0.1,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
) -> Task:
    """The task ``ref`` names: a preset, a table file, a saved HF dataset or an image folder.

    The type comes from the data unless ``task_type`` says: an image column or folder is image
    classification; ``prompt``/``completion`` columns, or a ``text`` column with no label column,
    are causal-LM fine-tuning; text and label columns are text classification.
    """
    check_task_ref(ref)
    common: dict[str, Any] = {"val_size": val_size, "seed": seed, "train_size": train_size, "test_size": test_size}
    if ref in PRESETS:
        task = PRESETS[ref](**common)
    elif is_table(path := Path(ref)):
        task = _from_table(path, task_type, text_column, label_column, common)
    else:
        task = image_folder(path, **common)
    if task_type is not None and task.kind != task_type:
        raise TaskError(f"{ref} is a {task.kind} task, not {task_type}")
    return task


def _from_table(path: Path, task_type, text_column, label_column, common: dict[str, Any]) -> Task:
    import datasets

    splits = read_table(path)
    if "train" not in splits:
        raise TaskError(f"{path}: a saved dataset needs a 'train' split (it has {', '.join(splits)})")
    features = splits["train"].features
    columns = list(splits["train"].column_names)
    image_columns = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    if task_type == "image-classification" or (task_type is None and image_columns):
        if not image_columns:
            raise TaskError(f"{path}: no image column (columns: {', '.join(columns)})")
        label = pick_column(columns, label_column, LABEL_COLUMNS, "label", path)
        from structpeft.workflow.tasks.images import saved_image_dataset

        return saved_image_dataset(splits, path, image_columns[0], label, **common)
    has_label = label_column is not None or any(c in columns for c in LABEL_COLUMNS)
    if task_type == "causal-lm" or (task_type is None and not has_label):
        return causal_lm(splits, path, **common)
    return text_classification(splits, path, text_column=text_column, label_column=label_column, **common)
