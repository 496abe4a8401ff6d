"""Coeff-Tuning on every architecture of tests/architectures.py, against the model's own eager attention.

The reference (tests/eager_reference.py) keeps each model's eager attention function and only
mixes the maps it returns, head by head in loops.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch

import structpeft as sp
from tests.architectures import ARCHITECTURES, Architecture, outputs
from tests.eager_reference import mixing_reference

# The attention modules a Coeff adapter takes in each tiny model (two layers per stack; an
# encoder-decoder has encoder self-attention, decoder self-attention and cross-attention).
EXPECTED_MODULES = {"encoder": 2, "decoder": 2, "encoder-decoder": 6}
EXTRA_MODULES = {"siglip_vision": 1}  # its pooling head is a torch.nn.MultiheadAttention
IDS = [a.name for a in ARCHITECTURES]


def alphas(model: sp.PeftModel, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {n: h.adapters[adapter]["coeff"].coeff_alpha for n, h in model.adapter_hosts() if adapter in h.adapters}


@functools.cache
def _source_calls_interface(cls: type) -> bool:
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def require_interface(arch: Architecture) -> None:
    """Skip, after checking the refusal, where this transformers' version of the architecture
    computes attention in its own code (T5 before 5.x did); judged from its source, independently
    of structpeft's detection."""
    import transformers

    model = arch.build()
    if any(_source_calls_interface(type(m)) for m in model.modules()):
        return
    with pytest.raises(ValueError, match="found no attention module"):
        sp.get_peft_model(model, sp.CoeffConfig())
    pytest.skip(
        f"{arch.name}'s attention does not call the AttentionInterface in transformers {transformers.__version__}"
    )


def adapted(arch: Architecture, implementation: str, **config) -> sp.PeftModel:
    return sp.get_peft_model(arch.build(implementation), sp.CoeffConfig(**config))


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=IDS)
def test_coeff_takes_every_attention_module_and_zero_start_equals_the_base(arch: Architecture) -> None:
    require_interface(arch)
    x = arch.inputs(0)
    for implementation in arch.implementations:
        with torch.no_grad():
            expected = outputs(arch.build(implementation), x)
            model = adapted(arch, implementation)
            assert len(alphas(model)) == EXPECTED_MODULES[arch.kind] + EXTRA_MODULES.get(arch.name, 0)
            got = outputs(model, x)
        assert torch.allclose(arch.judged(x, got), arch.judged(x, expected), atol=1e-5), implementation


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=IDS)
def test_coeff_matches_the_models_own_eager_maps_mixed_per_head(arch: Architecture) -> None:
    require_interface(arch)
    x = arch.inputs(1)
    base = arch.judged(x, outputs(arch.build("eager"), x)).detach()
    for implementation in arch.implementations:
        model = adapted(arch, implementation, init_weights=False)
        reference = arch.build("eager")
        with mixing_reference(reference, alphas(model)) as reference_alphas:
            got, want = arch.judged(x, outputs(model, x)), arch.judged(x, outputs(reference, x))
        assert not torch.allclose(want, base, atol=1e-3)  # the mixing does something
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (implementation, (got - want).abs().max())
        got.square().sum().backward()
        want.square().sum().backward()
        for path, alpha in reference_alphas.items():
            assert torch.allclose(alphas(model)[path].grad, alpha.grad, atol=1e-5, rtol=1e-4), path


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=IDS)
def test_coeff_one_training_step_moves_every_alpha(arch: Architecture) -> None:
    require_interface(arch)
    model = adapted(arch, arch.implementations[-1], dropout=0.0).train()
    before = {p: a.detach().clone() for p, a in alphas(model).items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = arch.inputs(2)
    out = model(**x)
    loss = arch.judged(x, out.logits if "logits" in out else out.last_hidden_state).square().mean()
    if out.get("pooler_output") is not None:  # SigLIP's pooling head is attention too
        loss = loss + out.pooler_output.square().mean()
    loss.backward()
    optimizer.step()
    moved = {p: not torch.equal(a, before[p]) for p, a in alphas(model).items()}
    assert all(moved.values()), moved


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=IDS)
def test_coeff_save_load_round_trip_and_disabled_equals_base(arch: Architecture, tmp_path) -> None:
    require_interface(arch)
    implementation = arch.implementations[-1]
    x = arch.inputs(3)
    model = adapted(arch, implementation, init_weights=False)
    with torch.no_grad():
        expected = outputs(model, x)
        base = outputs(arch.build(implementation), x)
        with model.disable_adapter():
            assert torch.equal(outputs(model, x), base)  # disabled: the model's own attention, untouched
        model.save_pretrained(tmp_path)
        loaded = sp.PeftModel.from_pretrained(arch.build(implementation), tmp_path)
        assert torch.equal(outputs(loaded, x), expected)
        assert not torch.allclose(arch.judged(x, expected), arch.judged(x, base), atol=1e-3)


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if len(a.implementations) > 1], ids=lambda a: a.name)
def test_coeff_under_sdpa_equals_coeff_under_eager(arch: Architecture) -> None:
    require_interface(arch)
    x = arch.inputs(4)
    with torch.no_grad():
        sdpa = outputs(adapted(arch, "sdpa", init_weights=False), x)
        eager = outputs(adapted(arch, "eager", init_weights=False), x)
    assert torch.allclose(arch.judged(x, sdpa), arch.judged(x, eager), atol=1e-5)
