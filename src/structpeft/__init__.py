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
    quantize_embeddings,
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
    "quantize_embeddings",
]


def __getattr__(name: str):
    """Any method's config class by its name (``sp.MyMethodConfig``), for methods added as a folder in
    ``structpeft/methods`` without an entry here."""
    from structpeft.core import method_cards

    for card in method_cards().values():
        if card.config.__name__ == name:
            return card.config
    raise AttributeError(f"module 'structpeft' has no attribute {name!r}")
