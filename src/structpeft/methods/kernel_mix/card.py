"""What the workflow and the bench need to know about this method (see structpeft.core.cards)."""

from __future__ import annotations

from structpeft.core.cards import MethodCard, register_card
from structpeft.methods.kernel_mix.config import KernelMixConfig

CARD = register_card(
    MethodCard(
        name="kernel-mix",
        config=KernelMixConfig,
        defaults={"text-encoder": {"lr": 1e-3}, "vit": {"lr": 1e-3}, "decoder": {"lr": 2e-4}},
        no_recipe={"convnet": "a convnet has no attention"},
        size=lambda k: {"r_q": k, "r_v": 2 * k, "r_q_shared": 2 * k, "r_v_shared": 4 * k},
        bench_sized=("kernel-mix",),
    )
)
