"""Adapters under FSDP2 (``fully_shard``), two CPU processes on gloo: see tests/fsdp_worker.py."""

from __future__ import annotations

import pytest

from tests.torchrun import torchrun

pytest.importorskip("torch.distributed.fsdp")


def test_fsdp2_trains_like_ddp_and_saves_exports_and_merges_whole_tensors(tmp_path) -> None:
    done = torchrun("tests/fsdp_worker.py", str(tmp_path), timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    assert "rank 0 ok" in done.stdout and "rank 1 ok" in done.stdout
    assert (tmp_path / "sharded0" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "sharded_lora0" / "adapter_config.json").is_file()
