"""What exporting an adapter as a plain LoRA (the factors a GGUF or HF PEFT export writes) costs, per method
and rank: the relative error of each layer's ΔW, and the validation loss of the exported factors beside the
adapter's own, on run folders written by ``structpeft finetune``.

The exported factors are written as an HF PEFT LoRA (the same factors ``--format gguf`` writes, bar llama.cpp's
row order and scale folding) and scored by HF PEFT on a fresh base, on the run's own validation split.

  python benchmarks/export_cost.py runs/lora runs/flora runs/surm runs/kernel-mix --ranks exact 8 16 64
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import peft
import torch

import structpeft as sp
from structpeft.workflow import recipes
from structpeft.workflow.run import _load, _settings, _spec_of, restore, uses_chat_template
from structpeft.workflow.train import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--ranks", nargs="+", default=["exact", "8", "16", "64"], help="'exact': no rank given")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    print("| run | rank | layers | mean rel. error of ΔW | max | val loss (exported) | val loss (adapter) | s |")
    print("|---|---|---|---|---|---|---|---|")
    for run_dir in args.runs:
        spec = _spec_of(run_dir)
        task, loaded = _load(spec)
        fresh_base = copy.deepcopy(loaded.model)
        model = restore(run_dir, spec, task, loaded)
        settings = _settings(spec, recipes.Recipe(spec.method, [spec.method]))
        settings.chat = uses_chat_template(spec.chat_template, loaded, task)
        own = evaluate(model, loaded, task, "val", settings)["loss"]
        for rank in args.ranks:
            r = None if rank == "exact" else int(rank)
            with tempfile.TemporaryDirectory() as folder:
                start = time.perf_counter()
                try:
                    report = sp.export_lora(model, folder, rank=r)
                except ValueError as e:
                    print(f"| {run_dir.name} | {rank} | refused: {str(e)[:120]} | | | | {own:.4f} | |")
                    continue
                seconds = time.perf_counter() - start
                exported = peft.PeftModel.from_pretrained(copy.deepcopy(fresh_base), folder).eval()
                loss = evaluate(exported, loaded, task, "val", settings)["loss"]
            errors = [layer.relative_error for layer in report.layers]
            print(
                f"| {run_dir.name} | {rank} | {len(errors)} | {statistics.mean(errors):.3f} | {max(errors):.3f} "
                f"| {loss:.4f} | {own:.4f} | {seconds:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
