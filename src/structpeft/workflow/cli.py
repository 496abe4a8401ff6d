"""``structpeft``: fine-tune, evaluate, size and compare PEFT methods on any model and data.

  structpeft finetune                                   # MiniLM + LoRA on Rotten Tomatoes (offline defaults)
  structpeft finetune --model dinov2_small --task fashion-mnist --method coeff+lora --set r=16
  structpeft finetune --model ./my-model --task reviews.csv --method flora --epochs 3 --out runs/flora
  structpeft evaluate --adapter runs/flora --split test
  structpeft budget --model minilm --method lora --params 100000
  structpeft report runs/results.jsonl --plot runs/results.png
  structpeft generate --adapter runs/my-lm --prompt "Once upon a time"
  structpeft export --adapter runs/flora --rank 16 --out runs/flora-as-lora
  structpeft export --adapter runs/lora --format gguf --out runs/lora.gguf
  structpeft bench --suite text --seeds 3 --out bench    # head-to-head suites (--quick: the machinery only)
  structpeft bench --suite speed --sections text,conv     # step time and memory beside HF PEFT, as ratios

Argument parsing only; what each command does is in structpeft.workflow.run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

from structpeft.workflow import recipes, tasks


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), value.strip()


def _finetune_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="minilm",
        help="a preset (minilm, mobilenet_v2, efficientnet_lite0, dinov2_small, smollm2-135m, gemma3-270m), "
        "a local HF model folder, a GGUF file, or a hub id",
    )
    p.add_argument(
        "--task",
        default="rotten-tomatoes",
        help=f"a preset ({', '.join(tasks.PRESETS)}), "
        "a CSV / JSONL / Parquet file, an image folder, or a save_to_disk folder",
    )
    p.add_argument(
        "--method",
        default="lora",
        help=f"one of {', '.join(recipes.method_names())}, or several "
        "joined by '+' (coeff+lora); surm-<structure>[-adapter]: surm with those set",
    )
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="a config field of the method (r=16, structure=toeplitz, lora.dropout=0.1, coeff.lr=0.02)",
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate of the first method and the head "
        "(default: the method's for this model family; other methods keep theirs unless --set M.lr=)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--max-length", type=int, default=64, help="tokens per text (longer ones are cut)")
    p.add_argument("--image-size", type=int, default=None, help="pixels per side (default: the model's)")
    p.add_argument(
        "--val-size",
        type=float,
        default=0.1,
        help="validation carved from the whole train split (before --train-size): a fraction of it or a count",
    )
    p.add_argument("--train-size", type=int, default=None, help="train on a seeded random N of the train split")
    p.add_argument("--test-size", type=int, default=None, help="score a fixed random N of the test split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument(
        "--quantize", choices=("nf4", "fp4", "int8"), default=None, help="load the base 4-bit or 8-bit (bitsandbytes)"
    )
    p.add_argument(
        "--quantize-embeddings",
        action="store_true",
        help="with --quantize nf4|fp4: the input embedding (and an LM head tied to it) in the same 4 bits too",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--text-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument(
        "--task-type",
        default=None,
        help="text-classification, image-classification or causal-lm (default: from the data)",
    )
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: none)")
    p.add_argument("--out", default=None, help="run folder (default runs/<model>-<task>-<method>-<time>)")
    p.add_argument("--results", default="runs/results.jsonl", help="every finished run appends a row here")
    p.add_argument(
        "--save-every",
        type=int,
        default=None,
        metavar="STEPS",
        help="write a training checkpoint (weights, optimizer, RNG, data position) every STEPS steps",
    )
    p.add_argument("--resume", action="store_true", help="go on from the checkpoint in --out")
    p.add_argument(
        "--chat-template",
        choices=("auto", "on", "off"),
        default="auto",
        help="causal LM: render prompt/completion rows with the tokenizer's chat template (auto: when it has one); "
        "chat rows ('messages') always use it",
    )
    p.add_argument(
        "--rouge-sample",
        type=int,
        default=0,
        metavar="N",
        help="causal LM, prompt/completion rows: also score ROUGE-L of greedy completions of the first N test prompts",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="structpeft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _finetune_flags(sub.add_parser("finetune", help="fine-tune a model on a task with a method"))
    ev = sub.add_parser("evaluate", help="score a run's adapter on its task (or another)")
    ev.add_argument("--adapter", required=True, help="a run folder written by finetune")
    ev.add_argument("--task", default=None, help="another task with the same labels (default: the run's)")
    ev.add_argument("--split", choices=("test", "val", "train"), default="test")
    ev.add_argument("--device", default=None)
    bu = sub.add_parser("budget", help="the size setting that gives N trainable adapter parameters")
    bu.add_argument("--model", default="minilm")
    bu.add_argument("--method", required=True)
    bu.add_argument("--params", type=int, required=True)
    bu.add_argument("--task", default=None, help="sets the head's classes (default: the model's preset task)")
    bu.add_argument("--set", dest="settings", action="append", type=_key_value, default=[], metavar="KEY=VALUE")
    rp = sub.add_parser("report", help="table and plot of runs")
    rp.add_argument("sources", nargs="*", default=["runs/results.jsonl"], help="results files or run folders")
    rp.add_argument("--plot", default=None, help="write the accuracy-vs-parameters plot here (PNG)")
    ex = sub.add_parser(
        "export",
        help="write an adapter as a plain HF PEFT LoRA (vLLM) or a llama.cpp LoRA GGUF (llama.cpp, ollama)",
    )
    ex.add_argument("--adapter", required=True, help="a run folder written by finetune, or an adapter folder")
    ex.add_argument("--out", required=True, help="folder for the PEFT LoRA; file (.gguf) for --format gguf")
    ex.add_argument("--format", dest="fmt", choices=("peft", "gguf"), default="peft")
    ex.add_argument("--rank", type=int, default=None, help="singular values kept per layer (LoRA needs none)")
    ex.add_argument("--energy", type=float, default=None, help="per layer, keep this fraction of ΔW's energy")
    ex.add_argument("--model", default=None, help="the base of an adapter folder (default: its config's)")
    ex.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="--format gguf tensors")
    ex.add_argument("--uniform-rank", action="store_true", help="one rank for every layer (8, 16, ..., 256)")
    ex.add_argument("--lora-bias", action="store_true", help="carry bias shifts as PEFT's lora_bias")
    ge = sub.add_parser("generate", help="complete a prompt with a causal-LM run's adapter")
    ge.add_argument("--adapter", required=True)
    ge.add_argument("--prompt", required=True)
    ge.add_argument("--max-new-tokens", type=int, default=64)
    ge.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampled")
    ge.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability mass")
    ge.add_argument("--device", default=None)
    be = sub.add_parser("bench", help="head-to-head suites: every method and the references, lr chosen on validation")
    be.add_argument("--suite", choices=("text", "conv", "vit", "llm", "speed", "all"), default="all")
    be.add_argument("--seeds", type=int, default=3, help="final runs per method (at the chosen lr)")
    be.add_argument("--quick", action="store_true", help="tiny subsets, one seed, one lr: checks the machinery")
    be.add_argument(
        "--out",
        default="bench",
        help="folder for runs, results.json, leaderboard.md and plots; finished runs found there are not run again",
    )
    be.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    be.add_argument("--rounds", type=int, default=None, help="speed suite: interleaved timed steps (default 20)")
    be.add_argument(
        "--sections",
        default=None,
        help="speed suite: a comma list of text, conv, surm, attention, compile, decoder, quantized, products "
        "(default: all)",
    )
    return parser


def _speed_run(args: argparse.Namespace, argv: list[str]) -> Callable[[], object]:
    """The speed suite's flags checked now, before any suite runs; the returned call measures."""
    from structpeft.workflow import run, speed

    names = [n.strip() for n in args.sections.split(",")] if args.sections else [*speed.SECTIONS, "products"]
    unknown = [n for n in names if n not in speed.SECTIONS and n != "products"]
    if unknown:
        raise run.UsageError(
            f"--sections: unknown {', '.join(unknown)}; the sections are {', '.join([*speed.SECTIONS, 'products'])}"
        )
    scale = speed.QUICK if args.quick else speed.Scale()
    if args.rounds is not None:
        if args.rounds < 1:
            raise run.UsageError(f"--rounds must be a positive integer, got {args.rounds}")
        scale = dataclasses.replace(scale, rounds=args.rounds)
    device = run.checked_device(args.device)
    sections = [n for n in names if n != "products"]
    return lambda: speed.run_speed(
        Path(args.out) / "speed", device, scale, sections, "products" in names, " ".join(["structpeft", *argv])
    )


