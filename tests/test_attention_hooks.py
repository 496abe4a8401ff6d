"""The attention hooks: bookkeeping on the hooked objects, implementation changes, incremental
decoding, and no structpeft code in models without a head-mixing adapter."""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import structpeft as sp
from structpeft.attention import hooks
from tests.architectures import BY_NAME, outputs

LLAMA, GPT2, BERT = BY_NAME["llama"], BY_NAME["gpt2"], BY_NAME["bert"]


def alphas(model: sp.PeftModel) -> list[torch.Tensor]:
    return [h.adapters["default"]["coeff"].coeff_alpha for _, h in model.adapter_hosts()]


def hooked_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hooks.is_hooked(m)]


@pytest.fixture
def mixing_calls(monkeypatch) -> list[int]:
    """Counts calls of the mixed attention (the maths every structpeft attention path runs)."""
    calls: list[int] = []
    real = hooks.mixed_head_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hooks, "mixed_head_attention", counting)
    return calls


def coeff(arch=LLAMA, implementation: str = "sdpa") -> sp.PeftModel:
    return sp.get_peft_model(arch.build(implementation), sp.CoeffConfig(init_weights=False))


def test_deepcopy_of_a_hooked_model_mixes_with_its_own_alpha() -> None:
    model = coeff()
    x = LLAMA.inputs(0)
    expected = outputs(model, x)
    clone = copy.deepcopy(model)
    assert len(hooked_modules(clone)) == len(hooked_modules(model)) == 2
    assert torch.equal(outputs(clone, x), expected)
    with torch.no_grad():
        for alpha in alphas(clone):
            alpha.zero_()
    base = outputs(LLAMA.build("sdpa"), x)
    assert torch.allclose(LLAMA.judged(x, outputs(clone, x)), LLAMA.judged(x, base), atol=1e-5)  # its own α, now 0
    assert torch.equal(outputs(model, x), expected)  # the original's α untouched
    clone.unload()
    assert not hooked_modules(clone) and len(hooked_modules(model)) == 2


def test_a_second_model_sharing_nothing_never_runs_structpeft(mixing_calls) -> None:
    x = LLAMA.inputs(1)
    model = coeff()
    plain = LLAMA.build("sdpa")
    expected = outputs(LLAMA.build("sdpa"), x)
    outputs(model, x)
    assert len(mixing_calls) == 2  # one per hooked attention module
    assert torch.equal(outputs(plain, x), expected)
    assert len(mixing_calls) == 2 and not hooked_modules(plain)
    assert interface_untouched()


def test_a_disabled_adapter_runs_no_structpeft_attention(mixing_calls) -> None:
    model = coeff()
    x = LLAMA.inputs(2)
    with model.disable_adapter():
        got = outputs(model, x)
    assert not mixing_calls
    assert torch.equal(got, outputs(LLAMA.build("sdpa"), x))


def test_deleting_a_hooked_model_and_building_others_leaves_no_stale_state() -> None:
    x = BERT.inputs(3)
    expected = outputs(BERT.build("sdpa"), x)
    for _ in range(4):  # freed objects' ids get reused: state keyed by id() would leak into the next model
        model = coeff(BERT)
        outputs(model, x)
        del model
        gc.collect()
    fresh = BERT.build("sdpa")
    adapted = sp.get_peft_model(fresh, sp.CoeffConfig())
    adapted.unload()
    assert not hooked_modules(fresh)
    assert torch.equal(outputs(fresh, x), expected)


def test_pickling_the_config_and_the_model_of_a_hooked_model() -> None:
    model = coeff(BERT)
    x = BERT.inputs(4)
    expected = outputs(model, x)
    config = pickle.loads(pickle.dumps(model.config))
    assert config._attn_implementation == "sdpa"
    assert "structpeft" not in model.config.to_json_string()
    clone = pickle.loads(pickle.dumps(model))
    assert len(hooked_modules(clone)) == 2
    assert torch.equal(outputs(clone, x), expected)


def interface_untouched() -> bool:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward and "eager" not in ALL_ATTENTION_FUNCTIONS


