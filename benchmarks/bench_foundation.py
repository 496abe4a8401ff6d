"""Foundation benchmark: LoRA and FLoRA beside HF PEFT's LoRA, as ratios measured in one run.

    python benchmarks/bench_foundation.py [--rounds 20]

1. structpeft LoRA vs HF PEFT LoRA on MiniLM (same targets, r=8)      target <= 1.05x
2. FLoRA vs structpeft LoRA on MiniLM's linear layers (r=8)            target <= 1.10x
3. FLoRA vs HF PEFT LoRA-conv at (nearly) equal parameters on the
   groups=1 convs of MobileNetV2, and on one 256->256 3x3 conv          target < 1.00x
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import structpeft as sp  # noqa: E402
from harness import Candidate, compare, print_ratios  # noqa: E402

TEXT_TARGETS = ["query", "key", "value", "dense"]


def text_batch(tokenizer, n: int = 32) -> dict[str, torch.Tensor]:
    from structpeft.zoo.rotten_tomatoes import load_rotten_tomatoes

    train, _ = load_rotten_tomatoes()
    chunk = train[:n]
    enc = tokenizer([e.text for e in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt")
    return {**enc, "labels": torch.tensor([e.label for e in chunk])}


class MiniLMWorkload:
    """MiniLM with a new head on one real Rotten Tomatoes batch; fresh adapted copies on demand."""

    HEAD = {"modules_to_save": ["classifier"]}

    def __init__(self) -> None:
        from structpeft.zoo.text import load_text_classifier

        self.base, tokenizer = load_text_classifier("minilm")
        self.batch = text_batch(tokenizer)

    def loss(self, model: nn.Module) -> torch.Tensor:
        return model(**self.batch).loss

    def candidate(self, name: str, config: sp.AdapterConfig | peft.PeftConfig) -> Candidate:
        wrap = sp.get_peft_model if isinstance(config, sp.AdapterConfig) else peft.get_peft_model
        return Candidate(name, wrap(copy.deepcopy(self.base), config).train(), self.loss)


def bench_minilm(rounds: int) -> list[str]:
    work = MiniLMWorkload()
    head = MiniLMWorkload.HEAD
    candidates = [
        work.candidate("hf-peft lora r=8", peft.LoraConfig(r=8, lora_alpha=16, target_modules=TEXT_TARGETS, **head)),
        work.candidate("structpeft lora r=8", sp.LoraConfig(r=8, alpha=16, target_modules=TEXT_TARGETS, **head)),
        work.candidate("structpeft flora r=8", sp.FloraConfig(r=8, alpha=16, target_modules=TEXT_TARGETS, **head)),
    ]
    results = compare(candidates, rounds)
    return print_ratios(
        "MiniLM, batch 32 x <=64 tokens, Rotten Tomatoes",
        results,
        [
            ("structpeft lora r=8", "hf-peft lora r=8", 1.05),
            ("structpeft flora r=8", "structpeft lora r=8", 1.10),
            ("structpeft flora r=8", "hf-peft lora r=8", None),
        ],
    )


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flora_at_equal_params(base: nn.Module, targets: list[str], budget: int) -> tuple[nn.Module, int]:
    """The largest FLoRA rank whose trainable count does not exceed ``budget``."""
    best = None
    for r in range(1, 65):
        model = sp.get_peft_model(copy.deepcopy(base), sp.FloraConfig(r=r, alpha=2 * r, target_modules=targets))
        if trainable(model) > budget:
            break
        best = (model, r)
    assert best is not None, "no FLoRA rank fits the budget"
    return best


def conv_candidates(
    base: nn.Module, targets: list[str], lora_r: int, loss: Callable[[nn.Module], torch.Tensor]
) -> list[Candidate]:
    hf = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=targets)
    ).train()
    flora, r = flora_at_equal_params(base, targets, trainable(hf))
    return [
        Candidate(f"hf-peft lora-conv r={lora_r}", hf, loss),
        Candidate(f"structpeft flora r={r}", flora.train(), loss),
    ]


def bench_convs(rounds: int) -> list[str]:
    from structpeft.zoo.mobilenet_v2 import load_mobilenet_v2

    torch.manual_seed(0)
    net = load_mobilenet_v2(num_classes=10)
    for p in net.parameters():
        p.requires_grad_(False)
    # HF PEFT's LoRA-conv needs r divisible by groups, so depthwise convs are out for it: compare on
    # every groups == 1 conv (the stem 3x3 and all 1x1 expansions/projections).
    targets = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    images, labels = torch.randn(32, 3, 112, 112), torch.randint(0, 10, (32,))
    net_loss = lambda model: F.cross_entropy(model(images), labels)  # noqa: E731
    missed = []
    cands = conv_candidates(net, targets, 8, net_loss)
    missed += print_ratios(
        f"MobileNetV2 ImageNet weights, {len(targets)} groups=1 convs, batch 32 @ 112px",
        compare(cands, rounds),
        [(cands[1].name, cands[0].name, 0.999)],
    )

    conv = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1))
    x = torch.randn(32, 256, 28, 28)
    conv_loss = lambda model: model(x).square().mean()  # noqa: E731
    cands = conv_candidates(conv, ["0"], 16, conv_loss)
    missed += print_ratios(
        "one 256->256 3x3 conv, batch 32 @ 28x28", compare(cands, rounds), [(cands[1].name, cands[0].name, 0.999)]
    )
    return missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"# structpeft foundation benchmark (torch {torch.__version__}, peft {peft.__version__}, {device})")
    missed = bench_minilm(args.rounds) + bench_convs(args.rounds)
    print("\nall targets met" if not missed else "\ntargets missed:\n  " + "\n  ".join(missed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
