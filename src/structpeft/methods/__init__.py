"""One sub-package per method. Importing this package imports every one of them, which registers each
method's config (for checkpoint loading) and card (for the workflow): a new method is a new folder here."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if _module.ispkg:
        importlib.import_module(f"{__name__}.{_module.name}")

from structpeft.methods.coeff import CoeffConfig  # noqa: E402 - the methods every user meets, by name
from structpeft.methods.flora import FloraConfig  # noqa: E402
from structpeft.methods.kernel_mix import KernelMixConfig  # noqa: E402
from structpeft.methods.lora import LoraConfig  # noqa: E402
from structpeft.methods.surm import SurmConfig  # noqa: E402

__all__ = ["CoeffConfig", "FloraConfig", "KernelMixConfig", "LoraConfig", "SurmConfig"]
