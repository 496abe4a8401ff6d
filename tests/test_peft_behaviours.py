"""HF PEFT behaviours users rely on, matched: switching while merged, deleting the active adapter,
nested disabling, mixed-adapter batches, the wrappers' attributes, and merges that refuse cleanly."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import structpeft as sp
from structpeft.core.config import register_method
from structpeft.core.layers import AdapterDelta
from tests.models import MLP, ConvNet, EmbeddingNet, tiny_bert, tiny_gpt2


def lora(targets=("lin0", "lin1"), **kw) -> sp.LoraConfig:
    return sp.LoraConfig(r=2, target_modules=list(targets), init_weights=False, **kw)


def two_adapters(base: nn.Module | None = None, **kw) -> sp.PeftModel:
    torch.manual_seed(0)
    model = sp.get_peft_model(base if base is not None else MLP(), lora(**kw))
    model.add_adapter("other", lora(**kw))
    return model


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n or "lora" not in n}


X = torch.randn(4, 10)


def test_set_adapter_while_merged_unmerges_first() -> None:
    model = two_adapters()
    model.set_adapter("other")
    expected = model(X)
    model.set_adapter("default")
    model.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging"):
        model.set_adapter("other")
    assert all(not layer.merged_adapters for _, layer in model.adapted_layers())
    assert torch.allclose(model(X), expected, atol=1e-6)


def test_deleting_the_active_adapter_activates_a_remaining_one() -> None:
    model = two_adapters()
    model.set_adapter("other")
    expected = model(X)
    model.set_adapter("default")
    with pytest.warns(UserWarning, match="'other' is now active"):
        model.delete_adapter("default")
    assert model.active_adapter == "other"
    assert torch.equal(model(X), expected)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora" in n)


def test_a_deleted_frozen_adapters_name_can_be_reused_and_trains(tmp_path) -> None:
    model = two_adapters()
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, "loaded")  # is_trainable=False: frozen
    model.delete_adapter("loaded")
    model.add_adapter("loaded", lora())
    model.set_adapter("loaded")
    params = [p for n, p in model.named_parameters() if ".loaded." in n]
    assert params and all(p.requires_grad for p in params)


def test_nested_disable_adapter_restores_the_previous_state() -> None:
    model = two_adapters()
    adapted = model(X)
    with model.disable_adapter():
        base = model(X)
        with model.disable_adapter():
            pass
        assert torch.equal(model(X), base)  # the inner block did not switch adapters back on
    assert not torch.allclose(base, adapted)
    assert torch.equal(model(X), adapted)
    model.disable_adapter_layers()
    with model.disable_adapter():
        pass
    assert torch.equal(model(X), base)
    model.enable_adapter_layers()
    assert torch.equal(model(X), adapted)


def test_two_active_adapters_keeping_the_same_module_are_refused() -> None:
    model = two_adapters(modules_to_save=["head"])
    with pytest.raises(ValueError, match=r"\['default', 'other'\] each keep their own copy of 'head'"):
        model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default"]


@pytest.mark.parametrize("trainable", [False, True])
def test_from_pretrained_is_in_eval_mode_unless_trainable(tmp_path, trainable) -> None:
    two_adapters().save_pretrained(tmp_path)
    loaded = sp.PeftModel.from_pretrained(MLP().train(), tmp_path, is_trainable=trainable)
    assert all(m.training == trainable for m in loaded.modules())


def test_active_adapter_and_set_requires_grad() -> None:
    model = two_adapters()
    assert model.active_adapter == "default"
    model.set_adapter(["default", "other"])
    assert model.active_adapter == ["default", "other"]
    model.set_requires_grad("other", requires_grad=False)
    model.set_adapter(["default", "other"])  # switching keeps it off
    grads = {n: p.requires_grad for n, p in model.named_parameters() if "lora" in n}
    assert all(g == (".default." in n) for n, g in grads.items())
    model.set_requires_grad(["other"])
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora" in n)


def test_wrapped_layers_expose_the_layers_attributes() -> None:
    mlp = sp.get_peft_model(MLP(), lora(modules_to_save=["head"]))
    assert (mlp.base_model.lin0.in_features, mlp.base_model.lin0.out_features) == (10, 20)
    assert mlp.base_model.head.out_features == 3
    conv = sp.get_peft_model(ConvNet(2), sp.LoraConfig(target_modules=["conv"])).base_model.conv
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (3, 8, (3, 3), (2, 2))
    assert (conv.in_features, conv.out_features) == (3, 8)  # as HF PEFT's conv wrappers
    c_attn = sp.get_peft_model(tiny_gpt2(), sp.LoraConfig(target_modules=["c_attn"])).base_model
    assert c_attn.transformer.h[0].attn.c_attn.nf == 96
    emb = sp.get_peft_model(EmbeddingNet(), sp.LoraConfig(target_modules=["emb"])).base_model.emb
    assert (emb.num_embeddings, emb.embedding_dim, emb.padding_idx) == (50, 16, None)
    with pytest.raises(AttributeError):
        _ = mlp.base_model.lin0.no_such_attribute


@pytest.mark.parametrize("target", ["wte", "lm_head"])
def test_merging_into_a_tied_embedding_unties_it_as_hf_peft(target: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = sp.get_peft_model(tiny_gpt2(), sp.LoraConfig(target_modules=[target], init_weights=False)).eval()
    ids = torch.randint(0, 100, (2, 7))
    base_logits = _base_logits(model, ids)
    unmerged = model(input_ids=ids).logits
    assert not torch.allclose(unmerged, base_logits, atol=1e-3)  # the adapter does something
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is not merged.transformer.wte.weight
    assert merged.config.tie_word_embeddings is False
    assert torch.allclose(merged(input_ids=ids).logits, unmerged, atol=1e-5)
    merged.save_pretrained(tmp_path)
    reloaded = type(merged).from_pretrained(tmp_path).eval()
    assert torch.allclose(reloaded(input_ids=ids).logits, unmerged, atol=1e-5)


def _base_logits(model: sp.PeftModel, ids: torch.Tensor) -> torch.Tensor:
    with model.disable_adapter():
        return model(input_ids=ids).logits


def test_a_failed_merge_into_a_tied_embedding_leaves_it_tied() -> None:
    torch.manual_seed(0)
    model = sp.get_peft_model(tiny_gpt2(), sp.LoraConfig(target_modules=["wte"], init_weights=False))
    with torch.no_grad():
        model.base_model.transformer.wte.adapters["default"]["lora"].lora_embedding_B[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot merge into module 'transformer.wte'.*Nothing was merged"):
        model.merge_adapter()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.base_model.lm_head.weight is model.base_model.transformer.wte.weight
    assert model.base_model.config.tie_word_embeddings is True


def test_disable_adapter_turns_gradients_off_and_back() -> None:
    model = two_adapters()
    model.set_requires_grad("other", requires_grad=False)
    before = {n: p.requires_grad for n, p in model.named_parameters() if "lora" in n}
    assert any(before.values()) and not all(before.values())
    with model.disable_adapter():
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora" in n)
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora" not in n)
    assert {n: p.requires_grad for n, p in model.named_parameters() if "lora" in n} == before
    model.disable_adapter_layers()
    assert not any(p.requires_grad for p in model.parameters())
    model.enable_adapter_layers()
    assert {n: p.requires_grad for n, p in model.named_parameters() if "lora" in n} == before


def test_merge_and_unload_takes_adapter_names_and_safe_merge() -> None:
    model = two_adapters()
    model.set_adapter("other")
    expected = model(X)
    model.set_adapter("default")
    merged = model.merge_and_unload(adapter_names=["other"], safe_merge=True)
    assert not any(isinstance(m, sp.AdaptedLayer) for m in merged.modules())
    assert torch.allclose(merged(X), expected, atol=1e-5)


def test_a_merge_that_fails_midway_restores_the_weights_bit_for_bit() -> None:
    model = two_adapters()
    with torch.no_grad():  # lin1 merges first (merges run backwards), then lin0 fails
        model.base_model.lin0.adapters["default"]["lora"].lora_B.weight[0, 0] = float("inf")
    before = base_weights(model)
    with pytest.raises(ValueError, match=r"cannot merge into module 'lin0'.*non-finite.*Nothing was merged"):
        model.merge_adapter()
    after = base_weights(model)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert all(not layer.merged_adapters for _, layer in model.adapted_layers())


class _InfiniteBias(AdapterDelta):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, result, base_layer):
        return result * self.scale

    def delta_weight(self, base_layer):
        return torch.zeros_like(base_layer.weight)

    def delta_bias(self, base_layer):
        return torch.full_like(base_layer.bias, float("inf"))


@register_method
@dataclass
class _InfiniteBiasConfig(sp.AdapterConfig):
    peft_type = "TEST_INFINITE_BIAS"

    def create_delta(self, layer, name):
        return _InfiniteBias()


def test_the_finite_check_of_a_merge_covers_biases() -> None:
    model = sp.get_peft_model(MLP(), [lora(["lin0"]), _InfiniteBiasConfig(target_modules=["lin1"])])
    before = base_weights(model)
    with pytest.raises(ValueError, match="'lin1'.*non-finite weights or biases"):
        model.merge_adapter()
    assert all(torch.equal(base_weights(model)[n], before[n]) for n in before)


def test_get_peft_model_on_an_adapted_model_points_to_add_adapter() -> None:
    model = two_adapters()
    for target in (model, model.base_model):
        with pytest.raises(ValueError, match=r"already holds structpeft adapters.*add_adapter"):
            sp.get_peft_model(target, lora())
    assert sorted(model.peft_config) == ["default", "other"]


# -- mixed-adapter batches: row i runs adapter_names[i] ------------------------------------------

MIXED_METHODS = {
    "lora": lambda: sp.LoraConfig(r=2, target_modules=["query", "value"], init_weights=False),
    "flora": lambda: sp.FloraConfig(r=2, target_modules=["query", "value"], init_weights=False),
    "surm-lora": lambda: sp.SurmConfig(target_modules=["query"], init_weights=False),
    "surm-adapter": lambda: sp.SurmConfig(mode="adapter", target_modules=["output.dense"], init_weights=False),
    "kernel-mix": lambda: sp.KernelMixConfig(dropout=0.0, init="paper"),
    "lora+heads": lambda: sp.LoraConfig(target_modules=["query"], modules_to_save=["classifier"], init_weights=False),
}


@pytest.mark.parametrize("method", MIXED_METHODS)
def test_a_mixed_batch_runs_each_rows_adapter(method) -> None:
    torch.manual_seed(0)
    model = sp.get_peft_model(tiny_bert().eval(), MIXED_METHODS[method]())
    model.add_adapter("other", MIXED_METHODS[method]())
    ids = torch.randint(0, 100, (3, 7))

    def logits(**kw):
        return model(input_ids=ids, **kw).logits

    rows = {}
    for adapter in ("default", "other"):
        model.set_adapter(adapter)
        rows[adapter] = logits()
    with model.disable_adapter():
        rows["__base__"] = logits()
    assert not torch.allclose(rows["default"], rows["other"])
    # BertForSequenceClassification.forward takes **kwargs: adapter_names must not end up there.
    mixed = logits(adapter_names=["other", "__base__", "default"])
    expected = torch.stack([rows["other"][0], rows["__base__"][1], rows["default"][2]])
    assert torch.allclose(mixed, expected, atol=1e-5)
    assert all(layer.batch_adapters is None for _, layer in model.adapted_layers())


def test_a_mixed_batch_is_refused_for_adapters_acting_inside_attention() -> None:
    model = sp.get_peft_model(tiny_bert().eval(), sp.CoeffConfig(init_weights=False))
    model.add_adapter("lora", sp.LoraConfig(target_modules=["query"]))
    ids = torch.randint(0, 100, (2, 5))
    with pytest.raises(ValueError, match=r"\['default'\] act inside module .*\(coeff\).*cannot be chosen per row"):
        model(input_ids=ids, adapter_names=["default", "lora"])
    model.set_adapter("lora")
    expected = model(input_ids=ids).logits
    with model.disable_adapter():
        base = model(input_ids=ids).logits
    mixed = model(input_ids=ids, adapter_names=["lora", "__base__"]).logits  # the Coeff adapter takes no row
    assert torch.allclose(mixed, torch.stack([expected[0], base[1]]), atol=1e-5)


@pytest.mark.parametrize(
    "names,error,words",
    [
        (["default"], ValueError, "adapter_names has 1 entries but module 'lin0' got a batch of 4"),
        (["default", "nope", "other", "other"], ValueError, "no adapter named ['nope']"),
        ("default", TypeError, "one per row"),
        ([], TypeError, "non-empty list"),
    ],
)
def test_bad_adapter_names_in_a_batch_are_refused(names, error, words) -> None:
    model = two_adapters()
    with pytest.raises(error) as info:
        model(X, adapter_names=names)
    assert words in str(info.value)
    assert all(layer.batch_adapters is None for _, layer in model.adapted_layers())


def test_a_mixed_batch_is_refused_while_merged_or_disabled() -> None:
    model = two_adapters()
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged into the weights: unmerge_adapter"):
        model(X, adapter_names=["default"] * 4)
    model.unmerge_adapter()
    with model.disable_adapter(), pytest.raises(ValueError, match="disabled"):
        model(X, adapter_names=["default"] * 4)


def test_a_mixed_batch_trains_each_adapter_on_its_rows() -> None:
    model = two_adapters()
    model(X, adapter_names=["default", "default", "__base__", "__base__"]).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert all((g is not None and g.abs().sum() > 0) == (".default." in n) for n, g in grads.items())


def test_copies_of_a_model_keep_their_adapters_apart() -> None:
    model = two_adapters()
    twin = copy.deepcopy(model)
    twin.set_adapter("other")
    assert model.active_adapter == "default" and twin.active_adapter == "other"


def test_adapter_parameters_names_each_methods_own_parameters() -> None:
    from tests.models import tiny_llama

    torch.manual_seed(0)
    model = sp.get_peft_model(
        tiny_llama(),
        [sp.CoeffConfig(), sp.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])],
    )
    model.add_adapter("other", sp.LoraConfig(r=2, target_modules=["o_proj"]))
    named = dict(model.named_parameters())
    every = dict(model.adapter_parameters())
    assert all(named[n] is p for n, p in every.items())  # the names are the model's own
    coeff = dict(model.adapter_parameters(method="coeff"))
    lora = dict(model.adapter_parameters(adapter="default", method="lora"))
    assert coeff and all(n.endswith("coeff_alpha") for n in coeff)
    assert lora and all(".lora_" in n and ".adapters.default.lora." in n for n in lora)
    assert set(every) == set(coeff) | set(lora) | set(dict(model.adapter_parameters(adapter="other")))
    heads = dict(model.saved_module_parameters())
    assert heads and not set(heads) & set(every) and all(named[n] is p for n, p in heads.items())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable == set(coeff) | set(lora) | set(heads)  # "other" is not active


def test_each_method_trains_at_its_own_learning_rate() -> None:
    from structpeft.workflow.train import TrainSettings, _optimizer
    from tests.models import tiny_llama

    model = sp.get_peft_model(tiny_llama(), [sp.CoeffConfig(), sp.LoraConfig(r=2, target_modules=["q_proj"])])
    optimizer = _optimizer(model, TrainSettings(lr=1e-3, lr_by_method={"coeff": 5e-2}))
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    assert by_lr == {
        5e-2: {id(p) for _, p in model.adapter_parameters(method="coeff")},
        1e-3: {id(p) for _, p in model.adapter_parameters(method="lora")},
    }


class _NamedLikeLora(AdapterDelta):
    def __init__(self) -> None:
        super().__init__()
        self.lora_A = nn.Linear(10, 1, bias=False)  # the key LoRA's own A takes: "lora_A.weight"

    def forward(self, x, result, base_layer):
        return result


@register_method
@dataclass
class _NamedLikeLoraConfig(sp.AdapterConfig):
    peft_type = "TEST_NAMED_LIKE_LORA"

    def create_delta(self, layer, name):
        return _NamedLikeLora()


def test_two_methods_naming_a_tensor_alike_on_one_module_are_refused_when_planned() -> None:
    base = MLP()
    with pytest.raises(ValueError, match=r"methods lora and test_named_like_lora on module 'lin0'.*'lora_A.weight'"):
        sp.get_peft_model(base, [lora(["lin0"]), _NamedLikeLoraConfig(target_modules=["lin0"])])
    assert not any(isinstance(m, sp.AdaptedLayer) for m in base.modules())
    sp.get_peft_model(MLP(), [lora(["lin0"]), _NamedLikeLoraConfig(target_modules=["lin1"])])  # apart: fine


@pytest.mark.parametrize(
    "config",
    [
        sp.LoraConfig(target_modules=["q_proj", "v_proj"], init_weights=False),
        sp.FloraConfig(target_modules=["q_proj", "v_proj"], init_weights=False),
        sp.SurmConfig(target_modules=["q_proj", "v_proj"], init_weights=False),
        sp.KernelMixConfig(init_weights=False, dropout=0.0),
        sp.CoeffConfig(init_weights=False, dropout=0.0),
    ],
    ids=lambda c: c.peft_type,
)
def test_a_model_cast_whole_to_bfloat16_runs_every_method(config) -> None:
    from tests.models import tiny_llama

    torch.manual_seed(0)
    model = sp.get_peft_model(tiny_llama(), config).eval()
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        model.to(torch.bfloat16)  # one dtype rule: the deltas compute in their parameters' dtype
        cast = model(input_ids=ids).logits
    assert cast.dtype == torch.bfloat16
    assert torch.allclose(cast.float(), reference, atol=5e-2), (cast.float() - reference).abs().max()
