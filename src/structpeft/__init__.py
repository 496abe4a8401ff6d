"""structpeft: structure-aware parameter-efficient fine-tuning for PyTorch models."""

from structpeft.core import (
    AdaptedLayer,
    AdapterConfig,
    AdapterDelta,
    CheckpointError,
    PeftModel,
    export_gguf,
    export_lora,
    get_peft_model,
)
from structpeft.methods import CoeffConfig, FloraConfig, KernelMixConfig, LoraConfig, SurmConfig

__version__ = "0.1.0"

__all__ = [
    "AdaptedLayer",
    "AdapterConfig",
    "AdapterDelta",
    "CheckpointError",
    "CoeffConfig",
    "FloraConfig",
    "KernelMixConfig",
    "LoraConfig",
    "PeftModel",
    "SurmConfig",
    "export_gguf",
    "export_lora",
    "get_peft_model",
]
