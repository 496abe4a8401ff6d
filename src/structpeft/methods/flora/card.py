"""What the workflow and the bench need to know about this method (see structpeft.core.cards)."""

from __future__ import annotations

from structpeft.core.cards import MethodCard, register_card
from structpeft.methods.flora.config import FloraConfig

CARD = register_card(
    MethodCard(
        name="flora",
        config=FloraConfig,
        defaults={
            "text-encoder": {"r": 8, "alpha": 16, "lr": 5e-3, "target_modules": "linear"},
            "vit": {"r": 8, "alpha": 16, "lr": 5e-3, "target_modules": "linear"},
            "convnet": {"r": 8, "alpha": 16, "lr": 5e-3, "target_modules": "conv"},
            "decoder": {"r": 8, "alpha": 16, "lr": 1e-3, "target_modules": "linear"},
        },
        size=lambda k: {"r": k},
        bench_sized=("flora",),
    )
)
