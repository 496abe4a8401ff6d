"""The 4-bit vocabulary table: a quantized input embedding (and the tied LM head reading the same table) gives
exactly what a float model holding the dequantized table gives, logits and adapter gradients alike, with the
rows read a few at a time; Gemma's scaled embedding keeps its scale; what cannot be read from 4 bits is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import structpeft as sp
from structpeft.core import quantized_embeddings as qe

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")


def _llama(tied: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _gemma3() -> nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=16,
    )  # fmt: skip
    return Gemma3ForCausalLM(config).eval()


def _dequantized_copy(model: nn.Module, table: qe.QuantizedTable) -> nn.Module:
    """The unquantized model with its (tied) table replaced by the 4-bit table's values, read whole."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.get_input_embeddings().weight.copy_(table.rows(torch.arange(table.shape[0])))
    return reference


@pytest.mark.parametrize("build", [lambda: _llama(tied=True), _gemma3], ids=["llama-tied", "gemma3-scaled"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_4bit_table_equals_the_float_model_holding_its_values(build, quant_type, monkeypatch) -> None:
    monkeypatch.setattr(qe, "HEAD_CHUNK_ROWS", 64)  # 300 rows: five chunks, the last one short
    model = build()
    float_bytes = model.get_input_embeddings().weight.numel() * 4
    saved = sp.quantize_embeddings(model, quant_type)
    table = model.get_input_embeddings().table
    assert model.get_output_embeddings().table is table  # one table, read by both
    assert saved == float_bytes - table.nbytes() and table.nbytes() < float_bytes / 7  # 4.5 bits of 32
    original = build()  # the same seed: the same float weights
    reference = _dequantized_copy(original, table)
    assert reference.get_output_embeddings().weight is reference.get_input_embeddings().weight  # still tied
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    whole = dequantize_4bit(*quantize_4bit(original.get_input_embeddings().weight.detach(), quant_type=quant_type))
    torch.testing.assert_close(reference.get_input_embeddings().weight, whole, atol=0, rtol=0)  # read by rows = whole
    error = (reference.get_input_embeddings().weight - original.get_input_embeddings().weight).norm()
    assert 0 < error / original.get_input_embeddings().weight.norm() < 0.15  # it is quantized, and close

    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)

    # adapters train through it: the same loss and the same gradient for every adapter tensor
    config = lambda: sp.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)  # noqa: E731
    torch.manual_seed(2)
    adapted = sp.get_peft_model(model, config())
    torch.manual_seed(2)
    adapted_reference = sp.get_peft_model(reference, config())
    losses = [m(input_ids=ids, labels=ids).loss for m in (adapted, adapted_reference)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (adapted, adapted_reference)]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads[1][name], atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in table.parameters())


def test_bf16_autocast_trains_through_the_table_and_a_bf16_cast_leaves_it_exact() -> None:
    model = _llama(tied=True)
    sp.quantize_embeddings(model)
    table = model.get_input_embeddings().table
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    rows = table.rows(ids)
    adapted = sp.get_peft_model(model, sp.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = adapted(input_ids=ids, labels=ids).loss
    loss.backward()  # outside autocast, as a training loop does: the head's gradient arrives in bf16
    grads = [p.grad for p in adapted.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    model.to(torch.bfloat16)  # casts floating-point buffers: the table's scales are not among them
    torch.testing.assert_close(table.rows(ids), rows, atol=0, rtol=0)


def test_gemma3_keeps_its_embedding_scale() -> None:
    model = _gemma3()
    scale = model.get_input_embeddings().embed_scale
    assert scale != 1
    sp.quantize_embeddings(model)
    ids = torch.tensor([[3, 7, 11]])
    embedding = model.get_input_embeddings()
    torch.testing.assert_close(embedding(ids), embedding.table.rows(ids) * scale)


def test_an_untied_head_is_left_float_and_a_second_call_changes_nothing() -> None:
    model = _llama(tied=False)
    head = model.get_output_embeddings()
    assert sp.quantize_embeddings(model) > 0
    assert model.get_output_embeddings() is head and isinstance(head, nn.Linear)
    embedding = model.get_input_embeddings()
    assert sp.quantize_embeddings(model) == 0 and model.get_input_embeddings() is embedding


def test_what_cannot_be_read_from_4_bits_is_refused_by_name() -> None:
    class Positional(nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) + 1.0

    model = _llama(tied=True)
    model.set_input_embeddings(Positional(300, 128))
    with pytest.raises(TypeError, match="the input embedding is a Positional"):
        sp.quantize_embeddings(model)
    model.set_input_embeddings(nn.Embedding(300, 128, max_norm=1.0))
    with pytest.raises(TypeError, match="max_norm"):
        sp.quantize_embeddings(model)
    model.set_input_embeddings(nn.Embedding(300, 96))
    with pytest.raises(ValueError, match="multiple of 64"):
        sp.quantize_embeddings(model)
    with pytest.raises(ValueError, match="'nf4' or 'fp4'"):
        sp.quantize_embeddings(_llama(tied=True), "int8")


def test_finetune_quantize_embeddings_trains_and_the_run_evaluates_with_the_same_table(tmp_path, capsys) -> None:
    from structpeft.workflow import run
    from structpeft.workflow.cli import main
    from tests import workflow_fixtures as fx

    decoder = fx.save_decoder(tmp_path / "llama", "llama", fx.CHAT_TEMPLATE, hidden_size=128, tie_embeddings=True)
    chat = fx.write_jsonl(tmp_path / "chat.jsonl", fx.conversations(24))
    args = ("--model", str(decoder), "--task", str(chat), "--quantize", "nf4", "--quantize-embeddings")
    code, metrics = fx.finetune(tmp_path, *args)
    assert code == 0 and metrics["status"] == "finished" and metrics["spec"]["quantize_embeddings"]
    assert "--quantize-embeddings: the vocabulary table in nf4" in capsys.readouterr().err
    assert metrics["val"]["loss"] < metrics["base_val"]["loss"]
    _, loaded = run._load(run._spec_of(tmp_path / "run"))
    assert isinstance(loaded.model.get_input_embeddings(), qe.QuantizedEmbedding)
    assert isinstance(loaded.model.get_output_embeddings(), qe.TiedQuantizedHead)
    assert run.evaluate_run(tmp_path / "run") == pytest.approx(metrics["test"])
    assert main(["generate", "--adapter", str(tmp_path / "run"), "--prompt", "the film", "--max-new-tokens", "3"]) == 0

    assert main(["finetune", "--model", str(decoder), "--task", str(chat), "--quantize-embeddings"]) == 2
    assert "needs --quantize nf4 or fp4" in capsys.readouterr().err
