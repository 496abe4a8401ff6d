"""What the workflow and the bench need to know about this method (see structpeft.core.cards)."""

from __future__ import annotations

from structpeft.core.cards import MethodCard, register_card
from structpeft.methods.lora.config import LoraConfig

CARD = register_card(
    MethodCard(
        name="lora",
        config=LoraConfig,
        defaults={
            "text-encoder": {"r": 8, "alpha": 16, "lr": 1e-3, "target_modules": "linear"},
            "vit": {"r": 8, "alpha": 16, "lr": 1e-3, "target_modules": "linear"},
            "convnet": {"r": 8, "alpha": 16, "lr": 1e-3, "target_modules": "conv"},
            "decoder": {"r": 8, "alpha": 16, "lr": 2e-4, "target_modules": "linear"},
        },
        size=lambda k: {"r": k},
        bench_sized=("lora",),
        budget_unit=True,  # the bench states budgets as LoRA r=k's size
    )
)
