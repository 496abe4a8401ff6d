"""Every weight method on a quantized base (bitsandbytes NF4/FP4 and int8, run on CPU here): trains with the
base frozen and quantized, saves and loads across the quantized and float bases, merges by requantizing
(lossy, warned) or exactly into a dequantized float model, and reads a frozen weight dequantized."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import structpeft as sp
from structpeft.core.layers import AdaptedLayer, ModuleAdapters
from structpeft.core.quantized import dense_weight, quant_backend, to_float_linear

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

QUANTIZATIONS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": torch.float32},
    "nf4-double": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": torch.float32,
    },
    "int8": {"load_in_8bit": True},
    "torchao-int8": None,  # torchao's int8 weight-only, applied to the loaded float model
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "lora": lambda: sp.LoraConfig(r=4, target_modules=PROJECTIONS, init_weights=False),
    "flora": lambda: sp.FloraConfig(r=2, target_modules=PROJECTIONS, init_weights=False),
    "surm-lora": lambda: sp.SurmConfig(target_modules=PROJECTIONS, alpha=0.5, init_weights=False),
    "surm-adapter": lambda: sp.SurmConfig(mode="adapter", target_modules=["o_proj"], init_weights=False),
    "kernel-mix": lambda: sp.KernelMixConfig(init_weights=False, dropout=0.0),
}
MERGEABLE = [m for m in METHODS if m != "surm-adapter"]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny LLaMA saved as a transformers folder; bitsandbytes' CPU kernels need rows of 64 values or more."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _load(folder, quantization: str | None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantization is None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if quantization == "torchao-int8":
        torchao = pytest.importorskip("torchao")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        torchao.quantization.quantize_(model, torchao.quantization.Int8WeightOnlyConfig())
        return model
    config = BitsAndBytesConfig(**QUANTIZATIONS[quantization])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: "inputs will be cast from float32 to float16"
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu").eval()


IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=IDS).logits.float()


def _base_state(model: sp.PeftModel) -> dict[str, torch.Tensor]:
    """Every parameter that is not the adapter's (compared by identity, not by name or flag)."""
    adapter = {id(p) for _, p in model.adapter_parameters()}
    return {n: _plain(p) for n, p in model.named_parameters() if id(p) not in adapter}


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A copy to compare: torchao's quantized weights by their values (they have no ``torch.equal``)."""
    if type(tensor).__module__.startswith("torchao."):
        return tensor.dequantize().detach().clone()
    return tensor.detach().clone()


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_every_weight_method_trains_on_a_quantized_base(llama_folder, quantization, method, monkeypatch) -> None:
    """Two steps: finite losses, every adapter tensor moves, no base tensor moves or requires grad, and the
    base is never dequantized by structpeft on the way (the quantized layers run their own kernels)."""
    import dataclasses

    from structpeft.core import quantized

    torch.manual_seed(0)
    model = sp.get_peft_model(_load(llama_folder, quantization), METHODS[method]())
    assert any(quant_backend(m) is not None for m in model.modules())
    frozen = _base_state(model)
    assert frozen and all(not model.get_parameter(n).requires_grad for n in frozen)
    dequantized = []

    def counting(dequantize):
        return lambda layer: dequantized.append(layer) or dequantize(layer)

    backends = tuple(dataclasses.replace(b, dequantize=counting(b.dequantize)) for b in quantized.BACKENDS)
    monkeypatch.setattr(quantized, "BACKENDS", backends)
    before = {n: p.detach().clone() for n, p in model.adapter_parameters()}
    optimizer = torch.optim.AdamW([p for _, p in model.adapter_parameters()], lr=1e-2)
    model.train()
    losses = []
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] < 7.0  # ln(256) = 5.5 at a random start
    for name, p in model.adapter_parameters():
        assert not torch.equal(p, before[name]), name
    for name, p in model.named_parameters():
        if name in frozen:
            assert not p.requires_grad and torch.equal(_plain(p), frozen[name]), name
    assert dequantized == []  # not on the hot path (Kernel-mix read its keys once, at creation)


