"""LoRA configuration, serialised in HF PEFT's ``LoraConfig`` layout so checkpoints move both ways."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from structpeft.core.config import HF_BOOKKEEPING_FIELDS, AdapterConfig, check_probability, register_method

# HF PEFT LoRA options that change the maths (or what is adapted); an HF checkpoint using any of them
# is refused rather than loaded as plain LoRA and silently computing something else. The first ones
# are also written, at their plain values, so that HF PEFT reads our checkpoints as plain LoRA.
_WRITTEN_HF_OPTIONS = {
    "use_dora": False,
    "use_rslora": False,
    "bias": "none",
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "target_parameters": None,
}
_UNSUPPORTED_HF_OPTIONS = {
    **_WRITTEN_HF_OPTIONS,
    "exclude_modules": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "monteclora_config": None,
    "velora_config": None,
}
# HF PEFT LoRA fields without meaning here: storage orientation (structpeft reads the layer type),
# initialisation schemes (a loaded checkpoint overwrites the factors) and distributed/quantised set-ups.
HF_LORA_IGNORED_FIELDS = HF_BOOKKEEPING_FIELDS | {
    "fan_in_fan_out",
    "layers_pattern",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "ensure_weight_tying",
}


@register_method
@dataclass
class LoraConfig(AdapterConfig):
    """LoRA (Hu et al. 2021, arXiv 2106.09685): ``ΔW = (alpha / r) · B A``, B zero at start."""

    peft_type = "LORA"
    ignored_fields = HF_LORA_IGNORED_FIELDS
    field_aliases = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init_weights"}

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r}")
        check_probability(self, "dropout")

    def create_delta(self, layer: nn.Module, name: str):
        from structpeft.methods.lora.layer import LoraDelta

        return LoraDelta(layer, name, self)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "peft_type": self.peft_type,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "modules_to_save": self.modules_to_save,
            "init_lora_weights": self.init_weights,
            **_WRITTEN_HF_OPTIONS,
            "fan_in_fan_out": False,
            "task_type": None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        d = dict(d)
        for option, plain in _UNSUPPORTED_HF_OPTIONS.items():
            value = d.pop(option, plain)
            if value not in (plain, None, {}, [], False, "none"):
                raise ValueError(f"LoRA option {option}={value!r} is not supported by structpeft (plain LoRA only)")
        for key in ("init_lora_weights", "init_weights"):
            # HF's init schemes ("gaussian", "pissa", ...) only matter before training; a loaded
            # checkpoint overwrites the factors anyway.
            if isinstance(d.get(key), str):
                d[key] = True
        return super().from_dict(d)