def test_the_interface_is_left_as_it_was_after_a_forward_and_after_a_failed_one() -> None:
    model = coeff(BERT)
    outputs(model, BERT.inputs(0))
    assert interface_untouched()
    delta = next(h for _, h in model.adapter_hosts()).adapters["default"]["coeff"]
    delta.coeff_alpha = torch.nn.Parameter(torch.zeros(3, 3))  # fails inside the mixed attention
    with pytest.raises(ValueError, match=r"ran 4 heads but its head mixing is \(3, 3\)"):
        outputs(model, BERT.inputs(0))
    assert interface_untouched()
    assert torch.equal(outputs(BERT.build("sdpa"), BERT.inputs(0)), outputs(BERT.build("sdpa"), BERT.inputs(0)))


class OwnEagerAttention(torch.nn.Module):
    """Reads the interface for sdpa but calls its own eager function directly (the pre-4.48 pattern)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config, self.num_heads = config, 2
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.proj(x)  # (B, H, N, d)
        if self.config._attn_implementation == "eager":
            maps = torch.softmax(query @ query.transpose(-1, -2), dim=-1)
            return maps @ query
        out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](self, query, query, query, None)
        return out.transpose(1, 2)


def test_a_module_that_bypasses_the_interface_raises_instead_of_dropping_alpha() -> None:
    from transformers import PretrainedConfig

    config = PretrainedConfig()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = torch.nn.Sequential(OwnEagerAttention(config)).eval()
    query = torch.randn(1, 2, 3, 4)
    expected = base(query)
    model = sp.get_peft_model(base, sp.CoeffConfig(init_weights=False, dropout=0.0))
    assert not torch.allclose(model(query), expected, atol=1e-4)  # sdpa: looked up, mixed
    config._attn_implementation = "eager"
    with pytest.raises(RuntimeError, match="OwnEagerAttention did not look its 'eager' attention up"):
        model(query)
    assert interface_untouched()


class InterfaceAttention(torch.nn.Module):
    """Two heads through the AttentionInterface's sdpa, its projection giving (B, H, N, d) directly."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config, self.num_heads, self.num_key_value_groups, self.is_causal = config, 2, 1, False
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.proj(x)  # (B, H, N, d)
        out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](self, query, query, query, None)
        return out  # (B, N, H, d): the interface hands the heads back after the positions


