"""Structured matrices: every fast product equals its dense matrix, values and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from structpeft import structured as S

SIZES = st.sampled_from([1, 2, 3, 4, 7, 8, 13, 16, 31, 64, 97])
BATCH = st.sampled_from([(), (3,), (2, 5)])


def params(seed: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]


def check(fast, dense, ps: list[torch.Tensor], x: torch.Tensor) -> None:
    """fast(ps, x) == dense(ps) @ x, and the same gradients for ps and x."""
    y_fast = fast(*ps, x)
    y_dense = x @ dense(*ps).T
    assert y_fast.shape == y_dense.shape
    assert torch.allclose(y_fast, y_dense, atol=1e-9, rtol=1e-9)
    w = torch.randn_like(y_dense)
    grads_fast = torch.autograd.grad((y_fast * w).sum(), [*ps, x])
    grads_dense = torch.autograd.grad((y_dense * w).sum(), [*ps, x])
    for a, b in zip(grads_fast, grads_dense):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)


def vector(seed: int, batch: tuple[int, ...], n: int) -> torch.Tensor:
    return params(seed + 1, (*batch, n))[0]


@settings(max_examples=30, deadline=None)
@given(n=SIZES, batch=BATCH, seed=st.integers(0, 1000))
def test_circulant(n, batch, seed) -> None:
    check(S.circulant_matmul, S.circulant_dense, params(seed, (n,)), vector(seed, batch, n))


@settings(max_examples=30, deadline=None)
@given(q=st.integers(1, 4), p=st.integers(1, 4), b=SIZES, batch=BATCH, seed=st.integers(0, 1000))
def test_block_circulant(q, p, b, batch, seed) -> None:
    check(S.block_circulant_matmul, S.block_circulant_dense, params(seed, (q, p, b)), vector(seed, batch, p * b))


@settings(max_examples=30, deadline=None)
@given(m=SIZES, n=SIZES, batch=BATCH, seed=st.integers(0, 1000))
def test_toeplitz_rectangular(m, n, batch, seed) -> None:
    check(
        lambda t, x: S.toeplitz_matmul(t, x, m),
        lambda t: S.toeplitz_dense(t, m, n),
        params(seed, (m + n - 1,)),
        vector(seed, batch, n),
    )


@settings(max_examples=30, deadline=None)
@given(n=SIZES, batch=BATCH, seed=st.integers(0, 1000))
def test_symmetric_toeplitz(n, batch, seed) -> None:
    (t,) = params(seed, (n,))
    dense = S.sym_toeplitz_dense(t)
    assert torch.equal(dense, dense.T)
    check(S.sym_toeplitz_matmul, S.sym_toeplitz_dense, [t], vector(seed, batch, n))


@settings(max_examples=30, deadline=None)
@given(
    a1=SIZES,
    a2=SIZES,
    b1=st.sampled_from([1, 2, 5]),
    b2=st.sampled_from([1, 3, 4]),
    batch=BATCH,
    seed=st.integers(0, 1000),
)
def test_kronecker(a1, a2, b1, b2, batch, seed) -> None:
    check(S.kronecker_matmul, S.kronecker_dense, params(seed, (a1, a2), (b1, b2)), vector(seed, batch, a2 * b2))


def ldr_reference(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The definition, one dense product per generator pair."""
    return sum(S.circulant_dense(gi) @ S.skew_circulant_dense(hi) for gi, hi in zip(g, h))


@settings(max_examples=30, deadline=None)
@given(n=SIZES, r=st.integers(1, 3), seed=st.integers(0, 1000))
def test_low_displacement_rank_matrix(n, r, seed) -> None:
    g, h = params(seed, (r, n), (r, n))
    assert torch.allclose(S.ldr_dense(g, h), ldr_reference(g, h), atol=1e-9, rtol=1e-9)


@settings(max_examples=30, deadline=None)
@given(n=SIZES, r=st.integers(1, 3), batch=BATCH, seed=st.integers(0, 1000))
def test_low_displacement_rank(n, r, batch, seed) -> None:
    """Both ways of the product (per vector, and through the matrix), and the dispatch between them."""
    ps, x = params(seed, (r, n), (r, n)), vector(seed, batch, n)
    check(S.ldr_fft_matmul, ldr_reference, ps, x)
    check(S.ldr_matmul, ldr_reference, ps, x)
    check(lambda g, h, v: v @ S.ldr_dense(g, h).T, ldr_reference, ps, x)


def test_low_displacement_rank_through_the_matrix() -> None:
    """40 vectors at n = 31 take the matrix way; it equals the definition and the per-vector way."""
    ps, x = params(7, (3, 31), (3, 31)), vector(7, (5, 8), 31)
    check(S.ldr_matmul, ldr_reference, ps, x)
    assert torch.allclose(S.ldr_matmul(*ps, x), S.ldr_fft_matmul(*ps, x), atol=1e-9, rtol=1e-9)


def test_low_displacement_rank_in_chunks(monkeypatch) -> None:
    """Many vectors at a size past the matrix way's: the per-vector product runs in chunks."""
    monkeypatch.setattr(S, "_LDR_MATRIX_MAX_N", 4)
    monkeypatch.setattr(S, "_LDR_CHUNK_ELEMENTS", 2 * 3 * 7)  # 3 vectors a chunk at r = 2, n = 7
    check(S.ldr_matmul, ldr_reference, params(0, (2, 7), (2, 7)), vector(0, (2, 5), 7))


