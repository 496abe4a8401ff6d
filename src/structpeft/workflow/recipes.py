"""Method names to adapter configs, with each method's default hyperparameters per model family.

The method names come from structpeft's registry (``peft_type`` lower-cased, ``_`` -> ``-``: lora,
flora, surm, coeff, kernel-mix), joined by ``+`` to compose them in one adapter (``coeff+lora``),
plus two baselines that are not adapters: ``probe`` (the new head only) and ``full`` (every weight),
and HF PEFT's own methods as references (``hf-lora``, ``hf-loha``, ``hf-c3a``: the ``peft`` package,
imported when used), trained by the same loop on the same batches; they do not compose.
``surm-<structure>[-adapter]`` is shorthand for ``surm`` with those two fields set.

Where each default comes from is recorded in docs/workflow.md ("Default hyperparameters").
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from torch import nn

import structpeft as sp
from structpeft.core import registered_methods

BASELINES = ("probe", "full")
SURM_ADAPTER_TARGETS = ["attention.output.dense", "output.dense"]  # Houlsby placement, BERT-style names
NOT_SETTABLE = {"extra", "modules_to_save"}  # modules_to_save is the head the model gives
# HF PEFT's methods, by their config class in the peft package.
HF_METHODS = {"hf-lora": "LoraConfig", "hf-loha": "LoHaConfig", "hf-c3a": "C3AConfig"}
# Coeff-Tuning is a plug-in on top of another method (arXiv 2503.18337): in a composition it keeps
# its own learning rate and the other method leads (its lr is --lr's and the head's).
PLUG_INS = ("coeff",)


class RecipeError(ValueError):
    """A method name or setting that does not exist: the message lists what does."""


def adapter_methods() -> dict[str, type[sp.AdapterConfig]]:
    """CLI name -> config class, for every registered method."""
    return {t.lower().replace("_", "-"): cls for t, cls in registered_methods().items()}


def method_names() -> list[str]:
    return sorted(adapter_methods()) + list(BASELINES) + list(HF_METHODS)


def config_class(name: str) -> type:
    """The config class of a method name: structpeft's, or for an ``hf-*`` name HF PEFT's."""
    if name not in HF_METHODS:
        return adapter_methods()[name]
    try:
        import peft
    except ImportError as e:
        raise RecipeError(f"{name} is HF PEFT's method: install it with pip install peft") from e
    return getattr(peft, HF_METHODS[name])


# Defaults per model family: config fields and the learning rate. "targets" is resolved against
# the model: "linear" = every linear layer but the head and the output embedding; "conv" = every
# Conv2d; None = the method's own default (every attention layer or block).
_LINEAR_WEIGHTS = {"target_modules": "linear"}
# HF PEFT references. C3A's block size must divide every target's in and out sizes: "gcd" takes the
# largest that does (PEFT's own advice); its lr is ours (C3A has no alpha scaling, so it wants a larger one).
_HF_LINEAR = {
    "hf-lora": {"r": 8, "lora_alpha": 16, "lr": 1e-3, **_LINEAR_WEIGHTS},
    "hf-loha": {"r": 8, "alpha": 16, "lr": 1e-3, **_LINEAR_WEIGHTS},
    "hf-c3a": {"block_size": "gcd", "lr": 1e-2, **_LINEAR_WEIGHTS},
}
_TEXT_ENCODER: dict[str, dict[str, Any]] = {
    "lora": {"r": 8, "alpha": 16, "lr": 1e-3, **_LINEAR_WEIGHTS},
    "flora": {"r": 8, "alpha": 16, "lr": 5e-3, **_LINEAR_WEIGHTS},
    "surm": {"alpha": 1.0, "lr": 2e-2, **_LINEAR_WEIGHTS},
    "coeff": {"lr": 2e-2},
    "kernel-mix": {"lr": 1e-3},
    "probe": {"lr": 2e-2},
    "full": {"lr": 5e-5},
    **_HF_LINEAR,
}
DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "text-encoder": _TEXT_ENCODER,
    "vit": {
        **_TEXT_ENCODER,
        # chosen on validation from 2e-2 x {1/3, 1, 3} (DINOv2-S, 2,000 Fashion-MNIST images, 1 epoch):
        # 6e-2 diverged; 2e-2 and 6.7e-3 tied on accuracy, 6.7e-3 had the lower loss
        "coeff": {"lr": 6.7e-3},
        "probe": {"lr": 1e-2},
    },
    "convnet": {
        "lora": {"r": 8, "alpha": 16, "lr": 1e-3, "target_modules": "conv"},
        "flora": {"r": 8, "alpha": 16, "lr": 5e-3, "target_modules": "conv"},
        "probe": {"lr": 1e-2},
        "full": {"lr": 1e-3},
        # HF PEFT's LoRA-conv needs the rank divisible by a conv's groups: it skips the depthwise convs
        "hf-lora": {"r": 8, "lora_alpha": 16, "lr": 1e-3, "target_modules": "conv-dense"},
        "hf-loha": {"r": 8, "alpha": 16, "lr": 1e-3, "target_modules": "conv"},
    },
    "decoder": {
        "lora": {"r": 8, "alpha": 16, "lr": 2e-4, **_LINEAR_WEIGHTS},
        "flora": {"r": 8, "alpha": 16, "lr": 1e-3, **_LINEAR_WEIGHTS},
        "surm": {"alpha": 1.0, "lr": 5e-3, **_LINEAR_WEIGHTS},
        "coeff": {"lr": 5e-3},
        "kernel-mix": {"lr": 2e-4},
        "probe": {"lr": 1e-3},
        "full": {"lr": 2e-5},
    },
}


@dataclass
class Recipe:
    """What ``finetune`` trains: the adapter's configs (empty for a baseline) and the learning rates."""

    method: str
    parts: list[str]  # method names in the composition, e.g. ["coeff", "lora"]
    configs: list[sp.AdapterConfig] = field(default_factory=list)
    lr: float = 1e-3  # the leading method's (and the head's)
    lr_by_method: dict[str, float] = field(default_factory=dict)  # the others', by parameter-name key

    @property
    def baseline(self) -> str | None:
        return self.parts[0] if self.parts[0] in BASELINES else None

    def adapt(self, model: nn.Module, head: list[str]) -> nn.Module:
        """``model`` ready to train: a PeftModel, or for a baseline the model with the right weights trainable."""
        if self.parts[0] in HF_METHODS:
            import peft

            return peft.get_peft_model(model, self.configs[0])
        if self.baseline is None:
            return sp.get_peft_model(model, self.configs)
        for name, p in model.named_parameters():
            p.requires_grad_(self.baseline == "full" or any(name == h or name.startswith(h + ".") for h in head))
        return model

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "configs": [c.to_dict() for c in self.configs],
            "lr": self.lr,
            "lr_by_method": self.lr_by_method,
        }


