"""The wrapper model: adds, switches, merges, disables and removes named adapters."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from structpeft.core import checkpoint
from structpeft.core.config import AdapterConfig
from structpeft.core.layers import (
    HOST_ATTRIBUTE,
    AdaptedLayer,
    AdapterDelta,
    AdapterHost,
    ModuleAdapters,
    ModulesToSave,
    module_host,
)
from structpeft.core.targets import get_submodule, named_modules, resolve_targets, set_submodule, unwrapped

DEFAULT_ADAPTER = "default"


def _as_list(config: AdapterConfig | list[AdapterConfig]) -> list[AdapterConfig]:
    configs = list(config) if isinstance(config, list | tuple) else [config]
    if not configs or not all(isinstance(c, AdapterConfig) for c in configs):
        raise TypeError("expected an adapter config (e.g. sp.LoraConfig(...)) or a non-empty list of them")
    return configs


class _BaseModelForward:
    """``PeftModel.forward``: calls the base model, and on an instance carries the base forward's
    signature, which HF Trainer reads to pick the dataset columns to keep (a bare
    ``*args, **kwargs`` would make it drop them all)."""

    @staticmethod
    def _unbound(self: PeftModel, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __get__(self, obj: PeftModel | None, objtype: type | None = None) -> Callable[..., Any]:
        if obj is None:
            return self._unbound
        base_model = obj.base_model

        @functools.wraps(base_model.forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return base_model(*args, **kwargs)

        return forward


class PeftModel(nn.Module):
    """A base model with structpeft adapters injected in place.

    The base model's adapted leaf layers are swapped for :class:`AdaptedLayer` wrappers, and
    modules whose computation a method changes from inside (attention) get a :class:`ModuleAdapters`
    child; everything else (its forward, ``generate``, ``config``) is reached through this object
    as on the base model.
    """

    def __init__(
        self,
        model: nn.Module,
        config: AdapterConfig | list[AdapterConfig] | None,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, list[AdapterConfig]] = {}
        self.active_adapters: list[str] = [adapter_name]
        self.frozen_adapters: set[str] = set()  # loaded with is_trainable=False
        if config is not None:
            with _frozen_base(model):
                self.add_adapter(adapter_name, config)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    forward = _BaseModelForward()

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # -- the layers structpeft put in -----------------------------------------------------
    def adapted_layers(self) -> Iterator[tuple[str, AdaptedLayer]]:
        return ((n, m) for n, m in named_modules(self.base_model) if isinstance(m, AdaptedLayer))

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        return ((n, m) for n, m in named_modules(self.base_model) if isinstance(m, ModulesToSave))

    def adapter_hosts(self) -> Iterator[tuple[str, AdapterHost]]:
        """Every place deltas live, with the path of the module they adapt."""
        for name, module in named_modules(self.base_model):
            if isinstance(module, AdaptedLayer):
                yield name, module
            elif (host := module_host(module)) is not None:
                yield name, host

    # -- adding and removing --------------------------------------------------------------
    def plan_adapter(self, adapter_name: str, configs: list[AdapterConfig]) -> dict[str, dict[str, AdapterDelta]]:
        """Build an adapter's deltas without touching the model: ``{layer path: {method: delta}}``.

        Every error (unknown target, unsupported layer, a method targeting a layer twice) is raised
        here, before anything changes.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it or pick another name")
        # A module kept whole (modules_to_save), now or by this adapter, is never also adapted.
        saved = {n for n, _ in self.saved_modules()} | set(self._modules_to_save_names(configs))
        plan: dict[str, dict[str, AdapterDelta]] = {}
        for config in configs:
            method = config.peft_type.lower()
            for name in config.find_targets(self.base_model, saved):
                target = unwrapped(get_submodule(self.base_model, name))
                device = next(target.parameters()).device
                for relative, delta in config.create_deltas(target, name).items():
                    path = ".".join(p for p in (name, relative) if p)
                    deltas = plan.setdefault(path, {})
                    if method in deltas:
                        raise ValueError(
                            f"module {path!r} is targeted twice by {config.peft_type} configs in adapter "
                            f"{adapter_name!r}; make their target_modules disjoint"
                        )
                    deltas[method] = delta.to(device)
        return plan

    def attach_adapter(
        self, adapter_name: str, configs: list[AdapterConfig], plan: dict[str, dict[str, AdapterDelta]]
    ) -> None:
        """Put a planned adapter into the model (the step that cannot fail on user input)."""
        for name, deltas in plan.items():
            inside = {m: d for m, d in deltas.items() if d.acts_inside}
            outside = {m: d for m, d in deltas.items() if not d.acts_inside}
            if outside:
                layer = get_submodule(self.base_model, name)
                if not isinstance(layer, AdaptedLayer):
                    layer = AdaptedLayer(layer, name)
                    set_submodule(self.base_model, name, layer)
                layer.adapters[adapter_name] = nn.ModuleDict(outside)
                layer.train(layer.base_layer.training)  # new deltas follow the model's train/eval mode
            if inside:
                module = get_submodule(self.base_model, name)
                host = module_host(module)
                if host is None:
                    host = ModuleAdapters()
                    module.add_module(HOST_ATTRIBUTE, host)
                host.adapters[adapter_name] = nn.ModuleDict(inside)
                host.train(module.training)
                for delta in inside.values():
                    delta.on_attach(module)
        for name in self._modules_to_save_names(configs):
            module = get_submodule(self.base_model, name)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                set_submodule(self.base_model, name, module)
            module.copies[adapter_name] = copy.deepcopy(module.original_module)
        self.peft_config[adapter_name] = configs
        self._refresh()

    def _modules_to_save_names(self, configs: list[AdapterConfig]) -> list[str]:
        entries = sorted({e for c in configs for e in (c.modules_to_save or [])})
        return resolve_targets(self.base_model, entries, what="modules_to_save") if entries else []

    def add_adapter(self, adapter_name: str, config: AdapterConfig | list[AdapterConfig]) -> None:
        """Add an adapter (one config, or a list of methods composed); ``set_adapter`` activates it."""
        configs = _as_list(config)
        self.attach_adapter(adapter_name, configs, self.plan_adapter(adapter_name, configs))

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_exists([adapter_name])
        for name, host in list(self.adapter_hosts()):
            if adapter_name in host.merged_adapters:
                raise ValueError(f"adapter {adapter_name!r} is merged in {name!r}; unmerge_adapter() first")
        for name, host in list(self.adapter_hosts()):
            if adapter_name in host.adapters:
                self._remove_deltas(name, host, [adapter_name])
        for name, module in list(self.saved_modules()):
            if adapter_name in module.copies:
                del module.copies[adapter_name]
            if not module.copies:
                set_submodule(self.base_model, name, module.original_module)
        del self.peft_config[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]
        self._refresh()

    # -- which adapters act ---------------------------------------------------------------
    def _check_exists(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapter named {unknown}; this model has {sorted(self.peft_config)}")

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters the active ones (their deltas add) and the only trainable ones."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_exists(names)
        self.active_adapters = names
        self._refresh()

    def _remove_deltas(self, name: str, host: AdapterHost, adapters: list[str]) -> None:
        """Take ``adapters`` out of ``host`` (the host of module ``name``); drop the host once empty."""
        module = unwrapped(get_submodule(self.base_model, name))
        for adapter in adapters:
            for delta in host.adapters[adapter].values():
                delta.on_detach(module)
            del host.adapters[adapter]
        if host.adapters:
            return
        if isinstance(host, AdaptedLayer):
            set_submodule(self.base_model, name, host.base_layer)
        else:
            delattr(module, HOST_ATTRIBUTE)

    def _refresh(self) -> None:
        """Push the active set into every wrapper; only active, trainable adapters get gradients."""
        wrappers = [(m, m.adapters) for _, m in self.adapter_hosts()]
        wrappers += [(m, m.copies) for _, m in self.saved_modules()]
        for wrapper, per_adapter in wrappers:
            wrapper.active_adapters = list(self.active_adapters)
            for adapter, params in per_adapter.items():
                params.requires_grad_(adapter in self.active_adapters and adapter not in self.frozen_adapters)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model as it was: no delta, original heads."""
        wrappers = [m for _, m in self.adapter_hosts()] + [m for _, m in self.saved_modules()]
        for m in wrappers:
            m.disabled = True
        try:
            yield
        finally:
            for m in wrappers:
                m.disabled = False

    # -- merging --------------------------------------------------------------------------
    def _unmergeable(self, adapters: list[str]) -> dict[str, list[str]]:
        """``{module path: [method, ...]}`` of the deltas of ``adapters`` that do not fold into weights."""
        found: dict[str, list[str]] = {}
        for name, host in self.adapter_hosts():
            methods = sorted({m for a in adapters if a in host.adapters for m in host.unmergeable_methods(a)})
            if methods:
                found[name] = methods
        return found

    def merge_adapter(self, adapter_names: list[str] | None = None, keep_unmergeable: bool = False) -> set[str]:
        """Fold adapters (default: the active ones) into the base weights; all or nothing.

        Modules carrying a delta that cannot merge (Coeff-Tuning, SURM adapters) make this an
        error, unless ``keep_unmergeable``: then those modules are left as they are and still act.
        Returns the paths of the modules so kept.
        """
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        self._check_exists(names)
        kept = self._unmergeable(names)
        if kept and not keep_unmergeable:
            listing = "; ".join(f"{name} ({', '.join(methods)})" for name, methods in kept.items())
            raise ValueError(
                f"cannot merge: these modules carry deltas that do not fold into weights: {listing}. Nothing was "
                "merged. Pass keep_unmergeable=True to merge the rest and keep these modules adapted."
            )
        merged: list[tuple[AdapterHost, str]] = []
        try:
            # Backwards through the model: a delta may read another layer's frozen weight (Kernel-mix's
            # V reads the key projection, which comes earlier), so that layer must still be unmerged.
            # unmerge_adapter() then runs forwards, restoring the earlier layers first.
            for name, host in reversed(list(self.adapter_hosts())):
                if name not in kept:
                    merged += [(host, a) for a in names if host.merge(a)]
        except Exception:
            for host, a in reversed(merged):  # all or nothing, also when a merge fails midway
                host.unmerge(a)
            raise
        return set(kept)

    def unmerge_adapter(self) -> None:
        for _, host in self.adapter_hosts():
            host.unmerge()

    def merge_and_unload(self, keep_unmergeable: bool = False) -> nn.Module:
        """Fold the active adapters into the weights and return the base model without wrappers.

        With ``keep_unmergeable=True`` the modules whose deltas cannot merge keep them (and keep
        acting); every other module is merged and unwrapped.
        """
        return self.unload(keep=self.merge_adapter(keep_unmergeable=keep_unmergeable))

    def unload(self, keep: set[str] = frozenset()) -> nn.Module:
        """Return the base model with every wrapper removed (unmerged deltas are dropped), but for
        the adapted modules named in ``keep``."""
        for name, host in list(self.adapter_hosts()):
            if name not in keep:
                self._remove_deltas(name, host, list(host.adapters))
        for name, module in list(self.saved_modules()):
            set_submodule(self.base_model, name, module.active_copy())
        return self.base_model

    # -- reporting ------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # -- export ---------------------------------------------------------------------------
    def export_lora(self, path: str | os.PathLike, **options: Any) -> Any:
        """Write an adapter as a plain HF PEFT LoRA (truncated SVD of each layer's ΔW); returns the
        per-layer error report. Options: see :func:`structpeft.core.export.export_lora`."""
        from structpeft.core.export import export_lora

        return export_lora(self, path, **options)

    # -- checkpoints ----------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
        """Write each adapter as ``adapter_config.json`` + ``adapter_model.safetensors``.

        The default adapter goes in ``save_directory`` itself, others in a sub-folder of their
        name, as HF PEFT lays them out.
        """
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        self._check_exists(names)
        for adapter in names:
            target = save_directory if adapter == DEFAULT_ADAPTER else os.path.join(save_directory, adapter)
            checkpoint.save_adapter(self, adapter, target)

    def load_adapter(
        self, path: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False
    ) -> None:
        """Load a saved adapter under ``adapter_name``; on any error the model is left as it was."""
        configs, tensors = checkpoint.read_adapter(path)
        try:
            plan = self.plan_adapter(adapter_name, configs)
        except (ValueError, TypeError) as e:
            saved_for = configs[0].extra.get("base_model_name_or_path") or "an unnamed model"
            raise checkpoint.CheckpointError(
                f"adapter at {path} (saved for {saved_for}) does not fit this "
                f"{type(self.base_model).__name__}: {e}. The model is unchanged."
            ) from e
        saved = self._modules_to_save_names(configs)
        heads = checkpoint.load_into_plan(self, plan, saved, tensors, path)
        if not is_trainable:
            self.frozen_adapters.add(adapter_name)
        self.attach_adapter(adapter_name, configs, plan)
        for name, state in heads.items():
            get_submodule(self.base_model, name).copies[adapter_name].load_state_dict(state)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, path: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False
    ) -> PeftModel:
        """Wrap ``model`` with the adapter saved at ``path``."""
        self = cls(model, None, adapter_name)
        with _frozen_base(model):
            self.load_adapter(path, adapter_name, is_trainable=is_trainable)
        return self


@contextlib.contextmanager
def _frozen_base(model: nn.Module) -> Iterator[None]:
    """Freeze the base model for adapter training; if the block fails, give back its flags."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def get_peft_model(
    model: nn.Module, config: AdapterConfig | list[AdapterConfig], adapter_name: str = DEFAULT_ADAPTER
) -> PeftModel:
    """Inject the adapter described by ``config`` (one method, or a list composed) into ``model``."""
    return PeftModel(model, config, adapter_name)
