"""Peak memory of a Coeff-Tuning training step on Gemma 3 270M at a long input: materialised maps
against ``chunk_size`` (queries in chunks, each recomputed in the backward).

    python benchmarks/coeff_long_context.py [--tokens 2048] [--chunk-size 256] [--device cpu]

Each path runs in a fresh process: forward and backward of one 2,048-token row (which crosses the 512-token
sliding window of 15 of the 18 layers), the loss on every token. It prints the peak resident set on CPU (the
model included, the high-water mark reset after loading) or the CUDA allocator's peak, and the step time.
Needs the Gemma 3 packages (see the README's decoder section).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def one_step(tokens: int, chunk_size: int | None, device_name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import structpeft as sp
    from structpeft.workflow.train import peak_memory_mib, reset_peak_memory
    from structpeft.zoo.gguf import convert_gguf, gemma3_270m_path

    device = torch.device(device_name)
    folder = convert_gguf(gemma3_270m_path()).folder
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = sp.get_peft_model(base, sp.CoeffConfig(dropout=0.0, chunk_size=chunk_size, init_weights=False)).to(device)
    ids = torch.randint(0, 20_000, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    since_reset = reset_peak_memory(device)
    start = time.perf_counter()
    hidden = model.base_model.model(input_ids=ids).last_hidden_state
    hidden.float().pow(2).mean().backward()  # a loss on every position, without 262k-wide logits
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"chunk_size": chunk_size, "seconds": seconds, **peak_memory_mib(device, since_reset)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one path
    args = parser.parse_args()
    if args.one is not None:
        chunk = None if args.one == "none" else int(args.one)
        print(json.dumps(one_step(args.tokens, chunk, args.device)))
        return
    rows = []
    for chunk in ("none", str(args.chunk_size)):
        command = [sys.executable, __file__, "--tokens", str(args.tokens), "--device", args.device, "--one", chunk]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    key = "peak_cuda_mib" if "peak_cuda_mib" in rows[0] else "peak_rss_mib"
    for row in rows:
        name = "materialised" if row["chunk_size"] is None else f"chunk_size={row['chunk_size']}"
        print(f"{name:>16}: peak {row[key]:,.0f} MiB ({key}), step {row['seconds']:.1f} s")
    print(f"chunked / materialised peak: {rows[1][key] / rows[0][key]:.2f}x")


if __name__ == "__main__":
    main()
