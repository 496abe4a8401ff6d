"""Configs: what the checks at construction accept, and the saved fields that ride along."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

import structpeft as sp
from structpeft.core.config import configs_from_dict, configs_to_dict

if TYPE_CHECKING:
    from collections import OrderedDict  # only for the annotation below, which cannot be resolved at run time


def test_sequences_become_lists_and_ints_are_floats() -> None:
    config = sp.FloraConfig(r=(4, 2), alpha=3, target_modules=("b", "a"), modules_to_save={"head"})
    assert config.r == [4, 2] and config.target_modules == ["b", "a"] and config.modules_to_save == ["head"]
    assert sp.LoraConfig(target_modules={"q", "k"}).target_modules == ["k", "q"]  # a set, in a stable order


def test_hf_fields_without_meaning_are_kept_through_a_load_and_save() -> None:
    saved = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q"],
        "task_type": "SEQ_CLS",
        "revision": "main",
        "fan_in_fan_out": True,
        "loftq_config": {},
        "base_model_name_or_path": "bert",
    }
    (config,) = configs_from_dict(saved)
    assert (config.r, config.alpha) == (4, 8)
    again = configs_to_dict([config], "bert")
    assert again["revision"] == "main" and again["base_model_name_or_path"] == "bert"


def test_each_method_suggests_its_own_fields() -> None:
    with pytest.raises(ValueError, match=r"'strucutre' \(did you mean 'structure'\?\)"):
        configs_from_dict({"peft_type": "SURM", "strucutre": "toeplitz"})
    with pytest.raises(ValueError, match=r"'factor_inti' \(did you mean 'factor_init'\?\)"):
        configs_from_dict({"peft_type": "FLORA", "factor_inti": "kaiming"})


@dataclass
class _UnresolvableConfig(sp.AdapterConfig):
    peft_type = "TEST_UNRESOLVABLE"

    table: OrderedDict | None = None


def test_a_config_with_annotations_unresolvable_at_run_time_still_builds() -> None:
    config = _UnresolvableConfig(["x"])
    assert config.target_modules == ["x"]
    with pytest.raises(ValueError, match="finite"):
        _UnresolvableConfig(["x"], table=float("nan"))
