"""Adapters under FSDP2 (``fully_shard``), two CPU processes on gloo: see tests/fsdp_worker.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed.fsdp")


def test_fsdp2_trains_like_ddp_and_saves_exports_and_merges_whole_tensors(tmp_path) -> None:
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo / "src"), str(repo)]), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "tests/fsdp_worker.py",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    assert "rank 0 ok" in done.stdout and "rank 1 ok" in done.stdout
    assert (tmp_path / "sharded0" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "sharded_lora0" / "adapter_config.json").is_file()
