"""Kernel-mix on every architecture of tests/architectures.py, against references written here.

The layouts below are what each model's code does (read from transformers' modeling files); the
library finds them by probing the blocks, and these tests hold it to them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structpeft as sp
from structpeft.attention import attention_anatomy
from structpeft.core.layers import AdaptedLayer
from tests.architectures import ARCHITECTURES, outputs

NAMES = [a.name for a in ARCHITECTURES]
BY_NAME = {a.name: a for a in ARCHITECTURES}
# Every tiny config: width 32, 4 query heads of 8; the GQA ones share 2 key/value heads.
WIDTH, HEADS, HEAD_DIM = 32, 4, 8
# How a fused projection lays out its rows: [q | k | v] or, per head, [q_h k_h v_h] (GPT-NeoX).
FUSED = {"gpt2": "thirds", "phi3": "thirds", "gpt_neox": "per_head"}


def kv_heads(name: str) -> int:
    return 2 if "gqa" in BY_NAME[name].variants else HEADS


def expected_rows(name: str) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Rows of each query head, and of each key and value head, in their layers' outputs."""
    d, heads, groups = HEAD_DIM, HEADS, kv_heads(name)
    span = lambda start: list(range(start, start + d))  # noqa: E731
    if FUSED.get(name) == "per_head":
        return (
            [span(3 * d * h) for h in range(heads)],
            [span(3 * d * g + d) for g in range(groups)],
            [span(3 * d * g + 2 * d) for g in range(groups)],
        )
    if FUSED.get(name) == "thirds":
        keys = heads * d
        return (
            [span(d * h) for h in range(heads)],
            [span(keys + d * g) for g in range(groups)],
            [span(keys + groups * d + d * g) for g in range(groups)],
        )
    kv = [span(d * g) for g in range(groups)]
    return [span(d * h) for h in range(heads)], kv, kv


def build(name: str) -> nn.Module:
    arch = BY_NAME[name]
    return arch.build(arch.implementations[-1])


def judged(name: str, model: nn.Module, seed: int = 0) -> torch.Tensor:
    arch = BY_NAME[name]
    x = arch.inputs(seed)
    return arch.judged(x, outputs(model, x))


def blocks(model: sp.PeftModel) -> list[str]:
    return model.peft_config["default"][0].find_targets(model.base_model, set())


def kernel_mix(name: str, **options) -> sp.PeftModel:
    return sp.get_peft_model(build(name), sp.KernelMixConfig(dropout=0.0, **options))


