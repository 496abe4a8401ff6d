"""Adapter checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors``, HF PEFT's layout.

Keys are ``base_model.model.<module path>.<parameter>`` with the adapter name left out, so a
structpeft LoRA and an HF PEFT LoRA read each other. Loading checks everything before it changes
the model; a save replaces both files together or neither (:mod:`structpeft.core.atomic`), so a
crash leaves the old checkpoint or the new one, never a mix. Nothing is ever pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from structpeft.core import distributed
from structpeft.core.atomic import atomic_write_dir, committed_path
from structpeft.core.config import AdapterConfig, configs_from_dict, configs_to_dict
from structpeft.core.targets import get_submodule, named_modules, unwrapped

if TYPE_CHECKING:
    from structpeft.core.layers import AdapterDelta
    from structpeft.core.model import PeftModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model; the model was left unchanged."""


def _base_model_name(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", "") or type(model).__name__


def adapter_state_dict(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, host in model.adapter_hosts():
        if adapter in host.adapters:
            for delta in host.adapters[adapter].values():
                for key, value in delta.state_dict().items():
                    state[f"{KEY_PREFIX}{name}.{key}"] = value
    for name, module in model.saved_modules():
        if adapter in module.copies:
            for key, value in module.copies[adapter].state_dict().items():
                state[f"{KEY_PREFIX}{name}.{key}"] = value
    return distributed.full_state(state)  # whole tensors, also from an FSDP2-sharded model


def same_configs(saved: list[AdapterConfig], live: list[AdapterConfig]) -> bool:
    """Whether a checkpoint's configs describe the same adapter (the base model's name aside)."""

    def plain(configs: list[AdapterConfig]) -> dict:
        described = json.loads(json.dumps(configs_to_dict(configs, "")))  # as the file holds it: lists, not tuples
        return {k: v for k, v in described.items() if k != "base_model_name_or_path"}

    return plain(saved) == plain(live)


def save_adapter(model: PeftModel, adapter: str, directory: str | os.PathLike) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model, adapter).items()}
    if not distributed.is_writer(model):  # sharded: every rank gathered, rank 0 writes
        return
    config = configs_to_dict(model.peft_config[adapter], _base_model_name(model.base_model))
    text = json.dumps(config, indent=2, allow_nan=False) + "\n"
    with atomic_write_dir(directory) as staging:
        save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(text)
    for leftover in Path(directory).glob(".adapter_*.tmp"):  # temporary files of structpeft <= 0.1's saves
        leftover.unlink(missing_ok=True)


def read_adapter(path: str | os.PathLike) -> tuple[list[AdapterConfig], dict[str, torch.Tensor]]:
    path = Path(path)
    # A save that a crash cut short after its commit point is read from where it left the new files.
    config_file, weights_file = committed_path(path, CONFIG_NAME), committed_path(path, WEIGHTS_NAME)
    if not config_file.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {path}: is this an adapter folder written by save_pretrained()?")
    if not weights_file.is_file():
        if committed_path(path, "adapter_model.bin").is_file():
            raise CheckpointError(
                f"{path} holds adapter_model.bin, a pickle, which structpeft never loads; "
                "re-save it as safetensors (HF PEFT: save_pretrained(..., safe_serialization=True))"
            )
        raise CheckpointError(f"no {WEIGHTS_NAME} in {path}")
    try:
        configs = configs_from_dict(json.loads(config_file.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file} is not a valid adapter config: {e}") from e
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_file} cannot be read ({e}); it is truncated or corrupt: save it again") from e
    return configs, tensors


def _embedding_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if layer is not None:
            found.append(unwrapped(layer))
    return found


def _base_keys(model: torch.nn.Module) -> set[str]:
    """Checkpoint keys that would name the base model's own parameters and buffers."""
    keys = set()
    for name, module in named_modules(model):
        layer = unwrapped(module)
        for k, _ in (*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)):
            keys.add(f"{KEY_PREFIX}{name}.{k}" if name else f"{KEY_PREFIX}{k}")
    return keys


