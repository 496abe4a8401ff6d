"""Export any mergeable adapter as a plain HF PEFT LoRA, for servers that read only LoRA.

Each adapted layer's update ΔW (the sum of the adapter's deltas on that layer, whatever the
methods) is factored by a truncated SVD, ``ΔW ≈ U_k S_k V_k^T``, and written as ``lora_B = U_k S_k``,
``lora_A = V_k^T`` with ``lora_alpha = r`` (scale 1), in HF PEFT's key layout. A layer whose deltas are all
low rank by construction (LoRA: ``AdapterDelta.low_rank_factors``) is written as its own factors, exactly,
unless a smaller rank or an energy is asked for. Conv layers become
PEFT's conv LoRA: the SVD runs over ΔW as a (C_out) x (C_in·k..) matrix, so ``lora_A`` is a
(r, C_in, k..) kernel and ``lora_B`` a 1x1 conv. The relative Frobenius error of each layer's ΔW,
``||ΔW - BA||_F / ||ΔW||_F``, is reported.

Refused, with the reason: deltas that act on attention maps or on a layer's output (they have no
ΔW), grouped convs (PEFT's grouped-conv LoRA reads every input channel in ``lora_A`` and PEFT
cannot merge it), convs with dilation or a non-zero padding mode (PEFT's ``lora_A`` conv drops
both, so it would compute something else than ΔW), and updates with a bias part unless
``lora_bias=True``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from structpeft.core import distributed
from structpeft.core.atomic import atomic_write_dir
from structpeft.core.checkpoint import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, _base_model_name
from structpeft.core.layers import AdaptedLayer, LayerGeometry

if TYPE_CHECKING:
    from structpeft.core.model import PeftModel

VLLM_RANKS = (8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class LayerExport:
    """How one layer was exported: its LoRA rank and the relative error of its ΔW."""

    name: str
    kind: str  # "linear" | "conv" | "embedding"
    rank: int
    full_rank: int  # min of ΔW's two matrix dimensions: the rank that loses nothing
    relative_error: float  # ||ΔW - B A||_F / ||ΔW||_F (0 for a zero ΔW)


@dataclass
class ExportReport:
    """What an export wrote: one :class:`LayerExport` per layer and the heads kept whole."""

    path: Path
    layers: list[LayerExport]
    modules_to_save: list[str] = field(default_factory=list)
    lora_bias: bool = False
    target: str = "LoRA"  # what was written: a HF PEFT LoRA, a llama.cpp LoRA GGUF

    @property
    def max_relative_error(self) -> float:
        return max((layer.relative_error for layer in self.layers), default=0.0)

    def __str__(self) -> str:
        width = max((len(layer.name) for layer in self.layers), default=5)
        header = f"{'layer':<{width}}  kind       rank / full  rel. error of ΔW"
        lines = [f"{self.target} export to {self.path}", header]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<{width}}  {layer.kind:<9}  {layer.rank:>4} / {layer.full_rank:<4}  "
                f"{layer.relative_error:.3e}"
            )
        lines.append(f"max relative error {self.max_relative_error:.3e}")
        if self.modules_to_save:
            lines.append(f"kept whole (modules_to_save): {', '.join(self.modules_to_save)}")
        return "\n".join(lines)


def export_lora(
    model: PeftModel,
    path: str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    adapter_name: str | None = None,
    uniform_rank: bool = False,
    lora_bias: bool = False,
    dtype: torch.dtype | None = None,
) -> ExportReport:
    """Write ``adapter_name`` (default: the only active adapter) as an HF PEFT LoRA in ``path``.

    rank: keep at most this many singular values per layer (fewer where ΔW has fewer); a layer whose
        update is low rank by construction (LoRA) and fits is written as its own factors.
    energy: per layer, the smallest rank keeping this fraction of ΔW's squared singular values.
    Neither: every layer must be low rank by construction, and is written exactly.
    uniform_rank: one rank for every layer, the smallest of vLLM's ranks (8, 16, ..., 256) that is at
        least every layer's rank from ``rank`` / ``energy``; layers whose ΔW has lower rank are
        padded with zero components.
    lora_bias: write a bias part of the update (Kernel-mix's head biases) as PEFT's ``lora_bias``
        (a bias on ``lora_B``, read by fewer servers); without it such an adapter is refused.
    dtype: of the written tensors; default each layer's weight dtype.

    Under FSDP2, call it on every rank: the sharded parameters are gathered, rank 0 writes.
    """
    check_rank_options(rank, energy)
    adapter = _pick_adapter(model, adapter_name)
    layers = _layers_to_export(model, adapter, lora_bias)
    factors = lora_factors(model, adapter, layers, rank=rank, energy=energy, uniform_rank=uniform_rank, dtype=dtype)

    tensors: dict[str, torch.Tensor] = {}
    for name, f in factors.items():
        if f.report.kind == "embedding":
            tensors[f"{KEY_PREFIX}{name}.lora_embedding_A"] = f.a.reshape(f.report.rank, -1)
            tensors[f"{KEY_PREFIX}{name}.lora_embedding_B"] = f.b
        else:
            tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = f.a
            tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = f.b
        if lora_bias and f.report.kind != "embedding":  # PEFT then gives every lora_B a bias
            bias = f.bias if f.bias is not None else f.b.new_zeros(len(f.b))
            tensors[f"{KEY_PREFIX}{name}.lora_B.bias"] = bias.to(f.b.dtype)
    ranks = {name: f.report.rank for name, f in factors.items()}

    tensors.update(_modules_to_save(model, adapter))
    saved_names = [name for name, module in model.saved_modules() if adapter in module.copies]
    config = _peft_config(model, layers, ranks, saved_names, lora_bias)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if distributed.is_writer(model):
        _write(Path(path), config, tensors)
    return ExportReport(Path(path), [f.report for f in factors.values()], saved_names, lora_bias)


def check_rank_options(rank: int | None, energy: float | None) -> None:
    if rank is not None and energy is not None:
        raise ValueError("an export takes at most one of rank=r (singular values kept) or energy=e (in (0, 1])")
    if rank is not None and rank <= 0:
        raise ValueError(f"export rank must be a positive integer, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], the fraction of squared singular values kept; got {energy}")


@dataclass
class LayerFactors:
    """One layer's written factors: ``a`` (r, *a_shape), ``b`` (d_out, r, *b_shape), with B A = ΔW (or its
    best rank-r part), the bias shift if any, and the report line."""

    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor | None
    report: LayerExport


def lora_factors(
    model: PeftModel,
    adapter: str,
    layers: dict[str, AdaptedLayer],
    *,
    rank: int | None,
    energy: float | None,
    uniform_rank: bool = False,
    dtype: torch.dtype | None = None,
) -> dict[str, LayerFactors]:
    """Each layer's update as LoRA factors: its own low-rank factors where every delta on it has them (and
    fit in ``rank``; never with ``energy``), else the top singular triplets of ΔW kept by ``rank`` /
    ``energy``. Without either, every layer must have exact factors."""
    with distributed.unsharded(model), torch.no_grad():
        factored = {name: _factor(name, layer, adapter, dtype, rank, energy) for name, layer in layers.items()}
    inexact = [name for name, f in factored.items() if f is None]
    if inexact:
        raise ValueError(
            f"the updates of {_first(inexact)} are not low rank by construction: give a rank (rank=r, --rank R) or "
            "an energy (energy=e, --energy E) for their truncated SVD. Nothing was written."
        )
    ranks = {name: f.rank_for(rank, energy) for name, f in factored.items()}
    if uniform_rank:
        common = _vllm_rank(max(ranks.values(), default=1))
        ranks = dict.fromkeys(ranks, common)
    out: dict[str, LayerFactors] = {}
    for name, f in factored.items():
        r = ranks[name]
        a, b = f.lora_factors(r)
        kind = layers[name].geometry.kind
        out[name] = LayerFactors(a, b, f.bias, LayerExport(name, kind, r, f.full_rank, f.relative_error(r)))
    return out


def refusal(what: str, refused: dict[str, list[str]]) -> str:
    """One line: ``what``, then each reason with the layers it holds for (the first few named)."""
    return (
        f"{what}: " + "; ".join(f"{why} ({_first(names)})" for why, names in refused.items()) + ". Nothing was written."
    )


def _first(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more layers" if len(names) > limit else "")


# -- what is exported ---------------------------------------------------------------------------
def _pick_adapter(model: PeftModel, adapter_name: str | None) -> str:
    if adapter_name is not None:
        model._check_exists([adapter_name])
        return adapter_name
    if len(model.active_adapters) != 1:
        raise ValueError(
            f"export_lora writes one adapter and {len(model.active_adapters)} are active "
            f"({model.active_adapters}); pass adapter_name=..."
        )
    return model.active_adapters[0]


def _layers_to_export(model: PeftModel, adapter: str, lora_bias: bool) -> dict[str, AdaptedLayer]:
    """The layers carrying ``adapter``, after checking that each can be written as a PEFT LoRA."""
    refused: dict[str, list[str]] = {}  # reason -> layers
    layers: dict[str, AdaptedLayer] = {}
    for name, host in model.adapter_hosts():
        if adapter not in host.adapters:
            continue
        deltas = host.adapters[adapter]
        inside = [m for m, d in deltas.items() if d.acts_inside or not d.mergeable]
        if inside:
            why = f"{', '.join(inside)} acts on attention maps or on a layer's output, so has no weight update ΔW"
            refused.setdefault(why, []).append(name)
            continue
        assert isinstance(host, AdaptedLayer)
        if host.merged_adapters:
            why = f"adapters {host.merged_adapters} are merged into it; unmerge_adapter() first"
            refused.setdefault(why, []).append(name)
            continue
        if (why := _conv_refusal(host)) is not None:
            refused.setdefault(why, []).append(name)
            continue
        layers[name] = host
    if refused:
        raise ValueError(refusal(f"cannot export adapter {adapter!r} as a plain LoRA", refused))
    if not layers:
        raise ValueError(f"adapter {adapter!r} adapts no layer; there is no LoRA to export")
    if not lora_bias:
        biased = biased_layers(model, layers, adapter)
        if biased:
            raise ValueError(
                f"adapter {adapter!r} also shifts the biases of {_first(biased)} (e.g. Kernel-mix's head "
                "biases), which a plain LoRA cannot carry. Pass lora_bias=True to write them as PEFT's lora_bias "
                "(a bias on lora_B). Nothing was written."
            )
    return layers


def biased_layers(model: PeftModel, layers: dict[str, AdaptedLayer], adapter: str) -> list[str]:
    """The layers whose update also shifts their bias (Kernel-mix's head biases, on projections with one)."""
    with distributed.unsharded(model), torch.no_grad():
        return [name for name, layer in layers.items() if _bias_delta(layer, adapter) is not None]


def _conv_refusal(layer: AdaptedLayer) -> str | None:
    geo: LayerGeometry = layer.geometry
    if geo.kind != "conv":
        return None
    base = layer.base_layer
    if geo.groups > 1:
        return (
            f"a grouped conv (groups={geo.groups}); PEFT's LoRA for it gives lora_A every input channel, which "
            "PEFT cannot merge. Keep grouped convs out of the adapter's targets, or merge it in structpeft"
        )
    if any(d != 1 for d in base.dilation):
        return f"a dilated conv (dilation={tuple(base.dilation)}); PEFT's lora_A conv ignores dilation"
    if base.padding_mode != "zeros":
        return f"padding_mode={base.padding_mode!r}; PEFT's lora_A conv pads with zeros"
    return None


def _bias_delta(layer: AdaptedLayer, adapter: str) -> torch.Tensor | None:
    biases = [b for d in layer.adapters[adapter].values() if (b := d.delta_bias(layer.base_layer)) is not None]
    if not biases or all(not b.any() for b in biases):
        return None
    return sum(b.float() for b in biases)


# -- factoring -----------------------------------------------------------------------------------
@dataclass
class _Factored:
    """ΔW = U diag(s) Vh as a (d_out, d_in·k..) matrix, and the shapes to write it in."""

    u: torch.Tensor  # (d_out, q)
    singular_values: torch.Tensor  # (q,): all of them, or the top q of a truncated SVD
    energy: float  # ||ΔW||_F², which the written components' share of gives the error
    vh: torch.Tensor  # (q, d_in·k..)
    a_shape: tuple[int, ...]  # lora_A's shape after the rank: (d_in,) or (C_in, k..)
    b_shape: tuple[int, ...]  # lora_B's shape after the rank: () or (1,)*spatial
    bias: torch.Tensor | None
    dtype: torch.dtype

    @property
    def full_rank(self) -> int:
        return min(self.u.shape[0], self.vh.shape[1])

    def rank_for(self, rank: int | None, energy: float | None) -> int:
        return _chosen_rank(self.singular_values, rank, energy)

    def relative_error(self, r: int) -> float:
        """``||ΔW - B A||_F / ||ΔW||_F`` for the rank-r factors: ``B A`` projects ΔW onto its top singular
        directions (exactly so for a truncated SVD too), so the error is the energy left out."""
        if self.energy == 0:
            return 0.0
        kept = self.singular_values[:r].pow(2).sum().item()
        return math.sqrt(max(self.energy - kept, 0.0) / self.energy)

    def lora_factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A (r, *a_shape), lora_B (d_out, r, *b_shape)), zero-padded past ΔW's rank."""
        keep = min(r, len(self.singular_values))
        return _padded(self.u[:, :keep] * self.singular_values[:keep], self.vh[:keep], r, self)


