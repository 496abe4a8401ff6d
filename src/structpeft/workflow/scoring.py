"""Causal-LM scores beyond the loss: the choice between a task's answers (accuracy by log-likelihood) and
ROUGE-L of greedy generations. Both take any model that maps a batch to ``.logits`` and has ``generate``:
a structpeft model, an HF PEFT one or a bare transformers model (the zero-shot base)."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from structpeft.workflow.tasks import IGNORE_INDEX, Task, example_tokens, prompt_ids


@functools.cache
def _cache_argument() -> str:
    """What transformers calls the KV cache, in a model's arguments and outputs: ``past_key_values`` until it
    was renamed ``cache`` (the old name warns, and is to go in 5.40)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _left_padded(rows: Sequence[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(ids, attention mask, position ids), each (B, width): rows padded on the left, positions from 0 at
    each row's first real token."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


@torch.no_grad()
def choice_scores(
    model: nn.Module,
    task: Task,
    examples: Sequence[dict[str, Any]],
    tokenizer: Any,
    max_length: int,
    chat: bool,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Each example completed with every answer in ``task.label_names``, tokenised as training tokenises it
    (the end of turn or of text after the answer included); the likeliest answer is the prediction.
    Accuracy, and the loss and perplexity per token of the right answers (the plain causal-LM loss of
    these rows, where they fit in ``max_length``). The prompt runs once per example; each answer continues
    from a copy of its KV cache."""
    answers = task.label_names or []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    log_likelihood = torch.zeros(len(examples), len(answers))
    tokens = torch.zeros(len(examples), len(answers), dtype=torch.long)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts, continuations = _split_answers(chunk, answers, tokenizer, max_length, chat)
        ids, mask, positions = _left_padded(prompts, pad, device)  # (B, W)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): each answer's first token
        cache = getattr(out, _cache_argument())
        for j in range(len(answers)):
            answer = [continuations[i][j] for i in range(len(chunk))]
            summed, count = _continuation_log_likelihood(
                model, first, cache, mask, positions[:, -1], answer, pad, device
            )
            log_likelihood[start : start + len(chunk), j] = summed.cpu()
            tokens[start : start + len(chunk), j] = count.cpu()
    if not len(examples):
        return {"accuracy": 0.0, "loss": 0.0, "perplexity": 1.0}
    truth = torch.tensor([e["label"] for e in examples])
    accuracy = (log_likelihood.argmax(1) == truth).float().mean().item()
    right = torch.arange(len(examples))
    loss = -log_likelihood[right, truth].sum().item() / tokens[right, truth].sum().item()
    return {"accuracy": accuracy, "loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def _split_answers(
    examples: Sequence[dict[str, Any]], answers: Sequence[str], tokenizer: Any, max_length: int, chat: bool
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Each example's prompt ids (what precedes its first learnt token) and, per answer, the ids learnt after
    it. A row longer than ``max_length`` loses the start of its prompt, never its answer: every answer is
    scored whole."""
    prompts, continuations = [], []
    for example in examples:
        split = []
        for answer in answers:
            ids, labels = example_tokens({**example, "completion": answer}, tokenizer, chat)
            first = next(t for t, label in enumerate(labels) if label != IGNORE_INDEX)
            split.append((ids[:first], ids[first:]))
        if any(prompt != split[0][0] for prompt, _ in split):
            raise ValueError("the answers change how the prompt is tokenised, so they cannot share it")
        room = max_length - max(len(answer) for _, answer in split)
        if room < 1:
            raise ValueError(f"--max-length {max_length} leaves no room for a prompt before the answers: raise it")
        prompts.append(split[0][0][-room:])
        continuations.append([answer for _, answer in split])
    return prompts, continuations


def _continuation_log_likelihood(
    model: nn.Module,
    first: torch.Tensor,
    cache: Any,
    prompt_mask: torch.Tensor,
    last_position: torch.Tensor,
    answers: list[list[int]],
    pad: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability, length) of each row's answer after its cached prompt."""
    width = max(len(a) for a in answers)
    ids = torch.tensor([a + [pad] * (width - len(a)) for a in answers], device=device)  # (B, A)
    answer_mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers], device=device)
    log_probs = first[:, None]  # (B, 1, V): the prompt's last position predicts the answer's first token
    if width > 1:  # the answer's own positions predict the rest
        out = model(
            input_ids=ids[:, :-1],
            attention_mask=torch.cat([prompt_mask, answer_mask[:, :-1]], dim=1),
            position_ids=last_position[:, None] + 1 + torch.arange(width - 1, device=device),
            **{_cache_argument(): copy.deepcopy(cache)},  # the prompt's cache, kept for the next answer
            use_cache=True,
        )
        log_probs = torch.cat([log_probs, F.log_softmax(out.logits.float(), dim=-1)], dim=1)  # (B, A, V)
    chosen = log_probs.gather(2, ids[:, :, None])[:, :, 0] * answer_mask  # (B, A)
    return chosen.sum(1), answer_mask.sum(1)


@torch.no_grad()
def greedy_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    chat: bool,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
) -> list[str]:
    """Each prompt completed greedily (as ``structpeft generate`` does at temperature 0), in left-padded batches."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    completions = []
    for start in range(0, len(prompts), batch_size):
        ids = [prompt_ids(tokenizer, p, chat) for p in prompts[start : start + batch_size]]
        width = max(len(i) for i in ids)
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)  # (B, width)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        completions += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [c.strip() for c in completions]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (longest common subsequence of words; Lin 2004), with Porter stemming, from the
    ``rouge-score`` package (Google's implementation, as summarisation papers report)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ImportError('ROUGE-L needs the rouge-score package: pip install "structpeft[cli]"') from e
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return sum(scores) / max(len(scores), 1)


def generation_scores(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    chat: bool,
    max_length: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """ROUGE-L of greedy completions of prompt/completion ``examples`` against their completions. The model may
    write as many tokens as the longest reference has, plus one to end its turn (at most ``max_length``)."""
    if any("completion" not in e for e in examples):
        raise ValueError("ROUGE-L scores prompt/completion rows; this task's rows have no completion")
    longest = max((len(tokenizer(e["completion"], add_special_tokens=False)["input_ids"]) for e in examples), default=0)
    predictions = greedy_completions(
        model, tokenizer, [e["prompt"] for e in examples], chat, min(longest + 1, max_length), batch_size, device
    )
    return {"rougeL": rouge_l(predictions, [e["completion"] for e in examples])}