def split_method(method: str) -> list[tuple[str, dict[str, Any]]]:
    """``"coeff+surm-toeplitz"`` -> [("coeff", {}), ("surm", {"structure": "toeplitz"})], checked."""
    known = adapter_methods()
    parts = []
    for name in method.split("+"):
        fields: dict[str, Any] = {}
        if name.startswith("surm-") and "surm" in known:
            structure = name.removeprefix("surm-").removesuffix("-adapter")
            fields = {"structure": structure, "mode": "adapter" if name.endswith("-adapter") else "lora"}
            name = "surm"
        if name not in known and name not in BASELINES and name not in HF_METHODS:
            raise RecipeError(f"unknown method {name!r}; choose from {', '.join(method_names())} (join with '+')")
        parts.append((name, fields))
    names = [n for n, _ in parts]
    if len(parts) > 1 and any(n in BASELINES for n in names):
        raise RecipeError(f"{method}: the baselines {' and '.join(BASELINES)} do not compose with adapters")
    if len(parts) > 1 and any(n in HF_METHODS for n in names):
        raise RecipeError(f"{method}: HF PEFT's methods ({', '.join(HF_METHODS)}) do not compose")
    if len(set(names)) != len(names):
        raise RecipeError(f"{method}: a method appears twice")
    return parts


def settable_fields(name: str) -> list[str]:
    if name in BASELINES:
        return ["lr"]
    cls = config_class(name)
    return sorted({f.name for f in dataclasses.fields(cls)} - NOT_SETTABLE | {"lr"})


PYTHON_SPELLINGS = {"True": True, "False": False, "None": None}


