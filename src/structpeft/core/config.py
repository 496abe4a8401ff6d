"""Adapter configurations: the method-agnostic base class and the registry of methods.

A method registers its config class under a ``peft_type`` string; checkpoints store that string,
and loading looks the class up here. The core never imports a method.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import nn

    from structpeft.core.layers import AdapterDelta

_REGISTRY: dict[str, type[AdapterConfig]] = {}

# Fields HF PEFT writes into every adapter_config.json that mean nothing to structpeft's maths:
# accepted when loading (and kept, so that a load-then-save writes them back), never acted on.
HF_BOOKKEEPING_FIELDS = frozenset(
    {"base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping", "peft_version"}
)


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
    # Saved-config keys accepted without meaning here (kept in ``extra``); a method adds its own.
    ignored_fields: ClassVar[frozenset[str]] = HF_BOOKKEEPING_FIELDS
    # Other names a saved config may use for a field (HF PEFT's ``lora_alpha`` for ``alpha``).
    field_aliases: ClassVar[dict[str, str]] = {}

    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        """Check every field against its type, every number for finiteness, and the targets, so that a bad
        value fails here, naming its field, rather than halfway into a model."""
        try:
            hints = typing.get_type_hints(type(self))
        except NameError:  # a method's config annotating with a name imported only for type checkers
            hints = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            hint = hints.get(f.name, Any)
            if isinstance(value, tuple | set | frozenset) and _allows_list(hint):
                value = sorted(value) if isinstance(value, set | frozenset) else list(value)
                setattr(self, f.name, value)
            if not _fits(value, hint):
                raise TypeError(
                    f"{type(self).__name__} field {f.name} must be {_type_name(hint)}, "
                    f"got {type(value).__name__} {value!r}"
                )
            if not _all_finite(value):
                raise ValueError(f"{type(self).__name__} field {f.name} must be finite, got {value!r}")
        self._check_targets()

    def _check_targets(self) -> None:
        name, targets, saved = type(self).__name__, self.target_modules, self.modules_to_save or []
        if isinstance(targets, str):
            if not targets:
                raise ValueError(f"{name} target_modules is an empty string: name modules, or leave it None")
            try:
                re.compile(targets)
            except re.error as e:
                raise ValueError(f"{name} target_modules {targets!r} is not a valid regular expression: {e}") from e
        elif targets is not None and not targets and not saved:
            raise ValueError(
                f"{name} target_modules is empty: name at least one module, leave it None for the method's default, "
                "or give modules_to_save alone to train only those modules"
            )
        for field_name, entries in (
            ("target_modules", targets if isinstance(targets, list) else []),
            ("modules_to_save", saved),
        ):
            if "" in entries:
                raise ValueError(f"{name} {field_name} holds an empty name")
        if isinstance(targets, list) and (both := sorted(set(targets) & set(saved))):
            raise ValueError(
                f"{name}: {both} both in target_modules and modules_to_save; a module is either adapted or kept "
                "whole as a trainable copy: drop it from one of them"
            )

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
        """The config a saved dict describes. An unknown key is an error that suggests the field meant,
        since a misspelt field would otherwise silently take its default; ``ignored_fields`` ride along
        in ``extra``."""
        d = dict(d)
        d.pop("peft_type", None)
        for alias, name in cls.field_aliases.items():
            if alias in d:
                if name in d:
                    raise ValueError(f"{cls.__name__} config gives both {alias!r} and {name!r}; keep one")
                d[name] = d.pop(alias)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(str(k) for k in d if k not in names and k not in cls.ignored_fields)
        if unknown:
            meant = sorted(names | set(cls.field_aliases))
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, meant, n=2, cutoff=0.6)
                hints.append(f"{key!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
            raise ValueError(f"unknown {cls.__name__} field {', '.join(hints)}; its fields are: {', '.join(meant)}")
        known = {k: v for k, v in d.items() if k in names}
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
    """The configs a saved ``adapter_config.json`` object describes; ValueError or TypeError naming the problem."""
    if not isinstance(d, dict) or not isinstance(d.get("peft_type"), str):
        raise ValueError("adapter config is not a JSON object with a string 'peft_type'")
    if d["peft_type"] != COMPOSED_PEFT_TYPE:
        return [config_class_for(d["peft_type"]).from_dict(d)]
    unknown = sorted(set(d) - {"peft_type", "base_model_name_or_path", "methods"})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in a composed adapter config")
    methods = d.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ValueError(f"composed adapter config needs 'methods', a non-empty list of configs; got {methods!r}")
    configs = []
    for m in methods:
        if not isinstance(m, dict) or not isinstance(m.get("peft_type"), str) or m["peft_type"] == COMPOSED_PEFT_TYPE:
            raise ValueError(f"each entry of a composed config's 'methods' is one method's config; got {m!r}")
        configs.append(config_class_for(m["peft_type"]).from_dict(m))
    return configs


def _allows_list(hint: Any) -> bool:
    return typing.get_origin(hint) is list or any(_allows_list(a) for a in _union_args(hint))


def _union_args(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()


def _fits(value: Any, hint: Any) -> bool:
    """``value`` is of the annotated type: bool is not an int here, and an int is a float."""
    if hint is Any:
        return True
    if args := _union_args(hint):
        return any(_fits(value, a) for a in args)
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_fits(k, key) and _fits(v, item) for k, v in value.items())
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    if args := _union_args(hint):
        return " or ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "None"
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True


def check_probability(config: AdapterConfig, name: str) -> None:
    """A dropout-like field lies in [0, 1)."""
    value = getattr(config, name)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{type(config).__name__} {name} must be in [0, 1), got {value}")
