"""The speed suite: step time and memory of every method beside HF PEFT and the frozen base.

Each section builds its candidates on one device, interleaves their training steps
(:mod:`structpeft.workflow.timing`) and prints ratios with the targets beside them:

- ``text``: our LoRA and FLoRA vs HF PEFT LoRA on MiniLM (one real Rotten Tomatoes batch).
- ``conv``: FLoRA vs HF PEFT LoRA-conv at (nearly) equal parameters, on MobileNetV2's groups=1
  convs and on one 256->256 3x3 conv; our LoRA and FLoRA on every MobileNetV2 conv, depthwise too.
- ``surm``: SURM (circulant, Toeplitz, Kronecker, LDR; LoRA and adapter mode) vs HF PEFT C3A and LoRA.
- ``products``: each structured family's fast product vs a dense matmul, n = 256..4096.
- ``attention``: Coeff-Tuning, Coeff + LoRA and Kernel-mix vs the frozen base and LoRA on MiniLM,
  DINOv2-S (random pixels: step time does not depend on them) and a Mistral-style decoder.
- ``compile``: ``torch.compile`` vs eager for LoRA, FLoRA and Coeff + LoRA on MiniLM.
- ``decoder``: every method vs HF PEFT LoRA on a real decoder LLM (SmolLM2-135M-Instruct), batch 4 x 128
  tokens, on its seven projections (Kernel-mix on its attention blocks).
- ``quantized``: every weight method on an NF4 base (SmolLM2, Gemma 3) vs HF PEFT LoRA on the same base and
  LoRA on the float base; the weights' own memory, float and NF4, counted exactly.

Memory is the CUDA allocator's peak over one step on a GPU, else the activations autograd saves.
"""

from __future__ import annotations

import copy
import math
import platform
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import structpeft as sp
from structpeft import structured
from structpeft.workflow import results
from structpeft.workflow.timing import Candidate, compare, time_interleaved, trainable_count

SPEED_JSON, SPEED_MD = "speed.json", "speed.md"
TEXT_TARGETS = ["query", "key", "value", "dense"]


@dataclass(frozen=True)
class Ratio:
    """``a / b`` in step time (and memory); ``target``: the most ``a`` may cost, as a multiple of ``b``."""

    a: str
    b: str
    target: float | None = None


@dataclass(frozen=True)
class Scale:
    """How big the measured work is: the defaults, or tiny shapes that only check the machinery."""

    rounds: int = 20
    warmup: int = 3
    text_batch: int = 32
    vit_batch: int = 8
    vit_pixels: int = 224
    conv_batch: int = 32
    conv_pixels: int = 112
    decoder_tokens: int = 256
    llm_batch: int = 4
    llm_tokens: int = 128
    product_sizes: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    product_vectors: int = 2048
    compile_backend: str = "inductor"
    quick: bool = False  # tiny shapes and one round: checks the machinery, its ratios mean nothing


QUICK = Scale(
    rounds=1, warmup=1, text_batch=4, vit_batch=1, vit_pixels=56, conv_batch=2, conv_pixels=32, decoder_tokens=32,
    llm_batch=1, llm_tokens=16,
    product_sizes=(256,), product_vectors=64, compile_backend="aot_eager", quick=True,
)  # fmt: skip


def _wrap(base: nn.Module, config: Any, device: torch.device, attention: str | None = None) -> nn.Module:
    """A fresh adapted copy of ``base`` (with that attention implementation): structpeft for our
    configs, HF PEFT for theirs."""
    import peft

    model = copy.deepcopy(base)
    if attention is not None:
        model.config._attn_implementation = attention
    adapted = sp.get_peft_model(model, config) if _ours(config) else peft.get_peft_model(model, config)
    return adapted.to(device).train()


def _ours(config: Any) -> bool:
    configs = config if isinstance(config, list) else [config]
    return all(isinstance(c, sp.AdapterConfig) for c in configs)


