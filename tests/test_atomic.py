"""Saves are all or nothing: a process killed at any moment of a save leaves the old checkpoint or
the new one, loadable, never a mix; and the next save clears what the killed one left."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

import structpeft as sp
from structpeft.core import atomic
from structpeft.core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from tests.models import MLP

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child process")


def _in_child(work) -> int:
    """Run ``work`` in a forked child that never returns into pytest; the child's pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            work()
        finally:
            os._exit(0)
    return pid


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _view(directory: Path) -> dict[str, bytes]:
    """The files a reader sees in ``directory`` (through the commit folder of a cut-short write)."""
    names = {p.name for p in directory.iterdir() if p.is_file()}
    if (directory / atomic.COMMIT_NAME).is_dir():
        names |= {p.name for p in (directory / atomic.COMMIT_NAME).iterdir()}
    return {n: atomic.committed_path(directory, n).read_bytes() for n in names}


def _write_version(directory: Path, version: int) -> None:
    with atomic.atomic_write_dir(directory) as staging:
        for name in ("a.bin", "b.bin", "c.json"):
            (staging / name).write_bytes(f"{name} version {version}\n".encode() * 1000)


def _expected(version: int) -> dict[str, bytes]:
    return {n: f"{n} version {version}\n".encode() * 1000 for n in ("a.bin", "b.bin", "c.json")}


def test_an_exception_inside_the_block_changes_nothing_and_leaves_nothing(tmp_path) -> None:
    _write_version(tmp_path, 1)
    with pytest.raises(RuntimeError, match="midway"), atomic.atomic_write_dir(tmp_path) as staging:
        (staging / "a.bin").write_bytes(b"half")
        raise RuntimeError("midway")
    assert _view(tmp_path) == _expected(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin", "c.json"]


@pytest.mark.parametrize("step", range(5))
def test_a_crash_at_each_rename_leaves_old_or_new_and_the_next_write_cleans_up(tmp_path, monkeypatch, step) -> None:
    """The child dies (os._exit, no clean-up) at the ``step``-th rename of a write: the commit, then
    the three moves into place; step 4 is past the last rename, so that write completes."""
    _write_version(tmp_path, 1)
    renames = {"count": 0}

    def dying(real):
        def call(*args, **kwargs):
            if renames["count"] == step:
                os._exit(9)
            renames["count"] += 1
            return real(*args, **kwargs)

        return call

    def work() -> None:
        monkeypatch.setattr(atomic.os, "rename", dying(os.rename))
        monkeypatch.setattr(atomic.os, "replace", dying(os.replace))
        _write_version(tmp_path, 2)

    _, status = os.waitpid(_in_child(work), 0)
    crashed = os.waitstatus_to_exitcode(status) == 9
    assert crashed == (step < 4)
    view = _view(tmp_path)
    assert view in (_expected(1), _expected(2))
    if crashed and step == 0:  # died before the commit point: the old set
        assert view == _expected(1)
    if crashed and step > 0:  # died after it: readers already see the new set
        assert view == _expected(2)
    _write_version(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin", "c.json"]
    assert _view(tmp_path) == _expected(3)


def _filled_lora(alpha: float) -> sp.PeftModel:
    """A LoRA whose every weight equals ``alpha``, so a checkpoint's tensors say which config they belong to."""
    model = sp.get_peft_model(MLP(), sp.LoraConfig(r=2, alpha=alpha, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.fill_(alpha)
    return model


def test_save_pretrained_killed_at_random_moments_leaves_a_whole_checkpoint(tmp_path) -> None:
    """SIGKILL a process that saves two different adapters in turn into one folder, at random
    moments, many times: each time the folder loads, and its weights belong to its config."""
    models = [_filled_lora(2.0), _filled_lora(5.0)]
    models[0].save_pretrained(tmp_path)
    seen_alphas = set()
    rng = random.Random(0)

    def save_forever() -> None:
        while True:
            for model in models[::-1]:  # the other version first: the folder holds models[0]'s
                model.save_pretrained(tmp_path)

    kills, started = 0, time.monotonic()
    while kills < 60 and time.monotonic() - started < 4.0:
        pid = _in_child(save_forever)
        time.sleep(rng.uniform(0.0, 0.08))
        _kill(pid)
        kills += 1
        configs, tensors = read_adapter(tmp_path)
        alpha = configs[0].alpha
        seen_alphas.add(alpha)
        assert all(torch.all(t == alpha) for t in tensors.values()), f"weights of another save than alpha={alpha}"
        loaded = sp.PeftModel.from_pretrained(MLP(), tmp_path)
        assert loaded.base_model.lin0.adapters["default"]["lora"].scaling == alpha / 2
    assert kills >= 10 and seen_alphas == {2.0, 5.0}
    models[1].save_pretrained(tmp_path)  # a save after the kills clears their leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert read_adapter(tmp_path)[0][0].alpha == 5.0


def test_saving_into_a_file_is_refused_before_writing(tmp_path) -> None:
    target = tmp_path / "out"
    target.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        _filled_lora(2.0).save_pretrained(target)
    assert target.read_text() == "not a folder"


def _training_state(value: float):
    """A LoRA model, its optimizer and schedule, and a run log, all saying ``value``."""
    from structpeft.workflow.train import RunLog

    model = sp.get_peft_model(MLP(), sp.LoraConfig(r=2, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(value)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=value)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, schedule, RunLog(steps=int(value))


def test_a_training_checkpoint_killed_at_random_moments_stays_whole(tmp_path) -> None:
    """The workflow's training checkpoints (weights, optimizer, RNG, position, log: four files) under
    SIGKILL at random moments of a save: each time the folder restores one save's state, whole."""
    from structpeft.workflow.checkpointing import Position, load_checkpoint, save_checkpoint

    states = [_training_state(2.0), _training_state(5.0)]

    def save(model, optimizer, schedule, log) -> None:
        position = Position(int(log.steps), int(log.steps), torch.Generator().get_state())
        best = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        save_checkpoint(tmp_path, model, optimizer, schedule, position, log, best)

    save(*states[0])

    def save_forever() -> None:
        while True:
            for state in states[::-1]:
                save(*state)

    rng, kills, seen, started = random.Random(0), 0, set(), time.monotonic()
    while kills < 60 and time.monotonic() - started < 4.0:
        pid = _in_child(save_forever)
        time.sleep(rng.uniform(0.0, 0.08))
        _kill(pid)
        kills += 1
        model, optimizer, schedule, log = _training_state(0.0)
        position, best = load_checkpoint(tmp_path, model, optimizer, schedule, log)
        value = float(log.steps)
        seen.add(value)
        assert position.epoch == position.batches_done == log.steps
        assert optimizer.param_groups[0]["lr"] == value  # the optimizer of the same save
        trained = [p for p in model.parameters() if p.requires_grad]
        assert all(torch.all(p == value) for p in trained) and all(torch.all(t == value) for t in best.values())
    assert kills >= 10 and seen == {2.0, 5.0}
    save(*states[1])  # a save after the kills clears their leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.safetensors",
        "optimizer.pt",
        "state.json",
        "trainable.safetensors",
    ]


def test_atomic_write_file_replaces_whole_and_cleans_up_on_error(tmp_path, monkeypatch) -> None:
    from structpeft.core.atomic import atomic_write_file

    target = tmp_path / "sub" / "run.json"
    atomic_write_file(target, b"old")
    atomic_write_file(target, b"new")
    assert target.read_bytes() == b"new"

    def failing_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr("structpeft.core.atomic.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_file(target, b"newer")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["run.json"]  # no temporary file left
