from structpeft.methods.kernel_mix.card import CARD
from structpeft.methods.kernel_mix.config import KernelMixConfig

__all__ = ["CARD", "KernelMixConfig"]
