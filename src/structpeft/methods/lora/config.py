"""LoRA configuration, serialised in HF PEFT's ``LoraConfig`` layout so checkpoints move both ways."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from structpeft.core.config import AdapterConfig, register_method

# HF PEFT LoRA options that change the maths; an HF checkpoint using any of them is refused
# rather than loaded as plain LoRA and silently computing something else.
_UNSUPPORTED_HF_OPTIONS = {
    "use_dora": False,
    "use_rslora": False,
    "bias": "none",
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "target_parameters": None,
}


@register_method
@dataclass
class LoraConfig(AdapterConfig):
    """LoRA (Hu et al. 2021, arXiv 2106.09685): ``ΔW = (alpha / r) · B A``, B zero at start."""

    peft_type = "LORA"

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r}")

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
            **_UNSUPPORTED_HF_OPTIONS,
            "fan_in_fan_out": False,
            "task_type": None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        d = dict(d)
        for option, plain in _UNSUPPORTED_HF_OPTIONS.items():
            value = d.pop(option, plain)
            if value not in (plain, None, {}, False, "none"):
                raise ValueError(f"LoRA option {option}={value!r} is not supported by structpeft (plain LoRA only)")
        init = d.pop("init_lora_weights", d.pop("init_weights", True))
        for hf_name in ("fan_in_fan_out", "task_type", "peft_type"):
            d.pop(hf_name, None)
        alpha = d.pop("lora_alpha", d.pop("alpha", 8.0))
        dropout = d.pop("lora_dropout", d.pop("dropout", 0.0))
        # HF's init schemes ("gaussian", "pissa", ...) only matter before training; a loaded
        # checkpoint overwrites the factors anyway.
        init_weights = init if isinstance(init, bool) else True
        return super().from_dict({**d, "alpha": alpha, "dropout": dropout, "init_weights": init_weights})
