"""How much of SURM circulant's cost on a decoder's MLP layers is its FFTs alone.

    python benchmarks/surm_fft_floor.py [--rounds 30]

On SmolLM2-135M's MLP shapes (576 -> 1536 and 1536 -> 576: block-circulant grids of 8 x 3 and 3 x 8 blocks
of 192) and a batch of 4 x 128 tokens, forward and backward (inputs requiring grad, as inside a network), it
times interleaved: SURM's block-circulant product as it runs, the same FFTs with no contraction between them
(the floor any contraction leaves), and LoRA r=8 on the same layer. Medians in ms, each beside LoRA's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from structpeft import structured as S


def ffts_only(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """rfft of the input blocks and irfft of the output blocks, their spectra joined by a broadcast only."""
    q, p, b = c.shape
    x_spectrum = torch.fft.rfft(x.reshape(*x.shape[:-1], p, b))  # (..., p, f)
    joined = x_spectrum.sum(-2, keepdim=True) * torch.fft.rfft(c)[:, 0]  # (..., q, f)
    return torch.fft.irfft(joined, n=b).reshape(*x.shape[:-1], q * b)


def medians(d_out: int, d_in: int, rounds: int, block: int = 192) -> dict[str, float]:
    c = torch.randn(d_out // block, d_in // block, block, requires_grad=True)
    x = torch.randn(4, 128, d_in, requires_grad=True)
    a_lora, b_lora = torch.randn(8, d_in, requires_grad=True), torch.randn(d_out, 8, requires_grad=True)
    work = {
        "surm circulant": lambda: S.block_circulant_matmul(c, x),
        "its FFTs alone": lambda: ffts_only(c, x),
        "lora r=8": lambda: (x @ a_lora.T) @ b_lora.T,
    }
    times: dict[str, list[float]] = {name: [] for name in work}
    for _ in range(rounds + 3):  # the first three are warm-up
        for name, run in work.items():
            start = time.perf_counter()
            run().sum().backward()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[3:]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward, median of {args.rounds}")
    for d_out, d_in in ((1536, 576), (576, 1536)):
        found = medians(d_out, d_in, args.rounds)
        row = "  ".join(f"{n} {1000 * m:.2f} ms ({m / found['lora r=8']:.1f}x lora)" for n, m in found.items())
        print(f"{d_in} -> {d_out}: {row}")


if __name__ == "__main__":
    main()
