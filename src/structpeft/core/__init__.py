"""Method-agnostic machinery: configs, injection, the wrapper model, checkpoint I/O."""

from structpeft.core.atomic import atomic_write_dir, atomic_write_file, committed_path, recover
from structpeft.core.cards import FAMILIES, MethodCard, method_cards, register_card
from structpeft.core.checkpoint import CONFIG_NAME, CheckpointError
from structpeft.core.config import AdapterConfig, register_method, registered_methods
from structpeft.core.export import ExportReport, LayerExport, check_rank_options, export_lora
from structpeft.core.export_gguf import export_gguf, gguf_architecture
from structpeft.core.layers import (
    AdaptedLayer,
    AdapterDelta,
    LayerGeometry,
    ModuleAdapters,
    layer_geometry,
    module_host,
)
from structpeft.core.model import PeftModel, get_peft_model
from structpeft.core.quantized_embeddings import quantize_embeddings

__all__ = [
    "quantize_embeddings",
    "CONFIG_NAME",
    "FAMILIES",
    "MethodCard",
    "AdaptedLayer",
    "AdapterConfig",
    "AdapterDelta",
    "CheckpointError",
    "ExportReport",
    "LayerExport",
    "LayerGeometry",
    "ModuleAdapters",
    "PeftModel",
    "atomic_write_dir",
    "atomic_write_file",
    "check_rank_options",
    "committed_path",
    "export_gguf",
    "export_lora",
    "get_peft_model",
    "gguf_architecture",
    "layer_geometry",
    "method_cards",
    "module_host",
    "recover",
    "register_card",
    "register_method",
    "registered_methods",
]