# -- workloads: a frozen base model and the loss of one fixed batch -------------------------------------
@dataclass
class Workload:
    """Candidates train in training mode (dropout on), as a real step does."""

    base: nn.Module
    loss: Callable[[nn.Module], torch.Tensor]
    device: torch.device
    bottom: str = ""  # a parameter name prefix at the bottom of the model: the frozen base trains only that

    def adapted(self, name: str, config: Any, attention: str | None = None) -> Candidate:
        return Candidate(name, _wrap(self.base, config, self.device, attention), self.loss)

    def frozen(self, name: str, attention: str = "eager") -> Candidate:
        """The base model's own cost: only the bottom trains, so backward runs through all of it."""
        model = copy.deepcopy(self.base).to(self.device).train()
        model.config._attn_implementation = attention
        for param_name, p in model.named_parameters():
            p.requires_grad_(param_name.startswith(self.bottom))
        return Candidate(name, model, self.loss)


def minilm(device: torch.device, scale: Scale) -> Workload:
    from structpeft.zoo.rotten_tomatoes import load_rotten_tomatoes
    from structpeft.zoo.text import load_text_classifier

    base, tokenizer = load_text_classifier("minilm")
    train, _ = load_rotten_tomatoes()
    rows = train[: scale.text_batch]
    batch = tokenizer([e.text for e in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
    batch = {**batch, "labels": torch.tensor([e.label for e in rows])}
    batch = {k: v.to(device) for k, v in batch.items()}
    return Workload(base, lambda model: model(**batch).loss, device, "bert.embeddings.LayerNorm")


def dinov2(device: torch.device, scale: Scale) -> Workload:
    from structpeft.zoo.dinov2 import load_dinov2_small

    base = load_dinov2_small(scale.vit_pixels)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(scale.vit_batch, 3, scale.vit_pixels, scale.vit_pixels, generator=g).to(device)
    labels = torch.randint(0, 10, (scale.vit_batch,), generator=g).to(device)
    head = nn.Linear(base.config.hidden_size, 10).to(device)  # a fixed head: the loss needs classes

    def loss(model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(head(model(pixel_values=pixels).pooler_output), labels)  # (B, 10)

    return Workload(base, loss, device, "embeddings.patch_embeddings")


# A Mistral-style decoder: 384 wide, 8 query heads of 48 over 2 key/value heads, a window of 64.
MISTRAL = dict(
    vocab_size=1000, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, sliding_window=64, max_position_embeddings=512,
)  # fmt: skip


def mistral(device: torch.device, scale: Scale, batch: int = 4) -> Workload:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    base = MistralForCausalLM(MistralConfig(**MISTRAL))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MISTRAL["vocab_size"], (batch, scale.decoder_tokens), generator=g).to(device)
    return Workload(base, lambda model: model(input_ids=ids, labels=ids).loss, device, "model.embed_tokens")


def decoder(name: str, device: torch.device, scale: Scale, quantize: str | None = None) -> Workload:
    """A real decoder preset (``smollm2-135m``, ``gemma3-270m``) from its GGUF (converted once, cached), its
    linear layers quantized by bitsandbytes if asked, on a fixed batch of random token ids: a step's cost does
    not depend on which tokens they are."""
    from transformers import AutoModelForCausalLM

    from structpeft.workflow.models import gguf_file, quantization_config
    from structpeft.zoo.gguf import convert_gguf

    folder = convert_gguf(gguf_file(name)).folder
    extra = (
        {} if quantize is None else {"quantization_config": quantization_config(quantize), "device_map": str(device)}
    )
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (scale.llm_batch, scale.llm_tokens), generator=g).to(device)
    return Workload(base, lambda model: model(input_ids=ids, labels=ids).loss, device, "model.embed_tokens")


# -- sections --------------------------------------------------------------------------------------------
@dataclass
class Section:
    title: str
    candidates: list[Candidate]
    ratios: list[Ratio]
    skipped: str | None = None  # why it could not be measured (its model or data is not installed)


def text_section(device: torch.device, scale: Scale) -> Iterator[Section]:
    import peft

    work, head = minilm(device, scale), {"modules_to_save": ["classifier"]}
    yield Section(
        f"MiniLM, batch {scale.text_batch} x <=64 tokens, Rotten Tomatoes",
        [
            work.adapted("hf-peft lora r=8", peft.LoraConfig(r=8, lora_alpha=16, target_modules=TEXT_TARGETS, **head)),
            work.adapted("lora r=8", sp.LoraConfig(r=8, alpha=16, target_modules=TEXT_TARGETS, **head)),
            work.adapted("flora r=8", sp.FloraConfig(r=8, alpha=16, target_modules=TEXT_TARGETS, **head)),
        ],
        [
            Ratio("lora r=8", "hf-peft lora r=8", 1.05),
            Ratio("flora r=8", "lora r=8", 1.10),
            Ratio("flora r=8", "hf-peft lora r=8"),
        ],
    )


def _conv_pair(base: nn.Module, targets: list[str], lora_r: int, loss, device: torch.device) -> list[Candidate]:
    """HF PEFT LoRA-conv at rank ``lora_r`` and the largest FLoRA whose parameter count does not exceed it."""
    import peft

    hf = _wrap(base, peft.LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=targets), device)
    budget, best = trainable_count(hf), None
    for r in range(1, 129):
        config = sp.FloraConfig(r=r, alpha=2 * r, target_modules=targets)
        if trainable_count(sp.get_peft_model(copy.deepcopy(base), config)) > budget:
            break
        best = (r, config)
    if best is None:
        raise ValueError(f"no FLoRA rank fits HF LoRA-conv r={lora_r}'s {budget:,} parameters")
    return [
        Candidate(f"hf-peft lora-conv r={lora_r}", hf, loss),
        Candidate(f"flora r={best[0]}", _wrap(base, best[1], device), loss),
    ]


