"""A method is one folder: its card declares what the workflow needs, and nothing outside the folder names it.
These tests fail when a registered method lacks any part of that (docs/adding-a-method.md)."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest

import structpeft as sp
from structpeft.core import FAMILIES, MethodCard, method_cards, registered_methods
from tests import test_matrix

ROOT = Path(__file__).resolve().parents[1]
CARDS = method_cards()


def test_every_registered_method_has_a_card() -> None:
    """Every method the package ships (other tests register throwaway ones of their own)."""
    carded = {card.config for card in CARDS.values()}
    shipped = {t: cls for t, cls in registered_methods().items() if cls.__module__.startswith("structpeft.methods.")}
    assert len(shipped) >= 5
    missing = [peft_type for peft_type, cls in shipped.items() if cls not in carded]
    assert not missing, f"methods without a card (methods/<name>/card.py): {missing}"


@pytest.mark.parametrize("name", sorted(CARDS))
def test_a_card_is_complete(name: str) -> None:
    card = CARDS[name]
    assert (ROOT / "docs" / "methods" / f"{name}.md").is_file(), f"docs/methods/{name}.md"
    assert (ROOT / "src" / "structpeft" / "methods" / name.replace("-", "_") / "card.py").is_file()
    parts = {part for m in test_matrix.METHODS for part in m.split("+")}
    in_matrix = {"surm" if part.startswith("surm-") else part for part in parts}  # surm-<structure> entries
    assert name in in_matrix, f"{name} is missing from tests/test_matrix.py"
    for family, fields in card.defaults.items():
        settable = {k: v for k, v in fields.items() if k not in ("lr", "target_modules")}
        card.config(**settable)  # the defaults make a valid config
        assert fields["lr"] > 0, family
    assert set(card.defaults) | set(card.no_recipe) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(n for n, c in CARDS.items() if c.size is not None))
def test_a_size_knob_grows_the_adapter(name: str) -> None:
    from tests.models import tiny_llama

    base = tiny_llama()
    counts = []
    for k in (1, 2, 4):
        fields = CARDS[name].size(k)
        if name == "surm":  # the knob is LDR's generator count
            fields = {**fields, "structure": "ldr"}
        targets = {} if name == "kernel-mix" else {"target_modules": ["q_proj", "v_proj"]}
        model = sp.get_peft_model(copy.deepcopy(base), CARDS[name].config(**fields, **targets))
        counts.append(sum(p.numel() for _, p in model.adapter_parameters()))
    assert counts[0] < counts[1] < counts[2], counts


def test_a_card_refuses_a_family_it_does_not_cover() -> None:
    with pytest.raises(ValueError, match="give defaults or a reason"):
        MethodCard(name="x", config=sp.LoraConfig, defaults={"vit": {"lr": 1e-3}})
    with pytest.raises(ValueError, match="need an lr"):
        MethodCard(name="x", config=sp.LoraConfig, defaults={f: {} for f in FAMILIES})


def _string_constants(path: Path, skip_classes: tuple[str, ...] = ()) -> set[str]:
    tree = ast.parse(path.read_text())
    skipped = {
        id(node) for cls in ast.walk(tree) if isinstance(cls, ast.ClassDef) and cls.name in skip_classes
        for node in ast.walk(cls)
    }  # fmt: skip
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped
    }


@pytest.mark.parametrize("module,skip", [("recipes.py", ()), ("run.py", ("RunSpec",)), ("bench.py", ())])
def test_the_workflow_names_no_method(module: str, skip: tuple[str, ...]) -> None:
    """recipes.py, run.py and bench.py read the cards (run.py's one exception: the command line's default)."""
    path = ROOT / "src" / "structpeft" / "workflow" / module
    named = _string_constants(path, skip) & set(CARDS)
    assert not named, f"{module} names {sorted(named)}: declare it in the method's card"


def test_the_defaults_reach_a_run() -> None:
    """What a card declares is what ``build_recipe`` gives (here: Coeff-Tuning's vit lr as a plug-in on LoRA)."""
    from structpeft.workflow import recipes
    from tests.models import tiny_vit

    recipe = recipes.build_recipe("coeff+lora", "vit", {}, tiny_vit(), ["classifier"])
    assert recipe.lr == CARDS["lora"].defaults["vit"]["lr"]
    assert recipe.lr_by_method == {"coeff": CARDS["coeff"].defaults["vit"]["lr"]}
    assert recipe.configs[1].r == CARDS["lora"].defaults["vit"]["r"]


def test_a_new_method_reaches_the_workflow_through_its_card_alone(monkeypatch) -> None:
    """What docs/adding-a-method.md promises: register a config and a card, and the workflow's names, recipes,
    budget knob and ``structpeft.<Name>Config`` know the method, with no edit anywhere else."""
    from dataclasses import dataclass
    from typing import ClassVar

    from structpeft.core import cards, config
    from structpeft.workflow import recipes, run
    from tests.models import tiny_llama

    @dataclass
    class ToyConfig(sp.LoraConfig):  # LoRA's maths under another name: the plumbing is what is tested
        peft_type: ClassVar[str] = "TOY"

    monkeypatch.setitem(config._REGISTRY, "TOY", ToyConfig)
    card = MethodCard(
        name="toy",
        config=ToyConfig,
        defaults={family: {"r": 2, "lr": 3e-3, "target_modules": "linear"} for family in FAMILIES},
        size=lambda k: {"r": k},
    )
    monkeypatch.setitem(cards._CARDS, "toy", card)
    assert "toy" in recipes.method_names() and sp.ToyConfig is ToyConfig
    recipe = recipes.build_recipe("toy", "decoder", {"r": "3"}, tiny_llama(), [])
    assert recipe.lr == 3e-3 and isinstance(recipe.configs[0], ToyConfig) and recipe.configs[0].r == 3
    assert run.size_knobs()["toy"](5) == {"r": 5}


def test_the_bench_suites_take_their_entries_from_the_cards() -> None:
    """A suite holds every card's entries whose methods have defaults for its family, and no others."""
    from structpeft.workflow import bench

    text, conv = bench.SUITES["text"], bench.SUITES["conv"]
    assert set(text.sized) == {e for c in CARDS.values() for e in c.bench_sized}
    assert set(text.fixed) == {e for c in CARDS.values() for e in c.bench_fixed}
    assert set(conv.sized) == {e for n, c in CARDS.items() for e in c.bench_sized if "convnet" in c.defaults}
    assert conv.fixed == ()  # SURM and Coeff-Tuning have no convnet defaults
    unit = [n for n, c in CARDS.items() if c.budget_unit]
    assert len(unit) == 1 and {b.method for b in conv.budgets} == set(unit)