@dataclass
class _Exact:
    """ΔW = B A exactly, from the deltas' own low-rank factors (a linear layer's)."""

    b: torch.Tensor  # (d_out, q)
    a: torch.Tensor  # (q, d_in)
    bias: torch.Tensor | None
    dtype: torch.dtype
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...] = ()

    @property
    def full_rank(self) -> int:
        return min(self.b.shape[0], self.a.shape[1])

    def rank_for(self, rank: int | None, energy: float | None) -> int:
        return self.a.shape[0]

    def relative_error(self, r: int) -> float:
        return 0.0

    def lora_factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _padded(self.b, self.a, r, self)


def _padded(b: torch.Tensor, a: torch.Tensor, r: int, f: _Factored | _Exact) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, *a_shape), B (d_out, r, *b_shape)) from B (d_out, q) and A (q, d_in·k..), zero rows and columns
    past q (a uniform rank above a layer's)."""
    q = a.shape[0]
    a_full = a.new_zeros(r, a.shape[1])
    b_full = b.new_zeros(b.shape[0], r)
    a_full[:q] = a
    b_full[:, :q] = b
    return a_full.reshape(r, *f.a_shape).to(f.dtype), b_full.reshape(b.shape[0], r, *f.b_shape).to(f.dtype)


def _factor(
    name: str, layer: AdaptedLayer, adapter: str, dtype: torch.dtype | None, rank: int | None, energy: float | None
) -> _Factored | _Exact | None:
    """The layer's update as exact factors when every delta has them (and they fit ``rank``; an ``energy``
    asks for the SVD), else by SVD when a rank or energy says how much to keep, else None."""
    deltas = list(layer.adapters[adapter].values())
    bias = _bias_delta(layer, adapter)
    bias = None if bias is None else distributed.full_tensor(bias)
    stored = layer.base_layer.weight.dtype
    dtype = dtype or (stored if stored.is_floating_point else torch.float32)  # a quantized base: float32
    pairs = [d.low_rank_factors(layer.base_layer) for d in deltas]
    if energy is None and all(pair is not None for pair in pairs):
        b = torch.cat([distributed.full_tensor(p[0]).double() for p in pairs], dim=1)  # (d_out, Σq)
        a = torch.cat([distributed.full_tensor(p[1]).double() for p in pairs], dim=0)  # (Σq, d_in)
        if rank is None or a.shape[0] <= rank:
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"the update of {name!r} has non-finite values; nothing was written")
            return _Exact(b=b, a=a, bias=bias, dtype=dtype, a_shape=(a.shape[1],))
    if rank is None and energy is None:
        return None
    delta = sum(d.delta_weight(layer.base_layer).float() for d in deltas)
    delta = distributed.full_tensor(delta)  # (d_out, d_in/groups, k..)
    if not torch.isfinite(delta).all():
        raise ValueError(f"the update of {name!r} has non-finite values; nothing was written")
    matrix = delta.reshape(delta.shape[0], -1).double()  # (d_out, d_in·k..)
    u, s, vh = _svd(matrix, rank)
    return _Factored(
        u=u,
        singular_values=s,
        energy=matrix.pow(2).sum().item(),
        vh=vh,
        a_shape=tuple(delta.shape[1:]),
        b_shape=(1,) * (delta.dim() - 2),
        bias=bias,
        dtype=dtype,
    )


