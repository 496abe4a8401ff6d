"""What the workflow and the bench need to know about this method (see structpeft.core.cards)."""

from __future__ import annotations

from structpeft.core.cards import MethodCard, register_card
from structpeft.methods.coeff.config import CoeffConfig

CARD = register_card(
    MethodCard(
        name="coeff",
        config=CoeffConfig,
        defaults={
            "text-encoder": {"lr": 2e-2},
            # chosen on validation from 2e-2 x {1/3, 1, 3} (DINOv2-S, 2,000 Fashion-MNIST images, 1 epoch):
            # 6e-2 diverged; 2e-2 and 6.7e-3 tied on accuracy, 6.7e-3 had the lower loss
            "vit": {"lr": 6.7e-3},
            "decoder": {"lr": 5e-3},
        },
        no_recipe={"convnet": "a convnet has no attention"},
        # A plug-in on top of another method (arXiv 2503.18337): in a composition it keeps its own learning
        # rate and the other method leads.
        plug_in=True,
        bench_sized=("coeff+lora",),
        bench_fixed=("coeff",),
    )
)
