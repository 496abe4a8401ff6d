"""Which modules a config targets, and swapping a module in place."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator

from torch import nn

from structpeft.core.layers import AdaptedLayer, HFConv1D, ModuleAdapters, ModulesToSave
from structpeft.core.quantized import quant_backend

ALL_LINEAR = "all-linear"


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` with structpeft's wrappers seen as the layer they wrap.

    Paths are those of the unadapted model, so targets resolve the same before and after a first
    adapter is added; the deltas structpeft attached inside modules are not listed.
    """

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        yield prefix, module
        if isinstance(module, AdaptedLayer | ModulesToSave):
            return
        for child_name, child in module.named_children():
            if not isinstance(child, ModuleAdapters):
                yield from walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    yield from walk(model, "")


def unwrapped(module: nn.Module) -> nn.Module:
    if isinstance(module, AdaptedLayer):
        return module.base_layer
    if isinstance(module, ModulesToSave):
        return module.original_module
    return module


def is_linear(module: nn.Module) -> bool:
    """A dense projection: ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2's transposed linear)."""
    return isinstance(module, nn.Linear) or (HFConv1D is not None and isinstance(module, HFConv1D))


def matches(name: str, entry: str) -> bool:
    """``name`` is ``entry`` or ends with it as a dotted suffix."""
    return name == entry or name.endswith("." + entry)


def within(name: str, parents: set[str]) -> bool:
    """``name`` is one of ``parents`` or lies inside one."""
    return any(name == p or name.startswith(p + ".") for p in parents)


def _output_layer_names(model: nn.Module) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return {n for n, m in named_modules(model) if out is not None and unwrapped(m) is out}


def resolve_targets(
    model: nn.Module,
    target_modules: list[str] | str | None,
    exclude: set[str] = frozenset(),
    what: str = "target_modules",
) -> list[str]:
    """Names of the modules ``target_modules`` selects, in model order.

    Every list entry must match something; a miss is an error that names the entry and the
    closest module names, since a silent partial match trains less than the user asked for.
    """
    modules = [(n, m) for n, m in named_modules(model) if n and not within(n, exclude)]
    if target_modules is None:
        raise ValueError("target_modules is required for this method (e.g. ['query', 'value'] or 'all-linear')")
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            skip = _output_layer_names(model)
            names = [n for n, m in modules if is_linear(unwrapped(m)) and n not in skip]
            for name, module in ((n, unwrapped(m)) for n, m in modules if n not in skip):
                # A quantized linear layer of a library without a backend here (GPTQ, AWQ: not an nn.Linear)
                # is refused by name: leaving it out would adapt less than 'all-linear' asks, silently.
                linear_shaped = hasattr(module, "in_features") and hasattr(module, "out_features")
                if linear_shaped and not is_linear(module):
                    quant_backend(module, name)  # raises, naming it and the supported backends, if it is one
            if not names:
                raise ValueError("target_modules='all-linear' found no nn.Linear or Conv1D layer in the model")
            return names
        names = [n for n, _ in modules if re.fullmatch(target_modules, n)]
        if not names:
            raise ValueError(
                f"target_modules regex {target_modules!r} matched no module name (it must match the whole "
                f"name); some names: {', '.join(n for n, _ in modules[:5])}"
            )
        return names

    entries = list(target_modules)
    missing = [e for e in entries if not any(matches(n, e) for n, _ in modules)]
    if missing:
        candidates = {n for n, _ in modules} | {n.rsplit(".", 1)[-1] for n, _ in modules}
        hints = []
        for e in missing:
            close = difflib.get_close_matches(e, candidates, n=3, cutoff=0.5)
            hints.append(f"{e!r} (closest: {', '.join(close) if close else 'none'})")
        raise ValueError(f"{what} entries matched no module: {'; '.join(hints)}")
    return [n for n, _ in modules if any(matches(n, e) for e in entries)]


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(get_submodule(model, parent_name), child, new)
