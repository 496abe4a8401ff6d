"""``structpeft``: fine-tune and compare methods on real pre-trained models and data, offline.

structpeft finetune --method flora          # MiniLM on Rotten Tomatoes, embedded defaults
structpeft report                            # table and plot of every run so far
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

import structpeft as sp

DEFAULT_TARGETS = ["query", "key", "value", "dense"]
HOULSBY_TARGETS = ["attention.output.dense", "output.dense"]  # SURM adapters: after attention and FFN
HEAD = ["classifier"]
SURM_STRUCTURES = ("circulant", "toeplitz", "sym_toeplitz", "kronecker", "ldr")

# Embedded defaults: each method's config for a BERT-style encoder with a new classifier head.
METHOD_DEFAULTS: dict[str, dict] = {
    "lora": {"r": 8, "alpha": 16, "lr": 1e-3},
    "flora": {"r": 8, "alpha": 16, "lr": 5e-3},  # orthonormal factors: ‖ΔW‖ = s‖G‖, so a larger step than LoRA
    "probe": {"lr": 2e-2},  # frozen encoder, trainable head only: the baseline every method must beat
    **{f"surm-{s}": {"alpha": 1.0, "lr": 2e-2} for s in SURM_STRUCTURES},
    **{f"surm-{s}-adapter": {"alpha": 1.0, "lr": 2e-2, "targets": HOULSBY_TARGETS} for s in SURM_STRUCTURES},
    # Coeff-Tuning: α (H x H) in every attention layer, dropout 0.2 on α (the paper's best).
    # targets None: every attention layer (Coeff) or block (Kernel-mix); --targets names them instead.
    "coeff": {"lr": 2e-2, "dropout": 0.2, "targets": None},  # the probe's head lr: only α differs from the probe
    "coeff+lora": {"r": 8, "alpha": 16, "lr": 1e-3, "dropout": 0.2, "lr_by_name": {"coeff_alpha": 2e-2}},
    # Kernel-mix at the authors' RoBERTa ranks (r_q, r_v, r_q_shared, r_v_shared) = (1, 2, 2, 4).
    "kernel-mix": {"lr": 1e-3, "dropout": 0.1, "targets": None},
}


def adapt(model: nn.Module, method: str, r: int, alpha: float, targets: list[str] | None, dropout: float) -> nn.Module:
    """``model`` ready to train with ``method``: a PeftModel, or for "probe" the model with only its head trainable."""
    if method == "probe":
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] in HEAD)
        return model
    if method == "kernel-mix":
        return sp.get_peft_model(
            model, sp.KernelMixConfig(dropout=dropout, target_modules=targets, modules_to_save=HEAD)
        )
    if method == "coeff":
        return sp.get_peft_model(model, sp.CoeffConfig(dropout=dropout, target_modules=targets, modules_to_save=HEAD))
    if method == "coeff+lora":  # Coeff-Tuning on every attention layer, LoRA on the targets
        configs = [sp.CoeffConfig(dropout=dropout, modules_to_save=HEAD)]
        configs.append(sp.LoraConfig(r=r, alpha=alpha, target_modules=targets))  # no dropout, as plain LoRA
        return sp.get_peft_model(model, configs)
    common = {"alpha": alpha, "dropout": dropout, "target_modules": targets, "modules_to_save": HEAD}
    if method.startswith("surm-"):
        structure = method.removeprefix("surm-").removesuffix("-adapter")
        mode = "adapter" if method.endswith("-adapter") else "lora"
        config = sp.SurmConfig(structure=structure, mode=mode, rank=r or 1, **common)
    else:
        config = {"lora": sp.LoraConfig, "flora": sp.FloraConfig}[method](r=r, **common)
    return sp.get_peft_model(model, config)


def _append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:  # one short line per append: no torn rows in practice
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def cmd_finetune(args: argparse.Namespace) -> int:
    from structpeft.training import TrainConfig, evaluate, train
    from structpeft.zoo.rotten_tomatoes import load_rotten_tomatoes, subsample
    from structpeft.zoo.text import load_text_classifier

    defaults = METHOD_DEFAULTS[args.method]
    r = args.r or defaults.get("r", 0)
    alpha = args.alpha if args.alpha is not None else defaults.get("alpha", 0)
    lr = args.lr or defaults["lr"]
    dropout = args.dropout if args.dropout is not None else defaults.get("dropout", 0.0)
    torch.manual_seed(args.seed)
    train_set, test_set = load_rotten_tomatoes()
    train_set = subsample(train_set, args.train_size, args.seed)
    test_set = subsample(test_set, args.test_size, seed=0)  # the same test subset for every run
    model, tokenizer = load_text_classifier(args.model)
    targets = args.targets.split(",") if args.targets else defaults.get("targets", DEFAULT_TARGETS)
    model = adapt(model, args.method, r, alpha, targets, dropout)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out_dir = Path(args.output_dir or f"runs/{args.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(
        f"method={args.method} model={args.model} train={len(train_set)} test={len(test_set)} "
        f"trainable={trainable:,} lr={lr} -> {out_dir}"
    )

    def save(epoch: int) -> None:  # every epoch, so a crash loses at most one epoch of work
        if isinstance(model, sp.PeftModel):
            model.save_pretrained(out_dir / "adapter")

    lr_by_name = {} if args.lr else defaults.get("lr_by_name", {})
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr, seed=args.seed, lr_by_name=lr_by_name)
    stats = train(model, tokenizer, train_set, cfg, on_epoch_end=save, progress=not args.quiet)
    accuracy = evaluate(model, tokenizer, test_set, progress=not args.quiet)
    row = {
        "method": args.method,
        "model": args.model,
        "r": r or None,
        "seed": args.seed,
        "train_examples": len(train_set),
        "test_examples": len(test_set),
        "epochs": args.epochs,
        "lr": lr,
        **({"lr_by_name": lr_by_name} if lr_by_name else {}),
        "trainable_params": trainable,
        "test_accuracy": accuracy,
        **stats,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(row, indent=2) + "\n")
    _append_jsonl(Path(args.results), row)
    print(
        f"test accuracy {100 * accuracy:.2f}% | trainable params {trainable:,} | "
        f"train time {stats['train_seconds']:.0f}s | adapter and metrics in {out_dir}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from structpeft.report import load_rows, plot_accuracy_vs_params, print_table

    rows = load_rows(Path(args.results))
    if not rows:
        print(f"no runs in {args.results}: run `structpeft finetune` first", file=sys.stderr)
        return 1
    print_table(rows)
    plot_accuracy_vs_params(rows, Path(args.plot))
    print(f"plot written to {args.plot}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="structpeft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="fine-tune a text classifier on Rotten Tomatoes (offline)")
    ft.add_argument("--method", choices=sorted(METHOD_DEFAULTS), default="lora")
    ft.add_argument("--model", default="minilm", help="preset name or a local HF model folder")
    ft.add_argument(
        "--r", type=int, default=None, help="rank; for SURM ldr the generator count (method default if unset)"
    )
    ft.add_argument("--alpha", type=float, default=None)
    ft.add_argument("--dropout", type=float, default=None, help="adapter dropout (Coeff-Tuning: on α)")
    ft.add_argument(
        "--targets",
        default=None,
        help=f"comma-separated target module names (default {','.join(DEFAULT_TARGETS)}; "
        f"SURM adapters {','.join(HOULSBY_TARGETS)}; coeff and kernel-mix every attention layer)",
    )
    ft.add_argument("--epochs", type=int, default=1)
    ft.add_argument("--lr", type=float, default=None)
    ft.add_argument("--batch-size", type=int, default=32)
    ft.add_argument("--train-size", type=int, default=None, help="train on a random N examples (seeded)")
    ft.add_argument("--test-size", type=int, default=None, help="test on a fixed random N examples")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--output-dir", default=None)
    ft.add_argument("--results", default="runs/results.jsonl", help="every run appends a row here")
    ft.add_argument("--quiet", action="store_true", help="no progress bars")
    ft.set_defaults(func=cmd_finetune)
    rp = sub.add_parser("report", help="table and plot of the runs in a results file")
    rp.add_argument("--results", default="runs/results.jsonl")
    rp.add_argument("--plot", default="runs/results.png")
    rp.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    for flag in ("r", "epochs", "batch_size", "train_size", "test_size"):
        value = getattr(args, flag, None)
        if value is not None and value <= 0:
            make_parser().error(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:  # bad targets, shapes, missing assets: no traceback
        print(f"structpeft {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
