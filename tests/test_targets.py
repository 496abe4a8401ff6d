"""Target matching, module swapping and the errors a user sees."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structpeft as sp
from structpeft.core.layers import AdaptedLayer, ModulesToSave
from tests.models import MLP, tiny_bert, tiny_gpt2


def adapted_names(model: sp.PeftModel) -> list[str]:
    return [n for n, _ in model.adapted_layers()]


def test_list_entries_match_exact_names_and_dotted_suffixes() -> None:
    model = sp.get_peft_model(
        tiny_bert(), sp.LoraConfig(target_modules=["query", "bert.encoder.layer.1.attention.self.value"])
    )
    assert adapted_names(model) == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    ]


def test_suffix_match_respects_dots() -> None:
    # "dense" must not match "attention.output.LayerNorm" nor a name merely ending in "dense".
    model = sp.get_peft_model(tiny_bert(), sp.LoraConfig(target_modules=["output.dense"]))
    assert all(n.endswith(".output.dense") for n in adapted_names(model))
    assert len(adapted_names(model)) == 4  # attention.output.dense and output.dense, 2 layers


def test_string_is_full_match_regex() -> None:
    model = sp.get_peft_model(tiny_bert(), sp.LoraConfig(target_modules=r".*layer\.0\..*(query|key)"))
    assert adapted_names(model) == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.key",
    ]
    with pytest.raises(ValueError, match="matched no module"):
        sp.get_peft_model(tiny_bert(), sp.LoraConfig(target_modules=r"query"))  # a partial match is not enough


def test_all_linear_takes_linear_and_conv1d_but_not_the_output_layer() -> None:
    model = sp.get_peft_model(tiny_gpt2(), sp.LoraConfig(target_modules="all-linear"))
    names = adapted_names(model)
    assert "lm_head" not in names
    assert {n.rsplit(".", 1)[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}


def test_unmatched_entry_names_itself_and_closest_modules() -> None:
    base = tiny_bert()
    with pytest.raises(ValueError) as err:
        sp.get_peft_model(base, sp.LoraConfig(target_modules=["query", "vaule"]))
    assert "'vaule'" in str(err.value) and "value" in str(err.value)
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())  # nothing half-injected
    assert all(p.requires_grad for p in base.parameters())  # nor frozen


def test_unsupported_layer_names_module_and_type() -> None:
    with pytest.raises(TypeError, match=r"'bert.embeddings.LayerNorm' is a LayerNorm.*supported layers"):
        sp.get_peft_model(tiny_bert(), sp.LoraConfig(target_modules=["embeddings.LayerNorm"]))


def test_modules_to_save_trains_a_copy_and_disable_uses_original() -> None:
    torch.manual_seed(0)
    model = sp.get_peft_model(MLP(), sp.LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
    x = torch.randn(4, 10)
    with torch.no_grad():
        model.base_model.head.copies["default"].weight.add_(1.0)
    assert model.base_model.head.original_module.weight.requires_grad is False
    assert model.base_model.head.copies["default"].weight.requires_grad is True
    adapted = model(x)
    with model.disable_adapter():
        assert not torch.allclose(model(x), adapted)
    plain = model.merge_and_unload()
    assert isinstance(plain.head, nn.Linear) and torch.allclose(plain(x), adapted, atol=1e-6)


def test_set_adapter_switches_trainability_and_delete_unwraps() -> None:
    model = sp.get_peft_model(MLP(), sp.LoraConfig(target_modules=["lin0"]))
    model.add_adapter("b", sp.FloraConfig(target_modules=["lin0", "lin1"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    model.set_adapter("b")
    assert all(".b." in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="no adapter named"):
        model.set_adapter("c")
    model.delete_adapter("b")
    assert adapted_names(model) == ["lin0"] and list(model.peft_config) == ["default"]
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", sp.LoraConfig(target_modules=["lin1"]))


def test_same_method_twice_on_a_module_in_one_adapter_is_an_error() -> None:
    base = MLP()
    with pytest.raises(ValueError, match="targeted twice"):
        sp.get_peft_model(
            base, [sp.LoraConfig(target_modules=["lin0"]), sp.LoraConfig(target_modules=["lin0", "lin1"])]
        )
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())


def test_composed_methods_on_one_module_add() -> None:
    torch.manual_seed(0)
    base = MLP()
    x = torch.randn(4, 10)
    lora = sp.LoraConfig(target_modules=["lin0"], init_weights=False)
    flora = sp.FloraConfig(target_modules=["lin0", "lin1"], init_weights=False)
    both = sp.get_peft_model(base, [lora, flora])
    y = both(x)
    deltas = both.base_model.lin0.adapters["default"]
    assert set(deltas) == {"lora", "flora"}
    with torch.no_grad():
        plain = base.lin0.base_layer(x)
        lora_only = deltas["lora"](x, plain, None)
        flora_only = deltas["flora"](x, plain, None)
        assert torch.allclose(base.lin0(x), lora_only + flora_only - plain, atol=1e-6)
        assert not torch.allclose(lora_only, plain) and not torch.allclose(flora_only, plain)
    both.merge_adapter()
    assert torch.allclose(both(x), y, atol=1e-5)


def test_modules_to_save_are_not_also_adapted() -> None:
    model = sp.get_peft_model(tiny_bert(), sp.LoraConfig(target_modules="all-linear", modules_to_save=["classifier"]))
    names = adapted_names(model)
    assert "classifier" not in names and "bert.pooler.dense" in names
    assert isinstance(model.base_model.classifier, ModulesToSave)