class DepthAttentionResidual(torch.nn.Module):
    """Like Inkling 2's block attention residual: at each position one learned query attends over L stacked
    states, the positions in the heads' slot. It shares a config that declares heads and sets
    num_key_value_groups only because the interface's functions read it."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config, self.num_key_value_groups, self.is_causal = config, 1, False
        self.query = torch.nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, L, d), L states stacked per position
        query = self.query.expand(*x.shape[:-2], 1, -1)  # (B, N, 1, d): N in the heads' slot
        out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](self, query, x, x, None)  # (B, 1, N, d)
        return out.squeeze(1)  # (B, N, d)


def test_attention_over_something_other_than_heads_is_not_a_coeff_target() -> None:
    from transformers import PretrainedConfig

    from structpeft.attention import is_attention_module

    config = PretrainedConfig(num_attention_heads=4)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = torch.nn.ModuleDict({"attention": InterfaceAttention(config), "residual": DepthAttentionResidual(config)})
    assert is_attention_module(base["attention"]) and not is_attention_module(base["residual"])

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = base

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blocks["residual"](self.blocks["attention"](x))

    model = Stack().eval()
    x = torch.randn(1, 2, 3, 4)  # (B, H, N, d)
    expected = model(x)
    adapted = sp.get_peft_model(model, sp.CoeffConfig(init_weights=False, dropout=0.0))
    assert [name for name, _ in adapted.adapter_hosts()] == ["blocks.attention"]
    assert not torch.allclose(adapted(x), expected, atol=1e-4)  # the two heads mixed, the residual left alone


@pytest.mark.parametrize("switch", ["set_attn_implementation", "by_hand"])
def test_changing_the_implementation_of_a_hooked_model_keeps_the_mixing(switch: str) -> None:
    model = coeff(LLAMA, "sdpa")
    x = LLAMA.inputs(5)
    mixed = LLAMA.judged(x, outputs(model, x))
    if switch == "set_attn_implementation":
        model.base_model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"
    assert model.config._attn_implementation == "eager"
    assert torch.allclose(LLAMA.judged(x, outputs(model, x)), mixed, atol=1e-5)
    with torch.no_grad():
        for alpha in alphas(model):
            alpha.mul_(2)
    assert not torch.allclose(LLAMA.judged(x, outputs(model, x)), mixed, atol=1e-3)  # α still acts under eager


def test_an_implementation_without_maps_set_after_hooking_is_refused_at_the_forward() -> None:
    model = coeff(LLAMA, "sdpa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"LlamaAttention.*'flex_attention'.*attn_implementation='sdpa'"):
        outputs(model, LLAMA.inputs(6))
    assert model.config._attn_implementation == "flex_attention"


def test_an_encoder_with_no_causal_flag_is_not_made_causal() -> None:
    """SDPA hands no mask for an unpadded encoder batch: causality then comes from the flag alone."""
    x = {"input_ids": BERT.inputs(7)["input_ids"]}  # no padding, so no mask
    expected = outputs(BERT.build("eager"), x)
    model = sp.get_peft_model(BERT.build("sdpa"), sp.CoeffConfig())
    for module in model.base_model.modules():
        if hooks.is_hooked(module):
            del module.is_causal  # unknown
    assert torch.allclose(outputs(model, x), expected, atol=1e-5)


@pytest.mark.parametrize("arch", [GPT2, LLAMA], ids=lambda a: a.name)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_generate_with_a_kv_cache_equals_the_full_sequence_each_step(arch, implementation: str) -> None:
    model = coeff(arch, implementation)
    with torch.no_grad():
        for alpha in alphas(model):
            alpha.mul_(2)  # mixing strong enough to change the tokens
    x = arch.inputs(8)
    new = 6
    generated = model.generate(**x, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    plain = arch.build(implementation).generate(
        **x, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
    )
    assert not torch.equal(generated, plain)  # Coeff changed the continuation
    start = x["input_ids"].shape[1]
    with torch.no_grad():
        for step in range(new):
            ids = generated[:, : start + step]
            mask = torch.cat([x["attention_mask"], torch.ones(ids.shape[0], step, dtype=torch.long)], dim=1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() counts them past left padding
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            assert torch.equal(logits.argmax(-1), generated[:, start + step]), step


def test_deepcopy_and_pickle_of_a_hooked_multihead_attention() -> None:
    from tests.models import MHANet, _mha_inputs

    torch.manual_seed(0)
    model = sp.get_peft_model(MHANet().eval(), sp.CoeffConfig(init_weights=False))
    x = _mha_inputs(0)
    expected = model(**x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert hooks.is_hooked(clone.base_model.attn)
        assert torch.equal(clone(**x), expected)
        with torch.no_grad():
            alphas(clone)[0].zero_()
        assert not torch.allclose(clone(**x), expected, atol=1e-4)  # the clone mixes with its own α
        assert torch.equal(model(**x), expected)


def test_the_transformers_private_names_are_checked_in_one_place(monkeypatch) -> None:
    from structpeft.attention import transformers_interface as ti

    ti._check_private_names()  # the installed transformers has them

    class Renamed:  # a transformers release whose interface names its mappings otherwise
        _local_mapping: dict = {}

    monkeypatch.setattr(ti, "AttentionInterface", Renamed)
    with pytest.raises(ImportError, match=r"no _global_mapping.*knows transformers 5\.1 to 5\.25"):
        ti._check_private_names()


def test_one_head_count_rule_for_the_hooks_and_the_anatomy() -> None:
    from types import SimpleNamespace

    from torch import nn

    from structpeft.attention import hooks
    from structpeft.attention.anatomy import declared_heads

    config = SimpleNamespace(num_attention_heads=6)
    own = nn.Module()
    own.num_heads, own.config = 4, config
    per_head = nn.Module()
    per_head.head_dim, per_head.config = 8, config
    shares_config = nn.Module()  # an MLP beside the attention, on the same config
    shares_config.config = config
    assert declared_heads(own) == hooks.num_heads(own) == 4
    assert declared_heads(per_head) == hooks.num_heads(per_head) == 6
    assert declared_heads(shares_config) is None
    with pytest.raises(ValueError, match="cannot tell the number of heads"):
        hooks.num_heads(shares_config)
