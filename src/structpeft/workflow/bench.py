"""``structpeft bench``: head-to-head suites, each method on its home ground, through one loop.

A suite is data (:data:`SUITES`): settings (model, task, data sizes, epochs) and the methods to run:
ours at two parameter budgets (picked by :func:`run.size_for`, sized to a reference's adapter), ours
at their own fixed size, and references (linear probe, full fine-tuning, HF PEFT's LoRA, LoHa and C3A).

Protocol, the same for every method: the learning rate is chosen on the validation split from a grid
of three values around the method's default, with seed 0 (only validation scores are read); the
final runs use seeds 0..N-1 at the chosen rate (seed 0 is the search run itself: the same spec) and
each scores the test split once. Search runs do not score it; the chosen one is scored once chosen,
from the weights it saved in its folder (its best epoch's, which a run scores at its end).

The results store (``OUT/results.jsonl``, one row per finished run) is the cache: a run whose folder
(``OUT/runs/<suite>/<setting>/<method>[@budget]/lr<lr>-seed<seed>``) has a finished row is not run
again, so an interrupted bench resumes where it stopped. Sizes are cached in ``OUT/plan.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from structpeft.core import method_cards
from structpeft.workflow import recipes, results, run
from structpeft.workflow.distributed import launched_processes

LR_FACTORS = (1 / 3, 1.0, 3.0)  # the grid around a method's default learning rate
LR_EDGE_STEP = 3.0  # how far beyond an edge of the grid a setting's extra learning rates go
DIVERGED = "diverged"  # marks a search run whose training loss became non-finite
QUICK_FIELDS = {"train_size": 64, "test_size": 64, "val_size": 16, "epochs": 1, "batch_size": 16, "max_length": 32}
QUICK_GENERATIONS = 8  # --quick's ROUGE-L sample
# Spec fields that do not change what a run computes (where it writes, how it shows progress, extra scores).
NOT_IN_KEY = {"out", "results", "progress", "device", "resume", "save_every", "score_test", "score_base"}
# Test metrics a leaderboard shows: (heading, scale, decimals); all but the losses are higher-is-better.
METRICS = {
    "accuracy": ("accuracy %", 100, 2),
    "rougeL": ("ROUGE-L", 100, 2),
    "loss": ("test loss", 1, 4),
}
PLAN_FILE, STORE_FILE, RESULTS_FILE, LEADERBOARD_FILE = "plan.json", "results.jsonl", "results.json", "leaderboard.md"


class StoreMismatch(run.UsageError):
    """The store has a run in the folder a planned run would use, made with other settings."""


@dataclass(frozen=True)
class Setting:
    """One model on one task at one data size."""

    name: str
    model: str
    task: str
    train_size: int | None = None  # None: the whole train split
    test_size: int | None = None
    val_size: float = 0.1  # a fraction of the whole train split (before train_size), or a count
    epochs: int = 1
    batch_size: int = 32
    max_length: int = 64
    image_size: int | None = None
    quick_image_size: int | None = None  # --quick's (small, and a multiple of a ViT's patch)
    quick_max_length: int | None = None  # --quick's, where QUICK_FIELDS' would cut every answer
    metrics: tuple[str, ...] = ("accuracy",)  # test metrics shown; the first ranks the leaderboard
    rouge_sample: int = 0  # causal LM: ROUGE-L of greedy completions of this many test prompts
    lr_factors: tuple[float, ...] = LR_FACTORS  # the lr grid: a method's default times these
    # a best lr (on validation) at an edge of the grid earns up to this many more, LR_EDGE_STEP apart, beyond it
    lr_edge_steps: int = 0
    # what the lr is chosen by on validation: "accuracy" (then the lower loss), or "loss" alone, where the
    # validation split is too small for accuracy to see more than a few rows' difference
    choose_by: str = "accuracy"


@dataclass(frozen=True)
class Budget:
    """A parameter budget: the adapter size of ``method`` with ``settings`` on the setting's model."""

    name: str
    method: str
    settings: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    name: str
    about: str
    settings: tuple[Setting, ...]
    sized: tuple[str, ...]  # ours, at each budget
    fixed: tuple[str, ...]  # ours whose size is their own (SURM circulant, Coeff-Tuning)
    references: tuple[str, ...]
    budgets: tuple[Budget, ...]


