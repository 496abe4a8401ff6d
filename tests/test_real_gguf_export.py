"""GGUF adapters exported from the two real decoders run in real llama.cpp (xllamacpp) and give what
transformers gives with the adapter merged, within 0.1 nat on the top-5 next-token log-probs.

Both run on the same base weights: transformers on the float dequantization of the GGUF (SmolLM2's Q4_1,
Gemma 3's Q4_K_M), llama.cpp on a float32 GGUF of those same values written in the test (on the quantized
file itself, llama.cpp's base alone differs from transformers' by up to 0.16 nat on SmolLM2, measured).
An adapter that moves transformers' log-probs by much more than 0.1 nat checks that the export changes
what llama.cpp computes; the adapter at scale 0 checks that it changes nothing else.

Slow: the models are converted from their GGUF once (cached under ~/.cache/structpeft/gguf).
"""

from __future__ import annotations

import copy

import pytest
import torch

import structpeft as sp
from structpeft.core import gguf_architecture
from tests.gguf_files import assert_same_top5, float32_copy, llamacpp_top5, top5_shift, torch_top5

pytestmark = pytest.mark.slow
pytest.importorskip("xllamacpp")
pytest.importorskip("gguf")

MODELS = ("smollm2-135m", "gemma3-270m")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXTS = ["The capital of France is", "Water boils at a temperature of", "def add(a, b):\n    return"]
TOLERANCE = 0.1  # nats: quantized llama.cpp against float transformers


@pytest.fixture(scope="module", params=MODELS)
def decoder(request, tmp_path_factory):
    """(the base as a float32 GGUF, a loader of the same float model in transformers, the prompts as ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from structpeft.workflow.models import gguf_file
    from structpeft.zoo.gguf import convert_gguf

    try:
        path = gguf_file(request.param)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    folder = convert_gguf(path).folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    float_file = float32_copy(path, tmp_path_factory.mktemp(request.param) / "base-f32.gguf")

    def load():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    return float_file, load, [tokenizer(text)["input_ids"] for text in TEXTS]


def _adapted(load, configs, amplify: float):
    base = load()
    torch.manual_seed(0)
    model = sp.get_peft_model(copy.deepcopy(base), configs).eval()
    with torch.no_grad():
        for _, p in model.adapter_parameters():
            p.mul_(amplify)
    return base, model


EXACT = [
    pytest.param(lambda: sp.LoraConfig(r=8, alpha=16, target_modules=PROJECTIONS, init_weights=False), 0.5, id="lora"),
    pytest.param(
        lambda: sp.FloraConfig(r=8, alpha=16, target_modules=PROJECTIONS, init_weights=False), 1.0, id="flora"
    ),
]


@pytest.mark.parametrize("configs,amplify", EXACT)
def test_lora_and_flora_in_llamacpp_agree_with_the_merged_model(decoder, tmp_path, configs, amplify) -> None:
    path, load, prompts = decoder
    base, model = _adapted(load, configs(), amplify)
    assert top5_shift(model, base, prompts) > 5 * TOLERANCE
    report = model.export_gguf(tmp_path / "adapter.gguf", architecture=gguf_architecture(path))
    assert report.max_relative_error == 0.0
    merged = model.merge_and_unload()
    banned: list[int] = []  # English prompts: the greedy tokens are whole words
    got = llamacpp_top5(path, tmp_path / "adapter.gguf", prompts, banned=banned)
    assert_same_top5(got, torch_top5(merged, prompts), TOLERANCE)
    assert_same_top5(
        llamacpp_top5(path, tmp_path / "adapter.gguf", prompts, scale=0.0, banned=banned),
        torch_top5(base, prompts),
        TOLERANCE,
    )


SVD = [
    pytest.param(
        lambda: sp.SurmConfig(structure="circulant", alpha=1.0, target_modules=PROJECTIONS, init_weights=False),
        {"rank": 16},
        20.0,
        id="surm-circulant-rank16",
    ),
    pytest.param(lambda: sp.KernelMixConfig(init_weights=False, dropout=0.0), {"energy": 1.0}, 0.5, id="kernel-mix"),
]


@pytest.mark.parametrize("configs,options,amplify", SVD)
def test_the_svd_exports_in_llamacpp_agree_with_the_same_factors_in_transformers(
    decoder, tmp_path, configs, options, amplify
) -> None:
    """A truncated export is compared with what it wrote: the same rank's PEFT LoRA export (the same seeded
    SVD) loaded by HF PEFT on the float base and merged."""
    peft = pytest.importorskip("peft")
    path, load, prompts = decoder
    base, model = _adapted(load, configs(), amplify)
    gguf_report = model.export_gguf(tmp_path / "adapter.gguf", architecture=gguf_architecture(path), **options)
    peft_report = model.export_lora(tmp_path / "lora", **options)
    assert [layer.rank for layer in gguf_report.layers] == [layer.rank for layer in peft_report.layers]
    written = peft.PeftModel.from_pretrained(load(), tmp_path / "lora").eval()
    assert top5_shift(written, base, prompts) > 5 * TOLERANCE
    merged = written.merge_and_unload()
    got = llamacpp_top5(path, tmp_path / "adapter.gguf", prompts, banned=[])
    assert_same_top5(got, torch_top5(merged, prompts), TOLERANCE)
