"""The common behaviours, for every tiny model x every method."""

from __future__ import annotations

import copy

import pytest
import torch

import structpeft as sp
from structpeft.core.layers import AdaptedLayer, ModulesToSave
from tests.models import CASES, Case, run

SURM = {
    "surm-circulant": {"structure": "circulant"},
    "surm-circulant-pad": {"structure": "circulant", "rectangular": "pad"},
    "surm-toeplitz": {"structure": "toeplitz"},
    "surm-kronecker": {"structure": "kronecker"},
    "surm-ldr": {"structure": "ldr", "rank": 2},
    "surm-adapter": {"structure": "circulant", "mode": "adapter", "activation": "gelu"},
}
ATTENTION = ["coeff", "kernel-mix", "coeff+lora", "coeff+flora", "kernel-mix+coeff+surm"]
METHODS = ["lora", "flora", *SURM, *ATTENTION]
MERGEABLE = [m for m in METHODS if m != "surm-adapter" and "coeff" not in m]


def make_config(method: str, case: Case, init_weights: bool, **overrides) -> sp.AdapterConfig | list:
    common = {"target_modules": case.targets, "modules_to_save": case.modules_to_save, "init_weights": init_weights}
    if method == "lora":
        return sp.LoraConfig(r=4, alpha=8, **{**common, **overrides})
    if method == "flora":
        return sp.FloraConfig(r=case.flora_r, alpha=8, **{**common, **overrides})
    if method == "coeff":  # every attention module of the model
        return sp.CoeffConfig(**{**common, "target_modules": None, **overrides})
    if method == "kernel-mix":
        return sp.KernelMixConfig(**{**common, "target_modules": None, **overrides})
    if "+" in method:  # composed: the first config also keeps the heads
        first, *rest = method.split("+")
        rest_overrides = {**overrides, "modules_to_save": None}
        return [make_config(first, case, init_weights, **overrides)] + [
            make_config(m, case, init_weights, **rest_overrides) for m in rest
        ]
    surm = "surm-circulant" if method == "surm" else method
    return sp.SurmConfig(**SURM[surm], **{**common, "target_modules": case.linear_targets, **overrides})


# Cases added for the attention methods; every SURM variant already runs on the text models, so
# these take one, to keep the suite short.
ATTENTION_CASES = {"vit", "dinov2", "mha"}


def _fits(case: Case, method: str) -> bool:
    needs = set(method.split("+"))
    if needs & {"surm", *SURM} and case.linear_targets is None:
        return False
    if case.name in ATTENTION_CASES and method in SURM and method != "surm-circulant":
        return False
    if "coeff" in needs and case.attention is None:
        return False
    return not ("kernel-mix" in needs and case.attention != "hf")


def pairs(methods: list[str]) -> pytest.MarkDecorator:
    """(case, method) for every method that can adapt the case (SURM: linear layers; Coeff: attention)."""
    combos = [(c, m) for c in CASES for m in methods if _fits(c, m)]
    return pytest.mark.parametrize("case,method", combos, ids=[f"{c.name}-{m}" for c, m in combos])


def build(case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    return case.build().eval()


matrix = pairs(METHODS)
mergeable = pairs(MERGEABLE)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return torch.allclose(a, b, atol=tol, rtol=tol)


def same(case: Case, a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b) if case.bitwise else close(a, b, 1e-6)


@matrix
def test_zero_start_equals_base(case: Case, method: str) -> None:
    base = build(case)
    x = case.inputs(1)
    expected = run(base, x)
    model = sp.get_peft_model(base, make_config(method, case, init_weights=True))
    if "coeff" in method:  # attention now runs with explicit maps, not SDPA's fused kernel: equal to rounding
        assert close(run(model, x), expected, 1e-6)
    else:
        assert same(case, run(model, x), expected)


@matrix
def test_random_start_changes_output(case: Case, method: str) -> None:
    base = build(case)
    x = case.inputs(1)
    expected = run(base, x)
    model = sp.get_peft_model(base, make_config(method, case, init_weights=False))
    assert not close(run(model, x), expected, 1e-4)


@matrix
def test_save_load_round_trip_is_exact(case: Case, method: str, tmp_path) -> None:
    base = build(case)
    fresh = copy.deepcopy(base)
    model = sp.get_peft_model(base, make_config(method, case, init_weights=False))
    x = case.inputs(2)
    expected = run(model, x)
    model.save_pretrained(tmp_path)
    loaded = sp.PeftModel.from_pretrained(fresh, tmp_path)
    assert same(case, run(loaded, x), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = sp.PeftModel.from_pretrained(copy.deepcopy(build(case)), tmp_path, is_trainable=True)
    n_trainable, _ = trainable.get_nb_trainable_parameters()
    assert n_trainable == model.get_nb_trainable_parameters()[0]


@mergeable
def test_merge_unmerge_and_unload_keep_outputs(case: Case, method: str) -> None:
    model = sp.get_peft_model(build(case), make_config(method, case, init_weights=False))
    x = case.inputs(3)
    expected = run(model, x)
    model.merge_adapter()
    assert close(run(model, x), expected)
    model.unmerge_adapter()
    assert close(run(model, x), expected)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer | ModulesToSave) for m in plain.modules())
    assert close(run(plain, x), expected)


@matrix
def test_disable_adapter_equals_base(case: Case, method: str) -> None:
    base = build(case)
    x = case.inputs(4)
    expected = run(base, x)
    model = sp.get_peft_model(base, make_config(method, case, init_weights=False))
    adapted = run(model, x)
    with model.disable_adapter():
        assert same(case, run(model, x), expected)
    assert same(case, run(model, x), adapted)


@matrix
def test_optimizer_step_changes_only_adapter_parameters(case: Case, method: str) -> None:
    model = sp.get_peft_model(build(case), make_config(method, case, init_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n or ".copies." in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    run(model, case.inputs(5)).pow(2).mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


@mergeable
def test_several_active_adapters_add_and_equal_merged(case: Case, method: str) -> None:
    model = sp.get_peft_model(build(case), make_config(method, case, init_weights=False))
    torch.manual_seed(1)
    model.add_adapter("other", make_config(method, case, init_weights=False, modules_to_save=None))
    x = case.inputs(6)
    first = run(model, x)
    model.set_adapter("other")
    second = run(model, x)
    model.set_adapter(["default", "other"])
    both = run(model, x)
    assert not close(both, first, 1e-4) and not close(both, second, 1e-4)
    model.merge_adapter()
    assert close(run(model, x), both)


@matrix
def test_bf16_base_keeps_float32_adapters(case: Case, method: str) -> None:
    reference = sp.get_peft_model(build(case), make_config(method, case, init_weights=False))
    x = case.inputs(7)
    expected = run(reference, x)
    torch.manual_seed(0)
    model = sp.get_peft_model(build(case).to(torch.bfloat16), make_config(method, case, init_weights=False))
    model.load_state_dict(
        {k: v.to(torch.bfloat16) if "adapters" not in k else v for k, v in reference.state_dict().items()}
    )
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".adapters." in n)
    x = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in x.items()}
    out = run(model, x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, atol=0.1, rtol=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run(model, x).float().pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".adapters." in n and p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
