"""Causal-LM fine-tuning data: chat rows of ``messages`` (a list of ``{role, content}``, rendered with the
tokenizer's chat template, loss on the assistant turns only), rows of ``prompt`` + ``completion`` (loss on the
completion only; through the chat template as one user and one assistant turn when the run uses it) or of
``text`` (loss on every token)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from structpeft.workflow.tasks.base import Task, TaskError, make_task

IGNORE_INDEX = -100  # positions the loss skips: prompt tokens and padding


def causal_lm(splits: dict[str, Any], path: Path, **kw: Any) -> Task:
    columns = list(splits["train"].column_names)
    if "messages" in columns:
        fields: tuple[str, ...] = ("messages",)
    elif {"prompt", "completion"} <= set(columns):
        fields = ("prompt", "completion")
    elif "text" in columns:
        fields = ("text",)
    else:
        raise TaskError(
            f"{path}: a causal-LM file needs a 'messages' column (chat), 'prompt' and 'completion' columns, or "
            f"'text' (columns: {', '.join(columns)})"
        )
    examples = {}
    for split in ("train", "test"):
        if split in splits:
            rows = splits[split].select_columns(list(fields)).to_list()
            if fields == ("messages",):
                for number, row in enumerate(rows, 1):
                    check_conversation(row["messages"], f"{path}, {split} row {number}")
            elif any(not isinstance(row[f], str) for row in rows for f in fields):
                raise TaskError(f"{path}: every {' and '.join(fields)} value must be a string")
            examples[split] = rows
    return make_task(
        path.name,
        "causal-lm",
        examples["train"],
        examples.get("test"),
        source={"path": str(path), "fields": fields},
        **kw,
    )


def check_conversation(messages: Any, where: str) -> None:
    """A chat row: a list of ``{role, content}`` with string values, not opening with the assistant, with at
    least one assistant turn (the turns the loss is on)."""
    if not isinstance(messages, list) or not messages:
        raise TaskError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for message in messages:
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise TaskError(f"{where}: every message needs string 'role' and 'content', got {message!r}")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise TaskError(f"{where}: no 'assistant' turn, so nothing to learn (roles: {', '.join(roles)})")
    if roles[0] == "assistant":
        raise TaskError(f"{where}: a conversation must open with a user or system turn, not the assistant's")


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # the template's own checks (roles that must alternate, no system role...)
        roles = ", ".join(m["role"] for m in messages)
        raise TaskError(f"the chat template refused a conversation (roles: {roles}): {e}") from e


def chat_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """A conversation rendered with the tokenizer's chat template: its token ids, and labels that keep only
    what the assistant says (each assistant turn's text and the template's end-of-turn after it).

    Each turn is found as the text its message adds to the rendering of the turns before it, so the template
    must render a conversation as a prefix of any continuation of it (templates that rewrite earlier turns,
    e.g. dropping a reasoning trace, are refused by name).
    """
    segments: list[tuple[str, bool]] = []  # (text, trained)
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            opened = _render(tokenizer, messages[:i], generation_prompt=True)
            segments.append((_continuation(done, opened, tokenizer), False))
            done = opened
        rendered = _render(tokenizer, messages[: i + 1])
        segments.append((_continuation(done, rendered, tokenizer), message["role"] == "assistant"))
        done = rendered
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _continuation(before: str, after: str, tokenizer: Any) -> str:
    if not after.startswith(before):
        raise TaskError(
            f"the chat template of {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '')}) does not "
            "render a conversation as the start of its continuation, so the assistant turns cannot be found; "
            "give prompt/completion rows with --chat-template off, or 'text' rows"
        )
    return after[len(before) :]


def prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """What a model is given to complete ``prompt``: the chat template's user turn and the assistant's opening,
    or the prompt's own tokens."""
    if chat:
        text = _render(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def check_rows(examples: list[dict[str, Any]], tokenizer: Any, max_length: int, chat: bool) -> str | None:
    """Render ``examples`` as training will, so a template that refuses them fails before the first step;
    a note when some are longer than ``max_length`` (their ends, the answers, are cut); an error when
    none keeps a token to learn within it."""
    batches = [collate_causal_lm([e], tokenizer, 10**9, chat) for e in examples]
    lengths = [len(b["input_ids"][0]) for b in batches]
    if examples and not any((b["labels"][0][:max_length] != IGNORE_INDEX).any() for b in batches):
        raise TaskError(
            f"--max-length {max_length} cuts every answer of the {len(examples)} rows checked (they are up to "
            f"{max(lengths)} tokens long): nothing would be learnt; raise --max-length"
        )
    longer = sum(n > max_length for n in lengths)
    if not longer:
        return None
    return (
        f"{longer} of {len(examples)} rows checked are longer than --max-length {max_length} tokens (longest "
        f"{max(lengths)}): their ends, which hold the answers, are cut; raise --max-length"
    )


def example_tokens(example: dict[str, Any], tokenizer: Any, chat: bool = False) -> tuple[list[int], list[int]]:
    """One row's token ids and labels (the ids where they are learnt, IGNORE_INDEX elsewhere), uncut.
    ``chat``: a prompt/completion row goes through the chat template (chat rows always do)."""
    if "messages" in example:
        return chat_tokens(tokenizer, example["messages"])
    if "completion" in example and chat:
        turns = [
            {"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["completion"]},
        ]
        return chat_tokens(tokenizer, turns)
    if "completion" in example:
        prompt = tokenizer(example["prompt"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion = completion + [tokenizer.eos_token_id]  # so generation learns to stop
        return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"]
    return ids, list(ids)


def collate_causal_lm(
    examples: list[dict[str, Any]], tokenizer: Any, max_length: int, chat: bool = False
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` (the ids, IGNORE_INDEX on what is not learnt and on
    padding), padded on the right to the batch's longest row. ``chat``: prompt/completion rows go through
    the chat template (chat rows always do)."""
    rows = []
    for example in examples:
        ids, labels = example_tokens(example, tokenizer, chat)
        rows.append((ids[:max_length], labels[:max_length]))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, labels in rows:
        gap = width - len(ids)
        batch["input_ids"].append(ids + [pad] * gap)
        batch["attention_mask"].append([1] * len(ids) + [0] * gap)
        batch["labels"].append(labels + [IGNORE_INDEX] * gap)
    return {k: torch.tensor(v) for k, v in batch.items()}
