"""structpeft models inside transformers' Trainer and TRL's SFT and DPO trainers: adapter checkpoints
(tied embeddings included), resuming, the best checkpoint reloaded, TRL's fused head, DPO's reference."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import TrainingArguments

import structpeft as sp
from structpeft.core.checkpoint import adapter_state_dict
from structpeft.integrations import Trainer
from tests.models import tiny_gpt2, tiny_llama, tiny_tokenizer


def _lm_rows(n: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 100, (12,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def _adapter(model: sp.PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter_state_dict(model, "default").items()}


def _tied_model() -> sp.PeftModel:
    torch.manual_seed(0)
    base = tiny_gpt2()
    assert base.lm_head.weight is base.transformer.wte.weight
    return sp.get_peft_model(base, sp.LoraConfig(r=2, target_modules=["c_attn", "wte"], init_weights=False))


def _args(out, **kw) -> TrainingArguments:
    defaults = dict(
        per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, save_strategy="steps"
    )
    return TrainingArguments(output_dir=str(out), **{**defaults, **kw})


def test_trainer_checkpoints_hold_the_adapter_and_resume_to_the_same_weights(tmp_path) -> None:
    model = _tied_model()
    Trainer(model=model, args=_args(tmp_path / "a", max_steps=4, save_steps=2), train_dataset=_lm_rows()).train()
    uninterrupted = _adapter(model)
    files = set(os.listdir(tmp_path / "a" / "checkpoint-2"))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}  # the frozen base is never written

    resumed = _tied_model()  # same start; trained from checkpoint-2 of the first run
    trainer = Trainer(model=resumed, args=_args(tmp_path / "a", max_steps=4, save_steps=2), train_dataset=_lm_rows())
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    after = _adapter(resumed)
    assert all(torch.allclose(after[k], uninterrupted[k], atol=1e-6) for k in uninterrupted)
    assert any(not torch.allclose(after[k], _adapter(_tied_model())[k]) for k in after)


def test_load_best_model_at_end_reloads_the_best_checkpoints_adapter(tmp_path) -> None:
    model = _tied_model()
    args = _args(
        tmp_path,
        max_steps=6,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,  # validation rows unlike the training rows: the first checkpoint is best
    )
    trainer = Trainer(model=model, args=args, train_dataset=_lm_rows(), eval_dataset=_lm_rows(8, seed=1))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6"), best  # else the reload would go unseen
    saved = sp.PeftModel.from_pretrained(tiny_gpt2(), best)
    loaded, reloaded = _adapter(model), _adapter(saved)
    assert all(torch.equal(loaded[k], reloaded[k]) for k in loaded)
    last = _adapter(sp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "checkpoint-6"))
    assert any(not torch.equal(loaded[k], last[k]) for k in loaded)  # the model left is not the last step's


def test_trainer_refuses_a_model_without_structpeft_adapters(tmp_path) -> None:
    with pytest.raises(TypeError, match="sp.get_peft_model"):
        Trainer(model=tiny_llama(), args=_args(tmp_path, max_steps=1))


def test_load_adapter_weights_checks_it_is_the_same_adapter(tmp_path) -> None:
    model = _tied_model()
    model.save_pretrained(tmp_path / "tied")
    other = sp.get_peft_model(tiny_gpt2(), sp.LoraConfig(r=3, target_modules=["c_attn"]))
    with pytest.raises(sp.CheckpointError, match="is not the adapter 'default'"):
        other.load_adapter_weights(tmp_path / "tied")


# -- TRL ------------------------------------------------------------------------------------------
@pytest.fixture
def trl():
    """TRL, an optional extra: its tests skip without it (the Trainer tests above still run)."""
    return pytest.importorskip("trl")


def _llama(targets=("q_proj", "v_proj"), **kw) -> sp.PeftModel:
    torch.manual_seed(0)
    return sp.get_peft_model(tiny_llama(), sp.LoraConfig(r=4, target_modules=list(targets), init_weights=False, **kw))


def _base_state(model: sp.PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "adapters" not in n}


def test_sft_trainer_trains_and_saves_a_structpeft_adapter(trl, tmp_path) -> None:
    from datasets import Dataset

    from structpeft.integrations.trl import SFTTrainer

    model = _llama()
    before, base_before = _adapter(model), _base_state(model)
    rows = Dataset.from_list([{"text": "the cat sat on the mat"}, {"text": "a dog ran far"}] * 4)
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        save_steps=3,
        per_device_train_batch_size=2,
        report_to=[],
        learning_rate=1e-2,
        use_cpu=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=tiny_tokenizer())
    trainer.train()
    after = _adapter(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every adapter tensor trained
    assert all(torch.equal(v, _base_state(model)[k]) for k, v in base_before.items())
    reloaded = _adapter(sp.PeftModel.from_pretrained(tiny_llama(), tmp_path / "checkpoint-3"))
    assert all(torch.equal(after[k], reloaded[k]) for k in after)


@pytest.mark.parametrize("where", ["target_modules", "modules_to_save"])
def test_trl_refuses_an_adapter_on_the_lm_head_by_name(trl, where: str, tmp_path) -> None:
    from structpeft.integrations.trl import SFTTrainer

    model = _llama(targets=["q_proj", "lm_head"]) if where == "target_modules" else _llama(modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="'lm_head'.*fused LM head"):
        SFTTrainer(model=model, args=trl.SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True))


def test_dpo_reference_is_the_model_with_adapters_off_and_the_adapter_trains_and_saves(trl, tmp_path) -> None:
    from datasets import Dataset

    from structpeft.integrations.trl import AdaptersDisabled, DPOTrainer

    model = _llama()
    ids = torch.randint(0, 100, (2, 6))
    with model.disable_adapter():
        base_logits = model(input_ids=ids).logits
    assert not torch.allclose(model(input_ids=ids).logits, base_logits, atol=1e-4)  # the adapter acts
    reference = AdaptersDisabled(model)
    assert torch.equal(reference(input_ids=ids).logits, base_logits)
    assert list(reference.parameters()) == []  # no second copy, nothing for an optimizer

    before = _adapter(model)
    rows = Dataset.from_list([{"prompt": "the cat", "chosen": " sat on the mat", "rejected": " ran far"}] * 4)
    config = trl.DPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        learning_rate=1e-2,
        use_cpu=True,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=rows, processing_class=tiny_tokenizer())
    assert isinstance(trainer.ref_model, AdaptersDisabled)
    trainer.train()
    after = _adapter(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert trainer.state.log_history[-1]["train_loss"] > 0
    files = set(os.listdir(tmp_path / "checkpoint-2"))
    assert "adapter_model.safetensors" in files and not files & {"model.safetensors", "pytorch_model.bin"}
    reloaded = _adapter(sp.PeftModel.from_pretrained(tiny_llama(), tmp_path / "checkpoint-2"))
    assert all(torch.equal(after[k], reloaded[k]) for k in after)


def test_a_model_read_from_a_gguf_file_trains(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from tests.gguf_files import tiny_llama_for_gguf, write_llama_gguf

    pytest.importorskip("gguf")
    write_llama_gguf(tiny_llama_for_gguf(), tmp_path / "tiny.gguf")
    base = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert base.is_quantized  # what transformers leaves: the stock Trainer refuses this model
    model = sp.get_peft_model(base, sp.LoraConfig(r=2, target_modules=["q_proj"], init_weights=False))
    before = _adapter(model)
    rows = [{"input_ids": r["input_ids"] % 200, "labels": r["labels"] % 200} for r in _lm_rows(8)]
    Trainer(model=model, args=_args(tmp_path / "out", max_steps=1, save_strategy="no"), train_dataset=rows).train()
    assert not base.is_quantized and any(not torch.equal(before[k], v) for k, v in _adapter(model).items())


def test_load_adapter_weights_refuses_another_config_with_the_same_shapes(tmp_path) -> None:
    model = _tied_model()
    model.save_pretrained(tmp_path / "a")
    torch.manual_seed(0)
    other = sp.get_peft_model(
        tiny_gpt2(), sp.LoraConfig(r=2, alpha=5, target_modules=["c_attn", "wte"], init_weights=False)
    )
    before = _adapter(other)
    with pytest.raises(sp.CheckpointError, match="another config"):
        other.load_adapter_weights(tmp_path / "a")
    assert all(torch.equal(v, _adapter(other)[k]) for k, v in before.items())