@pytest.mark.parametrize("quantization", ["nf4", "int8", "torchao-int8"])
def test_kernel_mix_reads_the_dequantized_keys(llama_folder, quantization) -> None:
    """Kernel-mix's V part is driven by W_k: on a quantized base it must be the dequantized W_k, as on the
    float model holding those same values."""
    quantized = _load(llama_folder, quantization)
    dequantized = copy.deepcopy(quantized)
    for name, module in list(dequantized.named_modules()):
        if quant_backend(module) is not None:
            dequantized.set_submodule(name, to_float_linear(module))
    torch.manual_seed(0)
    on_quantized = sp.get_peft_model(quantized, sp.KernelMixConfig(init_weights=False, dropout=0.0))
    torch.manual_seed(0)
    on_float = sp.get_peft_model(dequantized, sp.KernelMixConfig(init_weights=False, dropout=0.0))
    for (name, host), (_, twin) in zip(on_quantized.adapter_hosts(), on_float.adapter_hosts(), strict=True):
        for method, delta in host.adapters["default"].items():
            got = delta.delta_weight(host.base_layer)
            want = twin.adapters["default"][method].delta_weight(twin.base_layer)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("quantization", ["nf4", "nf4-double", "int8", "torchao-int8"])
@pytest.mark.parametrize("method", MERGEABLE)
def test_merging_into_a_quantized_base(llama_folder, quantization, method) -> None:
    model = sp.get_peft_model(_load(llama_folder, quantization), METHODS[method]())
    unmerged, base = _logits(model), None
    with model.disable_adapter():
        base = _logits(model)
    moved = (unmerged - base).abs().max().item()
    assert moved > 0.05

    exact = copy.deepcopy(model).merge_and_unload(dequantize=True)
    assert not any(quant_backend(m) is not None for m in exact.modules())
    assert not getattr(exact.config, "quantization_config", None)
    tolerance = 2e-2 if quantization == "int8" else 1e-2  # int8 quantizes the activations too
    assert (_logits(exact) - unmerged).abs().max().item() < tolerance

    requantized_model = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="requantizing the .* merged layers changed their weights by up to") as record:
        requantized = requantized_model.merge_and_unload()
    warned = next(str(w.message) for w in record if "requantizing" in str(w.message))
    assert all(quant_backend(m) is not None for n, m in requantized.named_modules() if n.endswith("q_proj"))
    errors = {n: m.requantization_error for n, m in requantized.named_modules() if hasattr(m, "requantization_error")}
    adapted = {n for n, _ in model.adapter_hosts()}
    assert errors.keys() == adapted and all(0 < e < 1 for e in errors.values()), errors  # each merged layer's own
    assert f"up to {max(errors.values()):.3g}" in warned
    # Lossy, but the adapter is in: the merged model is nearer the adapted model than the base is.
    assert (_logits(requantized) - unmerged).abs().max().item() < moved


def test_a_failed_merge_into_a_quantized_base_restores_it(llama_folder) -> None:
    model = sp.get_peft_model(_load(llama_folder, "nf4"), METHODS["lora"]())
    layer = model.base_model.model.layers[1].mlp.down_proj
    weights = [(h, h.base_layer.weight) for _, h in model.adapter_hosts()]
    before = _logits(model)
    with torch.no_grad():
        layer.adapters["default"]["lora"].lora_B.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_adapter()
    assert all(h.base_layer.weight is w for h, w in weights)  # the quantized weights themselves, put back
    assert not any(h.merged_adapters for _, h in model.adapter_hosts())
    with torch.no_grad():
        layer.adapters["default"]["lora"].lora_B.weight[0, 0] = 0.0
    after = _logits(model)
    assert torch.isfinite(after).all() and after.shape == before.shape


@pytest.mark.parametrize("failure", ["unmergeable", "non-finite"])
def test_a_refused_or_failed_dequantizing_merge_leaves_the_base_quantized(llama_folder, failure) -> None:
    """merge_and_unload(dequantize=True) swaps every quantized layer for a float one: a refusal comes before
    the swap, and a merge failing part-way puts the quantized layers back, so nothing changes either way."""
    configs = [METHODS["lora"](), METHODS["surm-adapter"]()] if failure == "unmergeable" else METHODS["lora"]()
    model = sp.get_peft_model(_load(llama_folder, "nf4"), configs)
    layers = {n: m for n, m in model.base_model.named_modules() if quant_backend(m) is not None}
    assert layers and model.base_model.config.quantization_config
    if failure == "non-finite":
        with torch.no_grad():
            model.base_model.model.layers[0].self_attn.q_proj.adapters["default"]["lora"].lora_B.weight[0, 0] = float(
                "nan"
            )
    before = _logits(model) if failure == "unmergeable" else None
    with pytest.raises(ValueError, match="Nothing was merged"):
        model.merge_and_unload(dequantize=True)
    after = {n: m for n, m in model.base_model.named_modules() if quant_backend(m) is not None}
    assert after.keys() == layers.keys() and all(after[n] is layers[n] for n in layers)
    assert model.base_model.config.quantization_config  # still marked quantized
    assert not any(h.merged_adapters for _, h in model.adapter_hosts())
    if before is not None:
        torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


