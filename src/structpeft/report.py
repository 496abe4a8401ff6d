"""Results of ``structpeft finetune`` runs as a table (rich) and a plot (matplotlib)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path


def load_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(rows: list[dict]) -> list[dict]:
    """One row per setting (method, model, r, train size, epochs, lr): accuracy mean and std over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        key = (row["method"], row["model"], row.get("r"), row["train_examples"], row.get("epochs"), row.get("lr"))
        groups[key].append(row)
    out = []
    for (method, model, r, n_train, epochs, lr), runs in groups.items():
        accs = [100 * run["test_accuracy"] for run in runs]
        out.append(
            {
                "method": method,
                "model": model,
                "r": r,
                "train": n_train,
                "epochs": epochs,
                "lr": lr,
                "runs": len(runs),
                "acc_mean": statistics.mean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "params": runs[0]["trainable_params"],
                "seconds": statistics.mean(run["train_seconds"] for run in runs),
            }
        )
    return sorted(out, key=lambda s: (s["model"], s["train"], -s["acc_mean"]))


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="structpeft runs (test accuracy, mean ± std over seeds)")
    for col in ("method", "model", "r", "train", "epochs", "lr", "runs", "accuracy %", "trainable", "train s"):
        table.add_column(col, justify="left" if col in ("method", "model") else "right")
    for s in summarise(rows):
        table.add_row(
            s["method"],
            s["model"],
            str(s["r"] or "-"),
            str(s["train"]),
            str(s["epochs"]),
            f"{s['lr']:g}" if s["lr"] else "-",
            str(s["runs"]),
            f"{s['acc_mean']:.2f} ± {s['acc_std']:.2f}",
            f"{s['params']:,}",
            f"{s['seconds']:.0f}",
        )
    Console().print(table)


def plot_accuracy_vs_params(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summarise(rows):
        ax.errorbar(s["params"], s["acc_mean"], yerr=s["acc_std"], fmt="o", capsize=3)
        ax.annotate(
            f"{s['method']} (n={s['train']})",
            (s["params"], s["acc_mean"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
