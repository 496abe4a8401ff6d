"""What saving, exporting and merging need from a model sharded with FSDP2 (``fully_shard``).

FSDP2 keeps each parameter as a DTensor holding this rank's shard. Writing an adapter needs whole
tensors, which every rank must take part in gathering; the file is then written by rank 0 alone.
Nothing here is needed (or does anything) for unsharded models, DDP included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - builds without distributed support
    FSDPModule = DTensor = None


def sharded_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to."""
    return [] if FSDPModule is None else [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    return bool(sharded_modules(model))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (a collective: every rank must call it); others as they are."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor


def full_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every DTensor gathered whole, in key order (the same on every rank)."""
    return {k: full_tensor(v) for k, v in state.items()}


def is_writer(model: nn.Module) -> bool:
    """Whether this process writes files for ``model``: every process for an unsharded model
    (under DDP the caller picks the rank), rank 0 alone for a sharded one (all ranks gather)."""
    if not is_sharded(model) or not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_rank() == 0


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Within the block every FSDP2-sharded module of ``model`` holds its whole parameters as plain
    tensors (read-only use: writes to them are lost when the block ends). A collective."""
    modules = sharded_modules(model)
    for module in modules:
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
