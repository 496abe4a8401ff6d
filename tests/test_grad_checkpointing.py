"""Gradient checkpointing trains every method: same gradients as without it, dropout included.

The recomputation in the backward must see the same random masks as the forward (Coeff-Tuning's
dropout on α, adapter and attention dropout): torch's checkpoint restores the RNG state for it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import structpeft as sp
from tests.models import MHANet, _mha_inputs, tiny_bert, tiny_gpt2

# Non-zero dropouts everywhere a method has one, so a different mask in the recomputation shows.
HF_METHODS = {
    "lora": lambda: sp.LoraConfig(r=2, target_modules=["query", "value"], dropout=0.3, init_weights=False),
    "flora": lambda: sp.FloraConfig(r=2, target_modules=["query", "output.dense"], dropout=0.3, init_weights=False),
    "surm-lora": lambda: sp.SurmConfig(target_modules=["query"], dropout=0.3, init_weights=False),
    "surm-adapter": lambda: sp.SurmConfig(
        mode="adapter", target_modules=["output.dense"], dropout=0.3, init_weights=False
    ),
    "coeff": lambda: sp.CoeffConfig(dropout=0.5, init_weights=False),
    "coeff-chunked": lambda: sp.CoeffConfig(dropout=0.5, chunk_size=3, init_weights=False),
    "kernel-mix": lambda: sp.KernelMixConfig(dropout=0.3, init_weights=False),
    "lora+kernel-mix+coeff": lambda: [
        sp.LoraConfig(r=2, target_modules=["intermediate.dense"], dropout=0.3, init_weights=False),
        sp.KernelMixConfig(dropout=0.3, init_weights=False),
        sp.CoeffConfig(dropout=0.5, init_weights=False),
    ],
}


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (4, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0])}


def _grads(model: nn.Module, loss_fn, seed: int) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(seed)
    loss_fn(model).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values()), "some adapter parameter got no gradient"
    return grads


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-5), name


def _hf_model(configs) -> nn.Module:
    torch.manual_seed(0)
    model = sp.get_peft_model(tiny_bert(), configs())
    model.train()
    return model


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("configs", HF_METHODS.values(), ids=HF_METHODS.keys())
def test_hf_gradient_checkpointing_gives_the_same_gradients(configs, reentrant) -> None:
    def loss(model: nn.Module) -> torch.Tensor:
        return model(**_batch()).loss

    model = _hf_model(configs)
    plain = _grads(model, loss, seed=1)
    assert not torch.allclose(  # the masks matter: another seed gives other gradients
        torch.cat([g.flatten() for g in plain.values()]),
        torch.cat([g.flatten() for g in _grads(model, loss, seed=2).values()]),
    )
    with pytest.warns(FutureWarning):  # transformers 5 renamed it activation_checkpointing_enable; both work
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = []
    model.base_model.bert.encoder.layer[0].attention.register_forward_hook(lambda *_: calls.append(1))
    _assert_same(_grads(model, loss, seed=1), plain)
    assert len(calls) == 2  # the layer really was recomputed in the backward


def test_hf_gradient_checkpointing_trains_gpt2_conv1d() -> None:
    torch.manual_seed(0)
    model = sp.get_peft_model(
        tiny_gpt2(), [sp.LoraConfig(target_modules=["c_attn"], dropout=0.2), sp.CoeffConfig(), sp.KernelMixConfig()]
    )
    model.train()
    model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


class CheckpointedMHANet(MHANet):
    """A custom model that checkpoints its blocks itself with ``torch.utils.checkpoint``."""

    def __init__(self, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint

    def _attention_block(self, h: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(h, h, h, key_padding_mask=padding, need_weights=False)
        return torch.relu(self.ff(h + a))

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.use_checkpoint:
            h = checkpoint(self._attention_block, h, padding, use_reentrant=False)
        else:
            h = self._attention_block(h, padding)
        return self.head(h.mean(1))


CUSTOM_METHODS = {
    "lora": lambda: sp.LoraConfig(r=2, target_modules=["ff"], dropout=0.3, init_weights=False),
    "flora": lambda: sp.FloraConfig(r=2, target_modules=["ff"], dropout=0.3, init_weights=False),
    "surm-lora": lambda: sp.SurmConfig(target_modules=["ff"], dropout=0.3, init_weights=False),
    "surm-adapter": lambda: sp.SurmConfig(mode="adapter", target_modules=["ff"], dropout=0.3, init_weights=False),
    "coeff": lambda: sp.CoeffConfig(dropout=0.5, init_weights=False),
}


@pytest.mark.parametrize("configs", CUSTOM_METHODS.values(), ids=CUSTOM_METHODS.keys())
def test_torch_checkpoint_in_a_custom_model_gives_the_same_gradients(configs) -> None:
    def loss(model: nn.Module) -> torch.Tensor:
        return model(**_mha_inputs(3)).pow(2).mean()

    torch.manual_seed(0)
    model = sp.get_peft_model(CheckpointedMHANet(), configs())
    model.train()
    plain = _grads(model, loss, seed=1)
    model.base_model.use_checkpoint = True
    calls = []
    model.base_model.attn.register_forward_pre_hook(lambda *_: calls.append(1))
    _assert_same(_grads(model, loss, seed=1), plain)
    assert len(calls) == 2  # recomputed in the backward


@pytest.mark.parametrize("chunk_size", [None, 3], ids=["materialised", "chunked"])
def test_coeff_alpha_dropout_mask_is_the_same_in_the_recomputation(chunk_size) -> None:
    """Only α's dropout is random here: the gradients match with checkpointing, and differ when the
    recomputation is allowed another mask (preserve_rng_state=False), which shows the mask is what matters."""
    from transformers import BertConfig, BertForSequenceClassification

    from tests.models import _ENCODER

    def loss(model: nn.Module) -> torch.Tensor:
        return model(**_batch()).loss

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(**_ENCODER, hidden_dropout_prob=0, attention_probs_dropout_prob=0))
    model = sp.get_peft_model(base, sp.CoeffConfig(dropout=0.5, chunk_size=chunk_size, init_weights=False))
    model.train()
    plain = _grads(model, loss, seed=1)
    model.base_model.activation_checkpointing_enable()
    _assert_same(_grads(model, loss, seed=1), plain)
    model.base_model.activation_checkpointing_enable({"use_reentrant": False, "preserve_rng_state": False})
    other = _grads(model, loss, seed=1)
    assert not all(torch.allclose(other[n], plain[n], atol=1e-6, rtol=1e-5) for n in plain)
