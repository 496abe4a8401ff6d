"""How much of SURM circulant's cost on a decoder's MLP layers is its FFTs alone.

    python benchmarks/surm_fft_floor.py [--rounds 30]

On SmolLM2-135M's MLP shapes (576 -> 1536 and 1536 -> 576: block-circulant grids of 8 x 3 and 3 x 8 blocks
of 192) and a batch of 4 x 128 tokens, it times interleaved: SURM's block-circulant product forward and
backward as it runs (inputs requiring grad, as inside a network); the four transforms that product cannot
avoid (rfft of the input and of the output's gradient, irfft of the output and of the input's gradient),
run alone on the same shapes, which is the floor any way of combining the spectra leaves; and LoRA r=8 on
the same layer, forward and backward. Medians in ms, each beside LoRA's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from structpeft import structured as S


def transforms_only(c: torch.Tensor, x: torch.Tensor, grad_y: torch.Tensor, spectra: dict[str, torch.Tensor]) -> None:
    """The product's four unavoidable transforms on its shapes, nothing between them, no autograd; the
    inverse transforms read contiguous spectra of the output's and the input's shapes made beforehand."""
    q, p, b = c.shape
    with torch.no_grad():
        torch.fft.rfft(x.reshape(-1, p, b))  # forward
        torch.fft.irfft(spectra["y"], n=b)
        torch.fft.rfft(grad_y.reshape(-1, q, b))  # backward
        torch.fft.irfft(spectra["x"], n=b)


def medians(d_out: int, d_in: int, rounds: int, block: int = 192) -> dict[str, float]:
    c = torch.randn(d_out // block, d_in // block, block, requires_grad=True)
    x = torch.randn(4, 128, d_in, requires_grad=True)
    grad_y = torch.randn(4, 128, d_out)
    a_lora, b_lora = torch.randn(8, d_in, requires_grad=True), torch.randn(d_out, 8, requires_grad=True)
    q, p, f = d_out // block, d_in // block, block // 2 + 1
    spectra = {"y": torch.randn(512, q, f, dtype=torch.cfloat), "x": torch.randn(512, p, f, dtype=torch.cfloat)}
    work = {
        "surm circulant": lambda: S.block_circulant_matmul(c, x).backward(grad_y),
        "its FFTs alone": lambda: transforms_only(c, x, grad_y, spectra),
        "lora r=8": lambda: ((x @ a_lora.T) @ b_lora.T).backward(grad_y),
    }
    times: dict[str, list[float]] = {name: [] for name in work}
    for _ in range(rounds + 3):  # the first three are warm-up
        for name, run in work.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[3:]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.rounds}")
    for d_out, d_in in ((1536, 576), (576, 1536)):
        found = medians(d_out, d_in, args.rounds)
        row = "  ".join(f"{n} {1000 * m:.2f} ms ({m / found['lora r=8']:.1f}x lora)" for n, m in found.items())
        grid = f"{d_out // 192} x {d_in // 192} grid"
        print(f"{d_in} -> {d_out} ({grid}): {row}")


if __name__ == "__main__":
    main()