def parse_value(key: str, text: str) -> Any:
    """JSON where it parses (numbers, booleans, lists, null), Python's True, False and None, else the text;
    comma lists of names for the module-list fields."""
    if text in PYTHON_SPELLINGS:
        return PYTHON_SPELLINGS[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if key == "target_modules" and "," in text:
            return [t.strip() for t in text.split(",") if t.strip()]
        return text


def route_settings(parts: list[str], settings: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``--set`` pairs to the methods they configure: ``key`` goes to every method with that field,
    ``method.key`` to that one. A key no method has is an error naming the fields they have."""
    routed: dict[str, dict[str, Any]] = {p: {} for p in parts}
    for raw_key, text in settings.items():
        owner, _, key = raw_key.rpartition(".")
        if owner and owner not in parts:
            raise RecipeError(f"--set {raw_key}: {owner!r} is not in this run's methods ({', '.join(parts)})")
        takers = [owner] if owner else [p for p in parts if key in settable_fields(p)]
        if not takers or key not in settable_fields(takers[0]):
            have = "; ".join(f"{p}: {', '.join(settable_fields(p))}" for p in (takers or parts))
            raise RecipeError(f"--set {raw_key}: no such field. Fields: {have}")
        for p in takers:
            routed[p][key] = parse_value(key, text)
    return routed


def check_method(method: str, settings: dict[str, str]) -> None:
    """Everything about the method that can be checked before a model loads: its name, the fields
    ``--set`` names, and their values (each config validates itself when built)."""
    parts = split_method(method)
    routed = route_settings([n for n, _ in parts], settings)
    for name, alias_fields in parts:
        if name in BASELINES:
            continue
        fields = {k: v for k, v in {**alias_fields, **routed[name]}.items() if k not in ("lr", "target_modules")}
        try:
            config_class(name)(**fields)
        except (TypeError, ValueError) as e:
            raise RecipeError(f"{name}: {e}") from e
    for name, fields in routed.items():
        if "lr" in fields and not (isinstance(fields["lr"], int | float) and 0 < fields["lr"] < float("inf")):
            raise RecipeError(f"--set {name}.lr must be a finite number > 0, got {fields['lr']!r}")


def _targets(spec: Any, model: nn.Module, head: list[str], family: str, name: str) -> Any:
    if spec == "linear":
        return "all-linear" if not head else _typed_modules(model, head, (nn.Linear,), "linear", name)
    if spec in ("conv", "conv-dense"):
        names = _typed_modules(model, head, (nn.Conv1d, nn.Conv2d, nn.Conv3d), "convolution", name)
        return [n for n in names if spec == "conv" or model.get_submodule(n).groups == 1]
    return spec


def _common_block_size(model: nn.Module, targets: Any) -> int:
    """The largest block size dividing every target layer's in and out sizes (C3A's block_size="gcd")."""
    if not isinstance(targets, list):
        raise RecipeError(f"block_size=gcd needs the target layers named, got target_modules={targets!r}")
    sizes = [size for n in targets for size in _in_out(model.get_submodule(n))]
    return math.gcd(*sizes)


def _in_out(module: nn.Module) -> tuple[int, int]:
    weight = module.weight  # nn.Linear (out, in); transformers' Conv1D (in, out): gcd does not care
    return int(weight.shape[0]), int(weight.shape[1])


def _typed_modules(model: nn.Module, head: list[str], types: tuple[type, ...], what: str, method: str) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    types = (*types, Conv1D) if nn.Linear in types else types
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, types) and m is not out and not any(n == h or n.startswith(h + ".") for h in head)
    ]
    if not names:
        raise RecipeError(
            f"{method} found no {what} layer to adapt outside the head; name them with --set target_modules=..."
        )
    return names


def build_recipe(method: str, family: str, settings: dict[str, str], model: nn.Module, head: list[str]) -> Recipe:
    """The configs and learning rates for ``method`` on ``model`` (of ``family``), defaults first,
    then ``settings`` (``--set``), then the model's own targets."""
    parts = split_method(method)
    names = [n for n, _ in parts]
    routed = route_settings(names, settings)
    family_defaults = DEFAULTS[family]
    recipe = Recipe(method, names)
    lead = next((n for n in names if n not in PLUG_INS), names[0])
    for name, alias_fields in parts:
        if name not in family_defaults:
            raise RecipeError(
                f"{name} has no recipe for a {family} ({_why_not(name, family)}); "
                f"methods for a {family}: {', '.join(sorted(family_defaults))}"
            )
        fields = {**family_defaults[name], **alias_fields, **routed[name]}
        lr = float(fields.pop("lr"))
        if name == lead:
            recipe.lr = lr
        elif lr != recipe.lr:
            recipe.lr_by_method[adapter_methods()[name].peft_type.lower()] = lr
        if name in BASELINES:
            continue
        if (
            fields.get("mode") == "adapter"
            and "target_modules" in family_defaults[name]
            and "target_modules" not in routed[name]
        ):
            fields["target_modules"] = SURM_ADAPTER_TARGETS
        if "target_modules" in fields:
            fields["target_modules"] = _targets(fields["target_modules"], model, head, family, name)
        if fields.get("block_size") == "gcd":
            fields["block_size"] = _common_block_size(model, fields["target_modules"])
        try:
            config = config_class(name)(**fields, modules_to_save=list(head) if name == lead and head else None)
        except TypeError as e:
            raise RecipeError(f"{name}: {e}") from e
        recipe.configs.append(config)
    return recipe


def _why_not(name: str, family: str) -> str:
    if family == "convnet" and name in ("coeff", "kernel-mix"):
        return "a convnet has no attention"
    if family == "convnet" and name == "surm":
        return "SURM adapts linear layers; a convnet's are its head"
    return "no defaults measured"


def config_field_types(name: str) -> dict[str, Any]:
    return typing.get_type_hints(config_class(name))
