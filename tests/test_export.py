"""Export to a plain HF PEFT LoRA: loads in the real ``peft`` package and matches within the reported error."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import structpeft as sp
from tests.models import ConvNet, EmbeddingNet, tiny_bert, tiny_gpt2

peft = pytest.importorskip("peft")


class SmallConvNet(nn.Module):
    """MobileNetV2-like pieces PEFT's conv LoRA can carry: a strided 3x3, a 1x1 expansion, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.expand = nn.Conv2d(8, 12, 1)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(torch.relu(self.stem(x)))
        return self.head(torch.relu(h).mean((2, 3)))


def _ids() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))}


def _out(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**x)
    return out.logits if hasattr(out, "logits") else out


CASES = [
    pytest.param(
        tiny_bert,
        lambda: [
            sp.LoraConfig(r=3, target_modules=["query", "value"], modules_to_save=["classifier"], init_weights=False),
            sp.FloraConfig(r=2, target_modules=["query", "attention.output.dense"], init_weights=False),
            sp.SurmConfig(structure="circulant", target_modules=["key"], alpha=0.1, init_weights=False),
        ],
        _ids,
        {},
        id="bert-lora+flora+surm",
    ),
    pytest.param(
        tiny_gpt2,
        lambda: [
            sp.LoraConfig(r=2, target_modules=["mlp.c_proj"], init_weights=False),
            sp.KernelMixConfig(init_weights=False, dropout=0.0),
        ],
        _ids,
        {"lora_bias": True},  # Kernel-mix's head biases
        id="gpt2-conv1d-lora+kernel-mix",
    ),
    pytest.param(
        SmallConvNet,
        lambda: [
            sp.LoraConfig(r=2, target_modules=["stem", "head"], init_weights=False),
            sp.FloraConfig(r=[4, 3, 2, 2], target_modules=["stem", "expand"], init_weights=False),
        ],
        lambda: {"x": torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(1))},
        {},
        id="convnet-lora+flora",
    ),
    pytest.param(
        EmbeddingNet,
        lambda: sp.LoraConfig(r=3, target_modules=["emb", "out"], init_weights=False),
        lambda: {"ids": torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(1))},
        {},
        id="embedding",
    ),
]


def _adapted(build, configs):
    torch.manual_seed(0)
    base = build().eval()
    fresh = copy.deepcopy(base)
    model = sp.get_peft_model(base, configs()).eval()
    with torch.no_grad():  # heads kept whole start as copies of the base's: make them differ
        for _, module in model.saved_modules():
            for p in module.copies.parameters():
                p.add_(torch.randn_like(p))
    return model, fresh


def _base(build) -> nn.Module:
    torch.manual_seed(0)
    return build().eval()


def _peft_delta(peft_model: nn.Module, name: str) -> torch.Tensor:
    """The ΔW PEFT computes for layer ``name``, as a (d_out, d_in·k..) matrix."""
    layer = peft_model.base_model.model.get_submodule(name)
    delta = layer.get_delta_weight("default")
    if getattr(layer, "fan_in_fan_out", False) or isinstance(layer, peft.tuners.lora.Embedding):
        delta = delta.T  # PEFT gives these in the layer's storage orientation
    return delta.reshape(delta.shape[0], -1)


@pytest.mark.parametrize("build,configs,inputs,options", CASES)
def test_lossless_export_loads_in_peft_and_gives_the_same_outputs(tmp_path, build, configs, inputs, options) -> None:
    ours, fresh = _adapted(build, configs)
    x = inputs()
    expected = _out(ours, x)
    assert not torch.allclose(expected, _out(fresh, x), atol=1e-4)
    report = ours.export_lora(tmp_path, energy=1.0, **options)
    assert report.max_relative_error < 1e-6
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert torch.allclose(_out(theirs, x), expected, atol=1e-5, rtol=1e-4)
    saved = [name for name, _ in ours.saved_modules()]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == (saved or None)


