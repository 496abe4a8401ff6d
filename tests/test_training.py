"""structpeft models under the trainers users bring: HF Trainer and torchrun (DDP)."""

from __future__ import annotations

import copy

import torch

import structpeft as sp
from tests.models import MHANet, _mha_inputs, tiny_bert
from tests.torchrun import torchrun


def test_hf_trainer_trains_only_the_adapter(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = sp.get_peft_model(
        tiny_bert(),
        [sp.LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"]), sp.KernelMixConfig()],
    )
    model.add_adapter("coeff", sp.CoeffConfig())  # a second adapter, trained alongside
    model.set_adapter(["default", "coeff"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 100, (8,), generator=g), "labels": torch.tensor(i % 2)} for i in range(32)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_train_epochs=2,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for trained in (".lora_B.", "kernel_mix.q.B", "coeff_alpha"):  # all start at zero: moved only if trained
        assert any(trained in n for n in changed), trained
    assert changed <= {n for n, p in model.named_parameters() if p.requires_grad}


def test_torchrun_ddp_keeps_ranks_in_sync_and_saves(tmp_path) -> None:
    done = torchrun("tests/ddp_worker.py", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank 0 ok" in done.stdout and "rank 1 ok" in done.stdout
    torch.manual_seed(0)
    base = MHANet().eval()
    loaded = sp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = _mha_inputs(7)
    assert not torch.allclose(loaded(**x), base(**x))  # the trained adapter came back
