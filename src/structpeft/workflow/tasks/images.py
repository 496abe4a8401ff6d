"""Image classification: Fashion-MNIST and MNIST presets, a folder with one subfolder per class,
or a saved HF dataset with an image column. Images are decoded and resized when batched."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from structpeft.workflow.tasks.base import Task, TaskError, make_task

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _from_tensors(images: torch.Tensor, labels: torch.Tensor) -> list[dict[str, Any]]:
    return [{"image": image, "label": int(label)} for image, label in zip(images, labels)]


def fashion_mnist(*, val_size: float | int, seed: int, **sizes: Any) -> Task:
    from structpeft.zoo.vision_data import FASHION_MNIST_LABELS, load_fashion_mnist

    (train_x, train_y), (test_x, test_y) = load_fashion_mnist()
    return make_task(
        "fashion-mnist",
        "image-classification",
        _from_tensors(train_x, train_y),
        _from_tensors(test_x, test_y),
        val_size=val_size,
        seed=seed,
        label_names=list(FASHION_MNIST_LABELS),
        source={"preset": "fashion-mnist"},
        **sizes,
    )


def mnist_5k(*, val_size: float | int, seed: int, **sizes: Any) -> Task:
    from structpeft.zoo.vision_data import load_mnist_5k

    images, labels = load_mnist_5k()
    return make_task(
        "mnist-5k",
        "image-classification",
        _from_tensors(images, labels),
        None,
        val_size=val_size,
        seed=seed,
        label_names=[str(i) for i in range(10)],
        source={"preset": "mnist-5k"},
        **sizes,
    )


def is_image_folder(path: Path) -> bool:
    return path.is_dir() and any(child.is_dir() for child in path.iterdir())


def _class_folders(root: Path) -> dict[str, list[Path]]:
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes[folder.name] = files
    return classes


def image_folder(path: Path, *, val_size: float | int, seed: int, **sizes: Any) -> Task:
    """``path/<class>/*.png``; or ``path/train/<class>/...`` and ``path/test/<class>/...``."""
    split_roots = {s: path / s for s in ("train", "test") if (path / s).is_dir()}
    roots = split_roots if "train" in split_roots else {"train": path}
    found = {split: _class_folders(root) for split, root in roots.items()}
    if not found["train"]:
        raise TaskError(
            f"{path}: no images found; an image folder holds one subfolder per class with image files "
            f"({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    classes = sorted(set().union(*found.values()))
    examples = {
        split: [{"image": str(f), "label": classes.index(c)} for c, files in folders.items() for f in files]
        for split, folders in found.items()
    }
    return make_task(
        path.name,
        "image-classification",
        examples["train"],
        examples.get("test"),
        val_size=val_size,
        seed=seed,
        label_names=classes,
        source={"path": str(path)},
        **sizes,
    )


def saved_image_dataset(splits: dict[str, Any], path: Path, image_column: str, label_column: str, **kw: Any) -> Task:
    """A saved HF dataset with an ``Image`` column; images stay encoded until batched."""
    import datasets

    examples = {}
    for split in ("train", "test"):
        if split in splits:
            data = splits[split].cast_column(image_column, datasets.Image(decode=False))
            examples[split] = [
                {"image": row[image_column]["bytes"] or row[image_column]["path"], "label": int(row[label_column])}
                for row in data
            ]
    names = list(splits["train"].features[label_column].names)
    return make_task(
        path.name,
        "image-classification",
        examples["train"],
        examples.get("test"),
        label_names=names,
        source={"path": str(path), "image_column": image_column},
        **kw,
    )


def decode_image(image: torch.Tensor | str | bytes) -> torch.Tensor:
    """A uint8 (3, H, W) tensor from a tensor ((H, W) grey or (C, H, W)), a file path or encoded bytes."""
    if isinstance(image, str | bytes):
        import numpy as np
        from PIL import Image

        with Image.open(image if isinstance(image, str) else io.BytesIO(image)) as pil:
            image = torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1)
    if image.dim() == 2:
        image = image.unsqueeze(0)
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def collate_images(
    examples: list[dict[str, Any]], image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> dict[str, torch.Tensor]:
    """``pixel_values`` (B, 3, S, S), normalised as the model was trained, and ``labels`` (B,)."""
    pixels = []
    for example in examples:
        image = decode_image(example["image"]).float().div(255).unsqueeze(0)  # (1, 3, H, W)
        if image.shape[-2:] != (image_size, image_size):
            image = F.interpolate(image, size=(image_size, image_size), mode="bilinear", antialias=True)
        pixels.append(image)
    pixels = torch.cat(pixels)
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return {"pixel_values": (pixels - mean_t) / std_t, "labels": torch.tensor([e["label"] for e in examples])}
