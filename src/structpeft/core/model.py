"""The wrapper model: adds, switches, merges, disables and removes named adapters."""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from structpeft.core import checkpoint
from structpeft.core.config import AdapterConfig
from structpeft.core.layers import (
    BASE_ROW,
    HOST_ATTRIBUTE,
    AdaptedLayer,
    AdapterDelta,
    AdapterHost,
    ModuleAdapters,
    ModulesToSave,
    module_host,
)
from structpeft.core.quantized import forget_quantization, prepare_quantized, quant_backend, to_float_linear
from structpeft.core.targets import get_submodule, named_modules, resolve_targets, set_submodule, unwrapped

DEFAULT_ADAPTER = "default"


def check_adapter_name(name: object) -> None:
    """Refuse, before anything changes, a name that cannot key the adapters' module dicts or that would
    put ``save_pretrained``'s sub-folder outside its folder."""
    if not isinstance(name, str):
        raise TypeError(f"adapter name must be a string, got {type(name).__name__} {name!r}")
    problem = None
    if not name.strip():
        problem = "is empty"
    elif any(c in name for c in "./\\\0"):
        problem = "holds '.', '/', '\\' or a NUL (it names a sub-folder of save_pretrained and a module key)"
    elif name == BASE_ROW:
        problem = f"is reserved: {BASE_ROW!r} marks the rows of a mixed batch that run without adapter"
    elif hasattr(nn.ModuleDict(), name):
        problem = "is the name of a torch.nn.ModuleDict attribute"
    if problem:
        raise ValueError(f"adapter name {name!r} {problem}; pick a plain name such as 'default' or 'sst2'")


def _as_list(config: AdapterConfig | list[AdapterConfig]) -> list[AdapterConfig]:
    configs = list(config) if isinstance(config, list | tuple) else [config]
    if not configs or not all(isinstance(c, AdapterConfig) for c in configs):
        raise TypeError("expected an adapter config (e.g. sp.LoraConfig(...)) or a non-empty list of them")
    return configs


