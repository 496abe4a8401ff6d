"""Method names to adapter configs, with each method's default hyperparameters per model family.

The methods and their defaults come from structpeft's method cards (``structpeft.core.cards``: each method
declares its own in its folder), joined by ``+`` to compose them in one adapter (``coeff+lora``), plus two
baselines that are not adapters: ``probe`` (the new head only), ``full`` (every weight) and, for decoders,
``zero-shot`` (nothing: the base model scored as it is), and HF PEFT's own
methods as references (``hf-lora``, ``hf-loha``, ``hf-c3a``: the ``peft`` package, imported when used),
trained by the same loop on the same batches; they do not compose. A card may define shorthand names
(``surm-<structure>[-adapter]``). This module names no structpeft method.

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
from structpeft.core import FAMILIES, MethodCard, method_cards

BASELINES = ("probe", "full", "zero-shot")
NOT_SETTABLE = {"extra", "modules_to_save"}  # modules_to_save is the head the model gives
# HF PEFT's methods, by their config class in the peft package.
HF_METHODS = {"hf-lora": "LoraConfig", "hf-loha": "LoHaConfig", "hf-c3a": "C3AConfig"}


class RecipeError(ValueError):
    """A method name or setting that does not exist: the message lists what does."""


def adapter_methods() -> dict[str, type[sp.AdapterConfig]]:
    """CLI name -> config class, for every method with a card."""
    return {name: card.config for name, card in method_cards().items()}


def plug_ins() -> set[str]:
    return {name for name, card in method_cards().items() if card.plug_in}


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


# Defaults per model family for what has no card: the baselines and HF PEFT's references. C3A's block size
# must divide every target's in and out sizes: "gcd" takes the largest that does (PEFT's own advice); its lr
# is ours (C3A has no alpha scaling, so it wants a larger one).
_LINEAR_WEIGHTS = {"target_modules": "linear"}
_HF_LINEAR = {
    "hf-lora": {"r": 8, "lora_alpha": 16, "lr": 1e-3, **_LINEAR_WEIGHTS},
    "hf-loha": {"r": 8, "alpha": 16, "lr": 1e-3, **_LINEAR_WEIGHTS},
    "hf-c3a": {"block_size": "gcd", "lr": 1e-2, **_LINEAR_WEIGHTS},
}
_NOT_CARDED: dict[str, dict[str, dict[str, Any]]] = {
    "text-encoder": {"probe": {"lr": 2e-2}, "full": {"lr": 5e-5}, **_HF_LINEAR},
    "vit": {"probe": {"lr": 1e-2}, "full": {"lr": 5e-5}, **_HF_LINEAR},
    "convnet": {
        "probe": {"lr": 1e-2},
        "full": {"lr": 1e-3},
        # HF PEFT's LoRA-conv needs the rank divisible by a conv's groups: it skips the depthwise convs
        "hf-lora": {"r": 8, "lora_alpha": 16, "lr": 1e-3, "target_modules": "conv-dense"},
        "hf-loha": {"r": 8, "alpha": 16, "lr": 1e-3, "target_modules": "conv"},
    },
    # a decoder has no new head: HF PEFT's references take our LoRA's lr (C3A at the text-encoder's 10x of it)
    "decoder": {
        "probe": {"lr": 1e-3},
        "full": {"lr": 2e-5},
        "zero-shot": {"lr": 0.0},  # nothing trains: the base model scored as it is
        "hf-lora": {**_HF_LINEAR["hf-lora"], "lr": 2e-4},
        "hf-loha": {**_HF_LINEAR["hf-loha"], "lr": 2e-4},
        "hf-c3a": {**_HF_LINEAR["hf-c3a"], "lr": 2e-3},
    },
}


def family_defaults(family: str) -> dict[str, dict[str, Any]]:
    """Method name -> its default fields and ``lr`` on a model of ``family``: every card's, then the rest."""
    if family not in FAMILIES:
        raise RecipeError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    carded = {name: card.defaults[family] for name, card in method_cards().items() if family in card.defaults}
    return {**carded, **_NOT_CARDED[family]}


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

    @property
    def trains(self) -> bool:
        """False for ``zero-shot``: the model is scored as it is."""
        return self.baseline != "zero-shot"

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
        name, fields = _expand_shorthand(name)
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


def _expand_shorthand(name: str) -> tuple[str, dict[str, Any]]:
    """A card's shorthand name (``surm-toeplitz``) -> (the method's name, the fields it stands for)."""
    for card_name, card in method_cards().items():
        fields = card.shorthand(name) if card.shorthand is not None else None
        if fields is not None:
            return card_name, fields
    return name, {}


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
    if spec == "linear":  # named one by one where a head must be left out, and for HF PEFT (C3A sizes its blocks)
        named = head or name in HF_METHODS
        return _typed_modules(model, head, (nn.Linear,), "linear", name) if named else "all-linear"
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
    defaults = family_defaults(family)
    cards = method_cards()
    recipe = Recipe(method, names)
    lead = next((n for n in names if n not in plug_ins()), names[0])
    for name, alias_fields in parts:
        if name not in defaults:
            why = cards[name].no_recipe.get(family) if name in cards else None
            raise RecipeError(
                f"{name} has no recipe for a {family} ({why or 'no defaults measured'}); "
                f"methods for a {family}: {', '.join(sorted(defaults))}"
            )
        fields = {**defaults[name], **alias_fields, **routed[name]}
        lr = float(fields.pop("lr"))
        if name == lead:
            recipe.lr = lr
        elif lr != recipe.lr:
            recipe.lr_by_method[adapter_methods()[name].peft_type.lower()] = lr
        if name in BASELINES:
            continue
        placed = _placed_targets(cards.get(name), fields)
        if placed is not None and "target_modules" in defaults[name] and "target_modules" not in routed[name]:
            fields["target_modules"] = placed
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


def _placed_targets(card: MethodCard | None, fields: dict[str, Any]) -> list[str] | None:
    return None if card is None or card.placed_targets is None else card.placed_targets(fields)


def config_field_types(name: str) -> dict[str, Any]:
    return typing.get_type_hints(config_class(name))