@pytest.mark.parametrize("build,configs,inputs,options", CASES)
def test_truncated_export_has_the_reported_error_in_peft(tmp_path, build, configs, inputs, options) -> None:
    ours, fresh = _adapted(build, configs)
    x = inputs()
    expected = _out(ours, x)
    report = ours.export_lora(tmp_path, rank=1, **options)
    assert all(layer.rank == 1 for layer in report.layers)
    assert report.max_relative_error > 1e-3  # rank 1 really loses something here
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    hosts = dict(ours.adapted_layers())
    for layer in report.layers:
        host = hosts[layer.name]
        ours_delta = sum(d.delta_weight(host.base_layer) for d in host.adapters["default"].values()).detach()
        ours_delta = ours_delta.reshape(ours_delta.shape[0], -1)
        error = (_peft_delta(theirs, layer.name) - ours_delta).norm() / ours_delta.norm()
        assert error.item() == pytest.approx(layer.relative_error, rel=1e-3, abs=1e-6), layer.name
    # The output moves away from the exact one by an amount of the order of the dropped part.
    moved = (_out(theirs, x) - expected).norm() / (expected - _out(_base(build), x)).norm()
    assert 0 < moved.item() < 10 * report.max_relative_error + 1e-6


def test_peft_layout_of_the_files(tmp_path) -> None:
    ours, _ = _adapted(
        tiny_gpt2,
        lambda: [
            sp.LoraConfig(r=3, target_modules=["c_attn"], init_weights=False),
            sp.FloraConfig(r=2, target_modules=["mlp.c_proj"], init_weights=False),
        ],
    )
    report = sp.export_lora(ours, tmp_path, energy=1.0)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none" and config["fan_in_fan_out"] is True
    ranks = {layer.name: layer.rank for layer in report.layers}
    assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"]  # scale 1
    patterned = {re.sub(r"\\(.)", r"\1", k): v for k, v in config["rank_pattern"].items()}
    assert set(patterned.values()) == {2}  # c_attn keeps rank 3 (r), c_proj rank 2
    assert ranks == {name: patterned.get(name, config["r"]) for name in ranks}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    name = "transformer.h.0.attn.c_attn"
    assert tensors[f"base_model.model.{name}.lora_A.weight"].shape == (ranks[name], 32)
    assert tensors[f"base_model.model.{name}.lora_B.weight"].shape == (96, ranks[name])
    assert len(tensors) == 2 * len(ranks)


def test_energy_picks_the_smallest_rank_keeping_that_energy(tmp_path) -> None:
    ours, _ = _adapted(tiny_bert, lambda: sp.FloraConfig(r=6, target_modules=["query"], init_weights=False))
    report = ours.export_lora(tmp_path, energy=0.9)
    for layer in report.layers:
        host = dict(ours.adapted_layers())[layer.name]
        s = torch.linalg.svdvals(host.adapters["default"]["flora"].delta_weight(host.base_layer).detach().double())
        kept = s.pow(2).cumsum(0) / s.pow(2).sum()
        assert kept[layer.rank - 1] >= 0.9 and (layer.rank == 1 or kept[layer.rank - 2] < 0.9)
        assert layer.relative_error == pytest.approx((1 - kept[layer.rank - 1].item()) ** 0.5, abs=1e-6)


def test_uniform_rank_is_one_vllm_rank_for_every_layer(tmp_path) -> None:
    ours, fresh = _adapted(SmallConvNet, lambda: sp.LoraConfig(r=5, target_modules=["stem", "expand", "head"]))
    report = ours.export_lora(tmp_path, rank=5, uniform_rank=True)
    assert {layer.rank for layer in report.layers} == {8}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and config["rank_pattern"] == {}
    x = {"x": torch.randn(2, 3, 10, 10)}
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert torch.allclose(_out(theirs, x), _out(ours, x), atol=1e-5)  # rank 8 >= 5: nothing lost