TRUNCATED_OVERSAMPLING, TRUNCATED_POWER_ITERATIONS = 10, 4


def _svd(matrix: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ΔW's singular triplets: for an export at a fixed rank well below ΔW's, only the top ``rank`` of a
    randomized SVD (Halko et al., arXiv 0909.4061; torch.svd_lowrank, seeded), which costs a few products
    with ΔW; else all of them. A full LAPACK SVD of a 1536 x 576 ΔW took 11-15 s on 2 threads while another
    process used the second core (thread oversubscription) and 0.26 s on one: the export of a 210-layer
    decoder was minutes, where the randomized one needs seconds."""
    smaller = min(matrix.shape)
    if rank is not None and rank + TRUNCATED_OVERSAMPLING < smaller // 2:
        with torch.random.fork_rng(devices=[]):  # the same factors every export, the caller's RNG untouched
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(matrix, q=rank + TRUNCATED_OVERSAMPLING, niter=TRUNCATED_POWER_ITERATIONS)
        return u[:, :rank], s[:rank], v[:, :rank].T
    with _one_thread():
        return torch.linalg.svd(matrix, full_matrices=False)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """LAPACK's SVD on one thread: with two, on a machine whose other core is busy, its threads wait on
    each other (measured 11-15 s against 0.26 s for a 1536 x 576 ΔW). torch's thread count is the
    process's, so it is set back however the block ends."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _chosen_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    if rank is not None:
        return min(rank, len(s))
    power = s.pow(2)
    total = power.sum()
    if total == 0:
        return 1  # PEFT needs r >= 1; the component written is zero
    kept = power.cumsum(0) / total
    # A relative tolerance so that energy=1.0 is met despite rounding in the cumulative sum.
    return int((kept < energy - 1e-12).sum().item()) + 1


def _vllm_rank(needed: int) -> int:
    for r in VLLM_RANKS:
        if r >= needed:
            return r
    raise ValueError(
        f"a layer needs rank {needed}, above the largest rank vLLM accepts ({VLLM_RANKS[-1]}); export with a "
        "smaller rank / energy, or without uniform_rank"
    )


# -- writing --------------------------------------------------------------------------------------
def _modules_to_save(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter's whole-module copies (e.g. a new classifier head), keyed as HF PEFT saves them."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.saved_modules():
        if adapter in module.copies:
            for key, value in module.copies[adapter].state_dict().items():
                tensors[f"{KEY_PREFIX}{name}.{key}"] = distributed.full_tensor(value)
    return tensors


def _peft_config(
    model: PeftModel,
    layers: dict[str, AdaptedLayer],
    ranks: dict[str, int],
    modules_to_save: list[str],
    lora_bias: bool,
) -> dict:
    """HF PEFT's ``LoraConfig`` as JSON: the commonest rank as ``r``, the others in ``rank_pattern``
    (and the same numbers in ``alpha_pattern``, so every layer's scale is 1)."""
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))
    # Full paths, escaped: PEFT matches pattern keys as regular expressions on a dotted suffix.
    pattern = {re.escape(name): ranks[name] for name in layers if ranks[name] != r}
    transposed = [layer.geometry.transposed for layer in layers.values() if layer.geometry.kind == "linear"]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": _base_model_name(model.base_model),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": list(layers),
        "modules_to_save": modules_to_save or None,
        "lora_dropout": 0.0,
        # GPT-2's Conv1D stores weights (in, out): PEFT flips merges for them when this is set, and
        # sets it per layer itself when it is wrong for a layer (with a warning).
        "fan_in_fan_out": bool(transposed) and all(transposed),
        "bias": "none",
        "lora_bias": lora_bias,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _write(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_write_dir(directory) as staging:  # the config and weights land together, or neither
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