@pytest.mark.parametrize("n", [1, 2, 5, 6, 8, 11])
def test_skew_circulant_against_its_definition(n: int) -> None:
    """Z_-1(h)[i, j] = h[i - j] on and below the diagonal, -h[n + i - j] above: written out with
    loops, so an even n (where a wrong root of unity goes unnoticed on odd sizes) is checked too."""
    (h,) = params(n, (n,))
    expected = torch.zeros(n, n, dtype=h.dtype)
    for i in range(n):
        for j in range(n):
            expected[i, j] = h[i - j] if i >= j else -h[n + i - j]
    assert torch.equal(S.skew_circulant_dense(h), expected)
    x = torch.randn(4, n, dtype=h.dtype)
    assert torch.allclose(S.skew_circulant_matmul(h, x), x @ expected.T, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fft_products_run_in_float32_and_cast_back(dtype) -> None:
    c = torch.randn(12)
    x = torch.randn(3, 12)
    y = S.circulant_matmul(c, x.to(dtype))
    assert y.dtype == dtype
    assert torch.allclose(y.float(), S.circulant_matmul(c, x), atol=0.1, rtol=0.05)
    g, h = torch.randn(2, 12), torch.randn(2, 12)
    for vectors in (torch.randn(3, 12), torch.randn(16, 12)):  # per vector, and through the matrix
        for params in ((g, h), (g.to(dtype), h.to(dtype))):
            y = S.ldr_matmul(*params, vectors.to(dtype))
            assert y.dtype == dtype
            assert torch.allclose(y.float(), S.ldr_matmul(g, h, vectors), atol=0.2, rtol=0.05)
    # Low-precision generators, float32 vectors: both ways compute in float32 from the same values
    # (the matrix is not rounded to the generators' dtype on the way).
    g_low, h_low = g.to(dtype), h.to(dtype)
    many = torch.randn(16, 12)
    expected = S.ldr_fft_matmul(g_low, h_low, many)
    assert expected.dtype == torch.float32
    assert torch.allclose(S.ldr_matmul(g_low, h_low, many), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("grid", [(3, 4, 8), (4, 3, 7), (1, 4, 8), (3, 1, 8), (1, 1, 9)])
def test_block_circulant_gradient_of_one_input(grid) -> None:
    """The written-out backward with only one input needing a gradient (a frozen grid, or the first
    layer's input) gives that gradient, equal to the dense matrix's (each saves only what its gradient reads)."""
    q, p, b = grid
    c, x = params(3, grid, (5, p * b))
    w = torch.randn(5, q * b, dtype=torch.float64)
    for wanted, frozen in ((c, x), (x, c)):
        frozen = frozen.detach()
        inputs = (wanted, frozen) if wanted is c else (frozen, wanted)
        y = S.block_circulant_matmul(*inputs)
        (fast,) = torch.autograd.grad((y * w).sum(), wanted)
        (dense,) = torch.autograd.grad((inputs[1] @ S.block_circulant_dense(inputs[0]).T * w).sum(), wanted)
        assert torch.allclose(fast, dense, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_circulant_low_precision_input(dtype) -> None:
    """A low-precision input against float32 columns: computed in float32, cast back, gradients in each
    input's own dtype and equal to the dense product's."""
    c = torch.randn(2, 3, 8, requires_grad=True)
    x = torch.randn(4, 24).to(dtype).requires_grad_(True)
    y = S.block_circulant_matmul(c, x)
    assert y.dtype == dtype
    x32 = x.detach().float().requires_grad_(True)
    expected = x32 @ S.block_circulant_dense(c).T
    assert torch.allclose(y.float(), expected, atol=0.1, rtol=0.05)
    y.float().sum().backward()
    assert x.grad.dtype == dtype and c.grad.dtype == torch.float32
    dense_c, dense_x = torch.autograd.grad(expected.sum(), (c, x32))
    assert torch.allclose(c.grad, dense_c, atol=1e-4, rtol=1e-4)
    assert torch.allclose(x.grad.float(), dense_x, atol=0.05, rtol=0.02)


def test_block_circulant_second_order_is_an_error_and_torch_func_works() -> None:
    """The backward is once differentiable: a second-order gradient raises rather than coming out wrong.
    torch.func still transforms the product (grad and vmap against the dense matrix)."""
    c, x = params(5, (3, 4, 8), (6, 32))
    (grad_x,) = torch.autograd.grad(S.block_circulant_matmul(c, x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.pow(2).sum().backward()
    c, x = c.detach(), x.detach()
    fast = torch.func.grad(lambda c: S.block_circulant_matmul(c, x).pow(2).sum())(c)
    dense = torch.func.grad(lambda c: (x @ S.block_circulant_dense(c).T).pow(2).sum())(c)
    assert torch.allclose(fast, dense, atol=1e-9, rtol=1e-9)
    batched = torch.vmap(lambda row: S.block_circulant_matmul(c, row))(x)
    assert torch.allclose(batched, x @ S.block_circulant_dense(c).T, atol=1e-9)
