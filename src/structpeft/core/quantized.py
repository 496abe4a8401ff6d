"""Quantized base layers: the one place that knows how a 4-bit or 8-bit layer stores its weight.

A quantized linear layer keeps ``in_features`` / ``out_features`` but stores its weight packed (bitsandbytes
NF4/FP4: a ``(n, 1)`` uint8 tensor plus a quantization state; int8: int8 values plus one scale per row), so
nothing outside this module may read ``layer.weight`` as the layer's (d_out, d_in) matrix. A backend here
gives that matrix dequantized, for the methods that need a frozen weight (Kernel-mix's V part reads W_k) and
for merging, and writes a float matrix back by quantizing it again (lossy, as the storage is). The forward
never goes through here: the quantized layer runs as it is and the adapters add their float deltas to its
output (QLoRA, arXiv 2305.14314).

Backends: bitsandbytes ``Linear4bit`` (nf4 and fp4, with and without double quantization) and
``Linear8bitLt``; torchao's int8 weight-only ``nn.Linear`` (``quantize_(model, Int8WeightOnlyConfig())``, a
weight of class ``Int8Tensor``). A layer with a packed or tensor-subclass weight of any other kind is
refused by name.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class QuantBackend:
    """How one kind of quantized layer reads and writes its (d_out, d_in) weight."""

    name: str
    matches: Callable[[nn.Module], bool]
    dequantize: Callable[[nn.Module], torch.Tensor]  # -> float32 (d_out, d_in)
    requantize: Callable[[nn.Module, torch.Tensor], None]  # float (d_out, d_in) -> the layer's storage
    # What a failed merge puts back: requantizing replaces the weight object, so the old one is kept whole.
    save: Callable[[nn.Module], object]
    restore: Callable[[nn.Module, object], None]
    prepare: Callable[[nn.Module], None] = lambda layer: None  # once, when a model with such layers is wrapped


def _is_bnb(layer: nn.Module, class_name: str) -> bool:
    # A bitsandbytes layer exists only once bitsandbytes is imported: a float model never imports it (0.8 s
    # and a warning about its hub kernels, on every get_peft_model, before this check).
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(layer, getattr(bnb.nn, class_name))


# -- bitsandbytes 4-bit (NF4, FP4) ------------------------------------------------------------------
def _bnb4_dequantize(layer: nn.Module) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    weight = layer.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a 4-bit weight in place at its first CPU inference forward, a layout
        # dequantize_4bit misreads (and whose inverse in bitsandbytes 0.50.2 gave weights 0.045 off, measured):
        # the weight it computes with is read off the layer itself, as its outputs for the unit vectors.
        with torch.no_grad():
            eye = torch.eye(layer.in_features, device=weight.device)
            columns = layer(eye).float()  # (d_in, d_out): row i is W e_i + b
            if layer.bias is not None:
                columns = columns - layer.bias.float()
        return columns.T.contiguous()
    return dequantize_4bit(weight.data, weight.quant_state).float()


def _bnb4_prepare(layer: nn.Module) -> None:
    """Keep the weight in bitsandbytes' training layout. At its first CPU inference forward (eval mode, no
    grad: a validation pass, Kernel-mix's shape probe) bitsandbytes 0.50.2 repacks a 4-bit weight in place
    for a bfloat16 kernel with no autograd formula, so every later training step's gradients through the
    layer were dropped ("an autograd kernel was not registered", seen in our tests). A weight packed
    already is written back in the plain layout."""
    layer.support_avx512bf16_for_cpu = False
    if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        _bnb4_requantize(layer, _bnb4_dequantize(layer))


def _bnb4_requantize(layer: nn.Module, new_weight: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old = layer.weight
    state = old.quant_state
    layer.weight = bnb.nn.Params4bit(
        new_weight.to(state.dtype).cpu(),
        requires_grad=False,
        blocksize=state.blocksize,
        compress_statistics=state.nested,
        quant_type=state.quant_type,
        quant_storage=old.dtype,
        module=layer,
    ).to(old.device)


# -- bitsandbytes 8-bit (LLM.int8) --------------------------------------------------------------------
def _bnb8_dequantize(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight
    scales = weight.SCB if weight.SCB is not None else layer.state.SCB
    return weight.data.float() * (scales.float().unsqueeze(1) / 127.0)  # CB (int8) * row absmax / 127


def _bnb8_requantize(layer: nn.Module, new_weight: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old = layer.weight
    layer.weight = bnb.nn.Int8Params(new_weight.half().cpu(), requires_grad=False, has_fp16_weights=False).to(
        old.device
    )
    layer.state.CB, layer.state.SCB = None, None  # bitsandbytes reads the new weight's on the next forward


def _bnb8_restore(layer: nn.Module, saved: object) -> None:
    layer.weight, layer.state.CB, layer.state.SCB = saved  # type: ignore[misc]


def _set_weight(layer: nn.Module, saved: object) -> None:
    layer.weight = saved


# -- torchao int8 weight-only (Int8WeightOnlyConfig) ------------------------------------------------------
def _is_torchao_int8(layer: nn.Module) -> bool:
    weight = layer._parameters.get("weight")
    return type(weight).__name__ == "Int8Tensor" and type(weight).__module__.startswith("torchao.")


def _torchao_dequantize(layer: nn.Module) -> torch.Tensor:
    return layer.weight.dequantize().float()


def _torchao_requantize(layer: nn.Module, new_weight: torch.Tensor) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    holder = nn.Sequential(nn.Linear(layer.in_features, layer.out_features, bias=False, device=new_weight.device))
    with torch.no_grad():
        holder[0].weight.copy_(new_weight)
    quantize_(holder, Int8WeightOnlyConfig())
    layer.weight = nn.Parameter(holder[0].weight.detach(), requires_grad=False)


BACKENDS = (
    QuantBackend(
        "bitsandbytes Linear4bit",
        lambda m: _is_bnb(m, "Linear4bit"),
        _bnb4_dequantize,
        _bnb4_requantize,
        save=lambda m: m.weight,
        restore=_set_weight,
        prepare=_bnb4_prepare,
    ),
    QuantBackend(
        "bitsandbytes Linear8bitLt",
        lambda m: _is_bnb(m, "Linear8bitLt"),
        _bnb8_dequantize,
        _bnb8_requantize,
        save=lambda m: (m.weight, m.state.CB, m.state.SCB),
        restore=_bnb8_restore,
    ),
    QuantBackend(
        "torchao int8 weight-only",
        _is_torchao_int8,
        _torchao_dequantize,
        _torchao_requantize,
        save=lambda m: m.weight,
        restore=_set_weight,
    ),
)
SUPPORTED = ", ".join(b.name for b in BACKENDS)


def quant_backend(layer: nn.Module, name: str = "") -> QuantBackend | None:
    """The backend of a quantized layer; None for a float layer; an error naming the layer's type for a
    quantized layer no backend reads (its packed weight would be taken for the layer's matrix)."""
    backend = _matching_backend(layer)
    if backend is not None:
        return backend
    packed = _packed_weight(layer)
    if packed is not None:
        key, weight = packed
        raise TypeError(
            f"module {name or '?'!r} is a {type(layer).__module__}.{type(layer).__name__} with a "
            f"{type(weight).__name__} ({weight.dtype}) {key!r}: a quantized layer structpeft has no backend for "
            f"(supported: {SUPPORTED}). Drop it from target_modules, or load the base unquantized"
        )
    return None


def _packed_weight(layer: nn.Module) -> tuple[str, torch.Tensor] | None:
    """A layer's own quantized weight storage, by name: a weight of an integer or 8-bit float dtype or a
    quantized tensor subclass (torchao's report a float dtype), or the packed ``qweight`` / ``W_q`` tensors
    that GPTQ, AWQ and HQQ layers keep, as parameters or buffers. None for a float layer."""
    own = {**layer._buffers, **layer._parameters}  # not tensors a wrapper forwards from its base layer
    for key in ("weight", "qweight", "W_q"):
        tensor = own.get(key)
        if tensor is None:
            continue
        foreign = type(tensor).__module__.split(".")[0] not in ("torch", "builtins")
        integer = not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)
        float8 = tensor.is_floating_point() and tensor.element_size() == 1  # needs its scale to mean anything
        if integer or float8 or foreign:
            return key, tensor
    return None