def _ours(family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(sized, fixed): every method card's bench entries whose methods all have defaults for ``family``."""
    cards = method_cards()

    def covered(entry: str) -> bool:
        return all(name in cards and family in cards[name].defaults for name, _ in recipes.split_method(entry))

    sized = tuple(entry for card in cards.values() for entry in card.bench_sized if covered(entry))
    fixed = tuple(entry for card in cards.values() for entry in card.bench_fixed if covered(entry))
    return sized, fixed


def _unit_budget(k: int) -> Budget:
    """The budget of the budget-unit method (LoRA) at its k-th size: ``lora-r8`` is LoRA r=8's adapter size."""
    unit = next(card for card in method_cards().values() if card.budget_unit)
    return Budget(f"{unit.name}-r{k}", unit.name, {key: str(v) for key, v in unit.size(k).items()})


_REFERENCES = ("probe", "full", "hf-lora", "hf-loha", "hf-c3a")
_TRANSFORMER_BUDGETS = (Budget("c3a", "hf-c3a"), _unit_budget(8))


def _vision(model: str, image_size: int, quick_image_size: int, main_size: int = 1600) -> tuple[Setting, ...]:
    """A main setting of ``main_size`` images and a low-data one of 400 (SURM claims its largest gains
    with little data); validation is a quarter of the training size in both.

    Sized toward the budget: a suite runs 5 runs (3 learning rates, 2 more seeds) of every entry in
    every setting, about 170 runs; 90 minutes on 2 CPU cores leave a run about 30 s. (Measured on
    DINOv2-S with 1,600 main images: 96 minutes, so the vit suite's main setting has 1,200.)"""
    common = {
        "model": model,
        "task": "fashion-mnist",
        "test_size": 1000,
        "image_size": image_size,
        "quick_image_size": quick_image_size,
    }
    return (
        Setting(f"{model}/{main_size}", train_size=main_size, val_size=main_size // 4, epochs=1, **common),
        Setting(f"{model}/400", train_size=400, epochs=2, batch_size=16, val_size=100, **common),
    )


def _main_settings_first(*per_model: tuple[Setting, ...]) -> tuple[Setting, ...]:
    """Every model's main setting before any low-data one: a suite stopped early still compares the models."""
    return tuple(setting for same_kind in zip(*per_model, strict=True) for setting in same_kind)


def _decoder(model: str) -> tuple[Setting, ...]:
    """Two generation tasks on a decoder: definitions (ranked by ROUGE-L of greedy completions, with the
    loss per answer token) and sentiment answered in one word (accuracy: the likelier label word).

    Sized toward a 2-hour budget that it does not meet on 2 CPU cores: 15 entries that train, 5 runs each (6
    where the edge step runs), on 2 tasks is 150-180 runs, and one step of every entry on 8 rows takes about
    a minute (SmolLM2; in ``--quick`` HF C3A's step is 3-4x LoRA's and SURM-LDR rank 6's about 7x). Each run
    takes 16 (definitions) and 12 (sentiment) steps of 8 rows; validation is 48 rows, test 200 (ROUGE-L on 64
    of them). Fewer steps would fit the budget and train too little to tell the methods apart.

    The learning rates: the decoder defaults were set on 63 steps of 16 rows, and on these 16 steps of 8 every
    entry of a first full run chose the top of the default × (1/3, 1, 3) grid; here the grid is the default ×
    (1, 3, 9), and a best lr at an edge earns one more beyond it (all chosen on validation). Both settings
    choose by validation loss: on 48 rows accuracy moves in steps of two points, and on sentiment it chose,
    by a review or four, rates that had barely trained (test losses 3-4x the others')."""
    common = {
        "model": model,
        "epochs": 1,
        "batch_size": 8,
        "val_size": 48,
        "test_size": 200,
        "lr_factors": (1.0, 3.0, 9.0),
        "lr_edge_steps": 1,
        "choose_by": "loss",
    }
    return (
        Setting(
            f"{model}/definitions", task="wordnet-definitions", train_size=128, max_length=96, quick_max_length=96,
            metrics=("rougeL", "loss"), rouge_sample=64, **common,
        ),
        Setting(
            f"{model}/sentiment", task="rotten-tomatoes-generation", train_size=96, max_length=128,
            quick_max_length=128, metrics=("accuracy", "loss"), **common,
        ),
    )  # fmt: skip


SUITES: dict[str, Suite] = {
    "text": Suite(
        "text", "MiniLM on Rotten Tomatoes",
        (Setting("minilm", "minilm", "rotten-tomatoes", train_size=1200, val_size=300, test_size=1000),),
        *_ours("text-encoder"), _REFERENCES, _TRANSFORMER_BUDGETS,
    ),
    "conv": Suite(
        "conv", "MobileNetV2 and EfficientNet-Lite0 on Fashion-MNIST (depthwise and pointwise convs: FLoRA's home)",
        _main_settings_first(_vision("mobilenet_v2", 64, 32), _vision("efficientnet_lite0", 64, 32)),
        *_ours("convnet"), ("probe", "full", "hf-lora", "hf-loha"),
        # a convnet has no layer C3A adapts (it takes linear layers): the small budget is LoRA r=1's
        (_unit_budget(1), _unit_budget(8)),
    ),
    "vit": Suite(
        "vit", "DINOv2-S on Fashion-MNIST (Coeff-Tuning's home)",
        _vision("dinov2_small", 56, 28, main_size=1200),
        *_ours("vit"), _REFERENCES, _TRANSFORMER_BUDGETS,
    ),
    "llm": Suite(
        "llm", "SmolLM2-135M-Instruct generating definitions and one-word sentiment (Kernel-mix's home: generation)",
        _decoder("smollm2-135m"),
        *_ours("decoder"), ("zero-shot", "hf-lora", "hf-loha", "hf-c3a"), _TRANSFORMER_BUDGETS,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """A row of the leaderboard: a method at a size."""

    label: str  # method, or method@budget
    method: str
    budget: str | None
    settings: dict[str, str]


@dataclass
class Options:
    seeds: int = 3
    quick: bool = False
    out: Path = Path("bench")
    device: str = "auto"
    command: str | None = None


def settings_of(suite: Suite, quick: bool) -> list[Setting]:
    """The suite's settings; ``--quick``: one per model and task, on tiny subsets."""
    if not quick:
        return list(suite.settings)
    first = {(s.model, s.task): s for s in reversed(suite.settings)}
    tasks_per_model = {m: sum(key[0] == m for key in first) for m in dict.fromkeys(s.model for s in suite.settings)}
    return [
        quick_setting(first[key], named_by_task=tasks_per_model[key[0]] > 1)
        for key in dict.fromkeys((s.model, s.task) for s in suite.settings)
    ]


def quick_setting(setting: Setting, named_by_task: bool = False) -> Setting:
    name = Path(setting.model).name + (f"-{Path(setting.task).name}" if named_by_task else "")
    return replace(
        setting,
        name=f"{name}-quick",
        **{**QUICK_FIELDS, "max_length": setting.quick_max_length or QUICK_FIELDS["max_length"]},
        image_size=setting.quick_image_size,
        rouge_sample=min(setting.rouge_sample, QUICK_GENERATIONS),
    )


def lr_grid(default: float, quick: bool, factors: tuple[float, ...] = LR_FACTORS) -> list[float]:
    return [default] if quick else [_rounded(default * f) for f in factors]


def _rounded(lr: float) -> float:
    return float(f"{lr:.3g}")


def beyond_edge(grid: list[float], chosen: float) -> float | None:
    """The next learning rate to try when ``chosen`` is the grid's largest or smallest, else None."""
    if len(grid) < 2 or min(grid) < chosen < max(grid):
        return None
    return _rounded(chosen * LR_EDGE_STEP if chosen == max(grid) else chosen / LR_EDGE_STEP)


def headline(setting: Setting | dict[str, Any]) -> str:
    """The test metric that ranks a setting's leaderboard."""
    metrics = setting.metrics if isinstance(setting, Setting) else setting.get("metrics", ["accuracy"])
    return metrics[0]


def choose_lr(val_by_lr: dict[float, dict[str, float]], by: str = "accuracy") -> float:
    """The learning rate with the best validation score: the higher accuracy, then the lower loss (``by``
    "accuracy"), or the lower loss alone (``by`` "loss"); test is never read."""
    if by not in ("accuracy", "loss"):
        raise ValueError(f"choose_by must be 'accuracy' or 'loss', got {by!r}")

    def score(lr: float) -> tuple[float, float]:
        val = val_by_lr[lr]
        if not val:
            raise ValueError(f"lr {lr:g}: the run has no validation score to choose by")
        loss = val["loss"]
        accuracy = val.get("accuracy", 0.0) if by == "accuracy" else 0.0
        return (accuracy, -loss if math.isfinite(loss) else -math.inf)  # a diverged run ranks last

    return max(val_by_lr, key=score)


# -- planning: sizes and default learning rates, cached -----------------------------------------------
def plan_setting(suite: Suite, setting: Setting, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Each entry of ``suite`` on ``setting``'s model: its size settings, adapter size and default lr.
    Cached in ``plan`` under the model and task (sizes do not depend on data sizes)."""
    key = f"{suite.name}|{setting.model}|{setting.task}"
    if key in plan:
        return plan[key]
    loaded = run.load_for_sizing(setting.model, setting.task)
    targets = {b.name: _attempt(lambda b=b: run.adapter_size(loaded, b.method, b.settings)) for b in suite.budgets}
    shown_targets = ", ".join(f"{n} {p:,}" if p is not None else f"{n} failed ({e})" for n, (p, e) in targets.items())
    print(f"{suite.name} / {setting.model}: budgets {shown_targets}", flush=True)
    entries = [(Entry(m, m, None, {}), None) for m in (*suite.references, *suite.fixed)]
    for method in suite.sized:
        for name, (target, failed) in targets.items():
            found, error = (
                (None, f"budget {name}: {failed}")
                if failed
                else _attempt(lambda m=method, t=target: run.size_for(loaded, m, t, {}))
            )
            settings = {k: str(v) for k, v in found["settings"].items()} if found else {}
            entries.append((Entry(f"{method}@{name}", method, name, settings), error))
    rows = []
    for entry, error in entries:
        row = {
            **dataclasses.asdict(entry),
            "adapter_params": None,
            "default_lr": None,
            "budget_target": targets[entry.budget][0] if entry.budget else None,
        }
        if error is None:
            described, error = _attempt(lambda e=entry: _describe(loaded, e))
            row.update(described or {})
        if error is not None:
            row["error"] = error
            print(f"  {entry.label:24} failed: {error}", flush=True)
            rows.append(row)
            continue
        shown = " ".join(f"{k}={v}" for k, v in entry.settings.items())
        sized = "-" if row["adapter_params"] is None else f"{row['adapter_params']:,}"
        print(f"  {entry.label:24} {shown:28} adapter {sized:>10}  default lr {row['default_lr']:g}", flush=True)
        rows.append(row)
    if not any("error" in row for row in rows):  # a failure is tried again on the next bench
        plan[key] = rows
    return rows


def _describe(loaded: Any, entry: Entry) -> dict[str, Any]:
    recipe = recipes.build_recipe(entry.method, loaded.family, entry.settings, loaded.model, loaded.head)
    size = None if recipe.baseline else run.adapter_size(loaded, entry.method, entry.settings)
    return {"adapter_params": size, "default_lr": recipe.lr, "trains": recipe.trains}


def _attempt(work: Callable[[], Any]) -> tuple[Any, str | None]:
    """(result, None), or (None, the error) for a method that cannot be built or trained on a model:
    the bench records it, goes on with the others and fails at the end naming each."""
    try:
        return work(), None
    except StoreMismatch:
        raise
    except Exception as e:  # noqa: BLE001 (recorded in results.json and the leaderboard, and the exit code)
        where = traceback.extract_tb(e.__traceback__)[-1]  # an empty message (a bare assert) says where instead
        return None, (
            f"{type(e).__name__}: {e}".splitlines()[0]
            if str(e)
            else f"{type(e).__name__} at {where.filename}:{where.lineno} ({where.line})"
        )


# -- running: the store is the cache ------------------------------------------------------------------
def run_spec(
    setting: Setting, entry: dict[str, Any], lr: float, seed: int, options: Options, folder: Path, score_test: bool
) -> run.RunSpec:
    return run.RunSpec(
        model=setting.model,
        task=setting.task,
        method=entry["method"],
        settings=dict(entry["settings"]),
        epochs=setting.epochs,
        lr=lr or None,  # zero-shot's is 0: nothing trains
        batch_size=setting.batch_size,
        max_length=setting.max_length,
        image_size=setting.image_size,
        val_size=setting.val_size,
        seed=seed,
        device=options.device,
        train_size=setting.train_size,
        test_size=setting.test_size,
        out=str(folder),
        results=str(options.out / STORE_FILE),
        progress="none",
        score_test=score_test,
        score_base=False,  # the zero-shot entry scores the base model, once
        rouge_sample=setting.rouge_sample,
    )


def _with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored run's spec, with the fields added to ``RunSpec`` since it ran at their defaults (what it ran with)."""
    defaults = {f.name: f.default for f in dataclasses.fields(run.RunSpec) if f.default is not dataclasses.MISSING}
    return {**defaults, **stored}


def spec_key(spec: run.RunSpec | dict[str, Any]) -> dict[str, Any]:
    fields = dataclasses.asdict(spec) if isinstance(spec, run.RunSpec) else spec
    return {k: v for k, v in fields.items() if k not in NOT_IN_KEY}


class Runner:
    """Runs what the store does not have; ``finetune`` and ``score_test`` are the workflow's (tests count
    their calls)."""

    def __init__(
        self,
        options: Options,
        finetune: Callable[..., dict[str, Any]] | None = None,
        score_test: Callable[[Path], dict[str, float]] | None = None,
    ) -> None:
        self.options = options
        self.finetune = finetune or run.finetune
        self.score_test = score_test or (lambda folder: run.evaluate_run(folder, split="test"))
        store = options.out / STORE_FILE
        rows = results.load_results([store]) if store.is_file() else []
        self.done = {row["out"]: row for row in rows if row.get("status") == "finished" and "out" in row}
        self.found = set(self.done)  # finished before this bench started
        self.trained = 0
        self.skipped = 0  # found finished (not a search run reused as the seed-0 final run)
        self.scored_later = 0  # search runs kept as final runs, scored on test from their saved weights

    def get(self, spec: run.RunSpec) -> dict[str, Any]:
        row = self.done.get(spec.out)
        if row is None:
            row = self.done[spec.out] = {**self.finetune(spec), "out": spec.out}
            self.trained += 1
        else:
            stored = _with_defaults(row["spec"])
            if spec_key(stored) != spec_key(spec):
                changed = sorted(k for k, v in spec_key(spec).items() if stored.get(k) != v)
                raise StoreMismatch(
                    f"{spec.out} holds a run made with other settings ({', '.join(changed)}): "
                    f"give another --out, or delete that folder's row from {self.options.out / STORE_FILE}"
                )
            self.skipped += spec.out in self.found
            self.found.discard(spec.out)
        if spec.score_test and not row.get("test"):
            row = self._scored_on_test(Path(spec.out), row)
        return row

    def _scored_on_test(self, folder: Path, row: dict[str, Any]) -> dict[str, Any]:
        """A search run kept as a final run: its test score from the weights it saved (its best epoch's,
        the very weights a run scores at its end), written to its metrics and, as a newer row, to the store."""
        row = {**row, "test": self.score_test(folder), results.SCORED_LATER: True}
        metrics = folder / results.METRICS_FILE
        results.write_json(metrics, {**json.loads(metrics.read_text(encoding="utf-8")), "test": row["test"]})
        results.append_result(self.options.out / STORE_FILE, row)
        self.done[str(folder)] = row
        self.scored_later += 1
        return row


def run_entry(runner: Runner, suite: Suite, setting: Setting, entry: dict[str, Any]) -> dict[str, Any]:
    """The lr search on validation (seed 0), then the seeds at the chosen lr."""
    options = runner.options
    folder = options.out / "runs" / suite.name / setting.name / entry["label"]

    def one(lr: float, seed: int, final: bool = True) -> dict[str, Any]:
        out = folder / f"lr{lr:g}-seed{seed}"
        return runner.get(run_spec(setting, entry, lr, seed, options, out, score_test=final))

    if "error" in entry:
        return entry

    trains = entry.get("trains", True)

    def searched(lr: float, final: bool) -> dict[str, Any]:
        """A search run's validation scores; a run whose training loss diverged ranks last (it is not stored,
        so a resumed bench runs it again) instead of failing the entry: high rates are what a search tries."""
        try:
            return one(lr, 0, final=final).get("val") or {}
        except run.RunFailed as e:
            if final or not isinstance(e.__cause__, FloatingPointError):
                raise
            print(f"  {entry['label']} lr {lr:g} diverged in training: ranked last", file=sys.stderr, flush=True)
            return {"loss": math.inf, DIVERGED: True}

    def search_and_finals() -> tuple[dict, float, list[dict[str, Any]]]:
        # what trains nothing has no lr to search and scores the same with any seed
        grid = lr_grid(entry["default_lr"], options.quick or not trains, setting.lr_factors)
        # test is scored only on the runs kept: the chosen lr's search run is scored once chosen
        val_by_lr = {lr: searched(lr, final=len(grid) == 1) for lr in grid}
        chosen = choose_lr(val_by_lr, setting.choose_by) if len(grid) > 1 else grid[0]
        for _ in range(setting.lr_edge_steps if len(grid) > 1 else 0):
            beyond = beyond_edge(sorted(val_by_lr), chosen)
            if beyond is None:
                break
            val_by_lr[beyond] = searched(beyond, final=False)
            chosen = choose_lr(val_by_lr, setting.choose_by)
        return val_by_lr, chosen, [one(chosen, seed) for seed in range(options.seeds if trains else 1)]

    done, error = _attempt(search_and_finals)
    if error is not None:
        print(f"  {entry['label']} failed: {error}", file=sys.stderr, flush=True)
        return {**entry, "error": error}
    val_by_lr, chosen, finals = done
    missing = sorted({m for r in finals for m in setting.metrics if m not in r["test"]})
    if missing:
        error = f"the test scores have no {', '.join(missing)} (they have {', '.join(finals[0]['test'])})"
        print(f"  {entry['label']} failed: {error}", file=sys.stderr, flush=True)
        return {**entry, "error": error}
    scores = {}
    for metric in setting.metrics:
        values = [METRICS[metric][1] * r["test"][metric] for r in finals]
        scores[metric] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    memory = [r.get("peak_cuda_mib") or r.get("peak_rss_mib") for r in finals]
    return {
        **entry,
        "lr_grid": {  # the validation score of each rate tried (None: diverged in training)
            f"{lr:g}": None if val.get(DIVERGED) else val.get(setting.choose_by, val.get("loss"))
            for lr, val in sorted(val_by_lr.items())
        },
        "lr": chosen,
        "trainable_params": finals[0]["trainable_params"],
        "metric": headline(setting),
        "score_mean": scores[headline(setting)]["mean"],
        "score_std": scores[headline(setting)]["std"],
        "scores": scores,
        "seeds": len(finals),
        "step_time_ms": statistics.mean(r.get("step_time_ms") or 0.0 for r in finals),
        "peak_mib": max(m for m in memory if m is not None) if any(memory) else None,
        "memory_kind": _memory_kind(finals[0]),
        "device": finals[0].get("device"),
        "runs": [{"seed": r["seed"], "test": r["test"], "out": r["out"]} for r in finals],
    }


_MEMORY_NOTES = {
    "peak RSS of the run": "On CPU the peak is the process's resident set during the run: the model, the data "
    "and what the allocator kept from earlier runs of the bench.",
    "process peak RSS": "On CPU the peak is the bench process's resident set so far (it includes earlier runs).",
}


def _memory_kind(row: dict[str, Any]) -> str:
    if row.get("peak_cuda_mib"):
        return "cuda allocator"
    return "peak RSS of the run" if row.get("peak_rss_since") == "run" else "process peak RSS"


def bench(suite_names: list[str], options: Options, finetune: Callable[..., dict[str, Any]] | None = None) -> dict:
    """Every suite named; a suite whose models or data are not installed is skipped, with the reason."""
    if launched_processes().distributed:
        raise run.UsageError("structpeft bench runs in one process (its runs are small): launch it without torchrun")
    options.out.mkdir(parents=True, exist_ok=True)
    plan_path = options.out / PLAN_FILE
    plan = json.loads(plan_path.read_text(encoding="utf-8")) if plan_path.is_file() else {}
    runner = Runner(options, finetune)
    report: dict[str, Any] = {
        "command": options.command,
        "seeds": options.seeds,
        "quick": options.quick,
        "lr_factors": list(LR_FACTORS),
        "suites": {},
        "skipped": {},
    }
    for name in suite_names:
        suite = SUITES[name]
        try:
            settings = settings_of(suite, options.quick)
            plans = [(s, plan_setting(suite, s, plan)) for s in settings]
        except (FileNotFoundError, ImportError) as e:  # an asset, or the extra that reads it, not installed
            print(f"suite {name} skipped: {e}", file=sys.stderr, flush=True)
            report["skipped"][name] = str(e)
            continue
        results.write_json(plan_path, plan)
        report["suites"][name] = {"about": suite.about, "settings": {}}
        for setting, entries in plans:
            rows = []
            report["suites"][name]["settings"][setting.name] = {"setting": dataclasses.asdict(setting), "rows": rows}
            for entry in entries:
                print(f"{name} / {setting.name} / {entry['label']}", flush=True)
                rows.append(run_entry(runner, suite, setting, entry))
                write_outputs(report, options.out)  # what there is so far, after each entry
    write_outputs(report, options.out)
    print(
        f"bench: {runner.trained} runs trained, {runner.skipped} found finished in {options.out / STORE_FILE}, "
        f"{runner.scored_later} search runs scored on test once chosen"
    )
    if not report["suites"]:
        raise run.UsageError("no suite could run: " + "; ".join(f"{k}: {v}" for k, v in report["skipped"].items()))
    failed = [
        f"{name} / {setting} / {r['label']}: {r['error']}"
        for name, suite in report["suites"].items()
        for setting, block in suite["settings"].items()
        for r in block["rows"]
        if "error" in r
    ]
    if failed:
        raise run.RunFailed(
            f"{len(failed)} entries failed (the others are in {options.out}):\n  " + "\n  ".join(failed)
        )
    return report


# -- outputs ----------------------------------------------------------------------------------------
def write_outputs(report: dict[str, Any], out: Path) -> None:
    results.write_json(out / RESULTS_FILE, report)
    (out / LEADERBOARD_FILE).write_text(leaderboard(report), encoding="utf-8")
    for name, suite in report["suites"].items():
        if suite["settings"]:
            plot_suite(name, suite, "trainable_params", "trainable parameters", out / f"{name}-score-vs-params.png")
            plot_suite(name, suite, "step_time_ms", "step time (ms, median)", out / f"{name}-score-vs-step-time.png")


def leaderboard(report: dict[str, Any]) -> str:
    lines = ["# structpeft bench", ""]
    if report.get("command"):
        lines += [f"Made by `{report['command']}`.", ""]
    grid = ", ".join(f"{f:.3g}" for f in report["lr_factors"])
    protocol = (
        "the default learning rate (no search) — `--quick`: tiny subsets, checks the machinery, not the numbers."
        if report["quick"]
        else f"the learning rate chosen on validation (grid: the default × {grid}, seed 0, unless a setting says "
        "otherwise below)."
    )
    lines += [f"Test scores, mean ± std over {report['seeds']} seed(s) (zero-shot: one run), at {protocol}", ""]
    for name, reason in report["skipped"].items():
        lines += [f"Suite {name} skipped: {reason}", ""]
    for name, suite in report["suites"].items():
        lines += [f"## {name}: {suite['about']}", ""]
        for setting_name, block in suite["settings"].items():
            s = block["setting"]
            metrics = s.get("metrics", ["accuracy"])
            failed = [r for r in block["rows"] if "error" in r]
            rows = sorted((r for r in block["rows"] if "error" not in r), key=lambda r: _rank(r, metrics[0]))
            memory = rows[0]["memory_kind"] if rows else ""
            generated = f", ROUGE-L on {s['rouge_sample']} greedy completions" if s.get("rouge_sample") else ""
            lines += [
                f"### {setting_name} (train {s['train_size'] or 'all'}, test {s['test_size'] or 'all'}{generated}, "
                f"{s['epochs']} epoch(s), device {rows[0]['device'] if rows else '-'})",
                "",
                *_own_grid(s, report),
                "| method | settings | adapter params | trainable | lr | "
                + " | ".join(METRICS[m][0] for m in metrics)
                + f" | step ms | peak MiB ({memory}) |",
                "|---|---|---:|---:|---:|" + "---:|" * len(metrics) + "---:|---:|",
            ]
            for r in rows:
                shown = " ".join(f"{k}={v}" for k, v in r["settings"].items()) or "-"
                peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] else "-"
                adapter = "-" if r["adapter_params"] is None else f"{r['adapter_params']:,}"
                lr = f"{r['lr']:g}" if r["lr"] else "-"
                step = f"{r['step_time_ms']:.0f}" if r["step_time_ms"] else "-"
                lines.append(
                    f"| {r['label']} | {shown} | {adapter} | {r['trainable_params']:,} | {lr} | "
                    + " | ".join(_shown_score(r, m) for m in metrics)
                    + f" | {step} | {peak} |"
                )
            lines += [""] + [f"- {r['label']} failed: {r['error']}" for r in failed] + ([""] if failed else [])
    kinds = {r.get("memory_kind") for s in report["suites"].values() for b in s["settings"].values() for r in b["rows"]}
    lines += [_MEMORY_NOTES[kind] + "\n" for kind in sorted(kinds & set(_MEMORY_NOTES))]
    return "\n".join(lines)


def _own_grid(setting: dict[str, Any], report: dict[str, Any]) -> list[str]:
    """A line on a setting's learning-rate grid and choice where they are not the suite-wide ones."""
    factors, steps = setting.get("lr_factors", report["lr_factors"]), setting.get("lr_edge_steps", 0)
    by_loss = setting.get("choose_by") == "loss"
    if report["quick"] or (list(factors) == list(report["lr_factors"]) and not steps and not by_loss):
        return []
    grid = ", ".join(f"{f:.3g}" for f in factors)
    beyond = f"; a best lr at an edge earns up to {steps} more, x{LR_EDGE_STEP:g} beyond it" if steps else ""
    choice = "the lowest validation loss" if by_loss else "validation accuracy, then loss"
    return [f"Learning rates here: the default × {grid}{beyond}, chosen by {choice} (the column shows it).", ""]


def _scores(row: dict[str, Any]) -> dict[str, dict[str, float]]:
    """A row's test scores by metric (rows written before there were several kept accuracy alone)."""
    if "scores" in row:
        return row["scores"]
    return {"accuracy": {"mean": row["accuracy_mean"], "std": row["accuracy_std"]}}


def _rank(row: dict[str, Any], metric: str) -> float:
    mean = _scores(row)[metric]["mean"]
    return mean if metric in results.LOWER_IS_BETTER else -mean


def _shown_score(row: dict[str, Any], metric: str) -> str:
    score, decimals = _scores(row)[metric], METRICS[metric][2]
    return f"{score['mean']:.{decimals}f} ± {score['std']:.{decimals}f}"


def plot_suite(name: str, suite: dict[str, Any], x_key: str, x_label: str, path: Path) -> None:
    """One panel per setting: its headline test score (mean ± std) against ``x_key``, log scale; what
    trains nothing (zero-shot) is a dashed line. Labels of nearby points are spread apart
    (:func:`results.label_points`)."""
    plt = results._pyplot()
    panels = list(suite["settings"].items())
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (setting_name, block) in zip(axes[0], panels):
        metric = headline(block["setting"])
        points: list[tuple[float, float, str]] = []
        for r in block["rows"]:
            if "error" in r:
                continue
            score = _scores(r)[metric]
            if not r["trainable_params"]:
                ax.axhline(score["mean"], linestyle="--", color="grey", linewidth=1)
                ax.annotate(r["label"], (0.01, score["mean"]), xycoords=("axes fraction", "data"), fontsize=7)
                continue
            if not r[x_key]:
                continue
            ax.errorbar(r[x_key], score["mean"], yerr=score["std"], fmt="o", capsize=3)
            points.append((r[x_key], score["mean"], r["label"]))
        ax.set_xscale("log")
        ax.set(xlabel=x_label, ylabel=f"test {METRICS[metric][0]}", title=f"{name}: {setting_name}")
        ax.grid(alpha=0.3)
        results.label_points(ax, points)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
