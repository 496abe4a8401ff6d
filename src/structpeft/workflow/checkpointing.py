"""Training checkpoints: everything a killed run needs to go on as if it had not stopped.

A checkpoint holds the trainable weights, the optimizer and scheduler states, the RNG states
(torch's global one, which drives dropout, and the data order's generator as it was when the
epoch began), the position in the epoch, the run log so far and the best epoch's weights. It is
written all at once with :func:`structpeft.core.atomic_write_dir`: a kill during a save leaves the
previous checkpoint whole.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from structpeft.core import atomic_write_dir, committed_path, recover

CHECKPOINT_DIR = "checkpoint"
_WEIGHTS, _BEST, _STATE, _OPTIMIZER = "trainable.safetensors", "best.safetensors", "state.json", "optimizer.pt"


@dataclass
class Position:
    epoch: int  # the epoch in progress (0-based)
    batches_done: int  # batches of that epoch already consumed
    epoch_generator_state: torch.Tensor  # the data order's generator when the epoch began
    epoch_loss: float = 0.0  # sum of the epoch's batch losses so far


def trains_own_parameters(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the trainable parameters, and the buffers of the modules that own some
    (a trained batch norm's running statistics, which move with its weights)."""
    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for prefix, module in model.named_modules():
        if trains_own_parameters(module):
            for name, buffer in module.named_buffers(recurse=False):
                tensors[f"{prefix}.{name}" if prefix else name] = buffer
    return tensors


def load_trained(model: nn.Module, tensors: dict[str, torch.Tensor], source: object) -> None:
    """Copy tensors saved from :func:`trained_tensors` back into ``model``."""
    targets = trained_tensors(model)
    unknown = set(tensors) - set(targets)
    if unknown:
        raise ValueError(
            f"{source} was written by another run: it has {sorted(unknown)[:3]}, which this one does not train"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            targets[name].copy_(value)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().cpu().contiguous() for n, t in trained_tensors(model).items()}


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    position: Position,
    log: Any,
    best_state: dict[str, torch.Tensor] | None,
) -> None:
    with atomic_write_dir(folder) as staging:
        save_file(_trainable(model), str(staging / _WEIGHTS))
        if best_state is not None:
            save_file({n: t.cpu().contiguous() for n, t in best_state.items()}, str(staging / _BEST))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "epoch_generator": position.epoch_generator_state,
            },
            staging / _OPTIMIZER,
        )
        state = {
            "epoch": position.epoch,
            "batches_done": position.batches_done,
            "epoch_loss": position.epoch_loss,
            "log": dataclasses.asdict(log),
        }
        (staging / _STATE).write_text(json.dumps(state), encoding="utf-8")


def has_checkpoint(folder: Path) -> bool:
    return committed_path(folder, _STATE).is_file()


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    log: Any,
) -> tuple[Position, dict[str, torch.Tensor] | None]:
    """Restore the state saved by :func:`save_checkpoint` into the objects of a fresh run."""
    recover(folder)
    load_trained(model, load_file(str(folder / _WEIGHTS)), folder)
    states = torch.load(folder / _OPTIMIZER, weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    schedule.load_state_dict(states["schedule"])
    torch.set_rng_state(states["torch_rng"])
    if states["cuda_rng"]:
        torch.cuda.set_rng_state_all(states["cuda_rng"])
    state = json.loads((folder / _STATE).read_text(encoding="utf-8"))
    for key, value in state["log"].items():
        setattr(log, key, [tuple(v) for v in value] if key == "losses" else value)
    best = load_file(str(folder / _BEST)) if (folder / _BEST).is_file() else None
    position = Position(state["epoch"], state["batches_done"], states["epoch_generator"], state["epoch_loss"])
    return position, best
