"""Decoder LLMs in the workflow, on tiny models made here: chat rows with the loss on the assistant's turns,
prompt/completion rows through the chat template, the base model's validation loss beside the final one,
generation through the template, GGUF files as models (converted once, cached by content)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from structpeft.workflow.cli import main
from tests import workflow_fixtures as fx


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm")
    return {
        "llama": fx.save_decoder(root / "llama", "llama", chat_template=fx.CHAT_TEMPLATE),
        "plain": fx.save_decoder(root / "plain", "llama"),  # no chat template
        "chat": fx.write_jsonl(root / "chat.jsonl", fx.conversations(48)),
        "completions": fx.write_jsonl(root / "completions.jsonl", fx.completions(40)),
        "text": fx.write_jsonl(root / "text.jsonl", [{"text": "the film was good"}] * 20),
    }


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_chat_rows_train_on_the_assistant_turns_only(assets) -> None:
    from structpeft.workflow.tasks import IGNORE_INDEX, collate_causal_lm

    tokenizer = _tokenizer(assets["llama"])
    messages = [
        {"role": "user", "content": "good film"},
        {"role": "assistant", "content": "good"},
        {"role": "user", "content": "very"},
        {"role": "assistant", "content": "very good"},
    ]
    batch = collate_causal_lm([{"messages": messages}], tokenizer, 64)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]  # the template's text, whole
    trained = [tokenizer.convert_ids_to_tokens(i) for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert trained == ["good", "<eos>", "very", "good", "<eos>"]  # each answer and its end of turn
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))


def test_prompt_completion_rows_go_through_the_template_when_asked(assets) -> None:
    from structpeft.workflow.tasks import IGNORE_INDEX, collate_causal_lm

    tokenizer = _tokenizer(assets["llama"])
    row = {"prompt": "good film", "completion": "good"}
    chat = collate_causal_lm([row], tokenizer, 64, chat=True)
    tokens = tokenizer.convert_ids_to_tokens(chat["input_ids"][0].tolist())
    assert tokens == ["user", ":", "good", "film", "<eos>", "bot", ":", "good", "<eos>"]
    kept = [t for t, label in zip(tokens, chat["labels"][0].tolist()) if label != IGNORE_INDEX]
    assert kept == ["good", "<eos>"]
    plain = collate_causal_lm([row], tokenizer, 64, chat=False)
    assert "bot" not in tokenizer.convert_ids_to_tokens(plain["input_ids"][0].tolist())


def test_chat_rows_are_checked_when_read(tmp_path) -> None:
    from structpeft.workflow.tasks import TaskError, load_task

    cases = {
        "no 'assistant' turn": [{"role": "user", "content": "good"}],
        "role' and 'content": [{"role": "user"}],
        "must open with a user or system turn": [{"role": "assistant", "content": "good"}],
    }
    for message, messages in cases.items():
        path = fx.write_jsonl(tmp_path / "bad.jsonl", [{"messages": messages}] * 12)
        with pytest.raises(TaskError, match=message):
            load_task(str(path), val_size=2)


@pytest.mark.parametrize(
    ("model", "task", "choice", "expected"),
    [
        ("llama", "completions", "auto", True),
        ("plain", "completions", "auto", False),
        ("llama", "completions", "off", False),
        ("llama", "chat", "auto", True),
        ("llama", "text", "auto", False),
        ("llama", "chat", "off", "need the template"),
        ("plain", "chat", "auto", "has no chat template"),
        ("llama", "text", "on", "needs prompt/completion or messages rows"),
        ("plain", "completions", "on", "has no chat template"),
    ],
)
def test_which_runs_use_the_chat_template(assets, model, task, choice, expected) -> None:
    from structpeft.workflow.models import load_model
    from structpeft.workflow.run import UsageError, uses_chat_template
    from structpeft.workflow.tasks import load_task

    loaded_task = load_task(str(assets[task]), val_size=4)
    loaded = load_model(str(assets[model]), loaded_task)
    if isinstance(expected, bool):
        assert uses_chat_template(choice, loaded, loaded_task) is expected
    else:
        with pytest.raises(UsageError, match=expected):
            uses_chat_template(choice, loaded, loaded_task)


def _finetune(tmp_path: Path, *args: str) -> dict:
    code, metrics = fx.finetune(tmp_path, "--epochs", "3", "--lr", "0.01", *args)
    assert code == 0 and metrics is not None
    return metrics


def test_a_chat_run_reports_the_base_models_validation_loss_and_generates_through_the_template(
    assets, tmp_path, capsys
) -> None:
    metrics = _finetune(tmp_path, "--model", str(assets["llama"]), "--task", str(assets["chat"]))
    base, best = metrics["base_val"]["loss"], metrics["val"]["loss"]
    assert best < base  # it learnt the verdicts
    assert json.loads((tmp_path / "run" / "run.json").read_text())["base_val"] == metrics["base_val"]
    out = capsys.readouterr().out
    assert f"base model before training: val loss {base:.4f}" in out
    assert f"val loss {base:.4f} before training -> {best:.4f}" in out
    args = ["generate", "--adapter", str(tmp_path / "run"), "--prompt", "good film", "--max-new-tokens", "2"]
    assert main(args) == 0
    words = capsys.readouterr().out.split()
    assert words and words[0] in ("good", "bad")  # the answer, not the prompt's continuation
    assert main([*args, "--temperature", "0.7", "--top-p", "0.9"]) == 0
    assert main([*args, "--temperature", "-1"]) == 2


def test_generate_passes_its_length_and_sampling_flags_to_the_model(assets, tmp_path, monkeypatch, capsys) -> None:
    import transformers

    _finetune(tmp_path, "--model", str(assets["llama"]), "--task", str(assets["chat"]), "--epochs", "1")
    calls = []
    original = transformers.GenerationMixin.generate

    def recording(self, *args, **kwargs):
        ids = original(self, *args, **kwargs)
        calls.append((kwargs, ids.shape[1] - kwargs["input_ids"].shape[1]))
        return ids

    monkeypatch.setattr(transformers.GenerationMixin, "generate", recording)
    args = ["generate", "--adapter", str(tmp_path / "run"), "--prompt", "good film"]
    assert main([*args, "--max-new-tokens", "3"]) == 0
    assert main([*args, "--max-new-tokens", "5", "--temperature", "0.7", "--top-p", "0.9"]) == 0
    (greedy, greedy_new), (sampled, sampled_new) = calls
    assert greedy["max_new_tokens"] == 3 and greedy["do_sample"] is False and 1 <= greedy_new <= 3
    assert sampled["max_new_tokens"] == 5 and 1 <= sampled_new <= 5
    assert (sampled["do_sample"], sampled["temperature"], sampled["top_p"]) == (True, 0.7, 0.9)


@pytest.mark.parametrize(
    ("model", "task", "choice", "refusal"),
    [("llama", "chat", "off", "need the template"), ("plain", "completions", "on", "has no chat template")],
)
def test_chat_template_flag_from_the_command_line(assets, tmp_path, capsys, model, task, choice, refusal) -> None:
    code, metrics = fx.finetune(
        tmp_path, "--model", str(assets[model]), "--task", str(assets[task]), "--chat-template", choice
    )
    assert code == 2 and metrics is None and refusal in capsys.readouterr().err


def test_a_resumed_run_keeps_the_base_loss_its_first_start_measured(assets, tmp_path, monkeypatch) -> None:
    from structpeft.workflow import run as run_module

    first = _finetune(tmp_path, "--model", str(assets["llama"]), "--task", str(assets["chat"]), "--save-every", "2")
    calls = []
    monkeypatch.setattr(run_module, "_base_validation", lambda *a: calls.append(a) or {"loss": -1.0})
    again = _finetune(
        tmp_path, "--model", str(assets["llama"]), "--task", str(assets["chat"]), "--save-every", "2", "--resume"
    )
    assert not calls and again["base_val"] == first["base_val"]


# -- GGUF files ---------------------------------------------------------------------------------------
def test_a_gguf_file_converts_once_to_the_float_model_it_holds(tmp_path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from structpeft.zoo.gguf import cache_folder, convert_gguf
    from tests.gguf_files import tiny_llama_for_gguf, write_llama_gguf

    pytest.importorskip("gguf")
    original = tiny_llama_for_gguf(tie=True)
    path = write_llama_gguf(original, tmp_path / "tiny.gguf")
    first = convert_gguf(path, cache_folder(path, tmp_path / "cache"))
    again = convert_gguf(path, cache_folder(path, tmp_path / "cache"))
    assert first.converted_now and not again.converted_now and first.folder == again.folder
    model = AutoModelForCausalLM.from_pretrained(first.folder).eval()
    assert not hasattr(model.config, "quantization_config") and not getattr(model, "is_quantized", False)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, original(ids).logits, atol=1e-5)  # q/k rows un-permuted
    other = write_llama_gguf(tiny_llama_for_gguf(tie=False), tmp_path / "other" / "tiny.gguf")
    assert cache_folder(other, tmp_path / "cache") != first.folder  # keyed by content, not by name


def test_finetune_takes_a_gguf_file_with_its_tokenizer_and_chat_template(tmp_path, capsys, monkeypatch) -> None:
    from tests.gguf_files import tiny_llama_for_gguf, write_llama_gguf

    pytest.importorskip("gguf")
    monkeypatch.setenv("STRUCTPEFT_CACHE", str(tmp_path / "cache"))
    path = write_llama_gguf(tiny_llama_for_gguf(), tmp_path / "tiny.gguf")
    chat = fx.write_jsonl(tmp_path / "chat.jsonl", fx.conversations(24))
    metrics = _finetune(tmp_path, "--model", str(path), "--task", str(chat), "--epochs", "1")
    assert metrics["model"] == str(path) and metrics["family"] == "decoder" and "base_val" in metrics
    assert "converted and cached in" in capsys.readouterr().err
    _finetune(tmp_path / "again", "--model", str(path), "--task", str(chat), "--epochs", "1")
    assert "read from the cache" in capsys.readouterr().err


# -- WordNet definitions --------------------------------------------------------------------------------
WORDNET_LINES = {
    "noun": [
        "  1 This software and database is being provided to you, the LICENSEE, by  ",
        "00045646 04 n 02 rally 1 rallying 1 003 @ 00036762 n 0000 | the feat of mustering strength for a "
        'renewed effort; "he singled to start a rally in the 9th inning"  ',
        "04023249 06 n 01 quern 0 001 @ 03765561 n 0000 | a primitive stone mill for grinding corn by hand  ",
    ],
    "verb": ['01097978 38 v 02 rally 0 summon 0 002 | gather  ;  "rally your courage"  '],
    "adj": ["00013887 00 s 01 galore(ip) 0 001 & 00013160 a 0000 | in great numbers  "],
    "adv": ["00001740 02 r 01 a_cappella 0 000 | without musical accompaniment  "],
}


def test_wordnet_glosses_are_read_as_definitions(tmp_path) -> None:
    from structpeft.zoo.wordnet import definition_prompt, load_glosses

    for part, lines in WORDNET_LINES.items():
        (tmp_path / f"data.{part}").write_text("\n".join(lines) + "\n")
    glosses = load_glosses(tmp_path)
    found = {(g.word, g.part_of_speech): g.definition for g in glosses}
    assert found == {
        ("rally", "noun"): "the feat of mustering strength for a renewed effort",
        ("quern", "noun"): "a primitive stone mill for grinding corn by hand",
        ("rally", "verb"): "gather",
        ("galore", "adjective"): "in great numbers",
        ("a cappella", "adverb"): "without musical accompaniment",
    }
    assert len({g.synset for g in glosses}) == 5  # the two 'rally' synsets stay apart
    assert definition_prompt(glosses[1]) == "Define the noun 'quern':"
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        load_glosses(tmp_path / "missing")


@pytest.mark.slow
def test_the_wordnet_preset_holds_each_text_once_on_one_side() -> None:
    from structpeft.workflow.tasks import load_task
    from structpeft.zoo.wordnet import WORDNET_DIR

    if not WORDNET_DIR.is_dir():
        pytest.skip("Debian's wordnet-base is not installed")
    task = load_task("wordnet-definitions", val_size=500)
    assert task.kind == "causal-lm" and len(task.test) > 10_000 and len(task.train) > 90_000
    assert not {r["prompt"] + r["completion"] for r in task.test} & {r["prompt"] + r["completion"] for r in task.train}


def test_a_template_that_refuses_the_rows_or_overlong_rows_are_reported_before_training(
    assets, tmp_path, capsys
) -> None:
    strict = fx.save_decoder(
        tmp_path / "strict",
        "llama",
        chat_template="{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        + fx.CHAT_TEMPLATE,
    )
    rows = [{"messages": [{"role": "system", "content": "good"}, *r["messages"]]} for r in fx.conversations(24)]
    chat = fx.write_jsonl(tmp_path / "system.jsonl", rows)
    args = ["finetune", "--model", str(strict), "--task", str(chat), "--quiet", "--out", str(tmp_path / "run")]
    assert main(args) == 2
    assert "the chat template refused a conversation (roles: system" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.json").exists()
    _finetune(tmp_path / "short", "--model", str(assets["llama"]), "--task", str(assets["chat"]), "--max-length", "12")
    assert "longer than --max-length 12 tokens" in capsys.readouterr().err
    args = ["finetune", "--model", str(assets["llama"]), "--task", str(assets["chat"]), "--max-length", "4", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "cut")]) == 2
    assert "--max-length 4 cuts every answer" in capsys.readouterr().err
