"""Method cards: what tools built on structpeft (its own workflow, a bench) need to know about a method, declared
by the method in its own folder, so that no tool has to name a method.

A card holds data only: the method's command-line name, its default fields and learning rate per model
family (with the reason where a family has none), the field that sizes it for a parameter budget, whether it
is a plug-in that composes on top of another method, and its shorthand names. The library itself never reads
a card; the workflow reads them through :func:`method_cards`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from structpeft.core.config import AdapterConfig

# The model families a card gives defaults for. "target_modules" in a family's defaults is resolved against
# the model by the tool: "linear" = every linear layer but the head and the output embedding, "conv" = every
# convolution; absent = the method's own default (every attention layer or block).
FAMILIES = ("text-encoder", "vit", "convnet", "decoder")


@dataclass(frozen=True)
class MethodCard:
    """One method, as tools see it.

    name: the command-line name (``lora``, ``kernel-mix``).
    config: its config class.
    defaults: per family in :data:`FAMILIES`, the config fields and ``lr`` a run starts from.
    no_recipe: per family without defaults, why (a convnet has no attention...).
    size: the config fields that give the method its k-th size (k = 1, 2, ...), for a parameter budget;
        None where the method has a fixed size.
    plug_in: composes on top of another method, which leads (its lr is the run's); the plug-in keeps its own.
    shorthand: a name like ``surm-toeplitz-adapter`` -> the fields it stands for, or None for other names.
    placed_targets: given a run's fields, module names that replace the family's default targets (SURM's
        adapter mode goes after the attention and feed-forward outputs), or None.
    bench_sized: the bench's entries for this method, sized to each of a suite's budgets, as the command
        line names them (a plug-in's may compose: Coeff-Tuning's is ``coeff+lora``).
    bench_fixed: its entries at their own size (SURM circulant, Coeff-Tuning alone).
    budget_unit: the method whose size knob states the bench's budgets ("LoRA r=8's size"); one card has it.
    """

    name: str
    config: type[AdapterConfig]
    defaults: dict[str, dict[str, Any]]
    no_recipe: dict[str, str] = field(default_factory=dict)
    size: Callable[[int], dict[str, Any]] | None = None
    plug_in: bool = False
    shorthand: Callable[[str], dict[str, Any] | None] | None = None
    placed_targets: Callable[[dict[str, Any]], list[str] | None] | None = None
    bench_sized: tuple[str, ...] = ()
    bench_fixed: tuple[str, ...] = ()
    budget_unit: bool = False

    def __post_init__(self) -> None:
        unknown = (set(self.defaults) | set(self.no_recipe)) - set(FAMILIES)
        if unknown:
            raise ValueError(f"method card {self.name!r}: unknown families {sorted(unknown)}; known: {FAMILIES}")
        missing = set(FAMILIES) - set(self.defaults) - set(self.no_recipe)
        if missing:
            raise ValueError(f"method card {self.name!r}: give defaults or a reason for {sorted(missing)}")
        for family, fields in self.defaults.items():
            if "lr" not in fields:
                raise ValueError(f"method card {self.name!r}: the {family} defaults need an lr")


_CARDS: dict[str, MethodCard] = {}


def register_card(card: MethodCard) -> MethodCard:
    """Make ``card`` known to the tools (each method's ``__init__`` registers its own)."""
    if card.name in _CARDS and _CARDS[card.name].config is not card.config:
        raise ValueError(f"two methods are named {card.name!r}")
    _CARDS[card.name] = card
    return card


def method_cards() -> dict[str, MethodCard]:
    """Every registered method's card, by command-line name (a copy)."""
    return dict(_CARDS)
