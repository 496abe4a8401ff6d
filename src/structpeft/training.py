"""A plain training loop for sequence classification, with progress bars and per-epoch saves."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from structpeft.zoo.rotten_tomatoes import Example


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_length: int = 64
    seed: int = 0
    # Parameters whose name contains a key train at that learning rate instead (e.g. Coeff-Tuning's
    # α beside LoRA's factors).
    lr_by_name: dict[str, float] = field(default_factory=dict)


def batches(
    examples: Sequence[Example], tokenizer, batch_size: int, max_length: int, generator: torch.Generator | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches padded to their own longest text (dynamic padding); shuffled if a generator is given."""
    n = len(examples)
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        enc = tokenizer(
            [e.text for e in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        enc["labels"] = torch.tensor([e.label for e in chunk])
        yield dict(enc)


def linear_warmup_decay(warmup: int, total: int) -> Callable[[int], float]:
    return lambda step: min((step + 1) / max(warmup, 1), max(0.0, (total - step) / max(total - warmup, 1)))


def train(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    cfg: TrainConfig,
    on_epoch_end: Callable[[int], None] | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """AdamW on the trainable parameters, linear warm-up then decay; returns time and last loss."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters: did get_peft_model target anything?")
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in named:
        lr = next((lr for key, lr in cfg.lr_by_name.items() if key in name), cfg.lr)
        groups.setdefault(lr, []).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": ps, "lr": lr} for lr, ps in groups.items()], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(int(cfg.warmup_ratio * total), total))
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    start, loss_ema = time.perf_counter(), float("nan")
    with tqdm(total=total, desc="train", unit="step", disable=not progress) as bar:
        for epoch in range(cfg.epochs):
            for batch in batches(examples, tokenizer, cfg.batch_size, cfg.max_length, generator):
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {bar.n}: lower --lr")
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                loss_ema = loss.item() if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * loss.item()
                bar.update()
                bar.set_postfix(loss=f"{loss_ema:.3f}")
            if on_epoch_end is not None:
                on_epoch_end(epoch)
    model.eval()
    return {"train_seconds": time.perf_counter() - start, "train_loss": loss_ema, "steps": total}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    batch_size: int = 64,
    max_length: int = 64,
    progress: bool = True,
) -> float:
    model.eval()
    correct = 0
    n_batches = math.ceil(len(examples) / batch_size)
    for batch in tqdm(
        batches(examples, tokenizer, batch_size, max_length),
        total=n_batches,
        desc="test",
        unit="batch",
        disable=not progress,
    ):
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return correct / len(examples)
