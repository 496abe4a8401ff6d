"""Coeff-Tuning on attention computed in a module's own code: found by running the module once, mixed
where its softmax forms its heads' maps (or where it calls scaled_dot_product_attention itself)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import structpeft as sp
from structpeft.attention import anatomy, hooks
from tests.eager_reference import mixing_reference

HEADS, WIDTH = 4, 16


class OwnAttention(nn.Module):
    """Attention written by hand, as older modelling code and users' models do: ``layout`` is where its
    maps come from: a softmax over (B, H, N, M) scores, over (B·H, N, M) ones, or a direct SDPA call
    (grouped-query there: 2 key/value heads)."""

    def __init__(self, layout: str = "bhnm", causal: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.layout, self.causal = HEADS, WIDTH // HEADS, layout, causal
        self.kv_heads = 2 if layout == "sdpa" else HEADS
        self.q = nn.Linear(WIDTH, WIDTH)
        self.k = nn.Linear(WIDTH, self.kv_heads * self.head_dim)
        self.v = nn.Linear(WIDTH, self.kv_heads * self.head_dim)
        self.o = nn.Linear(WIDTH, WIDTH)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, n, _ = hidden.shape
        q = self.q(hidden).view(b, n, HEADS, -1).transpose(1, 2)  # (B, H, N, d)
        k = self.k(hidden).view(b, n, self.kv_heads, -1).transpose(1, 2)  # (B, Hkv, N, d)
        v = self.v(hidden).view(b, n, self.kv_heads, -1).transpose(1, 2)
        if self.layout == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=True)
        else:
            scores = q @ k.transpose(-1, -2) / self.head_dim**0.5  # (B, H, N, N)
            if self.causal:
                scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            if self.layout == "bhnm":
                maps = scores.softmax(-1)
            else:  # (B·H, N, N)
                maps = nn.functional.softmax(scores.reshape(b * HEADS, n, n), dim=-1).view(b, HEADS, n, n)
            out = maps @ v
        return self.o(out.transpose(1, 2).reshape(b, n, WIDTH))


class Stack(nn.Module):
    def __init__(self, layout: str = "bhnm", causal: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList([OwnAttention(layout, causal) for _ in range(2)])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = hidden + layer(hidden)
        return hidden


def build(layout: str = "bhnm", causal: bool = False) -> Stack:
    torch.manual_seed(0)
    return Stack(layout, causal).eval()


def reference(base: nn.Module, model: sp.PeftModel, x: torch.Tensor) -> torch.Tensor:
    """The base model's own code with its softmax maps mixed head by head in loops, by the adapter's α."""
    alphas = {n: h.adapters["default"]["coeff"].coeff_alpha for n, h in model.adapter_hosts()}
    with mixing_reference(base, alphas), torch.no_grad():
        return base(x)


X = torch.randn(2, 5, WIDTH, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("layout", ["bhnm", "bh-flat", "sdpa"])
def test_own_code_attention_is_found_starts_at_the_base_and_mixes_like_the_reference(layout, causal) -> None:
    base = build(layout, causal)
    with torch.no_grad():
        expected = base(X)
    zero = sp.get_peft_model(build(layout, causal), sp.CoeffConfig())
    assert sorted(n for n, _ in zero.adapter_hosts()) == ["layers.0", "layers.1"]
    with torch.no_grad():
        assert torch.allclose(zero(X), expected, atol=1e-6)
    model = sp.get_peft_model(build(layout, causal), sp.CoeffConfig(init_weights=False, dropout=0.0))
    with torch.no_grad():
        got = model(X)
    want = reference(base, model, X)
    assert not torch.allclose(want, expected, atol=1e-3)  # the check has something to see
    assert torch.allclose(got, want, atol=1e-5)
    with model.disable_adapter(), torch.no_grad():
        assert torch.allclose(model(X), expected, atol=1e-6)


def test_own_code_alpha_trains_and_round_trips(tmp_path) -> None:
    model = sp.get_peft_model(build(), sp.CoeffConfig(init_weights=False))
    model.train()
    alpha = next(h.adapters["default"]["coeff"].coeff_alpha for _, h in model.adapter_hosts())
    before = alpha.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(X).square().mean().backward()
    optimizer.step()
    assert not torch.equal(alpha, before)
    model.eval()
    with torch.no_grad():
        expected = model(X)
    model.save_pretrained(tmp_path)
    loaded = sp.PeftModel.from_pretrained(build(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(X), expected, atol=1e-6)


def test_maps_formed_in_a_child_belong_to_the_child() -> None:
    """A parent declaring heads whose child forms the maps is not an attention module itself:
    hooking both would mix the maps twice."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_heads = HEADS
            self.attention = OwnAttention()
            self.mlp = nn.Linear(WIDTH, WIDTH)

        def forward(self, hidden):
            return self.mlp(hidden + self.attention(hidden))

    block = Block()
    assert anatomy.forms_own_maps(block.attention)
    assert not anatomy.forms_own_maps(block)
    model = sp.get_peft_model(nn.Sequential(block), sp.CoeffConfig())
    assert [n for n, _ in model.adapter_hosts()] == ["0.attention"]