@pytest.mark.parametrize("quantization", ["nf4", "int8", "torchao-int8"])
def test_checkpoints_move_between_the_quantized_and_the_float_base(llama_folder, tmp_path, quantization) -> None:
    torch.manual_seed(0)
    on_quantized = sp.get_peft_model(_load(llama_folder, quantization), METHODS["lora"]())
    on_quantized.save_pretrained(tmp_path / "from-quantized")
    on_float = sp.PeftModel.from_pretrained(_load(llama_folder, None), tmp_path / "from-quantized")
    for (name, p), (_, q) in zip(on_quantized.adapter_parameters(), on_float.adapter_parameters(), strict=True):
        assert torch.equal(p, q), name
    on_float.save_pretrained(tmp_path / "from-float")
    back = sp.PeftModel.from_pretrained(_load(llama_folder, quantization), tmp_path / "from-float")
    torch.testing.assert_close(_logits(back), _logits(on_quantized), rtol=0, atol=0)


def _same_4bit_kernels(model: nn.Module) -> nn.Module:
    for module in model.modules():  # not bitsandbytes' CPU inference repacking, which only one side would take
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def test_a_dequantizing_merge_refuses_an_unreadable_quantized_layer_before_swapping_any(llama_folder) -> None:
    model = sp.get_peft_model(_load(llama_folder, "nf4"), METHODS["lora"]())
    model.base_model.model.add_module("packed", GPTQStyleLinear())  # found last, after every 4-bit layer
    layers = {n: m for n, m in model.base_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    with pytest.raises(TypeError, match="'model.packed' is a .*GPTQStyleLinear"):
        model.merge_and_unload(dequantize=True)
    now = {n: m for n, m in model.base_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert now.keys() == layers.keys() and all(now[n] is layers[n] for n in layers)


def test_a_dequantizing_merge_keeps_what_cannot_merge_adapted_on_the_float_base(llama_folder) -> None:
    model = sp.get_peft_model(_load(llama_folder, "nf4"), [METHODS["lora"](), METHODS["surm-adapter"]()])
    unmerged = _logits(model)
    merged = model.merge_and_unload(dequantize=True, keep_unmergeable=True)
    assert not any(quant_backend(m) is not None for m in merged.modules())
    kept = [n for n, m in merged.named_modules() if isinstance(m, AdaptedLayer)]
    assert kept and all(n.endswith("o_proj") for n in kept)  # the SURM adapters, still acting
    assert (_logits(merged) - unmerged).abs().max().item() < 1e-2


def test_a_dequantizing_merge_on_a_bf16_qlora_base_gives_bf16_layers(llama_folder) -> None:
    """QLoRA as usually loaded (4-bit layers computing in bf16, the rest of the model in bf16): the float
    layers that replace the 4-bit ones share the model's dtype, so the merged model runs."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(
            llama_folder, quantization_config=config, device_map="cpu", dtype=torch.bfloat16
        ).eval()
    model = sp.get_peft_model(base, METHODS["lora"]())
    unmerged = _logits(model)
    merged = model.merge_and_unload(dequantize=True)
    linears = [m for n, m in merged.named_modules() if n.endswith("proj")]
    assert linears and all(type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 for m in linears)
    assert (_logits(merged) - unmerged).abs().max().item() < 5e-2  # bf16 rounding of the merged weights


def test_only_the_layers_a_merge_wrote_report_a_requantization_error(llama_folder) -> None:
    model = sp.get_peft_model(_load(llama_folder, "nf4"), METHODS["lora"]())
    model.merge_adapter()
    model.unmerge_adapter()  # every layer now holds the error of that unmerge
    model.add_adapter("b", sp.LoraConfig(r=2, target_modules=["q_proj"], init_weights=False))
    with pytest.warns(UserWarning, match="requantizing the 2 merged layers") as record:
        merged = model.merge_and_unload(adapter_names=["b"])
    assert any("requantizing the 2 merged layers" in str(w.message) for w in record)
    reported = [n for n, m in merged.named_modules() if hasattr(m, "requantization_error")]
    assert len(reported) == 2 and all(n.endswith("q_proj") for n in reported), reported


@pytest.mark.parametrize(("saved_on", "loaded_on"), [("nf4", "nf4"), ("nf4", None), (None, "nf4")])
def test_hf_peft_and_structpeft_lora_checkpoints_cross_between_quantized_and_float_bases(
    llama_folder, tmp_path, saved_on, loaded_on
) -> None:
    """An HF PEFT QLoRA checkpoint in structpeft and a structpeft one in HF PEFT, each on the base it was
    trained on and on the other: the same logits as the writing library on that base."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False)
    theirs = peft.get_peft_model(_load(llama_folder, saved_on), config).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours = sp.PeftModel.from_pretrained(_load(llama_folder, loaded_on), tmp_path / "hf")
    reference = _same_4bit_kernels(peft.PeftModel.from_pretrained(_load(llama_folder, loaded_on), tmp_path / "hf"))
    torch.testing.assert_close(_logits(ours), _logits(reference.eval()), rtol=1e-5, atol=1e-5)
    with ours.disable_adapter():
        assert (_logits(ours) - _logits(reference.eval())).abs().max() > 1e-2  # the adapter acts

    torch.manual_seed(1)
    mine = sp.get_peft_model(_load(llama_folder, saved_on), METHODS["lora"]()).eval()
    mine.save_pretrained(tmp_path / "ours")
    in_peft = _same_4bit_kernels(peft.PeftModel.from_pretrained(_load(llama_folder, loaded_on), tmp_path / "ours"))
    again = sp.PeftModel.from_pretrained(_load(llama_folder, loaded_on), tmp_path / "ours")
    torch.testing.assert_close(_logits(in_peft.eval()), _logits(again), rtol=1e-5, atol=1e-5)


def test_a_quantized_layer_without_a_backend_is_refused_by_name() -> None:
    class PackedLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.in_features, self.out_features = 8, 4
            self.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.uint8), requires_grad=False)

    model = nn.Sequential(PackedLinear())
    with pytest.raises(
        TypeError, match=r"PackedLinear with a Parameter \(torch.uint8\) 'weight': a quantized layer .* bitsandbytes"
    ):
        sp.get_peft_model(model, sp.LoraConfig(target_modules=["0"]))


