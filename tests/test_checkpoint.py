"""Checkpoint layout, HF PEFT compatibility, and loads that must fail without touching the model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import structpeft as sp
from structpeft.core.layers import AdaptedLayer
from tests.models import MLP, ConvNet, EmbeddingNet, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor], grads: list[bool]) -> None:
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == grads


def test_keys_follow_hf_peft_layout(tmp_path) -> None:
    model = sp.get_peft_model(tiny_bert(), sp.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.bert.encoder.layer.1.attention.self.query.lora_B.weight" in keys
    assert "base_model.model.classifier.weight" in keys and "base_model.model.classifier.bias" in keys
    assert len(keys) == 6
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == 8.0 and config["r"] == 4


def test_named_adapters_go_in_subfolders_and_load_by_name(tmp_path) -> None:
    torch.manual_seed(0)
    base = MLP()
    fresh = copy.deepcopy(base)
    model = sp.get_peft_model(base, sp.LoraConfig(target_modules=["lin0"], init_weights=False))
    model.add_adapter("tucker", sp.FloraConfig(target_modules=["lin1"], init_weights=False))
    model.set_adapter("tucker")
    x = torch.randn(3, 10)
    expected = model(x)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "tucker" / "adapter_config.json").is_file()
    loaded = sp.PeftModel.from_pretrained(fresh, tmp_path / "tucker", adapter_name="tucker")
    assert torch.equal(loaded(x), expected)


def test_composed_adapter_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    base = ConvNet(2)
    fresh = copy.deepcopy(base)
    configs = [
        sp.LoraConfig(target_modules=["conv", "head"], init_weights=False),
        sp.FloraConfig(r=[4, 4, 2, 2], target_modules=["conv"], init_weights=False),
    ]
    model = sp.get_peft_model(base, configs)
    x = torch.randn(2, 3, 9, 9)
    expected = model(x)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert [m["peft_type"] for m in config["methods"]] == ["LORA", "FLORA"]
    loaded = sp.PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(loaded(x), expected)


def test_save_leaves_no_temporary_files(tmp_path) -> None:
    sp.get_peft_model(MLP(), sp.LoraConfig(target_modules=["lin0"])).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    base = tiny_bert()
    sp.get_peft_model(
        copy.deepcopy(base),
        sp.LoraConfig(target_modules=["query", "value"], init_weights=False, modules_to_save=["classifier"]),
    ).save_pretrained(tmp_path)
    return base, tmp_path


def _expect_failed_load(base: nn.Module, path, match: str) -> None:
    before, grads = state(base), [p.requires_grad for p in base.parameters()]
    with pytest.raises(sp.CheckpointError, match=match):
        sp.PeftModel.from_pretrained(base, path)
    assert_untouched(base, before, grads)


def test_missing_key_is_refused(saved) -> None:
    base, path = saved
    tensors = load_file(path / "adapter_model.safetensors")
    del tensors["base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"]
    save_file(tensors, path / "adapter_model.safetensors")
    _expect_failed_load(base, path, r"missing keys: .*layer\.1\.attention\.self\.value\.lora_B")


def test_unexpected_key_is_refused(saved) -> None:
    base, path = saved
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.bert.pooler.dense.lora_A.weight"] = torch.zeros(8, 32)
    save_file(tensors, path / "adapter_model.safetensors")
    _expect_failed_load(base, path, "unexpected keys: base_model.model.bert.pooler.dense.lora_A.weight")


def test_shape_mismatch_is_refused(saved) -> None:
    base, path = saved
    tensors = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    tensors[key] = torch.zeros(8, 31)
    save_file(tensors, path / "adapter_model.safetensors")
    _expect_failed_load(
        base, path, r"shape mismatches: .*query\.lora_A\.weight \(checkpoint \(8, 31\), model \(8, 32\)\)"
    )


def test_config_for_another_architecture_is_refused(saved) -> None:
    _, path = saved
    _expect_failed_load(
        tiny_gpt2(), path, r"saved for .*does not fit this GPT2LMHeadModel: modules_to_save .*'classifier'"
    )


def test_wider_model_of_same_architecture_is_refused(saved) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    _, path = saved
    wider = BertForSequenceClassification(
        BertConfig(
            vocab_size=100,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            num_labels=2,
        )
    )
    _expect_failed_load(wider, path, "shape mismatches")


def test_truncated_file_is_refused(saved) -> None:
    base, path = saved
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    _expect_failed_load(base, path, "truncated or corrupt")


def test_corrupt_config_is_refused(saved) -> None:
    base, path = saved
    (path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    _expect_failed_load(base, path, "not a valid adapter config")
    (path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    _expect_failed_load(base, path, "unknown peft_type 'IA3'")


def test_pickle_checkpoint_is_refused(saved) -> None:
    base, path = saved
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    _expect_failed_load(base, path, "pickle")


def test_unsupported_hf_option_is_refused(saved) -> None:
    base, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    _expect_failed_load(base, path, "use_dora=True is not supported")


# -- both ways with the real HF PEFT package ---------------------------------------------------

HF_CASES = [
    (
        "bert",
        tiny_bert,
        ["query", "value", "dense"],
        ["classifier"],
        lambda: {"input_ids": torch.randint(0, 100, (2, 7))},
    ),
    ("gpt2-conv1d", tiny_gpt2, ["c_attn", "c_proj"], None, lambda: {"input_ids": torch.randint(0, 100, (2, 7))}),
    (
        "llama-embedding",
        tiny_llama,
        ["q_proj", "v_proj", "embed_tokens"],
        None,
        lambda: {"input_ids": torch.randint(0, 100, (2, 7))},
    ),
    ("conv2d", lambda: ConvNet(2), ["conv", "head"], None, lambda: {"x": torch.randn(2, 3, 9, 9)}),
    ("embedding", EmbeddingNet, ["emb"], None, lambda: {"ids": torch.randint(0, 50, (3, 5))}),
]


def _out(model, x):
    out = model(**x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("name,build,targets,saves,inputs", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_structpeft_lora_loads_in_hf_peft(tmp_path, name, build, targets, saves, inputs) -> None:
    torch.manual_seed(0)
    base = build().eval()
    fresh = copy.deepcopy(base)
    ours = sp.get_peft_model(
        base, sp.LoraConfig(r=4, alpha=6, target_modules=targets, modules_to_save=saves, init_weights=False)
    )
    x = inputs()
    expected = _out(ours, x)
    ours.save_pretrained(tmp_path)
    assert not torch.allclose(expected, _out(fresh, x), atol=1e-4)
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert torch.allclose(_out(theirs, x), expected, atol=1e-5)


@pytest.mark.parametrize("name,build,targets,saves,inputs", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_hf_peft_lora_loads_in_structpeft(tmp_path, name, build, targets, saves, inputs) -> None:
    torch.manual_seed(0)
    base = build().eval()
    fresh = copy.deepcopy(base)
    theirs = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets, modules_to_save=saves, init_lora_weights=False)
    ).eval()
    x = inputs()
    expected = _out(theirs, x)
    theirs.save_pretrained(tmp_path)
    ours = sp.PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.allclose(_out(ours, x), expected, atol=1e-5)
    with ours.disable_adapter():
        assert not torch.allclose(_out(ours, x), expected, atol=1e-4)