def test_a_module_with_heads_and_no_maps_is_not_attention() -> None:
    class Heads(nn.Module):  # declares heads, takes a softmax, but over the features: no maps
        def __init__(self) -> None:
            super().__init__()
            self.num_heads = HEADS
            self.proj = nn.Linear(WIDTH, WIDTH)

        def forward(self, hidden):
            return self.proj(hidden).softmax(-1)

    assert not hooks.is_attention_module(Heads())
    with pytest.raises(TypeError, match=r"'0' is a Heads, which head mixing cannot hook.*declares its heads"):
        sp.get_peft_model(nn.Sequential(Heads()), sp.CoeffConfig(target_modules=["0"]))


def test_a_hooked_module_that_forms_no_maps_raises_instead_of_dropping_alpha() -> None:
    model = sp.get_peft_model(build(), sp.CoeffConfig(init_weights=False))
    for layer in model.base_model.layers:
        layer.layout = "fused"  # neither a softmax of maps nor SDPA: an opaque kernel stands in
        layer.forward = lambda hidden, layer=layer: layer.o(layer.v(hidden))
    with pytest.raises(RuntimeError, match="OwnAttention took no softmax shaped as its 4 heads' attention maps"):
        model(X)
    assert not any(isinstance(m, torch.overrides.TorchFunctionMode) for m in _function_mode_stack())


def _function_mode_stack() -> list:
    from torch.overrides import _get_current_function_mode_stack

    return _get_current_function_mode_stack()


def assert_causal_lm_mixes_like_the_reference(build_lm, config: sp.CoeffConfig) -> None:
    """Two attention modules adapted; random α gives the reference's logits, which differ from the base's."""
    base = build_lm()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    model = sp.get_peft_model(build_lm(), config)
    assert len(list(model.adapter_hosts())) == 2
    alphas = {n: h.adapters["default"]["coeff"].coeff_alpha for n, h in model.adapter_hosts()}
    with torch.no_grad():
        expected = base(ids).logits
        got = model(ids).logits
    with mixing_reference(base, alphas), torch.no_grad():
        want = base(ids).logits
    assert not torch.allclose(want, expected, atol=1e-3)
    assert torch.allclose(got, want, atol=1e-5)


def test_a_real_modelling_file_with_its_own_attention_code() -> None:
    """MPT computes its attention in its own code (ALiBi inside the scores): Coeff takes its
    attention modules by default and mixes their maps like the reference."""
    from transformers import MptConfig, MptForCausalLM

    config = MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=64, max_seq_len=32, expansion_ratio=2)

    def mpt() -> nn.Module:
        torch.manual_seed(0)
        return MptForCausalLM(config).eval()

    assert_causal_lm_mixes_like_the_reference(mpt, sp.CoeffConfig(init_weights=False, dropout=0.0))


def test_a_module_the_probe_cannot_run_is_taken_when_named() -> None:
    """BLOOM's attention needs its ALiBi tensor, which a probe cannot make up: not taken by default
    (the error says to name it), taken when named, and then mixed like the reference."""
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(hidden_size=32, n_head=4, n_layer=2, vocab_size=64)

    def bloom() -> nn.Module:
        torch.manual_seed(0)
        return BloomForCausalLM(config).eval()

    with pytest.raises(ValueError, match="found no attention module.*Name the attention modules in target_modules"):
        sp.get_peft_model(bloom(), sp.CoeffConfig())
    named = sp.CoeffConfig(init_weights=False, dropout=0.0, target_modules=["self_attention"])
    assert_causal_lm_mixes_like_the_reference(bloom, named)


def test_deepcopy_and_pickle_of_a_hooked_own_code_model_mix_with_their_own_alpha() -> None:
    import copy
    import pickle

    model = sp.get_peft_model(build(), sp.CoeffConfig(init_weights=False, dropout=0.0))
    with torch.no_grad():
        expected = model(X)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert torch.equal(clone(X), expected)
            for _, host in clone.adapter_hosts():
                host.adapters["default"]["coeff"].coeff_alpha.zero_()
            assert torch.allclose(clone(X), build()(X), atol=1e-6)  # its own α, now zero
        assert torch.equal(model(X), expected)  # the original's α untouched
