"""Adapter configurations: the method-agnostic base class and the registry of methods.

A method registers its config class under a ``peft_type`` string; checkpoints store that string,
and loading looks the class up here. The core never imports a method.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import nn

    from structpeft.core.layers import AdapterDelta

_REGISTRY: dict[str, type[AdapterConfig]] = {}


def register_method(config_cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make ``config_cls`` loadable from checkpoints by its ``peft_type``."""
    _REGISTRY[config_cls.peft_type] = config_cls
    return config_cls


def registered_methods() -> dict[str, type[AdapterConfig]]:
    """Every registered method's config class, by ``peft_type`` (a copy: registering goes through
    :func:`register_method`)."""
    return dict(_REGISTRY)


def config_class_for(peft_type: str) -> type[AdapterConfig]:
    try:
        return _REGISTRY[peft_type]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise ValueError(f"unknown peft_type {peft_type!r} in adapter config; structpeft knows: {known}") from None


@dataclass
class AdapterConfig:
    """What every method's config shares.

    target_modules: a list matches module names exactly or as dotted suffixes (``"query"`` matches
        ``encoder.layer.0.attention.self.query``); a string is a regular expression that must match
        the whole name; ``"all-linear"`` takes every Linear/Conv1D but the model's output layer.
    modules_to_save: modules (same matching as a list of targets) kept as trainable full copies,
        e.g. a new classification head.
    init_weights: True gives the method's zero start (the adapted model equals the base at step 0);
        False gives a random non-zero start, for tests of merge, save/load and disable.
    """

    peft_type: ClassVar[str] = ""

    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple | set):
            self.target_modules = list(self.target_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    # -- what a method must provide ---------------------------------------------------------
    def create_delta(self, layer: nn.Module, name: str) -> AdapterDelta:
        """Build this method's trainable update for the frozen ``layer`` at path ``name``."""
        raise NotImplementedError

    # -- what a method may override ---------------------------------------------------------
    def default_targets(self, model: nn.Module, exclude: set[str]) -> list[str] | None:
        """What ``target_modules=None`` adapts (not within ``exclude``); None: the method has no
        default and ``target_modules`` is required."""
        return None

    def find_targets(self, model: nn.Module, exclude: set[str]) -> list[str]:
        """Paths of the modules this config adapts: ``target_modules`` resolved, or the default."""
        from structpeft.core.targets import resolve_targets

        if self.target_modules is None and (defaults := self.default_targets(model, exclude)) is not None:
            return defaults
        if not self.target_modules and self.modules_to_save:
            return []  # a config may only keep heads trainable
        return resolve_targets(model, self.target_modules, exclude=exclude)

    def create_deltas(self, module: nn.Module, name: str) -> dict[str, AdapterDelta]:
        """The deltas for the target ``module`` at ``name``, keyed by path relative to it ("" = itself).

        A method that adapts several layers of one target (the projections of an attention
        block) returns one delta per layer.
        """
        return {"": self.create_delta(module, name)}

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {"peft_type": self.peft_type, **d, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        d = dict(d)
        d.pop("peft_type", None)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        # Unknown keys (written by a newer version, or bookkeeping such as the base model's name)
        # ride along in `extra` so that a load-then-save keeps them.
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})


COMPOSED_PEFT_TYPE = "STRUCTPEFT_COMPOSED"


def configs_to_dict(configs: list[AdapterConfig], base_model_name: str) -> dict[str, Any]:
    """One adapter's configs as the JSON object stored in ``adapter_config.json``.

    A single method is written flat, in the same layout as HF PEFT (so a LoRA loads there);
    several composed methods are written as a list under one composed type. The base model's
    name is HF PEFT's field of that name, and is what error messages quote on a mismatch.
    """
    if len(configs) == 1:
        return {**configs[0].to_dict(), "base_model_name_or_path": base_model_name}
    return {
        "peft_type": COMPOSED_PEFT_TYPE,
        "base_model_name_or_path": base_model_name,
        "methods": [c.to_dict() for c in configs],
    }


def configs_from_dict(d: dict[str, Any]) -> list[AdapterConfig]:
    if not isinstance(d, dict) or "peft_type" not in d:
        raise ValueError("adapter config is not a JSON object with a 'peft_type' key")
    if d["peft_type"] == COMPOSED_PEFT_TYPE:
        return [config_class_for(m["peft_type"]).from_dict(m) for m in d["methods"]]
    return [config_class_for(d["peft_type"]).from_dict(d)]
