"""The command line: argument errors, and the report's table and plot from a results file."""

from __future__ import annotations

import json

import pytest

from structpeft.cli import main


def test_bad_flags_are_refused_with_a_message(capsys) -> None:
    with pytest.raises(SystemExit) as err:
        main(["finetune", "--method", "dora"])
    assert err.value.code == 2 and "invalid choice: 'dora'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["finetune", "--epochs", "0"])
    assert "--epochs must be a positive integer" in capsys.readouterr().err


def test_report_prints_a_table_and_writes_a_plot(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps cells to the (captured, narrow) terminal
    results = tmp_path / "results.jsonl"
    rows = [
        {
            "method": "lora",
            "model": "minilm",
            "r": 8,
            "seed": s,
            "train_examples": 100,
            "test_examples": 50,
            "epochs": 1,
            "lr": 1e-3,
            "trainable_params": 1000,
            "test_accuracy": acc,
            "train_seconds": 1.0,
        }
        for s, acc in enumerate([0.80, 0.82])
    ]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", "--results", str(results), "--plot", str(tmp_path / "plot.png")]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "81.00 ± 1.41" in out
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert main(["report", "--results", str(tmp_path / "none.jsonl")]) == 1


@pytest.mark.parametrize(
    "method,structure,mode",
    [("surm-toeplitz", "toeplitz", "lora"), ("surm-kronecker-adapter", "kronecker", "adapter")],
)
def test_surm_method_names_map_to_configs(method, structure, mode) -> None:
    from structpeft.cli import METHOD_DEFAULTS, adapt
    from tests.models import tiny_bert

    targets = METHOD_DEFAULTS[method].get("targets", ["query"])
    model = adapt(tiny_bert(), method, r=0, alpha=1.0, targets=targets, dropout=0.0)
    (config,) = model.peft_config["default"]
    assert (config.structure, config.mode, config.modules_to_save) == (structure, mode, ["classifier"])


def test_a_config_error_is_a_message_not_a_traceback(capsys, monkeypatch) -> None:
    import structpeft.zoo.text as text
    from tests.models import tiny_bert

    monkeypatch.setattr(text, "load_text_classifier", lambda preset: (tiny_bert(), None))
    code = main(["finetune", "--method", "lora", "--targets", "qery", "--train-size", "8", "--test-size", "8"])
    err = capsys.readouterr().err
    assert code == 2 and "structpeft finetune: error: target_modules entries matched no module: 'qery'" in err


@pytest.mark.parametrize("method,layer_0", [("coeff", "layer.0.attention.self"), ("kernel-mix", "layer.0.attention")])
def test_attention_methods_take_every_layer_unless_targets_name_some(method, layer_0) -> None:
    from structpeft.cli import METHOD_DEFAULTS, adapt
    from tests.models import tiny_bert

    everywhere = adapt(tiny_bert(), method, r=0, alpha=0.0, targets=METHOD_DEFAULTS[method]["targets"], dropout=0.0)
    one = adapt(tiny_bert(), method, r=0, alpha=0.0, targets=[layer_0], dropout=0.0)
    hosts = lambda m: {n.split(".")[3] for n, _ in m.adapter_hosts()}  # noqa: E731  (layer indices)
    assert hosts(everywhere) == {"0", "1"} and hosts(one) == {"0"}
