"""SURM benchmark, as ratios measured in one run.

    python benchmarks/bench_surm.py [--rounds 30]

1. each structured family's fast product vs a dense matmul, n = 256..4096 (forward + backward)
2. SURM circulant (LoRA mode) vs HF PEFT C3A and vs HF PEFT LoRA r=8 on MiniLM
                                                    targets: <= C3A, <= 1.3x LoRA r=8
3. SURM adapters (Houlsby placement) vs HF PEFT LoRA r=8 on MiniLM
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import peft
import torch

sys.path.insert(0, str(Path(__file__).parent))
import structpeft as sp  # noqa: E402
from bench_foundation import TEXT_TARGETS, MiniLMWorkload  # noqa: E402
from harness import compare, print_ratios, time_interleaved  # noqa: E402
from structpeft import structured as S  # noqa: E402

TOKENS = 2048  # a batch of 32 sequences x 64 tokens


def family_products(n: int) -> dict[str, tuple[list[torch.Tensor], object]]:
    """Per family: its parameters and the product as a function of (params, x)."""
    k = 2 ** round(math.log2(n) / 2)
    return {
        "circulant": ([torch.randn(n)], S.circulant_matmul),
        "toeplitz": ([torch.randn(2 * n - 1)], lambda t, x: S.toeplitz_matmul(t, x, n)),
        "sym_toeplitz": ([torch.randn(n)], S.sym_toeplitz_matmul),
        "kronecker": ([torch.randn(k, k), torch.randn(n // k, n // k)], S.kronecker_matmul),
        "ldr r=1": ([torch.randn(1, n), torch.randn(1, n)], S.ldr_matmul),
        "ldr r=4": ([torch.randn(4, n), torch.randn(4, n)], S.ldr_matmul),
    }


def step(product, params: list[torch.Tensor], x: torch.Tensor):
    return lambda: product(*params, x).sum().backward()


def bench_products(rounds: int) -> None:
    print(f"\n## fast product / dense matmul, forward + backward on {TOKENS} vectors (ratio < 1: fast wins)")
    sizes = [256, 512, 1024, 2048, 4096]
    print(f"{'family':<14}" + "".join(f"{f'n={n}':>10}" for n in sizes))
    rows: dict[str, list[str]] = {}
    for n in sizes:
        x = torch.randn(TOKENS, n, requires_grad=True)
        dense_w = torch.randn(n, n, requires_grad=True)
        fns = {"dense": step(lambda w, v: v @ w.T, [dense_w], x)}
        for name, (params, product) in family_products(n).items():
            fns[name] = step(product, [p.requires_grad_(True) for p in params], x)
        times = time_interleaved(fns, rounds)
        for name in fns:
            if name != "dense":
                rows.setdefault(name, []).append(f"{times[name] / times['dense']:>9.2f}x")
    for name, cells in rows.items():
        print(f"{name:<14}" + "".join(f"{c:>10}" for c in cells))


def bench_minilm(rounds: int) -> list[str]:
    work = MiniLMWorkload()
    head = MiniLMWorkload.HEAD
    houlsby = ["attention.output.dense", "output.dense"]
    candidates = [
        work.candidate("hf-peft lora r=8", peft.LoraConfig(r=8, lora_alpha=16, target_modules=TEXT_TARGETS, **head)),
        work.candidate("hf-peft c3a b=384", peft.C3AConfig(block_size=384, target_modules=TEXT_TARGETS, **head)),
        work.candidate("surm circulant", sp.SurmConfig(target_modules=TEXT_TARGETS, **head)),
        work.candidate("surm toeplitz", sp.SurmConfig(structure="toeplitz", target_modules=TEXT_TARGETS, **head)),
        work.candidate("surm kronecker", sp.SurmConfig(structure="kronecker", target_modules=TEXT_TARGETS, **head)),
        work.candidate("surm circulant adapters", sp.SurmConfig(mode="adapter", target_modules=houlsby, **head)),
    ]
    results = compare(candidates, rounds)
    return print_ratios(
        "MiniLM, batch 32 x <=64 tokens, targets query,key,value,dense",
        results,
        [
            ("surm circulant", "hf-peft c3a b=384", 1.0),
            ("surm circulant", "hf-peft lora r=8", 1.3),
            ("surm toeplitz", "hf-peft lora r=8", None),
            ("surm kronecker", "hf-peft lora r=8", None),
            ("surm circulant adapters", "hf-peft lora r=8", None),
        ],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--skip-products", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"# structpeft SURM benchmark (torch {torch.__version__}, peft {peft.__version__}, {device})")
    if not args.skip_products:
        bench_products(max(5, args.rounds // 3))
    missed = bench_minilm(args.rounds)
    print("\nall targets met" if not missed else "\ntargets missed:\n  " + "\n  ".join(missed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
