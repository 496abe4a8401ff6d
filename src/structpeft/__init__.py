"""structpeft: structure-aware parameter-efficient fine-tuning for PyTorch models."""

from structpeft.core import (
    AdaptedLayer,
    AdapterConfig,
    AdapterDelta,
    CheckpointError,
    PeftModel,
    get_peft_model,
)
from structpeft.methods import FloraConfig, LoraConfig, SurmConfig

__version__ = "0.1.0"

__all__ = [
    "AdaptedLayer",
    "AdapterConfig",
    "AdapterDelta",
    "CheckpointError",
    "FloraConfig",
    "LoraConfig",
    "PeftModel",
    "SurmConfig",
    "get_peft_model",
]
