"""SURM: structured deltas in LoRA mode and as adapters, parameter counts, shape errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import structpeft as sp
from structpeft import structured as S
from tests.models import MLP, ConvNet, tiny_bert


def trainable(model: sp.PeftModel) -> int:
    return model.get_nb_trainable_parameters()[0]


def linear(d_in: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, d_out))


@pytest.mark.parametrize(
    "structure,extra,d_in,d_out,expected",
    [
        ("circulant", {}, 64, 64, 2 * 64),  # a and b, n each
        ("circulant", {}, 64, 96, 2 * (3 * 2 * 32)),  # 3x2 grid of gcd=32 blocks
        ("circulant", {"rectangular": "pad"}, 64, 96, 2 * 96),
        ("toeplitz", {}, 64, 96, (96 + 64 - 1) + (2 * 64 - 1)),
        ("sym_toeplitz", {}, 64, 64, 2 * 64),
        ("kronecker", {}, 64, 96, 8 * 8 + 12 * 8),  # A 8x8 (sqrt-nearest divisors of 96 and 64)
        ("kronecker", {"kronecker_shape": [4, 16]}, 64, 96, 4 * 16 + 24 * 4),
        ("ldr", {"rank": 3}, 64, 96, 2 * 3 * 96),
    ],
)
def test_lora_mode_parameter_counts(structure, extra, d_in, d_out, expected) -> None:
    model = sp.get_peft_model(linear(d_in, d_out), sp.SurmConfig(structure=structure, target_modules=["0"], **extra))
    assert trainable(model) == expected


@pytest.mark.parametrize(
    "structure,m,n,shapes",
    [
        ("circulant", 12, 12, [(12,)]),
        ("circulant", 12, 8, [(3, 2, 4)]),
        ("toeplitz", 12, 8, [(19,)]),
        ("sym_toeplitz", 9, 9, [(9,)]),
        ("kronecker", 12, 8, [(3, 2), (4, 4)]),
        ("ldr", 12, 8, [(2, 12), (2, 12)]),
    ],
)
def test_structured_num_params_counts_what_the_products_take(structure, m, n, shapes) -> None:
    count = S.num_params(structure, m, n, rank=2, kronecker_a=(3, 2))
    assert count == sum(math.prod(s) for s in shapes)


def test_bert_base_adapters_have_55296_parameters() -> None:
    from transformers import BertConfig, BertModel

    bert_base = BertModel(BertConfig())  # 12 layers, hidden 768: two adapters per layer
    config = sp.SurmConfig(mode="adapter", target_modules=["attention.output.dense", "output.dense"])
    model = sp.get_peft_model(bert_base, config)
    assert len(list(model.adapted_layers())) == 24
    assert trainable(model) == 24 * 3 * 768 == 55_296


@pytest.mark.parametrize("structure", ["circulant", "toeplitz", "sym_toeplitz", "kronecker", "ldr"])
def test_lora_mode_delta_weight_is_the_dense_structured_matrix(structure) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(24, 24)
    model = sp.get_peft_model(
        nn.Sequential(layer), sp.SurmConfig(structure=structure, alpha=0.5, target_modules=["0"], init_weights=False)
    )
    x = torch.randn(5, 24)
    dense = model.base_model[0].adapters["default"]["surm"].delta_weight(layer)
    assert torch.allclose(model(x), layer(x) + x @ dense.T, atol=1e-5)
    assert torch.linalg.matrix_rank(dense) > 12  # unrestricted rank: far above a LoRA's r


def test_adapter_mode_acts_on_the_output_and_refuses_to_merge() -> None:
    torch.manual_seed(0)
    base = tiny_bert().eval()
    x = {"input_ids": torch.randint(0, 100, (2, 6))}
    model = sp.get_peft_model(
        base,
        sp.SurmConfig(mode="adapter", target_modules=["attention.output.dense"], activation="gelu", init_weights=False),
    )
    layer = model.base_model.bert.encoder.layer[0].attention.output.dense
    delta = layer.adapters["default"]["surm"]
    h = torch.randn(3, 32)
    out = delta(torch.randn(3, 32), h, layer.base_layer)
    expected = h + torch.nn.functional.gelu(delta.surm.dense() @ h.T).T + delta.surm_bias
    assert torch.allclose(out, expected, atol=1e-5)
    before = model(**x).logits
    with pytest.raises(ValueError, match=r"attention\.output\.dense \(surm\).*Nothing was merged"):
        model.merge_and_unload()
    assert torch.equal(model(**x).logits, before)


def test_structures_that_cannot_serve_a_shape_say_which_can() -> None:
    with pytest.raises(ValueError, match=r"'lin0' is 20x10: sym_toeplitz needs a square matrix; use toeplitz"):
        sp.get_peft_model(MLP(), sp.SurmConfig(structure="sym_toeplitz", target_modules=["lin0"]))
    with pytest.raises(ValueError, match=r"kronecker_shape \[3, 3\] must divide it"):
        sp.get_peft_model(MLP(), sp.SurmConfig(structure="kronecker", kronecker_shape=[3, 3], target_modules=["lin1"]))
    with pytest.raises(TypeError, match="'conv' is a Conv2d: SURM adapts nn.Linear"):
        sp.get_peft_model(ConvNet(2), sp.SurmConfig(target_modules=["conv"]))
    with pytest.raises(ValueError, match="structure='hankel'"):
        sp.SurmConfig(structure="hankel")


def test_surm_composes_with_lora_and_flora_and_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    base = MLP()
    fresh = copy.deepcopy(base)
    configs = [
        sp.SurmConfig(structure="toeplitz", target_modules=["lin0", "lin1"], init_weights=False),
        sp.LoraConfig(target_modules=["lin1"], init_weights=False),
        sp.FloraConfig(target_modules=["head"], init_weights=False),
    ]
    model = sp.get_peft_model(base, configs)
    x = torch.randn(4, 10)
    y = model(x)
    assert set(model.base_model.lin1.adapters["default"]) == {"surm", "lora"}
    model.save_pretrained(tmp_path)
    loaded = sp.PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(loaded(x), y)
    assert torch.allclose(loaded.merge_and_unload()(x), y, atol=1e-5)
