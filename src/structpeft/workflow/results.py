"""A run's files (metrics.json, curves.png), the results store (one JSON line per run) and the
report over it: a table and an accuracy-vs-parameters plot, grouped by model and task."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from structpeft.core import atomic_write_file

if TYPE_CHECKING:
    from matplotlib.axes import Axes

RUN_FILE, METRICS_FILE, CURVES_FILE = "run.json", "metrics.json", "curves.png"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a crash leaves the old file or the new one, never half of one."""
    atomic_write_file(path, (json.dumps(data, indent=2, default=str) + "\n").encode("utf-8"))


def append_result(store: Path, row: dict[str, Any]) -> None:
    """One line per run, appended and fsynced; a torn last line is skipped (with a warning) by the reader."""
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


SCORED_LATER = "test_scored_later"  # a run's row again, now with its test score (see load_results)


def load_results(sources: list[Path]) -> list[dict[str, Any]]:
    """Rows from results files (JSON lines) and run folders (their metrics.json); a line that is not
    a JSON object is skipped with a warning naming the file and line. A row marked ``test_scored_later``
    replaces the earlier row of its run folder (``out``): the bench appends a search run again once it
    has scored its test split."""
    rows: list[dict[str, Any]] = []
    for source in sources:
        if source.is_dir():
            files = [source / METRICS_FILE] if (source / METRICS_FILE).is_file() else sorted(source.rglob(METRICS_FILE))
            for file in files:
                try:
                    rows.append(json.loads(file.read_text(encoding="utf-8")))
                except json.JSONDecodeError as e:
                    print(f"warning: {file}: not valid JSON ({e.msg}); skipped", file=sys.stderr)
            continue
        if not source.is_file():
            raise FileNotFoundError(f"{source}: no such results file or run folder")
        newest: dict[str, int] = {}  # run folder -> its row's index in ``rows``
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError:
                print(f"warning: {source}:{number}: not a complete JSON row (torn write?); skipped", file=sys.stderr)
                continue
            if row.get(SCORED_LATER) and row.get("out") in newest:
                rows[newest[row["out"]]] = row
                continue
            if row.get("out"):
                newest[row["out"]] = len(rows)
            rows.append(row)
    return rows


def headline(row: dict[str, Any]) -> tuple[str, float | None]:
    """The metric a row is ranked by: test accuracy (%), else ROUGE-L (x100), else test perplexity."""
    test = row.get("test") or {}
    if "accuracy" in test:
        return "accuracy %", 100 * test["accuracy"]
    if "rougeL" in test:
        return "ROUGE-L", 100 * test["rougeL"]
    if "perplexity" in test:
        return "perplexity", test["perplexity"]
    return "-", None


