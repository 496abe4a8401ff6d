"""Attention-level methods (Coeff-Tuning, Kernel-mix), as ratios measured in one run.

    python benchmarks/bench_attention.py [--rounds 20] [--skip-dinov2] [--skip-mistral]

On MiniLM (batch 32 x <=64 tokens of Rotten Tomatoes), on the DINOv2-S/14 ViT (batch 8 at
224 px, 257 tokens; random pixels, since step time does not depend on them) and on a small
Mistral-style decoder (random weights and tokens: grouped-query heads, 8 over 2, and a sliding
window of 64 over 256 tokens, so the mask carries the window):

1. Coeff-Tuning alone vs the frozen base with eager attention, and Coeff + LoRA vs LoRA with eager
   attention                                                           target <= 1.15x (FLOPs: ~1.09x)
2. the query-chunked path vs the materialised one (Coeff + LoRA)      memory, for the time it costs
3. Kernel-mix vs LoRA at Kernel-mix's parameter count (on q, v, o)       target <= 1.2x

"Frozen base" trains only the embeddings' LayerNorm, so that the backward pass runs through the
whole encoder, as it must for Coeff-Tuning's α in every layer; it is the base model's own cost.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import structpeft as sp  # noqa: E402
from bench_foundation import MiniLMWorkload  # noqa: E402
from harness import Candidate, compare, print_ratios  # noqa: E402

# The Mistral-style decoder: 384 wide, 8 query heads of 48 over 2 key/value heads, 4 layers.
MISTRAL = dict(
    vocab_size=1000,
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    sliding_window=64,
    max_position_embeddings=512,
)
# LoRA r on q (384->384), v (384->96) and o (384->384) has (768 + 480 + 768)·r = 2,016·r parameters
# per layer; Kernel-mix at (1, 2, 2, 4) has 17,280 here (get_nb_trainable_parameters), nearest r = 9 (18,144).
MISTRAL_KERNEL_MIX_LORA_RANK = 9

# Kernel-mix adapts q, v and o; a LoRA of rank r on those three has 3 · 768 · r = 2,304·r parameters
# per layer, exactly Kernel-mix's count at ranks (1, 2, 2, 4) with r = 11 on MiniLM (384 wide, 12
# heads: 25,344 per layer) and r = 8 on DINOv2-S (384 wide, 6 heads: 18,432 per layer).
KERNEL_MIX_LORA_RANK = {"minilm": 11, "dinov2": 8, "mistral": MISTRAL_KERNEL_MIX_LORA_RANK}


def frozen_base(model: nn.Module, embedding_norm: str) -> nn.Module:
    """The base model, nothing trainable but one LayerNorm at the bottom (so backward spans it all)."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(embedding_norm))
    return model


def eager(model: nn.Module) -> nn.Module:
    model.config._attn_implementation = "eager"
    return model


class Workload:
    """A base model, a loss, and fresh adapted copies of the model on demand."""

    def __init__(self, base: nn.Module, loss, embedding_norm: str, qvo: list[str], kind: str) -> None:
        self.base, self.loss, self.embedding_norm, self.qvo, self.kind = base, loss, embedding_norm, qvo, kind

    def plain(self, name: str, attention: str) -> Candidate:
        model = frozen_base(copy.deepcopy(self.base), self.embedding_norm)
        model.config._attn_implementation = attention
        return Candidate(name, model.train(), self.loss)

    def adapted(self, name: str, configs: list[sp.AdapterConfig], attention: str = "sdpa") -> Candidate:
        model = copy.deepcopy(self.base)
        model.config._attn_implementation = attention
        return Candidate(name, sp.get_peft_model(model, configs).train(), self.loss)

    def candidates(self) -> list[Candidate]:
        lora = lambda: sp.LoraConfig(r=8, alpha=16, target_modules=self.qvo)  # noqa: E731
        rank = KERNEL_MIX_LORA_RANK[self.kind]
        return [
            self.plain("frozen base (eager)", "eager"),
            self.adapted("coeff", [sp.CoeffConfig()]),
            self.adapted("lora r=8 (eager)", [lora()], "eager"),
            self.adapted("lora r=8 (sdpa)", [lora()]),
            self.adapted("coeff + lora r=8", [sp.CoeffConfig(), lora()]),
            self.adapted("coeff + lora r=8, chunked", [sp.CoeffConfig(chunk_size=16), lora()]),
            self.adapted("kernel-mix (1,2,2,4)", [sp.KernelMixConfig()]),
            self.adapted(  # with Kernel-mix's default adapter dropout, for the same work per step
                f"lora r={rank} on q,v,o",
                [sp.LoraConfig(r=rank, alpha=rank, dropout=0.1, target_modules=self.qvo)],
            ),
        ]

    def pairs(self) -> list[tuple[str, str, float | None]]:
        rank = KERNEL_MIX_LORA_RANK[self.kind]
        return [
            ("coeff", "frozen base (eager)", 1.15),
            ("coeff + lora r=8", "lora r=8 (eager)", 1.15),
            ("coeff + lora r=8", "lora r=8 (sdpa)", None),
            ("coeff + lora r=8, chunked", "coeff + lora r=8", None),
            ("kernel-mix (1,2,2,4)", f"lora r={rank} on q,v,o", 1.2),
            ("kernel-mix (1,2,2,4)", "lora r=8 (sdpa)", None),
        ]


def minilm() -> Workload:
    work = MiniLMWorkload()
    work.base.eval()  # dropout off: the same computation in every step of every candidate
    qvo = ["query", "value", "attention.output.dense"]
    return Workload(work.base, work.loss, "bert.embeddings.LayerNorm", qvo, "minilm")


def dinov2(batch: int = 8) -> Workload:
    from structpeft.zoo.dinov2 import load_dinov2_small

    base = load_dinov2_small(224)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, 224, 224, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    head = nn.Linear(384, 10)

    def loss(model: nn.Module) -> torch.Tensor:
        cls = model(pixel_values=pixels).pooler_output  # (B, 384)
        return nn.functional.cross_entropy(head(cls), labels)

    qvo = ["q_proj", "v_proj", "o_proj"]
    return Workload(base, loss, "embeddings.patch_embeddings", qvo, "dinov2")


def mistral(batch: int = 4, tokens: int = 256) -> Workload:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    base = MistralForCausalLM(MistralConfig(**MISTRAL)).eval()
    ids = torch.randint(0, MISTRAL["vocab_size"], (batch, tokens), generator=torch.Generator().manual_seed(0))

    def loss(model: nn.Module) -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    return Workload(base, loss, "model.embed_tokens", ["q_proj", "v_proj", "o_proj"], "mistral")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--skip-dinov2", action="store_true")
    parser.add_argument("--skip-mistral", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"# structpeft attention-methods benchmark (torch {torch.__version__}, {device})")
    missed: list[str] = []
    workloads = [("MiniLM, batch 32 x <=64 tokens", minilm)]
    if not args.skip_dinov2:
        workloads.append(("DINOv2-S/14, batch 8 x 257 tokens (224 px)", dinov2))
    if not args.skip_mistral:
        workloads.append(("Mistral-style GQA 8/2 heads, window 64, batch 4 x 256 tokens", mistral))
    for title, make in workloads:
        work = make()
        results = compare(work.candidates(), args.rounds)
        missed += print_ratios(title, results, work.pairs())
    print("\nall targets met" if not missed else "\ntargets missed:\n  " + "\n  ".join(missed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
