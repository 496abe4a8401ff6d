"""A run killed with SIGKILL mid-epoch and resumed ends with the same adapter as an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import workflow_fixtures as fx


def command(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "structpeft.workflow.cli",
        "finetune",
        "--model",
        str(model),
        "--task",
        str(data),
        "--method",
        "lora",
        "--set",
        "dropout=0.1",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--val-size",
        "8",
        "--lr",
        "0.01",
        "--quiet",
        "--out",
        str(out),
        "--results",
        str(out.parent / "results.jsonl"),
        *extra,
    ]


def steps_saved(out: Path) -> int:
    state = out / "checkpoint" / "state.json"
    try:
        return json.loads(state.read_text())["log"]["steps"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_adapter(tmp_path) -> None:
    model = fx.save_text_encoder(tmp_path / "bert")
    data = fx.write_csv(tmp_path / "reviews.csv", fx.sentences(160))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    whole = tmp_path / "whole"
    subprocess.run(command(model, data, whole, "--save-every", "3"), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    target = random.Random(os.getpid()).randint(3, 50)  # of 2 x 37 steps: in the first epoch or the second
    process = subprocess.Popen(
        command(model, data, killed, "--save-every", "3"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while steps_saved(killed) < target and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (
        not (killed / "metrics.json").exists()
        or json.loads((killed / "metrics.json").read_text())["status"] != "finished"
    )
    done = steps_saved(killed)
    assert 0 < done < 74, f"killed after {done} steps: the kill came too late to test anything"
    resumed = subprocess.run(command(model, data, killed, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {done}" in resumed.stdout
    a, b = load_file(str(whole / "adapter_model.safetensors")), load_file(str(killed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name  # bit for bit
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (whole, killed))
    assert first["test"] == second["test"] and first["history"] == second["history"]
    assert not list(killed.glob("checkpoint/.structpeft-*"))  # no leftovers of interrupted saves


def test_resume_without_a_checkpoint_is_a_usage_error(tmp_path, capsys) -> None:
    from structpeft.workflow.cli import main

    assert main(["finetune", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "--resume needs --out naming a run folder" in capsys.readouterr().err


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # accelerate's --cpu with several processes wants MPI and otherwise starts one process; its
    # torchrun-style launcher (--multi_gpu) starts N, and on a machine without CUDA they join over gloo.
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}  # fmt: skip


@pytest.mark.parametrize(
    ("launcher", "method"),
    [("torchrun", "coeff+lora"), ("accelerate", "coeff+lora"), ("torchrun", "kernel-mix+surm")],
)
def test_two_processes_train_as_one(tmp_path, launcher, method) -> None:
    """DDP over 2 gloo processes (torchrun or accelerate launch) with the same global batch and seed
    gives the one-process adapter (no dropout anywhere: the ranks draw other random numbers than one
    process does)."""
    if launcher == "accelerate":
        pytest.importorskip("accelerate", reason="pip install accelerate")
    model = fx.save_text_encoder(tmp_path / "bert", dropout=0.0)
    data = fx.write_csv(tmp_path / "reviews.csv", fx.sentences(60))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = [
        "--model",
        str(model),
        "--task",
        str(data),
        "--method",
        method,
        "--batch-size",
        "7",
        "--val-size",
        "8",
        "--lr",
        "0.01",
        "--set",
        "dropout=0",
        "--quiet",
    ]
    one = [sys.executable, "-m", "structpeft.workflow.cli", "finetune", *flags, "--out", str(tmp_path / "one")]
    subprocess.run([*one, "--results", str(tmp_path / "r1.jsonl")], check=True, env=env, capture_output=True)
    two = [
        *LAUNCHERS[launcher],
        "-m",
        "structpeft.workflow.cli",
        "finetune",
        *flags,
        "--out",
        str(tmp_path / "two"),
        "--results",
        str(tmp_path / "r2.jsonl"),
    ]
    done = subprocess.run(two, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any((t != 0).any() for t in a.values())
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name
    assert len((tmp_path / "r2.jsonl").read_text().splitlines()) == 1  # only rank 0 writes
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["processes"] == 2