def _listing(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_into_plan(
    model: PeftModel,
    plan: dict[str, dict[str, AdapterDelta]],
    saved_modules: list[str],
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
) -> dict[str, dict[str, torch.Tensor]]:
    """Check ``tensors`` against the planned deltas and heads, then fill the deltas.

    Returns the heads' state dicts, keyed by module path, to load once they exist. Raises
    :class:`CheckpointError` (naming the keys) before anything is written.
    """
    expected: dict[str, torch.Tensor] = {}  # key -> the model's tensor it fills
    for name, deltas in plan.items():
        for delta in deltas.values():
            expected.update({f"{KEY_PREFIX}{name}.{k}": v for k, v in delta.state_dict().items()})
    heads = {name: unwrapped(get_submodule(model.base_model, name)).state_dict() for name in saved_modules}
    for name, state in heads.items():
        expected.update({f"{KEY_PREFIX}{name}.{k}": v for k, v in state.items()})
    # HF PEFT also saves the whole base weight of an adapted embedding (input or output; for resized
    # vocabularies) as `<path>.base_layer.weight`; such keys are optional and are loaded into the base
    # layer. Any other key naming a base weight is refused: an adapter never overwrites the model.
    base_layers = {name: unwrapped(get_submodule(model.base_model, name)) for name in plan}
    embeddings = _embedding_layers(model.base_model)
    optional = {
        f"{KEY_PREFIX}{name}.base_layer.{k}": v
        for name, layer in base_layers.items()
        if isinstance(layer, torch.nn.Embedding) or any(layer is e for e in embeddings)
        for k, v in layer.state_dict().items()
    }

    missing = sorted(set(expected) - set(tensors))
    unexpected = set(tensors) - set(expected) - set(optional)
    base_keys = _base_keys(model.base_model) if unexpected else set()
    overwriting = sorted(k for k in unexpected if k in base_keys or ".base_layer." in k)
    unexpected = sorted(unexpected - set(overwriting))
    shapes = {k: tuple(v.shape) for k, v in {**optional, **expected}.items()}
    wrong = sorted(
        f"{k} (checkpoint {tuple(tensors[k].shape)}, model {shapes[k]})"
        for k in set(shapes) & set(tensors)
        if tuple(tensors[k].shape) != shapes[k]
    )
    targets = {**optional, **expected}
    kinds = sorted(
        f"{k} ({tensors[k].dtype}, model {targets[k].dtype})"
        for k in set(targets) & set(tensors)
        if tensors[k].is_floating_point() != targets[k].is_floating_point()
    )
    non_finite = sorted(
        k
        for k in set(targets) & set(tensors)
        if tensors[k].is_floating_point() and not torch.isfinite(tensors[k]).all()
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if overwriting:
        problems.append(f"keys that would overwrite the base model's weights: {_listing(overwriting)}")
    if wrong:
        problems.append(f"shape mismatches: {_listing(wrong)}")
    if kinds:
        problems.append(f"non-float tensors where the model has float ones (or the reverse): {_listing(kinds)}")
    if non_finite:
        problems.append(f"NaN or infinite values in: {_listing(non_finite)}")
    if problems:
        raise CheckpointError(
            f"adapter at {path} does not fit this {type(model.base_model).__name__}: "
            + "; ".join(problems)
            + ". Was it saved for another model or with another config, or did training diverge? The model is "
            "unchanged."
        )

    for name, deltas in plan.items():
        for delta in deltas.values():
            prefix = f"{KEY_PREFIX}{name}."
            delta.load_state_dict({k: tensors[prefix + k] for k in delta.state_dict()})
        base_keys = [k for k in base_layers[name].state_dict() if f"{KEY_PREFIX}{name}.base_layer.{k}" in tensors]
        if base_keys:
            state = {k: tensors[f"{KEY_PREFIX}{name}.base_layer.{k}"] for k in base_keys}
            base_layers[name].load_state_dict(state, strict=False)
    return {name: {k: tensors[f"{KEY_PREFIX}{name}.{k}"] for k in state} for name, state in heads.items()}