def base_layer(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """(d_out, d_in), whatever the storage (GPT-2's Conv1D stores the transpose)."""
    return layer.weight.T if type(layer).__name__ == "Conv1D" else layer.weight


def block_count(name: str) -> int:
    return 6 if BY_NAME[name].kind == "encoder-decoder" else 2  # + decoder self- and cross-attention


# -- where the projections are ----------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_anatomy_finds_every_block_with_its_row_layout(name: str) -> None:
    model = kernel_mix(name)
    paths = blocks(model)
    assert len(paths) == block_count(name)
    q_rows, k_rows, v_rows = expected_rows(name)
    for path in paths:
        anatomy = attention_anatomy(model.base_model.get_submodule(path))
        assert (anatomy.heads, anatomy.kv_heads, anatomy.head_dim) == (HEADS, kv_heads(name), HEAD_DIM)
        assert anatomy.fused == (name in FUSED)
        assert len({anatomy.query, anatomy.key, anatomy.value, anatomy.output}) == (2 if name in FUSED else 4)
        assert list(anatomy.query_rows) == sum(q_rows, [])
        assert list(anatomy.key_rows) == sum(k_rows, [])
        assert list(anatomy.value_rows) == sum(v_rows, [])


# -- the maths ------------------------------------------------------------------------------
def naive_reference(name: str, model: sp.PeftModel) -> nn.Module:
    """The base model with W_q, W_v, W_o (and biases) changed head by head by the adapter's
    factors, as the paper writes Kernel-mix (docs/methods/kernel-mix.md), in loops over heads and
    the known row layouts."""
    reference = build(name)
    q_rows, k_rows, v_rows = expected_rows(name)
    for path in blocks(model):
        block, plain = model.base_model.get_submodule(path), reference.get_submodule(path)
        anatomy = attention_anatomy(block)
        q_delta, v_delta, o_delta = (
            block.get_submodule(p).adapters["default"]["kernel_mix"]
            for p in (anatomy.query, anatomy.value, anatomy.output)
        )
        if anatomy.query == anatomy.value:
            q_delta, v_delta = q_delta.query, q_delta.value
        layers = {p: base_layer(plain.get_submodule(p)) for p in {anatomy.query, anatomy.value, anatomy.output}}
        key = base_layer(plain.get_submodule(anatomy.key))
        w_k, b_k = dense_weight(key).detach().clone(), None if key.bias is None else key.bias.detach().clone()
        new_w = {p: dense_weight(m).detach().clone() for p, m in layers.items()}
        new_b = {p: None if m.bias is None else m.bias.detach().clone() for p, m in layers.items()}
        with torch.no_grad():
            q, v, o = anatomy.query, anatomy.value, anatomy.output
            for h, rows in enumerate(q_rows):
                new_w[q][rows] += q_delta.q.B[h] @ q_delta.q.A[h]
                if q_delta.q.c is not None:
                    new_b[q][rows] += q_delta.q.c[h * HEAD_DIM : (h + 1) * HEAD_DIM]
            new_w[q][sum(q_rows, [])] += q_delta.q_shared.B @ q_delta.q_shared.A
            for g, (rows, keys) in enumerate(zip(v_rows, k_rows, strict=True)):
                kernel = v_delta.v.B[g] @ v_delta.v.A[g]  # (d, d), applied to the head's keys
                new_w[v][rows] += kernel @ w_k[keys]
                if new_b[v] is not None:
                    new_b[v][rows] += v_delta.v.c[g * HEAD_DIM : (g + 1) * HEAD_DIM]
                    if b_k is not None:  # Whisper's keys have no bias
                        new_b[v][rows] += kernel @ b_k[keys]
            new_w[v][sum(v_rows, [])] += v_delta.v_shared.B @ v_delta.v_shared.A
            rank = o_delta.o.A.shape[1]
            for h in range(HEADS):
                columns = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                new_w[o][:, columns] += o_delta.o.B[:, h * rank : (h + 1) * rank] @ o_delta.o.A[h]
            new_w[o] += o_delta.o_shared.B @ o_delta.o_shared.A
            if new_b[o] is not None:
                new_b[o] += o_delta.o.c
            for p, layer in layers.items():
                dense_weight(layer).copy_(new_w[p])
                if layer.bias is not None:
                    layer.bias.copy_(new_b[p])
    return reference


@pytest.mark.parametrize("name", NAMES)
def test_kernel_mix_equals_naive_per_head_reference_and_merges(name: str) -> None:
    model = kernel_mix(name, init_weights=False)
    got = judged(name, model)
    assert not torch.allclose(got, judged(name, build(name)), atol=1e-3)  # the adapter does something
    assert torch.allclose(got, judged(name, naive_reference(name, model)), atol=1e-4, rtol=1e-4)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer) for m in merged.modules())
    assert torch.allclose(judged(name, merged), got, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_kernel_mix_zero_start_disabled_and_parameter_count(name: str) -> None:
    # The base frozen, as under any adapter: T5's output moves by ~1e-7 with autograd on its weights.
    base = judged(name, build(name).requires_grad_(False))
    assert torch.equal(judged(name, kernel_mix(name)), base)
    model = kernel_mix(name, init_weights=False)
    assert not torch.allclose(judged(name, model), base, atol=1e-3)
    with model.disable_adapter():
        assert torch.equal(judged(name, model), base)

    r_q, r_v, r_qs, r_vs = 1, 2, 2, 4  # the defaults
    d, heads, groups, width = HEAD_DIM, HEADS, kv_heads(name), WIDTH
    expected = 0
    for path in blocks(model):
        block = model.base_model.get_submodule(path)
        anatomy = attention_anatomy(block)
        roles = (anatomy.query, anatomy.value, anatomy.output)
        has_bias = {p: base_layer(block.get_submodule(p)).bias is not None for p in roles}
        query = heads * r_q * (width + d) + r_qs * (width + heads * d) + has_bias[anatomy.query] * heads * d
        value = groups * r_v * 2 * d + r_vs * (width + groups * d) + has_bias[anatomy.value] * groups * d
        output = heads * r_v * (d + width) + r_vs * (heads * d + width) + has_bias[anatomy.output] * width
        expected += query + value + output
    assert model.get_nb_trainable_parameters()[0] == expected


@pytest.mark.parametrize("name", NAMES)
def test_kernel_mix_trains_and_round_trips(name: str, tmp_path) -> None:
    model = kernel_mix(name, init_weights=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    out = judged(name, model)
    # Not a norm of the output: after a final LayerNorm, Σ y² per token is constant.
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    moved = {n: not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad}
    assert all(moved.values()), [n for n, m in moved.items() if not m]
    model.eval()
    expected = judged(name, model, seed=1)
    model.save_pretrained(tmp_path)
    loaded = sp.PeftModel.from_pretrained(build(name), tmp_path).eval()
    assert torch.equal(judged(name, loaded, seed=1), expected)


# -- blocks no family list knows --------------------------------------------------------------
class GroupedFusedAttention(nn.Module):
    """Plain torch attention whose one projection lays its rows out per key/value head g as
    ``[q of g's query heads | k_g | v_g]`` (Falcon's grouped layout), under names that say nothing."""

    def __init__(self, width: int = 24, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.mix = nn.Linear(width, (heads + 2 * kv_heads) * self.head_dim)
        self.back = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, _ = x.shape
        group = self.num_heads // self.kv_heads
        rows = self.mix(x).view(batch, n, self.kv_heads, group + 2, self.head_dim)
        q = rows[:, :, :, :group].reshape(batch, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)
        k, v = (rows[:, :, :, group + i].transpose(1, 2).repeat_interleave(group, 1) for i in (0, 1))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (B, H, N, d)
        return self.back(out.transpose(1, 2).reshape(batch, n, -1))


class Net(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 24)
        self.block = attention
        self.head = nn.Linear(24, 2)

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        h = self.embed(x)
        return self.head(h + self.block(h, *args))


def test_kernel_mix_reads_a_grouped_fused_layout_by_probing_and_its_maths_follow_it() -> None:
    torch.manual_seed(0)
    net = Net(GroupedFusedAttention()).eval()
    x = torch.randn(2, 5, 5)
    base = net(x)
    model = sp.get_peft_model(net, sp.KernelMixConfig(init_weights=False, dropout=0.0))
    block = model.base_model.block
    anatomy = attention_anatomy(block)
    d, slot = 6, 4 * 6  # per key/value head: 2 query heads, its keys, its values
    assert (anatomy.query, anatomy.output, anatomy.heads, anatomy.kv_heads) == ("mix", "back", 4, 2)
    assert list(anatomy.query_rows) == [r for g in range(2) for r in range(g * slot, g * slot + 2 * d)]
    assert list(anatomy.key_rows) == [r for g in range(2) for r in range(g * slot + 2 * d, g * slot + 3 * d)]
    assert list(anatomy.value_rows) == [r for g in range(2) for r in range(g * slot + 3 * d, (g + 1) * slot)]

    # The fused layer's output, head by head from the formulas: queries and values change, keys do not.
    fused = block.mix.adapters["default"]["kernel_mix"]
    h = torch.randn(3, 24)
    want = base_layer(block.mix)(h).detach().clone()
    w, b = block.mix.weight, block.mix.bias
    for g in range(2):
        keys = h @ w[g * slot + 2 * d : g * slot + 3 * d].T + b[g * slot + 2 * d : g * slot + 3 * d]
        for j in range(2):
            head, rows = 2 * g + j, slice(g * slot + j * d, g * slot + (j + 1) * d)
            q = fused.query.q
            want[:, rows] += h @ q.A[head].T @ q.B[head].T + q.c[head * d : (head + 1) * d]
        v = fused.value.v
        want[:, g * slot + 3 * d : (g + 1) * slot] += keys @ v.A[g].T @ v.B[g].T + v.c[g * d : (g + 1) * d]
    shared_q, shared_v = fused.query.q_shared, fused.value.v_shared
    want[:, list(anatomy.query_rows)] += h @ shared_q.A.T @ shared_q.B.T
    want[:, list(anatomy.value_rows)] += h @ shared_v.A.T @ shared_v.B.T
    assert torch.allclose(block.mix(h), want, atol=1e-5)

    adapted = model(x)
    assert not torch.allclose(adapted, base, atol=1e-3)
    assert torch.allclose(model.merge_and_unload()(x), adapted, atol=1e-5)


class OpaqueAttention(nn.Module):
    """Separate projections in a module order and under names that say nothing of their roles."""

    def __init__(self, width: int = 24, heads: int = 4) -> None:
        super().__init__()
        self.n_heads = heads
        self.alpha, self.beta, self.gamma, self.delta = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = lambda t: t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # noqa: E731
        v, q, k = split(self.alpha(x)), split(self.beta(x)), split(self.gamma(x))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.delta(out.transpose(1, 2).flatten(2))


def test_roles_come_from_the_data_flow_not_the_names() -> None:
    model = sp.get_peft_model(Net(OpaqueAttention()), sp.KernelMixConfig())
    anatomy = attention_anatomy(model.base_model.block)
    assert (anatomy.query, anatomy.key, anatomy.value, anatomy.output) == ("beta", "gamma", "alpha", "delta")
    assert anatomy.kv_heads == anatomy.heads == 4


class ScaledAttention(nn.Module):
    """A forward the probe cannot call (it needs a number), with separate or fused projections."""

    def __init__(self, fused: bool, width: int = 24, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        if fused:
            self.to_qkv = nn.Linear(width, 3 * width)
        else:
            self.to_q, self.to_k, self.to_v = (nn.Linear(width, width) for _ in range(3))
        self.to_out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        split = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731
        qkv = self.to_qkv(x).chunk(3, -1) if hasattr(self, "to_qkv") else (self.to_q(x), self.to_k(x), self.to_v(x))
        q, k, v = (split(t) for t in qkv)
        out = torch.nn.functional.scaled_dot_product_attention(q / temperature, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


def test_unprobeable_blocks_are_read_by_names_or_refused_naming_what_was_found() -> None:
    model = sp.get_peft_model(Net(ScaledAttention(fused=False)), sp.KernelMixConfig(init_weights=False))
    anatomy = attention_anatomy(model.base_model.block)
    assert (anatomy.query, anatomy.key, anatomy.value, anatomy.output) == ("to_q", "to_k", "to_v", "to_out")
    x = torch.randn(2, 5, 5)
    assert torch.allclose(model.merge_and_unload()(x, 2.0), model(x, 2.0), atol=1e-5)

    with pytest.raises(ValueError, match="Kernel-mix found no attention block"):
        sp.get_peft_model(Net(ScaledAttention(fused=True)), sp.KernelMixConfig())
    with pytest.raises(
        ValueError,
        match=r"'block' \(ScaledAttention\) is not an attention block.*TypeError.*"
        r"Projections found: to_qkv \(24x72\), to_out \(24x24\)",
    ):
        sp.get_peft_model(Net(ScaledAttention(fused=True)), sp.KernelMixConfig(target_modules=["block"]))


def test_torch_multihead_attention_is_refused_naming_its_projections() -> None:
    net = Net(nn.MultiheadAttention(24, 4, batch_first=True))
    with pytest.raises(ValueError, match=r"'block' \(MultiheadAttention\).*Projections found: out_proj \(24x24\)"):
        sp.get_peft_model(net, sp.KernelMixConfig(target_modules=["block"]))


def test_blocks_are_read_alike_under_a_head_mixer_and_inference_mode() -> None:
    """Coeff-Tuning's α mixes heads inside the attention: the probe must not see it."""
    plain = attention_anatomy(build("gpt_neox").gpt_neox.layers[0].attention)
    model = sp.get_peft_model(build("gpt_neox"), [sp.CoeffConfig(init_weights=False), sp.KernelMixConfig()])
    assert attention_anatomy(model.base_model.gpt_neox.layers[0].attention) == plain
    block = build("gpt_neox").gpt_neox.layers[0].attention
    with torch.inference_mode():
        assert attention_anatomy(block) == plain
    assert list(plain.key_rows[:HEAD_DIM]) == list(range(HEAD_DIM, 2 * HEAD_DIM))  # NeoX: [q_0 k_0 v_0 q_1 ...]


class QueryKeyValueSignature(OpaqueAttention):
    """Takes queries, keys and values apart, as older attention modules do; names say nothing."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, /) -> torch.Tensor:
        split = lambda t: t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.gamma(query)), split(self.alpha(key)), split(self.beta(value))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.delta(out.transpose(1, 2).flatten(2))


def test_a_forward_taking_query_key_value_apart_is_probed_as_self_attention() -> None:
    anatomy = attention_anatomy(QueryKeyValueSignature())
    assert (anatomy.query, anatomy.key, anatomy.value, anatomy.output) == ("gamma", "alpha", "beta", "delta")


class GatedAttention(nn.Module):
    """Qwen3-Next's gated attention in plain torch: one projection makes, per head, its queries and
    an output gate ``[q_h | g_h]``; the heads' outputs are multiplied by ``sigmoid(g)``."""

    def __init__(self, width: int = 24, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, width // heads
        self.q_proj = nn.Linear(width, 2 * width)
        self.k_proj, self.v_proj, self.o_proj = (nn.Linear(width, width) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731
        q, gate = split(self.q_proj(x)).chunk(2, dim=-1)  # each (B, H, N, d)
        out = torch.nn.functional.scaled_dot_product_attention(q, split(self.k_proj(x)), split(self.v_proj(x)))
        return self.o_proj((out * torch.sigmoid(gate)).transpose(1, 2).flatten(2))


def test_an_output_gate_made_beside_the_queries_is_left_out_of_them() -> None:
    torch.manual_seed(0)
    net = Net(GatedAttention()).eval()
    anatomy = attention_anatomy(net.block)
    d = 6
    assert list(anatomy.query_rows) == [r for h in range(4) for r in range(2 * d * h, 2 * d * h + d)]
    assert (anatomy.key, anatomy.value, anatomy.output) == ("k_proj", "v_proj", "o_proj")
    x = torch.randn(2, 5, 5)
    base = net(x)
    model = sp.get_peft_model(net, sp.KernelMixConfig(init_weights=False, dropout=0.0, r_v=0, r_v_shared=0))
    q_proj = model.base_model.block.q_proj
    h = torch.randn(3, 24)
    gates = [r for h_ in range(4) for r in range(2 * d * h_ + d, 2 * d * (h_ + 1))]
    assert torch.equal(q_proj(h)[:, gates], base_layer(q_proj)(h)[:, gates])  # the gates untouched
    assert not torch.allclose(model(x), base, atol=1e-3)
