"""Coeff-Tuning over every transformers causal LM that builds from a shrunk default config.

    python benchmarks/coeff_coverage.py [--only llama,gpt2] [--seconds 60] [--json out.json]

For each model type ``AutoModelForCausalLM`` maps: build it from its default config made tiny
(2 layers, 4 heads over 2 key/value heads, 64 wide, small vocabulary and MoE, a sliding window
shorter than the input), eager attention, and with sdpa too where the model supports it; then

- zero start: a fresh Coeff adapter (α = 0) gives the base model's logits;
- reference: with random α, the logits equal the model's own eager attention whose maps are
  mixed head by head (tests/eager_reference.py), and so do sdpa's;
- refusal: a model Coeff cannot hook must be refused by ``get_peft_model`` with a message naming
  the module.

Each model lands in one bucket: exact, refused clearly (at get_peft_model), failed (an error
anywhere else, including a refusal only at the first forward), wrong (a mismatch). Listed apart
and not counted: models whose shrunk config does not build or run without structpeft, and models
whose hooked attention modules do not run on text input (an image encoder beside a text decoder
that computes its own attention).
Padded positions (fully masked rows, which each implementation fills differently) are not judged.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import signal
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.eager_reference import mixing_reference  # noqa: E402

import structpeft as sp  # noqa: E402

WIDTH, HEADS, KV_HEADS, HEAD_DIM, VOCAB, SEQ = 64, 4, 2, 16, 128, 7
# Config fields made tiny wherever the default config has them (sub-configs too).
SHRINK = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "embed_dim", "n_embed"), WIDTH),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"), 2),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "decoder_attention_heads", "num_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"), KV_HEADS),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "decoder_ffn_dim", "ffn_hidden_size", "d_ff"), 96),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"), 32),
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k_experts", "moe_k"), 2),
    **dict.fromkeys(("n_group", "topk_group"), 1),
    "head_dim": HEAD_DIM,
    "d_kv": HEAD_DIM,
    "kv_channels": HEAD_DIM,
    "vocab_size": VOCAB,
    "sliding_window": 4,
    "attention_window": 4,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": HEAD_DIM,
    "qk_nope_head_dim": HEAD_DIM,
    "rotary_dim": HEAD_DIM // 2,
    "v_head_dim": HEAD_DIM,
    "max_position_embeddings": 128,
    "n_positions": 128,
}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id")


def shrunk(defaults: dict, grouped: bool = True) -> dict:
    """The overrides that make a default config (as a dict) tiny; ``grouped=False`` keeps as many
    key/value heads as query heads (for models whose attention has no grouped-query form)."""
    out = {}
    for key, value in defaults.items():
        if isinstance(value, dict) and "model_type" in value:
            out[key] = {**value, **shrunk(value, grouped)}
        elif key in SHRINK and value is not None and isinstance(value, int) and not isinstance(value, bool):
            out[key] = SHRINK[key] if grouped or SHRINK[key] != KV_HEADS else HEADS
        elif key in TOKEN_IDS and isinstance(value, int) and value >= VOCAB:
            out[key] = 2
        elif key in TOKEN_IDS and isinstance(value, list):
            out[key] = [v if v < VOCAB else 2 for v in value]
    layers = out.get("num_hidden_layers", defaults.get("num_hidden_layers"))
    types = defaults.get("layer_types")
    if isinstance(types, list) and types and isinstance(layers, int):
        distinct = list(dict.fromkeys(types))  # one layer of each kind first: hybrids keep an attention layer
        out["layer_types"] = (distinct + [types[0]] * layers)[: max(layers, min(len(distinct), 2))]
        out["num_hidden_layers"] = len(out["layer_types"])
    for key in ("max_window_layers", "first_k_dense_replace", "num_dense_layers"):
        if isinstance(defaults.get(key), int):
            out[key] = min(defaults[key], 1)
    return out


def build(model_type: str, implementation: str, grouped: bool = True) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    defaults = AutoConfig.for_model(model_type).to_dict()
    config = AutoConfig.for_model(model_type, **shrunk(defaults, grouped))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    return model.float().eval()


def runnable_base(model_type: str) -> tuple[torch.nn.Module, bool]:
    """The tiny eager model and whether it has grouped key/value heads; raises if neither form runs."""
    for grouped in (True, False):
        try:
            base = build(model_type, "eager", grouped)
            with torch.no_grad():
                base(**inputs(base))
            return base, grouped
        except Exception:  # noqa: BLE001 - try the other form, then report the error
            if not grouped:
                raise
    raise AssertionError("unreachable")


def inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    vocab = min(VOCAB, model.get_input_embeddings().num_embeddings)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as in generation
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**x).logits.float()[x["attention_mask"].bool()]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-3)


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def stop(*_):
        raise Timeout(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def alphas(model: sp.PeftModel) -> dict[str, torch.Tensor]:
    return {n: h.adapters["default"]["coeff"].coeff_alpha for n, h in model.adapter_hosts()}


def ran_modules(model: sp.PeftModel, x: dict[str, torch.Tensor]) -> list[str]:
    """The hooked attention modules a forward on ``x`` runs."""
    ran: list[str] = []
    handles = [
        model.base_model.get_submodule(path).register_forward_hook(lambda *_, p=path: ran.append(p))
        for path in alphas(model)
    ]
    try:
        with torch.no_grad():
            model(**x)
    finally:
        for handle in handles:
            handle.remove()
    return ran


def check(model_type: str) -> tuple[str, str]:
    """(bucket, detail) for one model type."""
    try:
        base, grouped = runnable_base(model_type)
        x = inputs(base)
        with torch.no_grad():
            expected = logits(base, x)
    except Exception as error:  # noqa: BLE001 - any failure of transformers itself
        return "unbuildable", f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"
    try:
        model = sp.get_peft_model(copy.deepcopy(base), sp.CoeffConfig(init_weights=False, dropout=0.0))
    except (ValueError, TypeError) as error:
        return "refused", str(error)[:300]
    try:
        implementations = ["eager"] + (["sdpa"] if getattr(base, "_supports_sdpa", False) else [])
        for implementation in implementations:
            plain = base if implementation == "eager" else build(model_type, "sdpa", grouped)
            zero = sp.get_peft_model(copy.deepcopy(plain), sp.CoeffConfig())
            with torch.no_grad():
                if not close(logits(zero, x), expected):
                    return "wrong", f"zero start differs from the base ({implementation})"
                mixed = sp.get_peft_model(copy.deepcopy(plain), sp.CoeffConfig(init_weights=False, dropout=0.0))
                with torch.no_grad():
                    for path, alpha in alphas(mixed).items():
                        alpha.copy_(alphas(model)[path])
                reference = copy.deepcopy(base)
                with mixing_reference(reference, alphas(model)):
                    want = logits(reference, x)
                ran = ran_modules(mixed, x)
            if not ran:
                return "unexercised", f"its {len(alphas(model))} hooked attention modules do not run on text input"
            if close(want, expected):
                return "wrong", "the reference's mixing changes nothing: the check would prove nothing"
            with torch.no_grad():
                got = logits(mixed, x)
            if not close(got, want):
                return "wrong", f"{implementation}: max |Δ| {(got - want).abs().max().item():.2e} from the reference"
        return "exact", f"{len(alphas(model))} attention modules, {'+'.join(implementations)}"
    except Timeout:
        raise
    except Exception as error:  # noqa: BLE001 - the sweep reports every failure
        return "failed", f"{type(error).__name__}: {str(error)[:300]}"


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated model types (default: all causal LMs)")
    parser.add_argument("--seconds", type=int, default=90, help="time limit per model type")
    parser.add_argument("--json", type=Path, help="write every model's bucket and detail here")
    args = parser.parse_args(argv)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    types = args.only.split(",") if args.only else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    results, start = {}, time.perf_counter()
    for model_type in types:
        try:
            with time_limit(args.seconds):
                bucket, detail = check(model_type)
        except Timeout as error:
            bucket, detail = "failed", f"timeout: {error}"
        results[model_type] = (bucket, detail)
        print(f"{bucket:12} {model_type:28} {detail}", flush=True)
    counts = Counter(bucket for bucket, _ in results.values())
    judged = sum(counts[b] for b in ("exact", "refused", "failed", "wrong"))
    print(
        f"\n{judged} model types judged in {time.perf_counter() - start:.0f} s "
        f"({counts['unbuildable']} more do not build or run from a shrunk config; {counts['unexercised']} have "
        "hooked attention only outside the text path, e.g. an image encoder):"
    )
    for bucket, label in (
        ("exact", "exact"),
        ("refused", "refused clearly"),
        ("failed", "failed"),
        ("wrong", "wrong"),
    ):
        share = f" ({100 * counts[bucket] / judged:.0f}%)" if judged else ""
        print(f"  {label:16} {counts[bucket]}{share}")
    if args.json:
        args.json.write_text(json.dumps({k: {"bucket": b, "detail": d} for k, (b, d) in results.items()}, indent=1))
    return dict(counts)


if __name__ == "__main__":
    main()
