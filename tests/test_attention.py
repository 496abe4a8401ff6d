"""Coeff-Tuning and Kernel-mix against plain, slow references written here (naive per-head loops)."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import structpeft as sp
from structpeft.attention import attention_anatomy, hooks, mixed_head_attention
from structpeft.core.layers import AdaptedLayer, module_host
from tests.models import (
    MHANet,
    _ids,
    _mha_inputs,
    _pixels,
    run,
    tiny_bert,
    tiny_dinov2,
    tiny_gpt2,
    tiny_llama,
    tiny_roberta,
    tiny_vit,
)


# -- references -----------------------------------------------------------------------------
def reference_mixed_attention(q, k, v, mask, alpha, scaling):
    """``O_h = Σ_k C[h,k] A_k V_{g(h)}`` with ``C = I + α``, one head and one map at a time."""
    batch, heads, n, _ = q.shape
    group = heads // k.shape[1]
    mixing = torch.eye(heads, dtype=alpha.dtype) + alpha
    out = torch.zeros(batch, heads, n, v.shape[-1], dtype=q.dtype)
    for b in range(batch):
        maps = []
        for h in range(heads):
            scores = q[b, h] @ k[b, h // group].T * scaling  # (N, M)
            if mask is not None:
                scores = scores + (mask[b, 0] if mask.shape[0] > 1 else mask[0, 0])
            maps.append(torch.softmax(scores, dim=-1))
        for h in range(heads):
            mixed = sum(mixing[h, j] * maps[j] for j in range(heads))
            out[b, h] = mixed @ v[b, h // group]
    return out


def reference_eager(alphas: dict[int, torch.Tensor]):
    """An ``eager_attention_forward`` that mixes maps by naive loops, α looked up by module."""

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        mask = None if attention_mask is None else attention_mask[..., : key.shape[2]]
        alpha = alphas.get(id(module), torch.zeros(query.shape[1], query.shape[1]))
        out = reference_mixed_attention(query, key, value, mask, alpha, scaling)
        return out.transpose(1, 2).contiguous(), None

    return forward


HF_MODELS = {
    "bert": (tiny_bert, _ids),
    "roberta": (tiny_roberta, _ids),
    "gpt2": (tiny_gpt2, _ids),  # causal + padding masks
    "llama": (tiny_llama, _ids),  # causal, RoPE, 4 query heads over 2 key/value heads
    "vit": (tiny_vit, _pixels),
    "dinov2": (tiny_dinov2, _pixels),
}


def build(name: str, attn_implementation: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    model = HF_MODELS[name][0]()
    model.config._attn_implementation = attn_implementation
    return model.eval()


def coeff_alphas(model: sp.PeftModel, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {n: h.adapters[adapter]["coeff"].coeff_alpha for n, h in model.adapter_hosts() if adapter in h.adapters}


# -- the pure maths ---------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    n=st.integers(1, 9),
    extra_keys=st.integers(0, 3),
    masked=st.booleans(),
    chunk=st.sampled_from([None, 1, 2, 4]),
)
def test_mixed_attention_matches_reference_and_its_gradients(batch, kv_heads, group, n, extra_keys, masked, chunk):
    g = torch.Generator().manual_seed(n * 31 + extra_keys)
    heads, m, d = kv_heads * group, n + extra_keys, 4
    q = torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, m, d, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, m, d, generator=g, dtype=torch.float64)
    alpha = torch.randn(heads, heads, generator=g, dtype=torch.float64)
    mask = None
    if masked:  # boolean, True = attend; the first key always visible so no row is empty
        keep = torch.rand(batch, 1, n, m, generator=g) > 0.3
        keep[..., 0] = True
        mask = keep
    additive = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, -1e9)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v, alpha)]
    out, _ = mixed_head_attention(*inputs[:3], mask, torch.eye(heads, dtype=q.dtype) + inputs[3], 0.5, chunk_size=chunk)
    ref_inputs = [t.clone().requires_grad_(True) for t in (q, k, v, alpha)]
    expected = reference_mixed_attention(*ref_inputs[:3], additive, ref_inputs[3], 0.5)
    assert torch.allclose(out, expected.to(out.dtype), atol=1e-9)
    weights = torch.randn(out.shape, generator=g, dtype=q.dtype)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for got, want in zip(inputs, ref_inputs, strict=True):
        assert torch.allclose(got.grad, want.grad, atol=1e-8)


def test_mixed_attention_refuses_a_mixing_of_the_wrong_size() -> None:
    q, k = torch.randn(1, 4, 3, 2), torch.randn(1, 2, 3, 2)
    with pytest.raises(ValueError, match="does not fit 4 query heads over 2"):
        mixed_head_attention(q, k, k, None, torch.eye(3), 1.0)


# -- Coeff-Tuning on transformers models ------------------------------------------------------
@pytest.mark.parametrize("name", sorted(HF_MODELS))
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_coeff_zero_start_equals_the_unadapted_model(name: str, implementation: str) -> None:
    base = build(name, implementation)
    x = HF_MODELS[name][1](0)
    expected = run(base, x)
    model = sp.get_peft_model(base, sp.CoeffConfig())
    hooked = [m for _, m in model.adapter_hosts()]
    assert hooked and all(hooks.is_hooked(m) for m in base.modules() if module_host(m) is not None)
    assert torch.allclose(run(model, x), expected, atol=1e-6, rtol=1e-6)
    assert base.config._attn_implementation == implementation  # named structpeft only during a forward
    model.unload()
    assert not any(hooks.is_hooked(m) for m in base.modules())


TEXT_MODELS = ["bert", "roberta", "gpt2", "llama"]


@pytest.mark.parametrize(("name", "padded"), [(n, True) for n in sorted(HF_MODELS)] + [(n, False) for n in TEXT_MODELS])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_coeff_matches_naive_per_head_reference(name: str, chunk_size: int | None, padded: bool, monkeypatch) -> None:
    """Outputs and α gradients equal a reference model whose eager attention mixes maps in loops.

    The adapted model replaces SDPA (boolean masks with padding; no mask at all, causality left
    implicit, without; GQA kernels); the reference runs the model's eager path, whose masks are
    explicit.
    """
    model = sp.get_peft_model(build(name), sp.CoeffConfig(init_weights=False, chunk_size=chunk_size))
    reference = build(name, "eager")
    alphas = {
        id(reference.get_submodule(path)): alpha.detach().clone().requires_grad_(True)
        for path, alpha in coeff_alphas(model).items()
    }
    modeling = importlib.import_module(type(reference).__module__)
    monkeypatch.setattr(modeling, "eager_attention_forward", reference_eager(alphas))
    x = HF_MODELS[name][1](1)
    if not padded:
        del x["attention_mask"]
    out, expected = run(model, x), run(reference, x)
    assert not torch.allclose(expected, run(build(name), x), atol=1e-4)  # the mixing does something
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    for path, alpha in coeff_alphas(model).items():
        want = alphas[id(reference.get_submodule(path))].grad
        assert torch.allclose(alpha.grad, want, atol=1e-5, rtol=1e-4), path


def test_coeff_chunked_path_equals_materialised_in_outputs_and_gradients() -> None:
    x = _ids(2)
    results = []
    for chunk_size in (None, 3):
        torch.manual_seed(5)
        model = sp.get_peft_model(build("llama"), sp.CoeffConfig(init_weights=False, chunk_size=chunk_size))
        out = run(model, x)
        out.square().sum().backward()
        results.append((out, [a.grad for a in coeff_alphas(model).values()]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b, strict=True))


def test_coeff_dropout_acts_on_alpha_in_training_only() -> None:
    model = sp.get_peft_model(build("bert"), sp.CoeffConfig(init_weights=False, dropout=0.5))
    delta = next(h for _, h in model.adapter_hosts()).adapters["default"]["coeff"]
    assert torch.equal(delta.mixing_delta(), delta.coeff_alpha)  # eval: no dropout
    model.train()
    torch.manual_seed(0)
    dropped = delta.mixing_delta()
    kept = dropped != 0
    assert 0 < kept.sum() < dropped.numel()
    assert torch.allclose(dropped[kept], 2 * delta.coeff_alpha[kept])  # inverted dropout


def test_two_active_coeff_adapters_add_their_alphas() -> None:
    model = sp.get_peft_model(build("gpt2"), sp.CoeffConfig(init_weights=False))
    model.add_adapter("other", sp.CoeffConfig(init_weights=False))
    model.set_adapter(["default", "other"])
    x = _ids(3)
    both = run(model, x)
    summed = sp.get_peft_model(build("gpt2"), sp.CoeffConfig())
    with torch.no_grad():
        for path, alpha in coeff_alphas(summed).items():
            alpha.copy_(coeff_alphas(model)[path] + coeff_alphas(model, "other")[path])
    assert torch.allclose(run(summed, x), both, atol=1e-6)


def test_coeff_checkpoint_keys_name_the_attention_module(tmp_path) -> None:
    from safetensors.torch import load_file

    model = sp.get_peft_model(build("bert"), sp.CoeffConfig(init_weights=False))
    model.save_pretrained(tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == [f"base_model.model.bert.encoder.layer.{i}.attention.self.coeff_alpha" for i in range(2)]


def test_merge_refuses_coeff_unless_asked_to_keep_it() -> None:
    model = sp.get_peft_model(
        build("bert"), [sp.CoeffConfig(init_weights=False), sp.LoraConfig(target_modules=["query"], init_weights=False)]
    )
    x = _ids(4)
    expected = run(model, x)
    weight = model.base_model.bert.encoder.layer[0].attention.self.query.weight.clone()
    with pytest.raises(ValueError, match=r"attention\.self \(coeff\).*Nothing was merged.*keep_unmergeable=True"):
        model.merge_and_unload()
    assert torch.equal(model.base_model.bert.encoder.layer[0].attention.self.query.weight, weight)
    plain = model.merge_and_unload(keep_unmergeable=True)
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())  # LoRA merged and gone
    assert module_host(plain.bert.encoder.layer[0].attention.self) is not None  # Coeff kept, still acting
    assert torch.allclose(run(plain, x), expected, atol=1e-5)


def test_deleting_one_of_two_coeff_adapters_keeps_the_hook() -> None:
    model = sp.get_peft_model(build("bert"), sp.CoeffConfig(init_weights=False))
    model.add_adapter("other", sp.CoeffConfig(init_weights=False))
    model.set_adapter("other")
    x = _ids(5)
    expected = run(model, x)
    attention = model.base_model.bert.encoder.layer[0].attention.self
    model.delete_adapter("default")
    assert hooks.is_hooked(attention)
    assert torch.equal(run(model, x), expected)
    model.delete_adapter("other")
    assert not hooks.is_hooked(attention)
    assert module_host(attention) is None


def test_coeff_errors_name_the_module_and_the_fix() -> None:
    with pytest.raises(TypeError, match=r"'bert.encoder.layer.0.attention.output.dense' is a Linear.*attention"):
        sp.get_peft_model(build("bert"), sp.CoeffConfig(target_modules=["layer.0.attention.output.dense"]))
    flash = build("bert")
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="BertSelfAttention.*flash_attention_2.*attn_implementation='sdpa'"):
        sp.get_peft_model(flash, sp.CoeffConfig())
    with pytest.raises(ValueError, match="found no attention module in this Linear"):
        sp.get_peft_model(torch.nn.Linear(3, 3), sp.CoeffConfig())


# -- Coeff-Tuning on torch.nn.MultiheadAttention --------------------------------------------
def reference_mha(mha: torch.nn.MultiheadAttention, x, padding, alpha):
    batch, n, width = x.shape
    heads = mha.num_heads
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    split = lambda t: t.view(batch, n, heads, -1).transpose(1, 2)  # noqa: E731
    mask = torch.zeros(batch, 1, 1, n).masked_fill(padding[:, None, None, :], -1e9)
    out = reference_mixed_attention(split(q), split(k), split(v), mask, alpha, (width // heads) ** -0.5)
    return mha.out_proj(out.transpose(1, 2).reshape(batch, n, width))


def test_coeff_on_multihead_attention_matches_reference() -> None:
    torch.manual_seed(0)
    net = MHANet().eval()
    inputs = _mha_inputs(0)
    expected_base = run(net, inputs)
    model = sp.get_peft_model(net, sp.CoeffConfig(init_weights=False))
    alpha = coeff_alphas(model)["attn"]
    h = net.embed(inputs["x"])
    got, _ = net.attn(h, h, h, key_padding_mask=inputs["padding"], need_weights=False)
    want = reference_mha(net.attn, h, inputs["padding"], alpha.detach())
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(run(model, inputs), expected_base, atol=1e-4)
    model.unload()
    assert "forward" not in vars(net.attn)
    assert torch.allclose(run(net, inputs), expected_base, atol=1e-6)


# -- Kernel-mix ------------------------------------------------------------------------------
def reference_kernel_mix(block, anatomy, deltas, x_attn, x_out):
    """Q, V and O of one block from the Kernel-mix paper's per-head formulas (docs/methods/kernel-mix.md), head by head.

    ``x_attn`` is the block input, ``x_out`` the input of the output projection (head outputs).
    """
    get = lambda p: block.get_submodule(p)  # noqa: E731
    unwrap = lambda m: m.base_layer if isinstance(m, AdaptedLayer) else m  # noqa: E731
    heads, kv_heads, d = anatomy.heads, anatomy.kv_heads, anatomy.head_dim
    width = heads * d
    if anatomy.fused:
        fused = unwrap(get(anatomy.query))
        w, b = fused.weight.T, fused.bias  # Conv1D stores (in, out)
        w_q, w_k, w_v = w[:width], w[width : 2 * width], w[2 * width :]
        b_q, b_k, b_v = b[:width], b[width : 2 * width], b[2 * width :]
        q_delta, v_delta = deltas[anatomy.query].query, deltas[anatomy.query].value
    else:
        q_layer, k_layer, v_layer = (unwrap(get(p)) for p in (anatomy.query, anatomy.key, anatomy.value))
        w_q, b_q, w_k, b_k, w_v, b_v = (
            q_layer.weight,
            q_layer.bias,
            k_layer.weight,
            k_layer.bias,
            v_layer.weight,
            v_layer.bias,
        )
        q_delta, v_delta = deltas[anatomy.query], deltas[anatomy.value]
    lin = lambda x, w, b: x @ w.T + (0 if b is None else b)  # noqa: E731
    keys = lin(x_attn, w_k, b_k)
    q_heads, v_heads = [], []
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        q_h = lin(x_attn, w_q[rows], None if b_q is None else b_q[rows])
        q_h = q_h + x_attn @ q_delta.q.A[h].T @ q_delta.q.B[h].T + (0 if q_delta.q.c is None else q_delta.q.c[rows])
        q_heads.append(q_h)
    shared = lambda x, lora: x @ lora.A.T @ lora.B.T  # noqa: E731
    q_out = torch.cat(q_heads, -1) + shared(x_attn, q_delta.q_shared)
    for g in range(kv_heads):
        rows = slice(g * d, (g + 1) * d)
        v_g = lin(x_attn, w_v[rows], None if b_v is None else b_v[rows])
        v_g = v_g + keys[..., rows] @ v_delta.v.A[g].T @ v_delta.v.B[g].T
        v_heads.append(v_g + (0 if v_delta.v.c is None else v_delta.v.c[rows]))
    v_out = torch.cat(v_heads, -1) + shared(x_attn, v_delta.v_shared)
    o_layer = unwrap(get(anatomy.output))
    o_delta = deltas[anatomy.output]
    per_head = [x_out[..., h * d : (h + 1) * d] @ o_delta.o.A[h].T for h in range(heads)]  # each (..., r_v)
    o_out = lin(x_out, o_layer.weight.T if anatomy.fused else o_layer.weight, o_layer.bias)
    o_out = o_out + torch.cat(per_head, -1) @ o_delta.o.B.T + (0 if o_delta.o.c is None else o_delta.o.c)
    return q_out, v_out, o_out + shared(x_out, o_delta.o_shared)


@pytest.mark.parametrize("name", ["bert", "roberta", "gpt2", "llama", "vit", "dinov2"])
def test_kernel_mix_projections_match_per_head_reference(name: str) -> None:
    model = sp.get_peft_model(build(name), sp.KernelMixConfig(init_weights=False, dropout=0.0))
    block_path = model.peft_config["default"][0].find_targets(model.base_model, set())[0]
    block = model.base_model.get_submodule(block_path)
    anatomy = attention_anatomy(block)
    deltas = {
        p: block.get_submodule(p).adapters["default"]["kernel_mix"]
        for p in {anatomy.query, anatomy.value, anatomy.output}
    }
    g = torch.Generator().manual_seed(0)
    width = anatomy.heads * anatomy.head_dim
    x_attn = torch.randn(2, 5, width, generator=g)
    x_out = torch.randn(2, 5, width, generator=g)
    q_ref, v_ref, o_ref = reference_kernel_mix(block, anatomy, deltas, x_attn, x_out)
    if anatomy.fused:
        qkv = block.get_submodule(anatomy.query)(x_attn)
        q_got, v_got = qkv[..., :width], qkv[..., 2 * width :]
    else:
        q_got, v_got = block.get_submodule(anatomy.query)(x_attn), block.get_submodule(anatomy.value)(x_attn)
    o_got = block.get_submodule(anatomy.output)(x_out)
    for got, want in ((q_got, q_ref), (v_got, v_ref), (o_got, o_ref)):
        assert torch.allclose(got, want, atol=1e-5)


def test_kernel_mix_finds_gqa_heads_and_llama_has_no_bias_terms() -> None:
    model = sp.get_peft_model(build("llama"), sp.KernelMixConfig())
    anatomy = attention_anatomy(model.base_model.model.layers[0].self_attn)
    assert (anatomy.heads, anatomy.kv_heads, anatomy.head_dim) == (4, 2, 8)
    value = model.base_model.model.layers[0].self_attn.v_proj.adapters["default"]["kernel_mix"]
    assert value.v.A.shape == (2, 2, 8) and value.v.c is None


@pytest.mark.parametrize(
    ("model_type", "ranks", "expected"),
    [("roberta", (1, 2, 2, 4), 608_256), ("gpt2", (3, 8, 12, 8), 2_009_088)],
)
def test_kernel_mix_parameter_counts_equal_the_papers(model_type: str, ranks, expected: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, RobertaConfig, RobertaModel

    with torch.device("meta"):  # full-size shapes, no memory
        base = RobertaModel(RobertaConfig()) if model_type == "roberta" else GPT2LMHeadModel(GPT2Config())
    r_q, r_v, r_q_shared, r_v_shared = ranks
    config = sp.KernelMixConfig(r_q=r_q, r_v=r_v, r_q_shared=r_q_shared, r_v_shared=r_v_shared)
    assert sp.get_peft_model(base, config).get_nb_trainable_parameters()[0] == expected


def test_kernel_mix_zero_start_is_exact_and_paper_init_is_not() -> None:
    x = _ids(6)
    expected = run(build("bert"), x)
    assert torch.equal(run(sp.get_peft_model(build("bert"), sp.KernelMixConfig()), x), expected)
    paper = sp.get_peft_model(build("bert"), sp.KernelMixConfig(init="paper"))
    assert not torch.equal(run(paper, x), expected)


def test_kernel_mix_merged_keeps_sdpa_and_equals_unmerged_with_lora_on_keys() -> None:
    model = sp.get_peft_model(
        build("llama"),
        [sp.KernelMixConfig(init_weights=False), sp.LoraConfig(target_modules=["k_proj"], init_weights=False)],
    )
    x = _ids(7)
    expected = run(model, x)
    plain = model.merge_and_unload()
    assert plain.config._attn_implementation == "sdpa"
    assert torch.allclose(run(plain, x), expected, atol=1e-5)


def test_kernel_mix_errors_on_a_module_without_projections() -> None:
    with pytest.raises(ValueError, match=r"'bert.embeddings' \(BertEmbeddings\) is not an attention block"):
        sp.get_peft_model(build("bert"), sp.KernelMixConfig(target_modules=["bert.embeddings"]))
    with pytest.raises(ValueError, match="Kernel-mix found no attention block"):
        sp.get_peft_model(MHANet(), sp.KernelMixConfig())


def test_composed_coeff_and_kernel_mix_train_together() -> None:
    model = sp.get_peft_model(build("gpt2"), [sp.CoeffConfig(init_weights=False), sp.KernelMixConfig()])
    model.train()
    run(model, _ids(8)).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("coeff_alpha" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert any("kernel_mix" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    clone = copy.deepcopy(model)
    assert torch.allclose(run(clone.eval(), _ids(9)), run(model.eval(), _ids(9)))