class _BaseModelForward:
    """``PeftModel.forward``: calls the base model, and on an instance carries the base forward's
    signature, which HF Trainer reads to pick the dataset columns to keep (a bare
    ``*args, **kwargs`` would make it drop them all).

    ``adapter_names=[...]`` (one per row, ``"__base__"`` for none) runs a mixed-adapter batch; it is
    taken out here, so a base model whose forward takes ``**kwargs`` never swallows it.
    """

    @staticmethod
    def _call(model: PeftModel, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            return model.base_model(*args, **kwargs)
        with model.mixed_batch(adapter_names):
            return model.base_model(*args, **kwargs)

    @staticmethod
    def _unbound(self: PeftModel, *args: Any, **kwargs: Any) -> Any:
        return _BaseModelForward._call(self, args, kwargs)

    def __get__(self, obj: PeftModel | None, objtype: type | None = None) -> Callable[..., Any]:
        if obj is None:
            return self._unbound

        @functools.wraps(obj.base_model.forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return _BaseModelForward._call(obj, args, kwargs)

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
        check_adapter_name(adapter_name)
        _check_not_adapted(model)
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, list[AdapterConfig]] = {}
        self.active_adapters: list[str] = [adapter_name]
        self.frozen_adapters: set[str] = set()  # loaded with is_trainable=False, or set_requires_grad(.., False)
        self.adapters_disabled = False  # disable_adapter_layers(); disable_adapter() sets it for a block
        prepare_quantized(model)
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

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name, or the list when several are active (HF PEFT's property)."""
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

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

    def adapter_parameters(
        self, adapter: str | None = None, method: str | None = None
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the adapters' deltas: of ``adapter`` only if given, of one ``method``
        (its ``peft_type`` in lower case: ``"lora"``, ``"coeff"``, ``"kernel_mix"``) only if given. The
        whole-module copies of ``modules_to_save`` are not deltas: see :meth:`saved_module_parameters`."""
        if adapter is not None:
            self._check_exists([adapter])
        wanted = {
            param
            for _, host in self.adapter_hosts()
            for name, deltas in host.adapters.items()
            if adapter is None or name == adapter
            for key, delta in deltas.items()
            if method is None or key == method
            for param in delta.parameters()
        }
        return ((n, p) for n, p in self.named_parameters() if p in wanted)  # named as the model names them

    def saved_module_parameters(self, adapter: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the adapters' whole-module copies (``modules_to_save``, a new head)."""
        wanted = {
            param
            for _, module in self.saved_modules()
            for name, copy_ in module.copies.items()
            if adapter is None or name == adapter
            for param in copy_.parameters()
        }
        return ((n, p) for n, p in self.named_parameters() if p in wanted)

    # -- adding and removing --------------------------------------------------------------
    def plan_adapter(self, adapter_name: str, configs: list[AdapterConfig]) -> dict[str, dict[str, AdapterDelta]]:
        """Build an adapter's deltas without touching the model: ``{layer path: {method: delta}}``.

        Every error (unknown target, unsupported layer, a method targeting a layer twice) is raised
        here, before anything changes.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it or pick another name")
        # A module kept whole (modules_to_save), now or by this adapter, is never also adapted.
        saved = {n for n, _ in self.saved_modules()} | set(self._modules_to_save_names(configs))
        plan: dict[str, dict[str, AdapterDelta]] = {}
        for config in configs:
            method = config.peft_type.lower()
            for name in config.find_targets(self.base_model, saved):
                target = unwrapped(get_submodule(self.base_model, name))
                device = next((t.device for t in itertools.chain(target.parameters(), target.buffers())), "cpu")
                for relative, delta in config.create_deltas(target, name).items():
                    path = ".".join(p for p in (name, relative) if p)
                    deltas = plan.setdefault(path, {})
                    if method in deltas:
                        raise ValueError(
                            f"module {path!r} is targeted twice by {config.peft_type} configs in adapter "
                            f"{adapter_name!r}; make their target_modules disjoint"
                        )
                    deltas[method] = delta.to(device)
        _check_unique_keys(plan)
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
        """Remove an adapter. Deleting an active one leaves the other active ones, or else activates the
        first remaining adapter (with a warning), as HF PEFT does."""
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
        self.frozen_adapters.discard(adapter_name)  # the name may be reused by a trainable adapter
        was_active = adapter_name in self.active_adapters
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]
        if was_active and not self.active_adapters and self.peft_config:
            self.active_adapters = [next(iter(self.peft_config))]
            warnings.warn(
                f"deleted the active adapter {adapter_name!r}; {self.active_adapters[0]!r} is now active", stacklevel=2
            )
        self._refresh()

    # -- which adapters act ---------------------------------------------------------------
    def _check_exists(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapter named {unknown}; this model has {sorted(self.peft_config)}")

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters the active ones (their deltas add) and the only trainable ones.

        Merged adapters are unmerged first (with a warning), as in HF PEFT: otherwise the merged one
        would stay in the weights under the new one.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_exists(names)
        for name, module in self.saved_modules():
            if len(clash := [a for a in names if a in module.copies]) > 1:
                raise ValueError(
                    f"adapters {clash} each keep their own copy of {name!r} (modules_to_save); only one copy can "
                    "act at a time, so they cannot be active together"
                )
        if any(host.merged_adapters for _, host in self.adapter_hosts()):
            warnings.warn("set_adapter() on a merged model: unmerging the merged adapters first", stacklevel=2)
            self.unmerge_adapter()
        self.active_adapters = names
        self._refresh()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients of these adapters' parameters on or off (HF PEFT's method). Off stays off until
        turned on again: set_adapter() does not turn it back on."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_exists(names)
        for adapter in names:
            if requires_grad:
                self.frozen_adapters.discard(adapter)
            else:
                self.frozen_adapters.add(adapter)
        for params in self._adapter_modules(names):
            params.requires_grad_(requires_grad)

    def _adapter_modules(self, names: list[str]) -> Iterator[nn.Module]:
        for _, host in self.adapter_hosts():
            yield from (host.adapters[a] for a in names if a in host.adapters)
        for _, module in self.saved_modules():
            yield from (module.copies[a] for a in names if a in module.copies)

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
        """Push the active set into every wrapper; only active, trainable, enabled adapters get gradients."""
        wrappers = [(m, m.adapters) for _, m in self.adapter_hosts()]
        wrappers += [(m, m.copies) for _, m in self.saved_modules()]
        for wrapper, per_adapter in wrappers:
            wrapper.active_adapters = list(self.active_adapters)
            wrapper.disabled = self.adapters_disabled
            for adapter, params in per_adapter.items():
                # Disabled adapters get no gradient, as in HF PEFT: an optimizer built inside
                # disable_adapter() or a reference pass (DPO) cannot touch them.
                trainable = adapter in self.active_adapters and adapter not in self.frozen_adapters
                params.requires_grad_(trainable and not self.adapters_disabled)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model as it was (no delta, original heads) inside the block, with no adapter
        parameter requiring grad; on leaving it, the previous state comes back (so nested blocks, and
        disable_adapter_layers(), are kept)."""
        previous = self.adapters_disabled
        self.adapters_disabled = True
        self._refresh()
        try:
            yield
        finally:
            self.adapters_disabled = previous
            self._refresh()

    def disable_adapter_layers(self) -> None:
        """Switch every adapter off until enable_adapter_layers() (HF PEFT's method)."""
        self.adapters_disabled = True
        self._refresh()

    def enable_adapter_layers(self) -> None:
        self.adapters_disabled = False
        self._refresh()

    # -- mixed batches ----------------------------------------------------------------------
    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: list[str]) -> Iterator[None]:
        """Inside the block, row i of every batch runs adapter ``adapter_names[i]`` alone (``"__base__"``: none).

        What ``model(..., adapter_names=[...])`` uses. Only deltas that act on a layer's output can be chosen
        per row; an adapter with deltas acting inside a module (Coeff-Tuning's attention maps) is refused, as
        are merged adapters (their deltas are in every row's weights) and a disabled model.
        """
        if isinstance(adapter_names, str) or not isinstance(adapter_names, list | tuple) or not adapter_names:
            raise TypeError(
                f"adapter_names must be a non-empty list of adapter names, one per row; got {adapter_names!r}"
            )
        names = list(adapter_names)
        self._check_exists(sorted({n for n in names if n != BASE_ROW}, key=str))
        if self.adapters_disabled:
            raise ValueError("adapter_names= while adapters are disabled: enable_adapter_layers() first")
        if merged := sorted({a for _, host in self.adapter_hosts() for a in host.merged_adapters}):
            raise ValueError(
                f"adapter_names= while adapters {merged} are merged into the weights: unmerge_adapter() first"
            )
        for name, host in self.adapter_hosts():
            if isinstance(host, ModuleAdapters) and (inside := sorted(set(names) & set(host.adapters))):
                methods = sorted({m for a in inside for m in host.adapters[a]})
                raise ValueError(
                    f"adapters {inside} act inside module {name!r} ({', '.join(methods)}), which cannot be chosen per "
                    "row of a batch; run those rows as a separate batch after set_adapter()"
                )
        wrappers = [m for _, m in self.adapter_hosts()] + [m for _, m in self.saved_modules()]
        for m in wrappers:
            m.batch_adapters = names
        try:
            yield
        finally:
            for m in wrappers:
                m.batch_adapters = None

    # -- merging --------------------------------------------------------------------------
    def _unmergeable(self, adapters: list[str]) -> dict[str, list[str]]:
        """``{module path: [method, ...]}`` of the deltas of ``adapters`` that do not fold into weights."""
        found: dict[str, list[str]] = {}
        for name, host in self.adapter_hosts():
            methods = sorted({m for a in adapters if a in host.adapters for m in host.unmergeable_methods(a)})
            if methods:
                found[name] = methods
        return found

    def merge_adapter(
        self, adapter_names: list[str] | None = None, keep_unmergeable: bool = False, safe_merge: bool = False
    ) -> set[str]:
        """Fold adapters (default: the active ones) into the base weights; all or nothing.

        Modules carrying a delta that cannot merge (Coeff-Tuning, SURM adapters) make this an
        error, unless ``keep_unmergeable``: then those modules are left as they are and still act.
        Returns the paths of the modules so kept. Every merge checks the new weights and biases are
        finite before writing them, so HF PEFT's ``safe_merge=True`` is what always happens (the flag is
        accepted for compatibility). A refused or failed merge restores the weights bit for bit, from a
        copy of the weights it writes, held in CPU memory while it runs.
        """
        del safe_merge  # always safe, see above
        names, kept = self._merge_plan(adapter_names, keep_unmergeable)
        hosts = [(n, h) for n, h in self.adapter_hosts() if n not in kept and any(a in h.adapters for a in names)]
        tied_before = getattr(getattr(self.base_model, "config", None), "tie_word_embeddings", True)
        untied = self._untie([h for _, h in hosts if isinstance(h, AdaptedLayer)])
        # A snapshot, not a subtraction (w + Δ - Δ is not w in floating point), kept in CPU memory so
        # that merging a large model on an accelerator does not need twice the memory there.
        snapshot = [(h, h.merged_adapters[:], _saved_weights(h)) for _, h in hosts]
        failing = ""
        try:
            # Backwards through the model: a delta may read another layer's frozen weight (Kernel-mix's
            # V reads the key projection, which comes earlier), so that layer must still be unmerged.
            # unmerge_adapter() then runs forwards, restoring the earlier layers first.
            for name, host in reversed(hosts):
                failing = name
                for a in names:
                    host.merge(a)
        except BaseException as e:  # also an interrupt or out-of-memory: never leave half a merge
            with torch.no_grad():
                for host, merged, saved in snapshot:
                    _restore_weights(host, saved)
                    host.merged_adapters[:] = merged
            for layer, shared in untied:
                layer.weight = shared
            if untied:
                _set_tie_word_embeddings(self.base_model, tied_before)
            if isinstance(e, ValueError):
                raise ValueError(f"cannot merge into module {failing!r}: {e}. Nothing was merged.") from e
            raise
        return set(kept)

    def _merge_plan(
        self, adapter_names: str | list[str] | None, keep_unmergeable: bool
    ) -> tuple[list[str], dict[str, list[str]]]:
        """The adapters to merge and the modules whose deltas cannot merge; refuses (changing nothing) when
        there are such modules and ``keep_unmergeable`` is not set."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names or self.active_adapters)
        self._check_exists(names)
        kept = self._unmergeable(names)
        if kept and not keep_unmergeable:
            listing = "; ".join(f"{name} ({', '.join(methods)})" for name, methods in kept.items())
            raise ValueError(
                f"cannot merge: these modules carry deltas that do not fold into weights: {listing}. Nothing was "
                "merged. Pass keep_unmergeable=True to merge the rest and keep these modules adapted."
            )
        return names, kept

    def _untie(self, hosts: list[AdaptedLayer]) -> list[tuple[nn.Module, nn.Parameter]]:
        """Give each host whose weight another module shares (tied input and output embeddings) its own
        copy, so a merge changes that module alone and merged equals unmerged, as HF PEFT does; the model's
        config then says the embeddings are no longer tied, so a save and reload keeps both. Returns
        ``[(layer, the shared weight)]`` to put back if the merge fails."""
        sharing: dict[int, int] = {}
        for _, param in self.base_model.named_parameters(remove_duplicate=False):
            sharing[id(param)] = sharing.get(id(param), 0) + 1
        untied = []
        for host in hosts:
            layer = host.base_layer
            if sharing.get(id(layer.weight), 1) > 1:
                untied.append((layer, layer.weight))
                layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
        if untied:
            _set_tie_word_embeddings(self.base_model, False)
        return untied

    def unmerge_adapter(self) -> None:
        for _, host in self.adapter_hosts():
            host.unmerge()

    def merge_and_unload(
        self,
        keep_unmergeable: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        dequantize: bool = False,
    ) -> nn.Module:
        """Fold adapters (default: the active ones) into the weights and return the base model without wrappers.

        With ``keep_unmergeable=True`` the modules whose deltas cannot merge keep them (and keep
        acting); every other module is merged and unwrapped. ``safe_merge`` as in merge_adapter().

        On a quantized base (bitsandbytes 4-bit or 8-bit) each adapted weight is dequantized, shifted and
        quantized again, which is lossy: the largest relative change requantization made is warned about,
        and each merged layer keeps its own in its ``requantization_error`` attribute. ``dequantize=True`` first turns
        every quantized linear layer of the model into a float ``nn.Linear`` holding its dequantized weight,
        so the merge is exact: the returned float model computes what the unmerged adapted model did, up to
        the quantization of the base's activations in its matmuls.
        """
        names, _ = self._merge_plan(adapter_names, keep_unmergeable)  # a refusal comes before anything changes
        # Every quantized layer is found (and one no backend reads refused) before the first is swapped.
        modules = self.base_model.named_modules() if dequantize else ()
        quantized = [(n, m) for n, m in modules if quant_backend(m, n) is not None]
        swapped: list[tuple[str, nn.Module]] = []
        # A bf16 QLoRA base gets bf16 layers, or its matmuls would fail.
        dtype = self._base_float_dtype() if quantized else None
        try:
            for name, layer in quantized:
                set_submodule(self.base_model, name, to_float_linear(layer, dtype))
                swapped.append((name, layer))
            kept = self.merge_adapter(names, keep_unmergeable=keep_unmergeable, safe_merge=safe_merge)
        except BaseException:  # merge_adapter restored the weights; put the quantized layers back too
            for name, layer in swapped:
                set_submodule(self.base_model, name, layer)
            raise
        if swapped:
            forget_quantization(self.base_model)
        errors = {}
        for name, host in self.adapter_hosts():
            error = getattr(host, "requantization_error", None)  # of the host's last merge or unmerge
            if error is not None and name not in kept and any(a in host.merged_adapters for a in names):
                errors[name] = host.base_layer.requantization_error = error  # outlives the host
        if errors:
            worst = max(errors, key=errors.get)
            warnings.warn(
                f"merged into a quantized base: requantizing the {len(errors)} merged layers changed their weights "
                f"by up to {errors[worst]:.3g} (relative Frobenius, {worst}; each merged layer keeps its own in "
                "its requantization_error attribute). merge_and_unload(dequantize=True) keeps the merged weights "
                "in float instead.",
                stacklevel=2,
            )
        return self.unload(keep=kept)

    def _base_float_dtype(self) -> torch.dtype:
        """The dtype of the base's own float weights (embeddings, norms, the head), not the adapters' float32
        ones nor packed quantized storage; float32 for a base with none."""
        adapter = {id(p) for _, p in self.adapter_parameters()}
        own = (p for p in self.base_model.parameters() if id(p) not in adapter)
        return next((p.dtype for p in own if p.is_floating_point() and p.element_size() > 1), torch.float32)

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

    def export_gguf(self, path: str | os.PathLike, **options: Any) -> Any:
        """Write the adapter as a llama.cpp LoRA adapter GGUF (llama.cpp, ollama); returns the per-layer
        report. Options: see :func:`structpeft.core.export_gguf.export_gguf`."""
        from structpeft.core.export_gguf import export_gguf

        return export_gguf(self, path, **options)

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
        """Load a saved adapter under ``adapter_name``; on any error the model is left as it was.

        ``is_trainable=False`` (the default, as in HF PEFT) loads it frozen and puts the model in eval mode.
        """
        check_adapter_name(adapter_name)
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
        if not is_trainable:
            self.eval()

    def load_adapter_weights(self, path: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER) -> None:
        """Fill the existing adapter ``adapter_name`` with the tensors saved at ``path`` (a trainer resuming, or
        reloading its best checkpoint). The saved config must describe the same adapter; the tensors are checked
        as :meth:`load_adapter` checks them (keys, shapes, kinds, finite values) before anything is written."""
        self._check_exists([adapter_name])
        configs, tensors = checkpoint.read_adapter(path)
        if not checkpoint.same_configs(configs, self.peft_config[adapter_name]):
            raise checkpoint.CheckpointError(
                f"adapter at {path} is not the adapter {adapter_name!r} of this model: it was saved with another "
                "config. The model is unchanged."
            )
        # The adapter's own deltas are the plan its tensors load into, in place.
        plan = {
            name: dict(host.adapters[adapter_name])
            for name, host in self.adapter_hosts()
            if adapter_name in host.adapters
        }
        saved = [name for name, module in self.saved_modules() if adapter_name in module.copies]
        heads = checkpoint.load_into_plan(self, plan, saved, tensors, path)
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


def _weights(host: AdapterHost) -> list[torch.Tensor]:
    """The float base tensors a merge into ``host`` writes in place (none for a host that does not merge; a
    quantized weight is replaced whole, not written into)."""
    if not isinstance(host, AdaptedLayer):
        return []
    layer = host.base_layer
    weight = None if quant_backend(layer) is not None else layer.weight
    return [t for t in (weight, getattr(layer, "bias", None)) if t is not None]


def _saved_weights(host: AdapterHost) -> tuple[list[torch.Tensor], object]:
    """What a failed merge restores: copies of the float tensors (in CPU memory), and a quantized weight's
    own objects (a merge replaces them rather than writing into them)."""
    copies = [t.detach().to("cpu", copy=True) for t in _weights(host)]
    backend = quant_backend(host.base_layer) if isinstance(host, AdaptedLayer) else None
    return copies, None if backend is None else backend.save(host.base_layer)


def _restore_weights(host: AdapterHost, saved: tuple[list[torch.Tensor], object]) -> None:
    copies, quantized = saved
    for tensor, value in zip(_weights(host), copies):
        tensor.copy_(value)
    if quantized is not None:
        quant_backend(host.base_layer).restore(host.base_layer, quantized)


def _check_unique_keys(plan: dict[str, dict[str, AdapterDelta]]) -> None:
    """Checkpoint keys leave the method out (HF PEFT's layout), so two methods on one module must not name
    a tensor alike: the second would overwrite the first in the file. Refused when planned."""
    owner: dict[str, str] = {}
    for path, deltas in plan.items():
        for method, delta in deltas.items():
            for key in delta.state_dict():
                full = f"{path}.{key}"
                if full in owner:
                    raise ValueError(
                        f"methods {owner[full]} and {method} on module {path!r} both name a tensor {key!r}, so their "
                        "checkpoints would collide; target different modules with them"
                    )
                owner[full] = method


def _set_tie_word_embeddings(model: nn.Module, tied: bool) -> None:
    """Record on a transformers model's config (and its text config) whether its embeddings are tied."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "tie_word_embeddings"):
        return
    config.tie_word_embeddings = tied
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if hasattr(text_config, "tie_word_embeddings"):
        text_config.tie_word_embeddings = tied


def _check_not_adapted(model: nn.Module) -> None:
    if isinstance(model, PeftModel) or any(isinstance(m, AdapterHost | ModulesToSave) for m in model.modules()):
        raise ValueError(
            f"this {type(model).__name__} already holds structpeft adapters; add another one to its PeftModel "
            "with model.add_adapter(name, config), or load_adapter(path, name) for a saved one, then set_adapter(name)"
        )


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
