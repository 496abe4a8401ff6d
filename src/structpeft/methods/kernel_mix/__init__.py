from structpeft.methods.kernel_mix.config import KernelMixConfig

__all__ = ["KernelMixConfig"]