PRESET_TASK = {"minilm": "rotten-tomatoes"}  # budget's default task per model preset; vision: fashion-mnist


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    from structpeft.workflow import results, run

    if args.command == "finetune":
        spec = run.RunSpec(**{k: v for k, v in vars(args).items() if k not in ("command", "quiet")})
        spec.settings = dict(args.settings)
        spec.progress = "none" if args.quiet else "auto"
        run.finetune(spec, command=["structpeft", *argv])
    elif args.command == "evaluate":
        run.evaluate_run(Path(args.adapter), args.task, args.split, args.device)
    elif args.command == "generate":
        if args.max_new_tokens < 1:
            raise run.UsageError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
        if not args.temperature >= 0 or not 0 < args.top_p <= 1:
            raise run.UsageError(
                f"--temperature must be >= 0 and --top-p in (0, 1]; got {args.temperature} and {args.top_p}"
            )
        text = run.generate(
            Path(args.adapter), args.prompt, args.max_new_tokens, args.device, args.temperature, args.top_p
        )
        print(text)
    elif args.command == "export":
        from structpeft.workflow.export import export

        export(
            Path(args.adapter),
            Path(args.out),
            fmt=args.fmt,
            rank=args.rank,
            energy=args.energy,
            uniform_rank=args.uniform_rank,
            lora_bias=args.lora_bias,
            model_ref=args.model,
            dtype=args.dtype,
        )
    elif args.command == "budget":
        if args.params < 1:
            raise run.UsageError(f"--params must be a positive integer, got {args.params}")
        task = args.task or PRESET_TASK.get(args.model, "fashion-mnist")
        run.budget(args.model, args.method, args.params, task, dict(args.settings))
    elif args.command == "bench":
        from structpeft.workflow import bench

        if args.seeds < 1:
            raise run.UsageError(f"--seeds must be a positive integer, got {args.seeds}")
        speed_run = _speed_run(args, argv) if args.suite in ("speed", "all") else None
        if args.suite != "speed":
            suites = list(bench.SUITES) if args.suite == "all" else [args.suite]
            options = bench.Options(
                seeds=1 if args.quick else args.seeds,
                quick=args.quick,
                out=Path(args.out),
                device=args.device,
                command=" ".join(["structpeft", *argv]),
            )
            bench.bench(suites, options)
        if speed_run is not None:
            speed_run()
    elif args.command == "report":
        rows = results.load_results([Path(s) for s in args.sources])
        if not rows:
            raise run.UsageError(f"no runs in {', '.join(args.sources)}: run structpeft finetune first")
        results.print_table(rows)
        if args.plot:
            results.plot_metric_vs_params(rows, Path(args.plot))
            print(f"plot written to {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 bad input (one line, before any work); 1 a failure during the work,
    after the run folder got what there was."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    from structpeft.workflow.run import RunFailed

    try:
        return _dispatch(args, argv)
    except RunFailed as e:
        print(f"structpeft {args.command}: failed: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, TypeError) as e:  # bad input: flags, data, model, method, checkpoint
        print(f"structpeft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"structpeft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
