"""What the workflow and the bench need to know about this method (see structpeft.core.cards)."""

from __future__ import annotations

from typing import Any

from structpeft.core.cards import MethodCard, register_card
from structpeft.methods.surm.config import SurmConfig

# Houlsby's placement for adapter mode, in BERT-style names: after attention's output and the feed-forward's.
ADAPTER_TARGETS = ["attention.output.dense", "output.dense"]


def _shorthand(name: str) -> dict[str, Any] | None:
    """``surm-<structure>[-adapter]``: SURM with that structure, in adapter mode for ``-adapter``."""
    if not name.startswith("surm-"):
        return None
    structure = name.removeprefix("surm-").removesuffix("-adapter")
    return {"structure": structure, "mode": "adapter" if name.endswith("-adapter") else "lora"}


CARD = register_card(
    MethodCard(
        name="surm",
        config=SurmConfig,
        defaults={
            "text-encoder": {"alpha": 1.0, "lr": 2e-2, "target_modules": "linear"},
            "vit": {"alpha": 1.0, "lr": 2e-2, "target_modules": "linear"},
            "decoder": {"alpha": 1.0, "lr": 5e-3, "target_modules": "linear"},
        },
        no_recipe={"convnet": "SURM adapts linear layers; a convnet's are its head"},
        size=lambda k: {"rank": k},  # LDR's generator count; the other structures have a fixed size
        shorthand=_shorthand,
        placed_targets=lambda fields: ADAPTER_TARGETS if fields.get("mode") == "adapter" else None,
        bench_sized=("surm-ldr",),  # LDR has a size knob; circulant's size is its own
        bench_fixed=("surm",),
    )
)