def _matching_backend(layer: nn.Module) -> QuantBackend | None:
    return next((backend for backend in BACKENDS if backend.matches(layer)), None)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as stored for a float layer; dequantized (float32, (d_out, d_in)) for a quantized one."""
    backend = quant_backend(layer)
    return layer.weight if backend is None else backend.dequantize(layer)


def write_weight(layer: nn.Module, new_weight: torch.Tensor) -> float:
    """Quantize ``new_weight`` (d_out, d_in) into a quantized layer; returns the relative Frobenius error of
    what the layer then holds, ``||Q(W) - W|| / ||W||``."""
    backend = quant_backend(layer)
    if backend is None:
        raise TypeError(f"{type(layer).__name__} is not a quantized layer")
    backend.requantize(layer, new_weight)
    held = backend.dequantize(layer)
    return (held - new_weight.float()).norm().item() / max(new_weight.float().norm().item(), 1e-30)


def to_float_linear(layer: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A plain ``nn.Linear`` holding a quantized layer's dequantized weight and its bias, in ``dtype``."""
    weight = dense_weight(layer)
    bias = getattr(layer, "bias", None)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense.requires_grad_(False)


def forget_quantization(model: nn.Module) -> None:
    """Drop the marks transformers leaves on a model loaded quantized (its config's ``quantization_config``,
    ``is_quantized``, its quantizer) once its weights are float: they make the HF Trainer refuse to train it
    and ``save_pretrained`` write a quantization config."""
    config = getattr(model, "config", None)
    if config is not None:
        configs = [config] + ([config.get_text_config()] if hasattr(config, "get_text_config") else [])
        for c in {id(c): c for c in configs}.values():
            if hasattr(c, "quantization_config"):
                del c.quantization_config
    for attribute, value in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attribute):
            setattr(model, attribute, value)
    for attribute in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attribute, False):
            setattr(model, attribute, False)


def prepare_quantized(model: nn.Module) -> None:
    """Ready every quantized layer of ``model`` for adapters (see each backend's ``prepare``)."""
    for module in model.modules():  # layers no backend reads are refused only where adapters go
        backend = _matching_backend(module)
        if backend is not None:
            backend.prepare(module)
