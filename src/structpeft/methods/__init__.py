"""One sub-package per method; importing it registers the method's config for checkpoint loading."""

from structpeft.methods.coeff import CoeffConfig
from structpeft.methods.flora import FloraConfig
from structpeft.methods.kernel_mix import KernelMixConfig
from structpeft.methods.lora import LoraConfig
from structpeft.methods.surm import SurmConfig

__all__ = ["CoeffConfig", "FloraConfig", "KernelMixConfig", "LoraConfig", "SurmConfig"]