def conv_section(device: torch.device, scale: Scale) -> Iterator[Section]:
    from structpeft.zoo.mobilenet_v2 import load_mobilenet_v2

    torch.manual_seed(0)
    net = load_mobilenet_v2(num_classes=10).requires_grad_(False)
    convs = {n: m for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    # HF PEFT's LoRA-conv needs r divisible by groups, so depthwise convs are out for it: compare on
    # every groups == 1 conv (the stem 3x3 and all 1x1 expansions and projections).
    targets = [n for n, m in convs.items() if m.groups == 1]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(scale.conv_batch, 3, scale.conv_pixels, scale.conv_pixels, generator=g).to(device)
    labels = torch.randint(0, 10, (scale.conv_batch,), generator=g).to(device)

    def loss(model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(model(images), labels)

    net_pair = _conv_pair(net, targets, 8, loss, device)
    yield Section(
        f"MobileNetV2, {len(targets)} groups=1 convs, batch {scale.conv_batch} @ {scale.conv_pixels}px",
        net_pair,
        [Ratio(net_pair[1].name, net_pair[0].name, 1.0)],
    )

    # Ours on every conv, the depthwise ones too (as the conv suite runs them): there LoRA convolves
    # with ΔW instead of its groups·r-wide factored path, and FLoRA keeps its Tucker factors.
    every = list(convs)
    ours = [
        Candidate(name, _wrap(net, config(r=8, alpha=16, target_modules=every), device), loss)
        for name, config in (("lora r=8", sp.LoraConfig), ("flora r=8", sp.FloraConfig))
    ]
    depthwise = len(every) - len(targets)  # groups > 1
    yield Section(
        f"MobileNetV2, all {len(every)} convs ({depthwise} depthwise), batch {scale.conv_batch} @ "
        f"{scale.conv_pixels}px",
        ours,
        [Ratio("flora r=8", "lora r=8")],
    )

    conv = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1)).requires_grad_(False)
    side = max(scale.conv_pixels // 4, 4)
    x = torch.randn(scale.conv_batch, 256, side, side, generator=g).to(device)
    conv_pair = _conv_pair(conv, ["0"], 16, lambda m: m(x).square().mean(), device)
    yield Section(
        f"one 256->256 3x3 conv, batch {scale.conv_batch} @ {side}x{side}",
        conv_pair,
        [Ratio(conv_pair[1].name, conv_pair[0].name, 1.0)],
    )


def surm_section(device: torch.device, scale: Scale) -> Iterator[Section]:
    import peft

    work, head = minilm(device, scale), {"modules_to_save": ["classifier"]}
    houlsby = ["attention.output.dense", "output.dense"]  # after attention and after the MLP
    surm = lambda **kw: sp.SurmConfig(target_modules=TEXT_TARGETS, **head, **kw)  # noqa: E731
    yield Section(
        f"MiniLM, batch {scale.text_batch} x <=64 tokens, targets query,key,value,dense",
        [
            work.adapted("hf-peft lora r=8", peft.LoraConfig(r=8, lora_alpha=16, target_modules=TEXT_TARGETS, **head)),
            work.adapted("hf-peft c3a b=384", peft.C3AConfig(block_size=384, target_modules=TEXT_TARGETS, **head)),
            work.adapted("surm circulant", surm()),
            work.adapted("surm toeplitz", surm(structure="toeplitz")),
            work.adapted("surm kronecker", surm(structure="kronecker")),
            work.adapted("surm ldr r=6", surm(structure="ldr", rank=6)),  # the text suite's LoRA r=8 budget
            work.adapted("surm circulant adapters", sp.SurmConfig(mode="adapter", target_modules=houlsby, **head)),
        ],
        [
            Ratio("surm circulant", "hf-peft c3a b=384", 1.0),
            Ratio("surm circulant", "hf-peft lora r=8", 1.3),
            Ratio("surm toeplitz", "hf-peft lora r=8"),
            Ratio("surm kronecker", "hf-peft lora r=8"),
            Ratio("surm ldr r=6", "hf-peft lora r=8"),
            Ratio("surm circulant adapters", "hf-peft lora r=8"),
        ],
    )


# Kernel-mix at (1, 2, 2, 4) against LoRA on q, v, o at the same parameter count: 3·768·r per layer
# is Kernel-mix's 25,344 at r = 11 on MiniLM (12 heads), its 18,432 at r = 8 on DINOv2-S (6 heads);
# on the Mistral-style decoder (v is 384->96) Kernel-mix has 17,280 and r = 9 gives 18,144.
_ATTENTION = {
    "minilm": (minilm, ["query", "value", "attention.output.dense"], 11),
    "dinov2": (dinov2, ["q_proj", "v_proj", "o_proj"], 8),
    "mistral": (mistral, ["q_proj", "v_proj", "o_proj"], 9),
}


def attention_section(device: torch.device, scale: Scale) -> Iterator[Section]:
    titles = {
        "minilm": f"MiniLM, batch {scale.text_batch} x <=64 tokens",
        "dinov2": f"DINOv2-S/14, batch {scale.vit_batch} at {scale.vit_pixels} px (random pixels)",
        "mistral": f"Mistral-style decoder, GQA 8/2 heads, window 64, batch 4 x {scale.decoder_tokens} tokens",
    }
    for name, (make, qvo, rank) in _ATTENTION.items():
        try:
            work = make(device, scale)
        except FileNotFoundError as e:  # an offline asset that is not installed: the others still run
            yield Section(titles[name], [], [], skipped=str(e))
            continue
        lora = lambda qvo=qvo: sp.LoraConfig(r=8, alpha=16, target_modules=qvo)  # noqa: E731
        same = f"lora r={rank} on q,v,o"
        yield Section(
            titles[name],
            [
                work.frozen("frozen base (eager)"),
                work.adapted("coeff", sp.CoeffConfig(), "sdpa"),
                work.adapted("lora r=8 (eager)", lora(), "eager"),
                work.adapted("lora r=8 (sdpa)", lora(), "sdpa"),
                work.adapted("coeff + lora r=8", [sp.CoeffConfig(), lora()], "sdpa"),
                work.adapted("coeff + lora r=8, chunked", [sp.CoeffConfig(chunk_size=16), lora()], "sdpa"),
                work.adapted("kernel-mix (1,2,2,4)", sp.KernelMixConfig(), "sdpa"),
                # with Kernel-mix's default adapter dropout, for the same work per step
                work.adapted(same, sp.LoraConfig(r=rank, alpha=rank, dropout=0.1, target_modules=qvo), "sdpa"),
            ],
            [
                Ratio("coeff", "frozen base (eager)", 1.15),
                Ratio("coeff + lora r=8", "lora r=8 (eager)", 1.15),
                Ratio("coeff + lora r=8", "lora r=8 (sdpa)"),
                Ratio("coeff + lora r=8, chunked", "coeff + lora r=8"),
                Ratio("kernel-mix (1,2,2,4)", same, 1.2),
                Ratio("kernel-mix (1,2,2,4)", "lora r=8 (sdpa)"),
            ],
        )


def compile_section(device: torch.device, scale: Scale) -> Iterator[Section]:
    """Compiled vs eager training steps: the compile happens in the warm-up, outside the timings."""
    work, head = minilm(device, scale), {"modules_to_save": ["classifier"]}
    methods = {
        "lora r=8": sp.LoraConfig(r=8, alpha=16, target_modules=TEXT_TARGETS, **head),
        "flora r=8": sp.FloraConfig(r=8, alpha=16, target_modules=TEXT_TARGETS, **head),
        "coeff + lora r=8": [sp.CoeffConfig(), sp.LoraConfig(r=8, alpha=16, target_modules=TEXT_TARGETS, **head)],
    }
    candidates, ratios = [], []
    for name, config in methods.items():
        eager = work.adapted(name, config)
        compiled = Candidate(f"{name}, compiled", torch.compile(eager.model, backend=scale.compile_backend), work.loss)
        candidates += [eager, compiled]
        ratios.append(Ratio(compiled.name, name))
    title = f"MiniLM, batch {scale.text_batch} x <=64 tokens, torch.compile ({scale.compile_backend}) vs eager"
    yield Section(title, candidates, ratios)


DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def decoder_section(device: torch.device, scale: Scale) -> Iterator[Section]:
    import peft

    title = f"SmolLM2-135M-Instruct, batch {scale.llm_batch} x {scale.llm_tokens} tokens, seven projections"
    try:
        work = decoder("smollm2-135m", device, scale)
    except (FileNotFoundError, ImportError) as e:  # the model's package (or gguf) is not installed
        yield Section(title, [], [], skipped=str(e))
        return
    lora = lambda: sp.LoraConfig(r=8, alpha=16, target_modules=DECODER_TARGETS)  # noqa: E731
    reference = "hf-peft lora r=8"
    yield Section(
        title,
        [
            work.adapted(reference, peft.LoraConfig(r=8, lora_alpha=16, target_modules=DECODER_TARGETS)),
            work.adapted("lora r=8", lora()),
            work.adapted("flora r=8", sp.FloraConfig(r=8, alpha=16, target_modules=DECODER_TARGETS)),
            work.adapted("kernel-mix (1,2,2,4)", sp.KernelMixConfig()),
            work.adapted("coeff + lora r=8", [sp.CoeffConfig(), lora()], "sdpa"),
            work.adapted("surm circulant", sp.SurmConfig(target_modules=DECODER_TARGETS)),
        ],
        [
            Ratio("lora r=8", reference, 1.02),
            Ratio("flora r=8", reference, 1.02),
            Ratio("kernel-mix (1,2,2,4)", reference, 1.05),
            Ratio("coeff + lora r=8", reference, 1.05),
            Ratio("surm circulant", reference, 1.10),
        ],
    )


def weight_bytes(model: nn.Module) -> int:
    """What a model's weights take: every parameter and buffer, and a 4-bit weight's quantization state
    (its block scales, and their own scales under double quantization)."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            total += sum(t.numel() * t.element_size() for t in (state.absmax, state.code) if t is not None)
            state = getattr(state, "state2", None)
    return total


def quantized_section(device: torch.device, scale: Scale) -> Iterator[Section]:
    """Every weight method on an NF4 base beside HF PEFT LoRA on the same base, and LoRA on the float base.
    The weights' own memory is counted exactly (parameters, buffers, quantization states) in the title."""
    import peft

    for name in ("smollm2-135m", "gemma3-270m"):
        title = f"{name}, NF4 base (bitsandbytes, double quantization), batch {scale.llm_batch} x {scale.llm_tokens}"
        try:
            quantized = decoder(name, device, scale, "nf4")
            floating = decoder(name, device, scale)
        except (FileNotFoundError, ImportError) as e:  # the model's packages, gguf or bitsandbytes missing
            yield Section(title, [], [], skipped=str(e))
            continue
        tabled = replace(quantized, base=copy.deepcopy(quantized.base))
        sp.quantize_embeddings(tabled.base, "nf4")
        q_bytes, f_bytes, t_bytes = (weight_bytes(w.base) for w in (quantized, floating, tabled))
        title += (
            f"; weights {f_bytes / 2**20:.0f} MiB float32, {q_bytes / 2**20:.0f} MiB NF4 ({f_bytes / q_bytes:.2f}x "
            f"less), {t_bytes / 2**20:.0f} MiB NF4 with the 4-bit vocabulary table ({f_bytes / t_bytes:.2f}x less)"
        )
        lora = lambda: sp.LoraConfig(r=8, alpha=16, target_modules=DECODER_TARGETS)  # noqa: E731
        reference = "hf-peft lora r=8 (nf4)"
        methods = {
            "lora r=8 (nf4)": lora(),
            "flora r=8 (nf4)": sp.FloraConfig(r=8, alpha=16, target_modules=DECODER_TARGETS),
            "kernel-mix (nf4)": sp.KernelMixConfig(),
            "surm circulant (nf4)": sp.SurmConfig(target_modules=DECODER_TARGETS),
        }
        yield Section(
            title,
            [
                quantized.adapted(reference, peft.LoraConfig(r=8, lora_alpha=16, target_modules=DECODER_TARGETS)),
                *(quantized.adapted(label, config) for label, config in methods.items()),
                floating.adapted("lora r=8 (float32 base)", lora()),
                tabled.adapted("lora r=8 (nf4 + 4-bit table)", lora()),
            ],
            [
                *(Ratio(label, reference, 1.05) for label in methods),  # each weight method, as QLoRA's LoRA
                Ratio("lora r=8 (nf4)", "lora r=8 (float32 base)"),
                Ratio("lora r=8 (nf4 + 4-bit table)", "lora r=8 (nf4)"),
            ],
        )


SECTIONS: dict[str, Callable[[torch.device, Scale], Iterator[Section]]] = {
    "text": text_section,
    "conv": conv_section,
    "surm": surm_section,
    "attention": attention_section,
    "compile": compile_section,
    "decoder": decoder_section,
    "quantized": quantized_section,
}


def product_table(device: torch.device, scale: Scale) -> dict[str, Any]:
    """Each structured family's fast product / a dense n x n matmul, forward + backward."""
    rows: dict[str, list[float]] = {}
    for n in scale.product_sizes:
        k = 2 ** round(math.log2(n) / 2)
        families = {
            "circulant": ([n], structured.circulant_matmul),
            "toeplitz": ([2 * n - 1], lambda t, v, n=n: structured.toeplitz_matmul(t, v, n)),
            "sym_toeplitz": ([n], structured.sym_toeplitz_matmul),
            "kronecker": ([(k, k), (n // k, n // k)], structured.kronecker_matmul),
            "ldr r=1": ([(1, n), (1, n)], structured.ldr_matmul),
            "ldr r=4": ([(4, n), (4, n)], structured.ldr_matmul),
        }
        x = torch.randn(scale.product_vectors, n, device=device, requires_grad=True)

        def step(product: Callable, params: list[torch.Tensor], x: torch.Tensor = x) -> Callable[[], None]:
            return lambda: product(*params, x).sum().backward()

        dense = torch.randn(n, n, device=device, requires_grad=True)
        functions = {"dense": step(lambda w, v: v @ w.T, [dense])}
        for name, (shapes, product) in families.items():
            functions[name] = step(product, [torch.randn(s, device=device, requires_grad=True) for s in shapes])
        times = time_interleaved(functions, max(scale.rounds // 3, 1), device, warmup=min(scale.warmup, 2))
        for name in families:
            rows.setdefault(name, []).append(times[name] / times["dense"])
    return {"sizes": list(scale.product_sizes), "vectors": scale.product_vectors, "ratio_to_dense": rows}


# -- running and reporting -------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"


def measure(section: Section, scale: Scale, device: torch.device) -> dict[str, Any]:
    figures = compare(section.candidates, scale.rounds, scale.warmup)
    rows = [
        {
            "candidate": name,
            "device": str(device),
            "trainable": f["trainable"],
            "step_ms": 1000 * f["step_s"],
            "memory_mib": f["memory_bytes"] / 2**20,
        }
        for name, f in figures.items()
    ]
    ratios = []
    for r in section.ratios:
        time_ratio = figures[r.a]["step_s"] / figures[r.b]["step_s"]
        memory_ratio = figures[r.a]["memory_bytes"] / max(figures[r.b]["memory_bytes"], 1)
        met = None if r.target is None else time_ratio <= r.target
        ratios.append(
            {"a": r.a, "b": r.b, "step_time": time_ratio, "memory": memory_ratio, "target": r.target, "met": met}
        )
    return {"title": section.title, "rows": rows, "ratios": ratios}


def section_text(block: dict[str, Any], memory_label: str) -> str:
    lines = [f"## {block['title']}", f"{'candidate':<36}{'trainable':>12}{'step ms':>10}{memory_label:>22}"]
    for row in block["rows"]:
        lines.append(f"{row['candidate']:<36}{row['trainable']:>12,}{row['step_ms']:>10.1f}{row['memory_mib']:>22.1f}")
    for r in block["ratios"]:
        verdict = "" if r["target"] is None else f"  target <= {r['target']:.2f}x: {'met' if r['met'] else 'MISSED'}"
        lines.append(f"  {r['a']} / {r['b']}: step time {r['step_time']:.3f}x, memory {r['memory']:.3f}x{verdict}")
    return "\n".join(lines)


def products_text(table: dict[str, Any]) -> str:
    lines = [
        f"## fast product / dense matmul, forward + backward on {table['vectors']} vectors (< 1: fast wins)",
        f"{'family':<14}" + "".join(f"{f'n={n}':>10}" for n in table["sizes"]),
    ]
    for name, cells in table["ratio_to_dense"].items():
        lines.append(f"{name:<14}" + "".join(f"{c:>9.2f}x" for c in cells))
    return "\n".join(lines)


def run_speed(
    out: Path,
    device: torch.device,
    scale: Scale = Scale(),
    sections: list[str] | None = None,
    products: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Measure the named sections (default: all) and the product table; write ``speed.json`` and
    ``speed.md`` in ``out`` after each section, so an interrupted suite keeps what it measured."""
    import peft

    names = list(SECTIONS) if sections is None else sections
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown speed sections {unknown}; the sections are {', '.join(SECTIONS)}")
    out.mkdir(parents=True, exist_ok=True)
    memory_label = "peak CUDA MiB" if device.type == "cuda" else "saved-activation MiB"
    report: dict[str, Any] = {
        "command": command,
        "device": device_name(device),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "rounds": scale.rounds,
        "memory": memory_label,
        "sections": [],
        "skipped": [],
        "products": None,
    }
    header = (
        f"# structpeft speed suite: {report['device']}, torch {torch.__version__}, peft {peft.__version__}, "
        f"median of {scale.rounds} interleaved rounds"
        + (" (--quick: tiny shapes, the ratios mean nothing)" if scale.quick else "")
    )
    print(header, flush=True)

    def write() -> None:
        results.write_json(out / SPEED_JSON, report)
        parts = [header, f"command: `{command}`" if command else ""]
        parts += [f"```\n{section_text(b, memory_label)}\n```" for b in report["sections"]]
        if report["products"]:
            parts.append(f"```\n{products_text(report['products'])}\n```")
        parts += [f"Skipped {s['title']}: {s['reason']}" for s in report["skipped"]]
        (out / SPEED_MD).write_text("\n\n".join(p for p in parts if p) + "\n", encoding="utf-8")

    for name in names:
        print(f"\n[{name}] building candidates", file=sys.stderr, flush=True)
        try:
            for section in SECTIONS[name](device, scale):  # built lazily, one at a time
                if section.skipped:
                    report["skipped"].append({"section": name, "title": section.title, "reason": section.skipped})
                    print(f"\n## {section.title}\nskipped: {section.skipped}", flush=True)
                    continue
                block = measure(section, scale, device)
                block["section"] = name
                report["sections"].append(block)
                print("\n" + section_text(block, memory_label), flush=True)
                write()
        except FileNotFoundError as e:  # the section's model or data is not installed
            report["skipped"].append({"section": name, "title": name, "reason": str(e)})
            print(f"\n## {name}\nskipped: {e}", flush=True)
    if products:
        report["products"] = product_table(device, scale)
        print("\n" + products_text(report["products"]), flush=True)
    write()
    missed = [
        f"{b['title']}: {r['a']} / {r['b']} = {r['step_time']:.3f}x > {r['target']:.2f}x"
        for b in report["sections"]
        for r in b["ratios"]
        if r["met"] is False
    ]
    print("\nall targets met" if not missed else "\ntargets missed:\n  " + "\n  ".join(missed), flush=True)
    print(f"written: {out / SPEED_MD}, {out / SPEED_JSON}", flush=True)
    return report
