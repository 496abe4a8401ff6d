"""Method maths against references: FLoRA's factorised conv, parameter counts, merge guards."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import structpeft as sp
from structpeft.core.config import register_method
from structpeft.core.layers import AdapterDelta
from structpeft.methods.flora import tucker_to_tensor
from tests.models import MLP


def delta_of(model: sp.PeftModel, name: str, method: str):
    return model.base_model.get_submodule(name).adapters["default"][method]


@settings(max_examples=40, deadline=None)
@given(
    dims=st.sampled_from([1, 2, 3]),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    kernel=st.integers(1, 3),
    padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    fold=st.booleans(),
)
def test_factorised_flora_conv_equals_dense_delta_conv(dims, stride, padding, dilation, kernel, padding_mode, fold):
    torch.manual_seed(0)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    layer = conv(5, 7, kernel, stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode)
    x = torch.randn(2, 5, *(9,) * dims)
    reference = layer(x)
    model = sp.get_peft_model(nn.Sequential(layer), sp.FloraConfig(r=3, target_modules=["0"], init_weights=False))
    delta = delta_of(model, "0", "flora")
    delta._fold_input_factor = lambda x: fold  # both exact paths, whatever the FLOP rule picks
    dense = delta.delta_weight(layer)
    assert dense.shape == layer.weight.shape
    expected = layer._conv_forward(x, layer.weight + dense, layer.bias)
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert not torch.allclose(model(x), reference, atol=1e-4)


@pytest.mark.parametrize("groups", [2, 8])
def test_grouped_flora_conv_delta_has_per_group_input_modes(groups: int) -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    model = sp.get_peft_model(
        nn.Sequential(layer), sp.FloraConfig(r=[4, 2, 2, 3], target_modules=["0"], init_weights=False)
    )
    delta = delta_of(model, "0", "flora")
    assert [tuple(u.shape) for u in delta.flora_factors] == [(8, 4), (8 // groups, 2), (3, 2), (3, 3)]
    x = torch.randn(2, 8, 6, 6)
    assert torch.allclose(
        model(x), F.conv2d(x, layer.weight + delta.delta_weight(layer), layer.bias, padding=1, groups=groups), atol=1e-5
    )


def test_tucker_matches_explicit_einsum() -> None:
    torch.manual_seed(0)
    core = torch.randn(3, 4, 2, 2)
    factors = [torch.randn(6, 3), torch.randn(5, 4), torch.randn(3, 2), torch.randn(3, 2)]
    expected = torch.einsum("abce,oa,ib,pc,qe->oipq", core, *factors)
    assert torch.allclose(tucker_to_tensor(core, factors), expected, atol=1e-5)


def test_flora_linear_is_lora_with_a_core() -> None:
    torch.manual_seed(0)
    model = sp.get_peft_model(MLP(), sp.FloraConfig(r=[3, 5], alpha=6, target_modules=["lin0"], init_weights=False))
    d = delta_of(model, "lin0", "flora")
    u_out, u_in = d.flora_factors
    assert torch.allclose(d.delta_weight(None), 6 / 3 * u_out @ d.flora_core @ u_in.T)


def trainable(model: sp.PeftModel) -> int:
    return model.get_nb_trainable_parameters()[0]


def test_parameter_counts_match_methods_md() -> None:
    conv = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1))
    assert trainable(sp.get_peft_model(conv, sp.FloraConfig(r=[16, 16, 2, 2], target_modules=["0"]))) == 9_228
    conv = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1))
    assert trainable(sp.get_peft_model(conv, sp.LoraConfig(r=16, target_modules=["0"]))) == 40_960
    lin = nn.Sequential(nn.Linear(30, 20))
    assert trainable(sp.get_peft_model(lin, sp.FloraConfig(r=[4, 6], target_modules=["0"]))) == 4 * 20 + 6 * 30 + 4 * 6
    lin = nn.Sequential(nn.Linear(30, 20))
    assert trainable(sp.get_peft_model(lin, sp.LoraConfig(r=4, target_modules=["0"]))) == 4 * (30 + 20)
    depthwise = nn.Sequential(nn.Conv2d(32, 32, 3, groups=32))
    # int r: channel modes r, kernel modes min(r, k); the input mode has C_in/groups = 1 row.
    assert trainable(sp.get_peft_model(depthwise, sp.FloraConfig(r=4, target_modules=["0"]))) == (
        4 * 4 * 3 * 3 + 32 * 4 + 1 * 4 + 3 * 3 + 3 * 3
    )


def test_flora_rank_per_mode_must_fit_the_weight() -> None:
    with pytest.raises(ValueError, match=r"module '0' has a 4-mode weight \(4, 3, 3, 3\)"):
        sp.get_peft_model(nn.Sequential(nn.Conv2d(3, 4, 3)), sp.FloraConfig(r=[2, 2], target_modules=["0"]))


# (8, 12, 4): the factored path (groups*r < C_out); depthwise and x2-multiplier: ΔW's path
@pytest.mark.parametrize(("c_in", "c_out", "groups"), [(8, 12, 4), (8, 8, 8), (8, 16, 8)])
def test_grouped_lora_conv_merges(c_in: int, c_out: int, groups: int) -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups)
    model = sp.get_peft_model(nn.Sequential(layer), sp.LoraConfig(r=2, target_modules=["0"], init_weights=False))
    x = torch.randn(2, 8, 5, 5)
    y = model(x)
    assert delta_of(model, "0", "lora").delta_weight(layer).shape == layer.weight.shape
    model.merge_adapter()
    assert torch.allclose(model(x), y, atol=1e-5)


class SamePaddingConv2d(nn.Conv2d):
    """TensorFlow "same" padding worked out in the forward, as EfficientNet ports do; its
    constructor needs an extra argument, so adapters cannot rebuild it by its type."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, image_size: int, **kw):
        super().__init__(in_channels, out_channels, kernel_size, stride, **kw)
        out = -(-image_size // stride)
        total = max((out - 1) * stride + kernel_size - image_size, 0)
        self.same = nn.ZeroPad2d((total // 2, total - total // 2) * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.same(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("config", [sp.LoraConfig(r=2, init_weights=False), sp.FloraConfig(r=2, init_weights=False)])
def test_conv_subclass_with_its_own_padding_adapts_and_merges(config, groups: int) -> None:
    torch.manual_seed(0)
    layer = SamePaddingConv2d(8, 12, 4, stride=2, image_size=9, groups=groups)
    x = torch.randn(2, 8, 9, 9)
    base = layer(x)
    model = sp.get_peft_model(nn.Sequential(layer), replace(config, target_modules=["0"]))
    y = model(x)
    assert y.shape == base.shape and not torch.allclose(y, base, atol=1e-3)
    model.merge_adapter()  # the merged layer runs its own forward: the unmerged path must agree
    assert torch.allclose(model(x), y, atol=1e-5)


# -- a method that cannot merge: merging must refuse before it changes any weight ---------------


class _OutputShift(AdapterDelta):
    mergeable = False

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.ones(()))

    def forward(self, x, result, base_layer):
        return result + torch.tanh(result) * self.shift


@register_method
@dataclass
class _ShiftConfig(sp.AdapterConfig):
    peft_type = "TEST_SHIFT"

    def create_delta(self, layer, name):
        return _OutputShift()


def test_merge_with_an_unmergeable_method_merges_nothing() -> None:
    torch.manual_seed(0)
    model = sp.get_peft_model(
        MLP(),
        [sp.LoraConfig(target_modules=["lin0", "lin1"], init_weights=False), _ShiftConfig(target_modules=["lin1"])],
    )
    weights = {n: p.clone() for n, p in model.named_parameters()}
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match=r"lin1 \(test_shift\).*Nothing was merged"):
            call()
        assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
        assert all(not layer.merged_adapters for _, layer in model.adapted_layers())


def test_a_merge_that_fails_midway_is_rolled_back() -> None:
    torch.manual_seed(0)
    model = sp.get_peft_model(MLP(), sp.LoraConfig(target_modules=["lin0", "lin1"], init_weights=False))
    with torch.no_grad():
        model.base_model.lin1.adapters["default"]["lora"].lora_B.weight.fill_(float("inf"))
    weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_adapter()
    # lin0 merged before lin1 failed, and was taken out again (w + Δ - Δ: equal up to rounding)
    assert all(torch.allclose(p, weights[n], atol=1e-6) for n, p in model.named_parameters() if "base_layer" in n)
    assert all(not layer.merged_adapters for _, layer in model.adapted_layers())
