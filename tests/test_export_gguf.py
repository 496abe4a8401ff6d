"""Export to a llama.cpp LoRA adapter GGUF: the file read back key by key, and run in real llama.cpp (xllamacpp)
on a tiny LLaMA and a tiny Gemma 3 written as GGUF in the test, against transformers with the adapter."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import structpeft as sp
from structpeft.core.export_gguf import llama_rope_rows
from tests.gguf_files import (
    assert_same_top5,
    llamacpp_top5,
    tiny_gemma3_for_gguf,
    tiny_llama_for_gguf,
    top5_shift,
    torch_top5,
    write_gguf,
)

gguf = pytest.importorskip("gguf")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [[5, 70, 80, 90, 100], [33, 34, 35], [200, 12, 7, 64, 64, 90, 3]]
BUILDS = {"llama": tiny_llama_for_gguf, "gemma3": tiny_gemma3_for_gguf}


def _adapted(arch: str, configs, amplify: float = 1.0):
    base = BUILDS[arch]()
    torch.manual_seed(1)
    model = sp.get_peft_model(copy.deepcopy(base), configs()).eval()
    with torch.no_grad():  # a clear effect on the log-probs, so that a no-op export cannot pass
        for _, p in model.adapter_parameters():
            p.mul_(amplify)
    return base, model


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_lora_in_llamacpp_gives_the_adapted_models_logprobs(tmp_path, arch) -> None:
    base, model = _adapted(
        arch, lambda: sp.LoraConfig(r=4, alpha=8, target_modules=PROJECTIONS, init_weights=False), amplify=4.0
    )
    assert top5_shift(model, base, PROMPTS) > 0.1
    base_file = write_gguf(base, tmp_path / "base.gguf", arch)
    report = model.export_gguf(tmp_path / "adapter.gguf")
    assert report.max_relative_error == 0.0 and {layer.rank for layer in report.layers} == {4}
    assert len(report.layers) == 2 * len(PROJECTIONS)
    assert_same_top5(llamacpp_top5(base_file, tmp_path / "adapter.gguf", PROMPTS), torch_top5(model, PROMPTS))
    assert_same_top5(llamacpp_top5(base_file, tmp_path / "adapter.gguf", PROMPTS, scale=0.0), torch_top5(base, PROMPTS))


OTHER_METHODS = [
    pytest.param(lambda: sp.FloraConfig(r=2, alpha=8, target_modules=PROJECTIONS, init_weights=False), id="flora"),
    pytest.param(
        lambda: sp.SurmConfig(structure="circulant", alpha=0.5, target_modules=PROJECTIONS, init_weights=False),
        id="surm-circulant",
    ),
    pytest.param(lambda: sp.KernelMixConfig(init_weights=False, dropout=0.0), id="kernel-mix"),
    pytest.param(
        lambda: [
            sp.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_weights=False),
            sp.FloraConfig(r=2, alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], init_weights=False),
        ],
        id="lora+flora-two-ranks",
    ),
]


@pytest.mark.parametrize("configs", OTHER_METHODS)
def test_other_weight_methods_go_through_the_svd_into_llamacpp(tmp_path, configs) -> None:
    base, model = _adapted("llama", configs, amplify=3.0)
    assert top5_shift(model, base, PROMPTS) > 0.1
    base_file = write_gguf(base, tmp_path / "base.gguf", "llama")
    report = model.export_gguf(tmp_path / "adapter.gguf", energy=1.0)  # every singular value: lossless
    assert report.max_relative_error < 1e-6
    assert_same_top5(llamacpp_top5(base_file, tmp_path / "adapter.gguf", PROMPTS), torch_top5(model, PROMPTS))


def _read(path) -> tuple[dict, dict[str, torch.Tensor]]:
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    return fields, tensors


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_file_holds_each_layers_update_under_llamacpps_names(tmp_path, arch) -> None:
    """Read back key by key: the adapter keys llama.cpp checks, one A/B pair per layer under llama.cpp's tensor
    names with A (r, d_in) and B (d_out, r), and (alpha / r) B A = ΔW once a LLaMA's q/k rows are put back."""
    configs = lambda: [  # noqa: E731 - two ranks, so alpha / r differs between layers
        sp.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_weights=False),
        sp.FloraConfig(r=2, alpha=3, target_modules=["gate_proj", "up_proj", "down_proj"], init_weights=False),
    ]
    _, model = _adapted(arch, configs)
    report = model.export_gguf(tmp_path / "adapter.gguf")  # both low rank by construction: written exactly
    assert report.max_relative_error == 0.0
    assert {(layer.name.rsplit(".", 1)[-1], layer.rank) for layer in report.layers} == {
        ("q_proj", 4), ("k_proj", 4), ("v_proj", 4), ("o_proj", 4), ("gate_proj", 2), ("up_proj", 2), ("down_proj", 2)
    }  # fmt: skip
    fields, tensors = _read(tmp_path / "adapter.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == arch
    alpha = fields["adapter.lora.alpha"]
    assert alpha == 4.0  # the commonest rank: 8 attention layers at 4, 6 MLP layers at 2
    llama_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    llama_names |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    config = model.base_model.config
    expected = set()
    for name, layer in model.adapter_hosts():
        block, projection = name.split(".")[2], name.rsplit(".", 1)[-1]
        key = f"blk.{block}.{llama_names[projection]}.weight"
        expected |= {f"{key}.lora_a", f"{key}.lora_b"}
        a, b = tensors[f"{key}.lora_a"].double(), tensors[f"{key}.lora_b"].double()
        d_out, d_in = layer.base_layer.weight.shape
        r = a.shape[0]
        assert a.shape == (r, d_in) and b.shape == (d_out, r)
        if arch == "llama" and projection in ("q_proj", "k_proj"):
            heads = config.num_attention_heads if projection == "q_proj" else config.num_key_value_heads
            b = _transformers_unpermute(b, heads)
        delta = sum(d.delta_weight(layer.base_layer) for d in layer.adapters["default"].values()).double()
        torch.testing.assert_close(alpha / r * b @ a, delta, atol=1e-5, rtol=1e-5)
    assert set(tensors) == expected


def _transformers_unpermute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' own inverse of llama.cpp's q/k row order (what its GGUF loader applies to a base)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    undone = LlamaTensorProcessor()._reverse_permute_weights(rows.numpy(), heads, heads)
    return torch.from_numpy(undone.copy())


@pytest.mark.parametrize("heads,d_head,d_in", [(4, 8, 32), (3, 64, 5), (1, 4, 1)])
def test_the_rope_row_order_is_the_one_transformers_undoes(heads, d_head, d_in) -> None:
    rows = torch.randn(heads * d_head, d_in, dtype=torch.float64)
    permuted = llama_rope_rows(rows, heads)
    assert not torch.equal(permuted, rows)
    torch.testing.assert_close(_transformers_unpermute(permuted, heads), rows, rtol=0, atol=0)


REFUSED = [
    pytest.param("llama", lambda: sp.CoeffConfig(), "acts on attention maps", id="coeff"),
    pytest.param(
        "llama",
        lambda: sp.SurmConfig(mode="adapter", target_modules=["o_proj"], init_weights=False),
        "on a layer's output",
        id="surm-adapter",
    ),
    pytest.param(
        "llama",
        lambda: sp.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "modules_to_save",
        id="modules-to-save",
    ),
    pytest.param(
        "gemma3",
        lambda: sp.LoraConfig(target_modules=["q_proj", "lm_head"], init_weights=False),
        "tied to the input embedding",
        id="tied-output-head",
    ),
    pytest.param("llama", lambda: sp.LoraConfig(target_modules=["embed_tokens"]), "embedding layer", id="embedding"),
]


@pytest.mark.parametrize("arch,configs,reason", REFUSED)
def test_what_llamacpp_cannot_apply_is_refused_and_nothing_written(tmp_path, arch, configs, reason) -> None:
    _, model = _adapted(arch, configs)
    with pytest.raises(ValueError, match=reason) as refused:
        model.export_gguf(tmp_path / "adapter.gguf", rank=4)
    assert "Nothing was written" in str(refused.value)
    assert not list(tmp_path.iterdir())


def test_an_architecture_llamacpp_has_no_name_for_is_refused(tmp_path) -> None:
    from tests.models import tiny_bert

    model = sp.get_peft_model(tiny_bert(), sp.LoraConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="no llama.cpp architecture known for model_type 'bert'"):
        model.export_gguf(tmp_path / "adapter.gguf")
    assert not list(tmp_path.iterdir())


def test_a_method_that_is_not_low_rank_needs_a_rank_or_an_energy(tmp_path) -> None:
    _, model = _adapted("llama", lambda: sp.SurmConfig(target_modules=["q_proj"], init_weights=False))
    with pytest.raises(ValueError, match="not low rank by construction: give a rank"):
        model.export_gguf(tmp_path / "adapter.gguf")
    with pytest.raises(ValueError, match="float32 or float16"):
        model.export_gguf(tmp_path / "adapter.gguf", rank=2, dtype=torch.bfloat16)
    assert not list(tmp_path.iterdir())
    model.export_gguf(tmp_path / "adapter.gguf", rank=2, dtype=torch.float16)
    _, tensors = _read(tmp_path / "adapter.gguf")
    assert {t.dtype for t in tensors.values()} == {torch.float16}


# -- the command line ---------------------------------------------------------------------------------
def test_export_gguf_takes_an_hf_peft_lora_and_llamacpp_runs_it(tmp_path, monkeypatch, capsys) -> None:
    """Any HF PEFT LoRA goes to llama.cpp: the checkpoint PEFT saved, put on the base GGUF by --model."""
    peft = pytest.importorskip("peft")
    from structpeft.workflow.cli import main

    monkeypatch.setenv("STRUCTPEFT_CACHE", str(tmp_path / "cache"))
    base = tiny_llama_for_gguf()
    base_file = write_gguf(base, tmp_path / "base.gguf", "llama")
    torch.manual_seed(2)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=PROJECTIONS, init_lora_weights=False)
    reference = peft.get_peft_model(copy.deepcopy(base), config).eval()
    reference.save_pretrained(tmp_path / "peft-lora")
    assert top5_shift(reference, base, PROMPTS) > 0.1
    out = tmp_path / "out" / "adapter.gguf"
    argv = ["export", "--adapter", str(tmp_path / "peft-lora"), "--model", str(base_file), "--format", "gguf"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "llama.cpp LoRA (GGUF) export to" in capsys.readouterr().out
    assert_same_top5(llamacpp_top5(base_file, out, PROMPTS), torch_top5(reference, PROMPTS))


def test_export_gguf_refuses_with_exit_2_and_one_line_before_writing(tmp_path, monkeypatch, capsys) -> None:
    from structpeft.workflow.cli import main

    monkeypatch.setenv("STRUCTPEFT_CACHE", str(tmp_path / "cache"))
    base = tiny_llama_for_gguf()
    base_file = write_gguf(base, tmp_path / "base.gguf", "llama")
    coeff = sp.get_peft_model(copy.deepcopy(base), sp.CoeffConfig())
    coeff.save_pretrained(tmp_path / "coeff")
    (tmp_path / "a-folder").mkdir()
    out = tmp_path / "out.gguf"
    cases = [
        (["--adapter", str(tmp_path / "coeff"), "--model", str(base_file)], "acts on attention maps"),
        (["--adapter", str(tmp_path / "coeff"), "--uniform-rank"], "--uniform-rank and --lora-bias are for"),
        (["--adapter", str(tmp_path / "coeff"), "--rank", "2", "--energy", "0.5"], "at most one of"),
        (["--adapter", str(tmp_path / "a-folder"), "--rank", "0"], "rank must be a positive integer"),
        (["--adapter", str(tmp_path / "a-folder"), "--energy", "1.5"], "energy must be in (0, 1]"),
        (["--adapter", str(tmp_path / "a-folder")], "neither a run folder"),
    ]
    for flags, reason in cases:
        capsys.readouterr()
        assert main(["export", "--format", "gguf", "--out", str(out), *flags]) == 2
        lines = capsys.readouterr().err.strip().splitlines()  # the base's loading progress, then the error
        assert lines[-1].startswith("structpeft export: error:") and reason in lines[-1], lines
        assert sum("error" in line for line in lines) == 1
        assert not out.exists()
    assert main(["export", "--format", "gguf", "--adapter", str(tmp_path / "coeff"), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    peft_out = tmp_path / "peft-lora"
    assert main(["export", "--adapter", str(tmp_path / "coeff"), "--out", str(peft_out), "--dtype", "float16"]) == 2
    assert "--dtype float16 is for --format gguf" in capsys.readouterr().err and not peft_out.exists()
    saved = json.loads((tmp_path / "coeff" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"]  # what an adapter folder's export falls back to without --model


def test_a_bias_shift_is_refused_before_any_factoring(tmp_path, monkeypatch) -> None:
    """Kernel-mix's head biases on GPT-2's biased projections: llama.cpp's LoRA has no bias, refused by name
    before any SVD runs."""
    from structpeft.core import export
    from tests.models import tiny_gpt2

    model = sp.get_peft_model(tiny_gpt2(), sp.KernelMixConfig(init_weights=False, dropout=0.0))
    monkeypatch.setattr(export, "_svd", lambda *a: pytest.fail("factored before refusing"))
    with pytest.raises(ValueError, match=r"also shifts the biases of transformer\.h\.0\.attn\.c_attn"):
        model.export_gguf(tmp_path / "adapter.gguf", rank=4)
    assert not list(tmp_path.iterdir())