LOWER_IS_BETTER = {"loss", "perplexity"}  # metrics ranked lowest first, here and by the bench


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setting (model, task, method, adapter size, train size, lr) and headline metric: its mean
    and std over seeds. Two sizes of one method (LoRA r=2 and r=8) are two settings, told apart by their
    trainable parameter counts.

    Ranked within each model, task and metric, best first (a lower perplexity is better); a store that
    holds both ROUGE-L and perplexity runs of a task shows them as two rankings, never one."""
    groups: dict[tuple, list[tuple[dict[str, Any], float | None]]] = defaultdict(list)
    for row in rows:
        if row.get("status", "finished") != "finished":
            continue
        metric, value = headline(row)
        key = (row.get("model"), row.get("task"), row.get("method"), row.get("trainable_params"))
        groups[(*key, row.get("train_examples"), row.get("lr"), metric)].append((row, value))
    out = []
    for (model, task, method, params, n_train, lr, metric), runs in groups.items():
        values = [v for _, v in runs if v is not None]  # a search run may have no test score
        out.append(
            {
                "model": model,
                "task": task,
                "method": method,
                "train": n_train,
                "lr": lr,
                "runs": len(runs),
                "metric": metric,
                "mean": statistics.mean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "params": params,
                "step_ms": statistics.mean(r.get("step_time_ms") or 0 for r, _ in runs),
            }
        )

    def rank(s: dict[str, Any]) -> tuple:  # within a model, task and metric: the best first, unscored last
        sign = 1 if s["metric"] in LOWER_IS_BETTER else -1
        return (str(s["model"]), str(s["task"]), s["metric"], s["mean"] is None, sign * (s["mean"] or 0.0))

    return sorted(out, key=rank)


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="structpeft runs (test metric, mean ± std over seeds)")
    for col in ("model", "task", "method", "train", "lr", "runs", "metric", "trainable", "step ms"):
        table.add_column(col, justify="left" if col in ("model", "task", "method", "metric") else "right")
    for s in summarise(rows):
        value = "-" if s["mean"] is None else f"{s['mean']:.2f} ± {s['std']:.2f}"
        table.add_row(
            str(s["model"]),
            str(s["task"]),
            str(s["method"]),
            str(s["train"]),
            f"{s['lr']:g}" if s["lr"] else "-",
            str(s["runs"]),
            f"{s['metric']} {value}",
            f"{s['params']:,}" if s["params"] else "-",
            f"{s['step_ms']:.0f}",
        )
    Console().print(table)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


LABEL_GAP = 0.04  # axes fraction between two labels' baselines: a 7-point label on a 4.5-inch panel
LABEL_REACH = 0.25  # axes fraction: points closer than this in x can have colliding labels (a label's width)
LABEL_TOP = 0.97  # axes fraction: the highest label's baseline, clear of the panel's title


def spread_labels(
    xs: list[float], ys: list[float], gap: float = LABEL_GAP, reach: float = LABEL_REACH, top: float = LABEL_TOP
) -> list[float]:
    """Label heights (axes fractions) for points at ``(xs, ys)`` (axes fractions): each label starts at its
    point's height, and labels of points within ``reach`` of each other in x are pushed apart to ``gap``,
    in the points' own order, and pushed down from ``top`` where they would pass it. A cluster too tall for
    [0, top] at ``gap`` is packed closer, to fit."""
    heights = list(ys)
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    clusters: list[list[int]] = []
    for i in order:
        if clusters and xs[i] - xs[clusters[-1][-1]] < reach:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    for cluster in clusters:
        cluster.sort(key=lambda i: ys[i])
        spacing = min(gap, top / max(1, len(cluster) - 1))
        for below, above in zip(cluster, cluster[1:]):
            heights[above] = max(ys[above], heights[below] + spacing)
        heights[cluster[-1]] = min(heights[cluster[-1]], top)  # over the top: push down only what must move
        for above, below in zip(cluster[::-1], cluster[-2::-1]):
            heights[below] = min(heights[below], heights[above] - spacing)
    return heights


def label_points(ax: Axes, points: list[tuple[float, float, str]]) -> None:
    """Name each ``(x, y, label)`` point of a panel with a log x axis, labels of nearby points spread apart
    (:func:`spread_labels`) and joined to their points by a thin line. Call after plotting the points;
    points that a log axis cannot show (x <= 0, or not finite) get no label."""
    points = [(x, y, label) for x, y, label in points if x > 0 and math.isfinite(x) and math.isfinite(y)]
    if not points:
        return
    (x_low, x_high), (y_low, y_high) = ax.get_xlim(), ax.get_ylim()  # autoscaled to the points
    xs = [(math.log(x) - math.log(x_low)) / (math.log(x_high) - math.log(x_low)) for x, _, _ in points]
    ys = [(y - y_low) / (y_high - y_low) for _, y, _ in points]
    for (x, y, label), x_frac, height in zip(points, xs, spread_labels(xs, ys)):
        ax.annotate(
            label,
            (x, y),
            xytext=(x_frac + 0.015, height),
            textcoords="axes fraction",
            va="center",
            fontsize=7,
            arrowprops={"arrowstyle": "-", "linewidth": 0.4, "color": "grey", "shrinkA": 0, "shrinkB": 3},
        )


def plot_metric_vs_params(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per (model, task, metric): the headline metric against trainable parameters (log scale)."""
    plt = _pyplot()
    summary = [s for s in summarise(rows) if s["mean"] is not None and s["params"]]
    panels = sorted({(str(s["model"]), str(s["task"]), s["metric"]) for s in summary})
    if not panels:
        raise ValueError("no finished run with a test metric to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (model, task, metric) in zip(axes[0], panels):
        points: list[tuple[float, float, str]] = []
        for s in (s for s in summary if (str(s["model"]), str(s["task"]), s["metric"]) == (model, task, metric)):
            ax.errorbar(s["params"], s["mean"], yerr=s["std"], fmt="o", capsize=3)
            points.append((s["params"], s["mean"], str(s["method"])))
        ax.set_ylabel(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
        ax.set_xscale("log")
        label_points(ax, points)
        ax.set_xlabel("trainable parameters")
        ax.set_title(f"{model} on {task}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(losses: list[tuple[int, float]], history: list[dict[str, Any]], path: Path) -> None:
    """Train loss per step and the validation metric per epoch, against optimizer steps."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    if losses:
        steps, values = zip(*losses)
        left.plot(steps, values, lw=0.8, alpha=0.5, label="per step")
        window = max(1, len(values) // 25)
        smooth = [statistics.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
        left.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
        left.legend()
    left.set(xlabel="optimizer step", ylabel="train loss", title="training loss")
    metric = "val_accuracy" if history and "val_accuracy" in history[0] else "val_loss"
    right.plot([h["step"] for h in history], [h[metric] for h in history], "o-")
    right.set(xlabel="optimizer step", ylabel=metric.replace("_", " "), title="validation, each epoch")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
