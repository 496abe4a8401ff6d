"""Tiny models saved as HF folders and small data files, made in the test: what a user brings."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

POSITIVE = ["good", "great", "fine", "lovely", "superb", "happy"]
NEGATIVE = ["bad", "awful", "poor", "dull", "sad", "boring"]
FILLER = ["the", "film", "was", "a", "story", "and", "very", "quite"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<eos>"]


def make_tokenizer(folder: Path):
    """A word-level fast tokenizer over the fixtures' vocabulary, saved with the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + POSITIVE + NEGATIVE + FILLER + ["user", "bot", ":"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        eos_token="<eos>",
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_text_encoder(folder: Path, dropout: float = 0.1) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(folder)
    make_tokenizer(folder)
    return folder


# Roles as words of the fixtures' vocabulary; the end of a turn is the tokenizer's EOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ 'bot' if m['role'] == 'assistant' else 'user' }} : {{ m['content'] }} <eos> "
    "{% endfor %}{% if add_generation_prompt %}bot : {% endif %}"
)


def save_decoder(
    folder: Path, kind: str, chat_template: str | None = None, hidden_size: int = 32, tie_embeddings: bool = False
) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    else:
        config = LlamaConfig(
            vocab_size=40,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=tie_embeddings,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer = make_tokenizer(folder)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(folder)
    return folder


def save_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    ViTModel(config).save_pretrained(folder)
    return folder


def sentences(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 3) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "positive" if label else "negative"})
    return rows


def write_csv(path: Path, rows: list[dict], columns: tuple[str, str] = ("text", "label")) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[r["text"], r["label"]] for r in rows])
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def completions(n: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        word = rng.choice(POSITIVE + NEGATIVE)
        rows.append({"prompt": f"user : {word} film", "completion": "good" if word in POSITIVE else "bad"})
    return rows


def conversations(n: int) -> list[dict]:
    """Chat rows: a review and the bot's one-word verdict, some with a second exchange."""
    rng = random.Random(1)
    rows = []
    for i in range(n):
        word = rng.choice(POSITIVE + NEGATIVE)
        verdict = "good" if word in POSITIVE else "bad"
        messages = [{"role": "user", "content": f"{word} film"}, {"role": "assistant", "content": verdict}]
        if i % 3 == 0:
            messages += [{"role": "user", "content": "very"}, {"role": "assistant", "content": f"very {verdict}"}]
        rows.append({"messages": messages})
    return rows


def write_image_folder(root: Path, per_class: int = 12) -> Path:
    """Two classes a model can tell apart: bright and dark 20x20 PNGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, base in (("bright", 200), ("dark", 40)):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def finetune(tmp_path: Path, *args: str) -> tuple[int, dict | None]:
    """``structpeft finetune`` on small settings into ``tmp_path/run``: (exit code, metrics.json or None)."""
    from structpeft.workflow.cli import main

    out = tmp_path / "run"
    defaults = ["--epochs", "1", "--batch-size", "8", "--val-size", "8", "--quiet", "--out", str(out)]
    defaults += ["--results", str(tmp_path / "results.jsonl")]
    code = main(["finetune", *defaults, *args])  # later flags win
    metrics = out / "metrics.json"
    return code, json.loads(metrics.read_text()) if metrics.is_file() else None


# ChatML, as SmolLM2's template renders it (without its default system turn).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_byte_level_decoder(folder: Path, texts: list[str], vocab_size: int = 320, positions: int = 256) -> Path:
    """A tiny LLaMA with a byte-level BPE tokenizer trained on ``texts`` and a ChatML template: it reads
    any text (real data, not the fixtures' word list) in about as many tokens as words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