@pytest.mark.parametrize(
    "configs,reason",
    [
        (lambda: sp.CoeffConfig(init_weights=False), "acts on attention maps"),
        (lambda: sp.SurmConfig(mode="adapter", target_modules=["query"]), "or on a layer's output"),
        (lambda: [sp.LoraConfig(target_modules=["query"]), sp.CoeffConfig()], "coeff acts on"),
        (lambda: sp.KernelMixConfig(init_weights=False), "lora_bias=True"),
    ],
    ids=["coeff", "surm-adapter", "lora+coeff", "kernel-mix-bias"],
)
def test_what_lora_cannot_carry_is_refused_and_nothing_written(tmp_path, configs, reason) -> None:
    ours, _ = _adapted(tiny_bert, configs)
    with pytest.raises(ValueError, match="Nothing was written") as e:
        ours.export_lora(tmp_path / "out", rank=4)
    assert reason in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target,reason", [("depthwise", "grouped conv"), ("grouped", "grouped conv")])
def test_convs_peft_cannot_represent_are_refused(tmp_path, target, reason) -> None:
    ours, _ = _adapted(lambda: ConvNet(2), lambda: sp.LoraConfig(r=2, target_modules=["conv", target]))
    with pytest.raises(ValueError, match=reason):
        ours.export_lora(tmp_path, rank=2)


def test_dilated_and_reflect_padded_convs_are_refused(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    ours = sp.get_peft_model(model, sp.LoraConfig(r=2, target_modules=["0", "1"]))
    with pytest.raises(ValueError, match=r"dilation=\(2, 2\).*padding_mode='reflect'"):
        ours.export_lora(tmp_path, rank=2)


def test_arguments_are_checked(tmp_path) -> None:
    ours, _ = _adapted(tiny_bert, lambda: sp.LoraConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="at most one of"):
        ours.export_lora(tmp_path, rank=2, energy=0.9)
    with pytest.raises(ValueError, match="energy must be in"):
        ours.export_lora(tmp_path, energy=1.5)
    ours.add_adapter("other", sp.LoraConfig(target_modules=["value"]))
    ours.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="pass adapter_name"):
        ours.export_lora(tmp_path, rank=2)
    report = ours.export_lora(tmp_path, rank=2, adapter_name="other")
    assert [layer.name.rsplit(".", 1)[-1] for layer in report.layers] == ["value", "value"]
    assert "max relative error" in str(report)


def test_a_rank_export_of_a_wide_layer_uses_a_truncated_svd_with_the_optimal_error(tmp_path) -> None:
    """A fixed rank well below ΔW's runs a randomized SVD (fast on large layers); its factors must be as good
    as the full SVD's (Eckart-Young) and the reported error the error of what was written."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(96, 160))
    model = sp.get_peft_model(base, sp.SurmConfig(target_modules=["0"], init_weights=False))  # ΔW full rank
    report = model.export_lora(tmp_path, rank=4)
    delta = model.base_model[0].adapters["default"]["surm"].delta_weight(model.base_model[0].base_layer).double()
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    a = tensors["base_model.model.0.lora_A.weight"].double()
    b = tensors["base_model.model.0.lora_B.weight"].double()
    written = ((delta - b @ a).norm() / delta.norm()).item()
    s = torch.linalg.svdvals(delta)
    optimal = (s[4:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt()).item()
    assert report.layers[0].rank == 4 and report.layers[0].full_rank == 96
    assert report.layers[0].relative_error == pytest.approx(written, rel=1e-6)
    assert optimal <= written <= 1.01 * optimal  # a flat spectrum, the randomized SVD's hardest case
    again = model.export_lora(tmp_path / "again", rank=4)
    assert again.layers[0].relative_error == report.layers[0].relative_error  # seeded: the same every time


def test_a_rank_export_of_a_low_rank_update_is_exact_through_the_truncated_svd(tmp_path) -> None:
    torch.manual_seed(0)
    model = sp.get_peft_model(
        nn.Sequential(nn.Linear(96, 160)), sp.LoraConfig(r=3, target_modules=["0"], init_weights=False)
    )
    x = torch.randn(5, 96)
    expected = model(x)
    report = model.export_lora(tmp_path, rank=3)
    assert report.max_relative_error < 1e-6
    peft = pytest.importorskip("peft")
    exported = peft.PeftModel.from_pretrained(copy.deepcopy(model.unload()), tmp_path)
    assert torch.allclose(exported(x), expected, atol=1e-5)