class GPTQStyleLinear(nn.Module):
    """A quantized linear as GPTQ and AWQ layers are: packed int32 buffers and float scales, no parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 64, 32
        self.register_buffer("qweight", torch.zeros(8, 32, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(1, 32, dtype=torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : self.out_features]


@pytest.mark.parametrize("targets", [["1"], "all-linear"])
def test_a_buffer_only_quantized_layer_is_refused_by_name_when_targeted_or_swept(targets) -> None:
    model = nn.Sequential(nn.Linear(64, 64), GPTQStyleLinear(), nn.Linear(32, 8))
    with pytest.raises(TypeError, match=r"module '1' is a .*GPTQStyleLinear with a Tensor \(torch.int32\) 'qweight'"):
        sp.get_peft_model(model, sp.LoraConfig(target_modules=targets))
    assert not any(isinstance(m, AdaptedLayer | ModuleAdapters) for m in model.modules())  # nothing attached
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen


def test_the_dense_weight_of_a_4bit_layer_is_the_one_it_computes_with(llama_folder) -> None:
    """bitsandbytes repacks a 4-bit weight at its first CPU inference forward; the dense weight is then read
    off the layer, and must match what it computes before and after."""
    model = _load(llama_folder, "nf4")
    layer = model.model.layers[0].mlp.down_proj
    before = dense_weight(layer)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        y = layer(x)  # repacks on CPUs with AVX512-BF16
    after = dense_weight(layer)
    torch.testing.assert_close(after, before, atol=2e-3, rtol=0)
    torch.testing.assert_close(y, x @ after.T, atol=5e-3, rtol=0)  # the repacked kernel computes in bfloat16


def test_an_inference_pass_leaves_later_gradients_right(llama_folder) -> None:
    """bitsandbytes 0.50.2 repacks a 4-bit weight at its first CPU inference forward into a layout whose kernel
    has no backward: gradients through the layer were then dropped (measured on this model: the embedding's
    gradient norm 1.14 where it is 3.05). A model with adapters keeps the training layout."""

    def gradients(validate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = sp.get_peft_model(_load(llama_folder, "nf4"), METHODS["lora"]())
        if validate_first:
            _logits(model.eval())  # a validation pass: eval mode, no grad
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(input_ids=IDS, labels=IDS).loss.backward()
        return {n: p.grad for n, p in model.adapter_parameters()}

    fresh, after_validation = gradients(False), gradients(True)
    for name, grad in fresh.items():
        torch.testing.assert_close(after_validation[name], grad, msg=name)


# -- the command line ---------------------------------------------------------------------------------
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_finetune_quantize_trains_and_the_run_evaluates_generates_and_exports(tmp_path, quantization, capsys) -> None:
    from structpeft.workflow.cli import main
    from tests import workflow_fixtures as fx

    decoder = fx.save_decoder(tmp_path / "llama", "llama", chat_template=fx.CHAT_TEMPLATE, hidden_size=128)
    chat = fx.write_jsonl(tmp_path / "chat.jsonl", fx.conversations(24))
    code, metrics = fx.finetune(tmp_path, "--model", str(decoder), "--task", str(chat), "--quantize", quantization)
    assert code == 0 and metrics["status"] == "finished"
    assert metrics["val"]["loss"] < metrics["base_val"]["loss"] and metrics["spec"]["quantize"] == quantization
    run = str(tmp_path / "run")
    assert main(["evaluate", "--adapter", run, "--split", "val"]) == 0
    assert main(["generate", "--adapter", run, "--prompt", "the film", "--max-new-tokens", "3"]) == 0
    assert main(["export", "--adapter", run, "--out", str(tmp_path / "lora")]) == 0  # LoRA: exact, float32
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    assert main(["export", "--adapter", run, "--format", "gguf", "--out", str(tmp_path / "lora.gguf")]) == 0
    assert (tmp_path / "lora.gguf").stat().st_size > 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main(["finetune", "--model", str(decoder), "--task", str(chat), "--quantize", "int4"])
    assert refused.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


def test_finetune_in_bf16_on_a_4bit_base_computes_in_bf16_and_learns(tmp_path, monkeypatch) -> None:
    from structpeft.workflow import run
    from tests import workflow_fixtures as fx

    decoder = fx.save_decoder(tmp_path / "llama", "llama", chat_template=fx.CHAT_TEMPLATE, hidden_size=128)
    chat = fx.write_jsonl(tmp_path / "chat.jsonl", fx.conversations(24))
    loaded_dtypes = []
    load_model = run.load_model

    def recording(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        loaded_dtypes.extend({m.compute_dtype for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)})
        return loaded

    monkeypatch.setattr(run, "load_model", recording)
    code, metrics = fx.finetune(
        tmp_path, "--model", str(decoder), "--task", str(chat), "--quantize", "fp4", "--bf16", "--lr", "0.01"
    )
    assert code == 0 and metrics["status"] == "finished" and metrics["spec"]["bf16"] is True
    assert loaded_dtypes == [torch.bfloat16]  # every 4-bit layer computes in bf16
    assert metrics["val"]["loss"] < metrics["base_val"]["loss"]


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["lora", "kernel-mix"])
def test_a_classifier_on_a_quantized_base_trains_its_new_head_in_float(tmp_path, quantization, method) -> None:
    """The new head bitsandbytes gave a 4/8-bit layer class, with weights it never quantized (they were not in
    the checkpoint), is a float nn.Linear: trained whole, saved, and the run evaluates to its own test score."""
    from structpeft.workflow import run
    from tests import workflow_fixtures as fx

    encoder = fx.save_text_encoder(tmp_path / "bert", dropout=0.0)
    data = fx.write_csv(tmp_path / "reviews.csv", fx.sentences(80))
    args = ("--model", str(encoder), "--task", str(data), "--method", method, "--quantize", quantization)
    code, metrics = fx.finetune(tmp_path, *args)
    assert code == 0 and metrics["status"] == "finished"
    spec = run._spec_of(tmp_path / "run")
    task, loaded = run._load(spec)
    assert loaded.head == ["classifier"] and type(loaded.model.classifier) is nn.Linear
    assert quant_backend(loaded.model.bert.encoder.layer[0].attention.self.query) is not None  # the rest is quantized
    assert run.evaluate_run(tmp_path / "run") == pytest.approx(metrics["test"])


@pytest.mark.parametrize("double", [False, True])
def test_the_speed_suite_counts_a_4bit_layers_bytes(double) -> None:
    """Half a byte per weight, plus one scale per block of 64: float32 scales, or (double quantization) uint8
    scales with their own float32 scales per 256 and a 256-entry code."""
    from structpeft.workflow.speed import weight_bytes

    layer = bnb.nn.Linear4bit(256, 128, bias=False, quant_type="nf4", compress_statistics=double)
    layer.weight = bnb.nn.Params4bit(torch.randn(128, 256), quant_type="nf4", compress_statistics=double)
    layer = layer.to("cpu")
    blocks = 128 * 256 // 64
    code = 16 * 4  # the 16 NF4 values, float32
    scales = blocks * 1 + (2 * 4 + 256 * 4) if double else blocks * 4
    assert weight_bytes(layer) == 128 * 256 // 2 + scales + code
    assert weight_bytes(nn.Linear(256, 128, bias=False)) == 128 * 256 * 4
