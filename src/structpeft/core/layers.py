"""Where deltas live: beside a frozen layer, or inside a module whose computation they change.

A method contributes an :class:`AdapterDelta` per (adapter, target module). Two hosts hold them,
keyed by adapter name then by method:

- :class:`AdaptedLayer` replaces a leaf layer (Linear, Conv, Embedding). It owns the frozen
  ``base_layer``; its forward has one branch order for every method: disabled -> base; otherwise
  base (with any merged deltas already in its weight) plus each active, unmerged delta in turn.
- :class:`ModuleAdapters` is attached as a child to a module that stays in place (an attention
  layer). Its deltas act inside that module's forward, through a hook the method installs
  (``AdapterDelta.on_attach``); the hook asks the host for its active deltas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from structpeft.core.quantized import quant_backend, write_weight

try:  # GPT-2 style layers store their weight as (in, out); only needed when transformers is used.
    from transformers.pytorch_utils import Conv1D as HFConv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the core usable
    HFConv1D = None

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_CLASS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_TORCH_CONV_FORWARDS = {cls.forward for cls in _CONV_CLASS.values()}


@dataclass(frozen=True)
class LayerGeometry:
    """The shape facts of a supported layer that methods build deltas from.

    ``weight_shape`` is always in the (d_out, d_in/groups, *kernel) convention (PyTorch's conv layout);
    ``transposed`` says the layer stores its weight as the transpose (HF Conv1D, nn.Embedding).
    """

    kind: str  # "linear" | "conv" | "embedding"
    in_features: int
    out_features: int
    weight_shape: tuple[int, ...]
    transposed: bool = False
    groups: int = 1


SUPPORTED_LAYERS = "nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d, nn.Embedding"


def layer_geometry(layer: nn.Module, name: str = "") -> LayerGeometry:
    quant_backend(layer, name)  # a quantized layer no backend reads is refused here, by name
    if isinstance(layer, nn.Linear):  # a quantized linear packs its weight: the shape is its features'
        return LayerGeometry("linear", layer.in_features, layer.out_features, (layer.out_features, layer.in_features))
    if HFConv1D is not None and isinstance(layer, HFConv1D):
        d_in, d_out = layer.weight.shape
        return LayerGeometry("linear", d_in, d_out, (d_out, d_in), transposed=True)
    if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return LayerGeometry(
            "conv", layer.in_channels, layer.out_channels, tuple(layer.weight.shape), groups=layer.groups
        )
    if isinstance(layer, nn.Embedding):
        num, dim = layer.weight.shape
        return LayerGeometry("embedding", num, dim, (dim, num), transposed=True)
    raise TypeError(
        f"module {name or '?'!r} is a {type(layer).__name__}, which structpeft cannot adapt; "
        f"supported layers: {SUPPORTED_LAYERS}. Drop it from target_modules."
    )


def conv_like(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Apply ``weight`` to ``x`` with ``layer``'s stride, padding, dilation and padding mode.

    A conv subclass with a forward of its own (TensorFlow-style "same" padding worked out in the
    forward, as in EfficientNet ports) runs that forward with ``weight`` in place of its weight."""
    if type(layer).forward not in _TORCH_CONV_FORWARDS:
        if groups != layer.groups:
            raise ValueError(
                f"{type(layer).__name__} has its own forward with groups={layer.groups}; "
                f"a delta applied through it must use the same groups, not {groups}"
            )
        return torch.func.functional_call(layer, {"weight": weight, "bias": None}, (x,))
    conv = _CONV_FN[weight.dim() - 2]
    weight = _canonical_strides(weight)
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        return conv(x, weight, None, layer.stride, 0, layer.dilation, groups)
    return conv(x, weight, None, layer.stride, layer.padding, layer.dilation, groups)


def plain_conv_class(layer: nn.Module) -> type[nn.Module]:
    """The torch conv class with ``layer``'s number of spatial dims (subclasses may need extra
    constructor arguments, such as an image size)."""
    return _CONV_CLASS[len(layer.kernel_size)]


def pointwise_conv(x: torch.Tensor, matrix: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Mix channels of a (B, C, *spatial) tensor by ``matrix`` (C_out, C_in/groups): a 1x1 conv."""
    spatial = x.dim() - 2
    weight = _canonical_strides(matrix.reshape(*matrix.shape, *(1,) * spatial))
    return _CONV_FN[spatial](x, weight, groups=groups)


def _canonical_strides(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with row-major strides. A kernel built by transposes/movedims can have size-1
    dims with odd strides (e.g. (320, 1, 320, 320)): ``is_contiguous()`` says yes, but convolution
    reads it as channels-last and hands back channels-last gradients, which made every batch norm
    backward downstream 3x slower in MobileNetV2 (measured)."""
    return weight.contiguous().view(-1).view(weight.shape)


class AdapterDelta(nn.Module):
    """One method's trainable update to one frozen layer, for one adapter.

    ``forward(x, result, base_layer)`` returns the adapted output given the layer input ``x`` and
    the output so far. Mergeable deltas also give ``delta_weight`` in the (d_out, d_in/groups,
    *kernel) convention and may give ``delta_bias``.
    """

    mergeable: bool = True
    acts_inside: bool = False  # True: hosted by ModuleAdapters and read by a hook, not added to an output

    def on_attach(self, module: nn.Module) -> None:
        """Called when the delta is put into the model on ``module`` (install a hook here)."""

    def on_detach(self, module: nn.Module) -> None:
        """Called when the delta leaves the model (remove what ``on_attach`` installed)."""

    def forward(self, x: torch.Tensor, result: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    @property
    def compute_dtype(self) -> torch.dtype:
        """The one dtype rule for every method: a delta computes in its own parameters' dtype (float32,
        unless the model was cast whole, ``model.to(torch.bfloat16)``); its input is cast to it
        (:meth:`adapter_input`) and its output back to the layer's."""
        param = next(self.parameters(), None)
        return torch.float32 if param is None else param.dtype

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.compute_dtype)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into weights")

    def delta_bias(self, base_layer: nn.Module) -> torch.Tensor | None:
        return None

    def low_rank_factors(self, base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(B, A)`` with ``delta_weight == B @ A`` exactly, B (d_out, q) and A (q, d_in), scale folded in, for
        a linear layer's update that is low rank by construction; None otherwise. Exports write these
        instead of an SVD of ΔW."""
        return None


class AdapterHost(nn.Module):
    """What both hosts share: ``adapters[adapter_name][method] -> AdapterDelta`` and the switches
    the wrapper model sets (active adapters, disabled)."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Set for the length of a mixed-batch forward: the adapter of each row (BASE_ROW for none).
        self.batch_adapters: list[str] | None = None

    def unmergeable_methods(self, adapter: str) -> list[str]:
        return [m for m, d in self.adapters[adapter].items() if not d.mergeable]

    def merge(self, adapter: str) -> bool:
        return False

    def unmerge(self, adapter: str | None = None) -> None:
        pass


class ModuleAdapters(AdapterHost):
    """The deltas that act inside ``module``'s own forward; attached to it as :data:`HOST_ATTRIBUTE`."""

    def active_deltas(self) -> list[AdapterDelta]:
        """The deltas of the active adapters, in activation order; none when disabled."""
        if self.disabled or self.batch_adapters is not None:
            # A mixed batch never names an adapter acting inside a module (the model refuses it), so
            # none of these deltas belongs to any row.
            return []
        return [d for a in self.active_adapters if a in self.adapters for d in self.adapters[a].values()]


HOST_ATTRIBUTE = "structpeft_adapters"
BASE_ROW = "__base__"  # in a mixed batch, the rows that run the base model alone (HF PEFT's name)


def module_host(module: nn.Module) -> ModuleAdapters | None:
    """The :class:`ModuleAdapters` attached to ``module``, if any (what a method's hook reads)."""
    return module._modules.get(HOST_ATTRIBUTE)


class AdaptedLayer(AdapterHost):
    """A frozen layer plus its deltas: ``adapters[adapter_name][method] -> AdapterDelta``."""

    def __init__(self, base_layer: nn.Module, name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.path = name
        self.geometry = layer_geometry(base_layer, name)
        self.requantization_error: float | None = None  # of the last merge into a quantized base

    def __getattr__(self, name: str):
        """The wrapped layer's attributes (``in_features``, ``in_channels``, Conv1D's ``nf``, ``padding_idx``...)
        read through the wrapper, as model code reads them; conv layers also answer ``in_features`` and
        ``out_features`` (their channels), as HF PEFT's wrappers do. Private names are not forwarded: a
        hook library's markers (accelerate's ``_hf_hook``) on the layer must not read as the wrapper's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("base_layer", "geometry"):
                raise
        try:
            return getattr(self.base_layer, name)
        except AttributeError:
            if name in ("in_features", "out_features"):
                return getattr(self.geometry, name)
            raise

    # Model code reads its layers' parameters directly (ViT's patch embedding checks
    # ``projection.weight.dtype``): the wrapper answers with the base layer's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.batch_adapters is not None:
            return self._mixed_batch_forward(x, result)
        for adapter in self.active_adapters:
            if adapter in self.adapters and adapter not in self.merged_adapters:
                for delta in self.adapters[adapter].values():
                    result = delta(x, result, self.base_layer)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each row gets its own adapter's deltas (``batch_adapters[i]`` for row i); out of place, for autograd."""
        rows = _check_rows(self.batch_adapters, x, f"module {self.path!r}")
        for adapter, index in rows.items():
            if adapter in self.adapters:
                part = result.index_select(0, index)
                for delta in self.adapters[adapter].values():
                    part = delta(x.index_select(0, index), part, self.base_layer)
                result = result.index_copy(0, index, part)
        return result

    # -- merging --------------------------------------------------------------------------
    def _to_storage(self, delta_w: torch.Tensor) -> torch.Tensor:
        return delta_w.T if self.geometry.transposed else delta_w

    def _shift_weights(self, adapter: str, sign: float) -> None:
        """Add (sign=+1) or remove (-1) all of an adapter's deltas; checked in full before writing. A quantized
        base is dequantized, shifted and quantized again (lossy: the error is kept in
        ``requantization_error``)."""
        backend = quant_backend(self.base_layer, self.path)
        weight = self.base_layer.weight
        bias = getattr(self.base_layer, "bias", None)
        with torch.no_grad():
            new_w = weight.float() if backend is None else backend.dequantize(self.base_layer)
            new_b = None if bias is None else bias.float()
            for method, delta in self.adapters[adapter].items():
                new_w = new_w + sign * self._to_storage(delta.delta_weight(self.base_layer)).float()
                db = delta.delta_bias(self.base_layer)
                if db is not None:
                    if new_b is None:
                        raise ValueError(f"adapter {adapter!r} ({method}) has a bias delta but the layer has no bias")
                    new_b = new_b + sign * db.float()
            if not torch.isfinite(new_w).all() or (new_b is not None and not torch.isfinite(new_b).all()):
                raise ValueError(f"merging adapter {adapter!r} gives non-finite weights or biases")
            if backend is None:
                weight.copy_(new_w.to(weight.dtype))
            self.requantization_error = None if backend is None else write_weight(self.base_layer, new_w)
            if new_b is not None:
                bias.copy_(new_b.to(bias.dtype))

    def merge(self, adapter: str) -> bool:
        """Fold ``adapter`` into the base weights; False if there was nothing to merge."""
        if adapter not in self.adapters or adapter in self.merged_adapters:
            return False
        self._shift_weights(adapter, +1.0)
        self.merged_adapters.append(adapter)
        return True

    def unmerge(self, adapter: str | None = None) -> None:
        """Take ``adapter`` (default: every merged adapter) back out of the base weights."""
        for name in [adapter] if adapter is not None else self.merged_adapters[::-1]:
            if name in self.merged_adapters:
                self._shift_weights(name, -1.0)
                self.merged_adapters.remove(name)


class ModulesToSave(nn.Module):
    """A module kept frozen as ``original_module`` with one trainable full copy per adapter."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.batch_adapters: list[str] | None = None  # as AdapterHost's

    def __getattr__(self, name: str):
        """The kept module's public attributes (a head's ``out_features``...) read through the wrapper."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("original_module", "copies") or "_modules" not in self.__dict__:
                raise
        return getattr(self.active_copy(), name)

    def active_copy(self) -> nn.Module:
        if not self.disabled:
            for adapter in self.active_adapters:
                if adapter in self.copies:
                    return self.copies[adapter]
        return self.original_module

    def forward(self, *args, **kwargs):
        if self.batch_adapters is None or self.disabled:
            return self.active_copy()(*args, **kwargs)
        if not args or not isinstance(args[0], torch.Tensor):
            raise ValueError("a mixed-adapter batch needs the batch as the first positional input of a kept module")
        x, rest = args[0], args[1:]
        rows = _check_rows(self.batch_adapters, x, "a module in modules_to_save")
        parts, order = [], []
        for adapter, index in rows.items():
            module = self.original_module
            if adapter in self.copies:
                module = self.copies[adapter]
            parts.append(module(x.index_select(0, index), *rest, **kwargs))
            order.append(index)
        if not all(isinstance(p, torch.Tensor) for p in parts):
            raise ValueError("a mixed-adapter batch needs kept modules (modules_to_save) that return a tensor")
        return torch.cat(parts).index_select(0, torch.argsort(torch.cat(order)))


def _check_rows(adapters: list[str], x: torch.Tensor, where: str) -> dict[str, torch.Tensor]:
    """``{adapter: indices of its rows}`` for a mixed batch, after checking one name per row of ``x``."""
    if x.dim() == 0 or x.shape[0] != len(adapters):
        raise ValueError(
            f"adapter_names has {len(adapters)} entries but {where!s} got a batch of "
            f"{x.shape[0] if x.dim() else 'a scalar'}: give one adapter name per row ({BASE_ROW!r} for none)"
        )
    rows: dict[str, list[int]] = {}
    for i, adapter in enumerate(adapters):
        rows.setdefault(adapter, []).append(i)
    return {a: torch.tensor(i, device=x.device) for a, i in rows.items()}
