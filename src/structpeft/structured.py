"""Structured matrices with fast products: pure tensor code, no modules, no parameters of its own.

Each family has ``<family>_matmul(params..., x)``, the product ``S @ x`` for ``x`` of shape
(..., n) returning (..., m), and ``<family>_dense(params...)``, the (m, n) matrix itself (for
merging and tests). SURM (Sehanobish et al., NeurIPS 2024, arXiv 2406.17740) builds adapters from
them: full rank, few parameters, O(n log n) products.

FFTs run in float32 (bf16 has no FFT, fp16 only for powers of two on GPU): inputs are cast up
and results cast back to the input's dtype.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint


def _fft_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _fft_input(x: torch.Tensor) -> torch.Tensor:
    return x.to(_fft_dtype(x.dtype))


def _circular_convolve(a: torch.Tensor, x: torch.Tensor, length: int) -> torch.Tensor:
    """``(a ⊛ x)[k] = Σ_j a[(k - j) mod L] x[j]`` over the last dim, zero-padded to ``length``.

    The padding is explicit: ``rfft(x, n=L)`` pads too, but its backward ran a full complex FFT
    and was 10x slower than this (pad's backward is a slice).
    """
    a, x = _fft_input(a), _fft_input(x)
    a = F.pad(a, (0, length - a.shape[-1]))
    x = F.pad(x, (0, length - x.shape[-1]))
    return torch.fft.irfft(torch.fft.rfft(a) * torch.fft.rfft(x), n=length)


# -- circulant: C[i, j] = c[(i - j) mod n], n parameters -------------------------------------------


def circulant_matmul(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    n = c.shape[-1]
    return _circular_convolve(c, x, n).to(x.dtype)  # (..., n)


def circulant_dense(c: torch.Tensor) -> torch.Tensor:
    """(..., n) first columns -> (..., n, n) circulants."""
    n = c.shape[-1]
    idx = (torch.arange(n).unsqueeze(1) - torch.arange(n).unsqueeze(0)) % n  # (n, n): i - j mod n
    return c[..., idx]


# -- block-circulant: a (q x p) grid of b x b circulants, (q·b, p·b), q·p·b parameters --------------


def _grid_product(x_spectrum: torch.Tensor, c_spectrum: torch.Tensor, frequency_major: bool) -> torch.Tensor:
    """Per frequency, (N, p) spectra times a (p, q) grid of block spectra.

    frequency_major (a full grid): x (f, N, p), c (f, p, q) -> (f, N, q), one batched matmul on contiguous
    operands (the einsum of the same contraction copied its strided operands one frequency at a time and
    was 1.45x slower). Otherwise x (N, p, f), c (p, q, f) -> (N, q, f): a single row or column of blocks
    is a broadcast product (and a sum), 2-2.5x faster on CPU than a matmul per frequency.
    """
    if frequency_major:
        return torch.bmm(x_spectrum, c_spectrum)
    if c_spectrum.shape[0] == 1:
        return x_spectrum * c_spectrum[0]  # (N, 1, f) * (q, f)
    return (x_spectrum * c_spectrum[:, 0]).sum(-2, keepdim=True)  # (N, p, f) * (p, f), summed over p


class _BlockCirculantProduct(torch.autograd.Function):
    """``y_i = Σ_j C_ij x_j`` for a (q, p) grid of b x b circulants, each block product a pointwise product of
    spectra (:func:`_grid_product`).

    The backward is written out. The adjoint of ``irfft`` (which divides by b) is ``rfft`` with the interior
    bins doubled, over b; the adjoint of ``rfft`` is ``irfft`` with them halved, times b; so the weights and
    the factors of b cancel: ``grad_x`` is the conjugate-transposed grid applied to ``grad_y``'s spectra and
    ``grad_c`` the circular cross-correlation of ``grad_y`` with ``x``, each one ``rfft`` and one ``irfft``.
    Autograd's own backward of the same graph ran rfft's adjoint as a complex FFT of a zero-filled full
    spectrum and resolved the conjugated operands of the complex bmm one frequency at a time.

    The spectra are extra outputs (not differentiable) so that the backward reuses them and ``torch.func``
    can still transform the function; the backward is once differentiable (a second-order gradient is an
    error, not a silently wrong number).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(c: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, p, b = c.shape  # x: (N, p·b)
        frequency_major = p > 1 and q > 1
        c_spectrum = torch.fft.rfft(c).permute(2, 1, 0) if frequency_major else torch.fft.rfft(c).transpose(0, 1)
        x_spectrum = torch.fft.rfft(x.reshape(-1, p, b))  # (N, p, f)
        if frequency_major:  # (f, p, q) and (f, N, p)
            c_spectrum, x_spectrum = c_spectrum.contiguous(), x_spectrum.permute(2, 0, 1).contiguous()
        y_spectrum = _grid_product(x_spectrum, c_spectrum, frequency_major)
        if frequency_major:
            y_spectrum = y_spectrum.permute(1, 2, 0)  # (N, q, f)
        return torch.fft.irfft(y_spectrum, n=b).reshape(-1, q * b), c_spectrum, x_spectrum  # y: (N, q·b)

    @staticmethod
    def setup_context(ctx, inputs: tuple[torch.Tensor, torch.Tensor], output: tuple[torch.Tensor, ...]) -> None:
        c, _ = inputs
        _, c_spectrum, x_spectrum = output
        ctx.mark_non_differentiable(c_spectrum, x_spectrum)
        needs_c, needs_x = ctx.needs_input_grad
        # grad_c needs x's spectra, grad_x the grid's: keep only what a wanted gradient reads.
        ctx.save_for_backward(c_spectrum if needs_x else None, x_spectrum if needs_c else None)
        q, p, b = c.shape
        ctx.shape, ctx.frequency_major = (q, p, b), p > 1 and q > 1

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor, *_: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        c_spectrum, x_spectrum = ctx.saved_tensors
        (q, p, b), frequency_major = ctx.shape, ctx.frequency_major
        g_spectrum = torch.fft.rfft(grad_y.reshape(-1, q, b))  # (N, q, f)
        if frequency_major:
            g_spectrum = g_spectrum.permute(2, 0, 1).contiguous()  # (f, N, q)
        grad_c = grad_x = None
        if ctx.needs_input_grad[0]:
            if frequency_major:  # Σ_N g conj(x), or conj(Σ_N conj(g) x): conjugate the narrower operand
                g_rows = g_spectrum.transpose(1, 2)  # (f, q, N)
                if p <= q:
                    grad_c_spectrum = torch.bmm(g_rows, x_spectrum.conj_physical())  # (f, q, p)
                else:
                    grad_c_spectrum = torch.bmm(g_rows.conj_physical(), x_spectrum).conj()
                grad_c_spectrum = grad_c_spectrum.permute(1, 2, 0)  # (q, p, f)
            else:
                grad_c_spectrum = (g_spectrum.unsqueeze(2) * x_spectrum.conj().unsqueeze(1)).sum(0)  # (q, p, f)
            grad_c = torch.fft.irfft(grad_c_spectrum, n=b)  # (q, p, b)
        if ctx.needs_input_grad[1]:
            adjoint = c_spectrum.transpose(1, 2) if frequency_major else c_spectrum.transpose(0, 1)  # the grid's
            grad_x_spectrum = _grid_product(g_spectrum, adjoint.conj_physical(), frequency_major)
            if frequency_major:
                grad_x_spectrum = grad_x_spectrum.permute(1, 2, 0)  # (N, p, f)
            grad_x = torch.fft.irfft(grad_x_spectrum, n=b).reshape(-1, p * b)  # (N, p·b)
        return grad_c, grad_x


def block_circulant_matmul(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """c (q, p, b) holds each block's first column; x (..., p·b) -> (..., q·b). The grid costs one FFT per
    input and output block, forward and backward."""
    q = c.shape[0]
    dtype = torch.promote_types(_fft_dtype(c.dtype), _fft_dtype(x.dtype))
    y, _, _ = _BlockCirculantProduct.apply(c.to(dtype), x.reshape(-1, x.shape[-1]).to(dtype))  # (N, q·b)
    return y.reshape(*x.shape[:-1], q * c.shape[-1]).to(x.dtype)


def block_circulant_dense(c: torch.Tensor) -> torch.Tensor:
    q, p, b = c.shape
    return circulant_dense(c).permute(0, 2, 1, 3).reshape(q * b, p * b)  # (q, b, p, b) -> (q·b, p·b)


# -- Toeplitz (m x n): T[i, j] = t[i - j + n - 1], m + n - 1 parameters -----------------------------


@functools.lru_cache(maxsize=256)
def fast_fft_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: FFTs of lengths with large prime factors are several times
    slower (a 767-point FFT cost 35x a 384-point circulant's here)."""
    m = n
    while True:
        rest = m
        for p in (2, 3, 5):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return m
        m += 1


def toeplitz_matmul(t: torch.Tensor, x: torch.Tensor, m: int) -> torch.Tensor:
    """Embedded in a circulant of length >= m + n - 1: for output i the taps i - j + n - 1 stay in
    [0, m + n - 2], so the circular convolution never wraps (any longer length works as well)."""
    n = x.shape[-1]
    full = _circular_convolve(t, x, fast_fft_length(m + n - 1))  # (..., L)
    return full[..., n - 1 : n - 1 + m].to(x.dtype)  # (..., m)


def toeplitz_dense(t: torch.Tensor, m: int, n: int) -> torch.Tensor:
    idx = torch.arange(m).unsqueeze(1) - torch.arange(n).unsqueeze(0) + n - 1  # (m, n)
    return t[idx]


# -- symmetric Toeplitz (n x n): T[i, j] = t[|i - j|], n parameters ---------------------------------


def _symmetric_taps(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t[1:].flip(-1), t], dim=-1)  # t[n-1], .., t[1], t[0], t[1], .., t[n-1]


def sym_toeplitz_matmul(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return toeplitz_matmul(_symmetric_taps(t), x, t.shape[-1])


def sym_toeplitz_dense(t: torch.Tensor) -> torch.Tensor:
    n = t.shape[-1]
    return toeplitz_dense(_symmetric_taps(t), n, n)


# -- Kronecker: (A ⊗ B), A (a1, a2), B (b1, b2) -> (a1·b1, a2·b2), a1·a2 + b1·b2 parameters --------


def kronecker_matmul(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(A ⊗ B) vec(X) = vec(B X Aᵀ)``, here in row-major form: X = x viewed as (a2, b2), and the
    result is A X Bᵀ flattened. The (a1·b1, a2·b2) matrix is never built."""
    x_grid = x.reshape(*x.shape[:-1], a.shape[1], b.shape[1])  # (..., a2, b2)
    y = torch.einsum("rp,...pq,sq->...rs", a.to(x.dtype), x_grid, b.to(x.dtype))  # (..., a1, b1)
    return y.reshape(*x.shape[:-1], a.shape[0] * b.shape[0])


def kronecker_dense(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.kron(a, b)


# -- low displacement rank: W(G, H) = Σ_i Z_1(g_i) Z_-1(h_i), 2·r·n parameters ----------------------


def _skew_root_powers(n: int, like: torch.Tensor) -> torch.Tensor:
    """η^k for k < n with η = exp(iπ/n), a primitive 2n-th root of unity: η^n = -1, which is
    what turns a circulant into a skew-circulant (the sign flips where the index wraps)."""
    k = torch.arange(n, device=like.device, dtype=torch.float64)
    powers = torch.polar(torch.ones_like(k), math.pi * k / n)
    return powers if like.dtype == torch.float64 else powers.to(torch.complex64)


def skew_circulant_matmul(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Z_-1(h) x with Z_-1(h)[i, j] = h[i - j] for i >= j and -h[i - j + n] above the diagonal.

    Z_-1(h) = D⁻¹ C(D h) D with D = diag(η^k): scaling by η^k makes the wrapped terms pick up
    η^n = -1, so the skew-circulant becomes a plain circulant in the scaled basis.
    """
    n = h.shape[-1]
    h, x_in = _fft_input(h), _fft_input(x)
    eta = _skew_root_powers(n, x_in)
    spectrum = torch.fft.fft(h * eta) * torch.fft.fft(x_in * eta)
    return (torch.fft.ifft(spectrum) * eta.conj()).real.to(x.dtype)


def skew_circulant_dense(h: torch.Tensor) -> torch.Tensor:
    """(..., n) first columns -> (..., n, n) skew-circulants."""
    n = h.shape[-1]
    diff = torch.arange(n).unsqueeze(1) - torch.arange(n).unsqueeze(0)  # (n, n): i - j
    sign = torch.where(diff >= 0, 1.0, -1.0).to(h)
    return sign * h[..., diff % n]


# Timed on 2 CPU cores, forward + backward, r = 1 and 6: through the matrix was the faster way from
# n vectors on at n = 384 (1.5-3x at 4n), and the slower one up to 4n vectors at n = 1536, where
# the dense product itself (n² per vector) outweighs 2r + 2 FFTs. (Not timed on a GPU.)
_LDR_MATRIX_MAX_N = 512
# Vectors per chunk of the per-vector product on CPU: its (chunk, r, n) complex intermediates stay
# near 4 MB, in cache; one pass over 2,048 vectors at n = 1536 ran 3x slower than chunks. A GPU
# gets one pass (chunks there would be many small kernel launches).
_LDR_CHUNK_ELEMENTS = 2**19


def ldr_matmul(g: torch.Tensor, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_i Z_1(g_i) Z_-1(h_i) x for generators g, h of shape (r, n).

    Two exact ways: per vector (2r + 2 FFTs each, :func:`ldr_fft_matmul`, in chunks on CPU), or
    through the (n, n) matrix (built on each call with (r + 1)·n FFTs, as :func:`ldr_dense`) and a
    dense product, which is faster for a batch of at least n vectors when n is small (a layer of a
    small transformer). Both compute in float32 for low-precision inputs or generators.
    """
    n = g.shape[-1]
    if n <= _LDR_MATRIX_MAX_N and x.numel() >= n * n:  # at least n vectors
        x_in = _fft_input(x)
        return (x_in @ _ldr_matrix(g, h).to(x_in.dtype).T).to(x.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (g, h, x)):
        # autograd would keep the per-vector (vectors, r, n) complex intermediates, about 14x the input
        # at r = 6 (80 MiB a layer for 960 vectors at n = 1536, measured; SmolLM2 at LoRA r=8's budget ran
        # out of 24 GiB): only the inputs are kept and the product is recomputed in backward (+28% time).
        return checkpoint(_ldr_per_vector, g, h, x, use_reentrant=False)
    return _ldr_per_vector(g, h, x)


def _ldr_per_vector(g: torch.Tensor, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    n = g.shape[-1]
    vectors = x.reshape(-1, n)
    chunk = max(_LDR_CHUNK_ELEMENTS // (g.shape[0] * n), 1)
    if x.device.type != "cpu" or vectors.shape[0] <= chunk:
        return ldr_fft_matmul(g, h, x)
    return torch.cat([ldr_fft_matmul(g, h, part) for part in vectors.split(chunk)]).reshape(x.shape)


def ldr_fft_matmul(g: torch.Tensor, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``ldr_matmul`` per vector: r skew-circulant products, then the r circulants' spectra summed
    before a single inverse FFT."""
    n = g.shape[-1]
    g, h, x_in = _fft_input(g), _fft_input(h), _fft_input(x)
    eta = _skew_root_powers(n, x_in)
    x_spectrum = torch.fft.fft(x_in * eta).unsqueeze(-2)  # (..., 1, n)
    inner = (torch.fft.ifft(torch.fft.fft(h * eta) * x_spectrum) * eta.conj()).real  # (..., r, n): Z_-1(h_i) x
    spectrum = (torch.fft.rfft(g) * torch.fft.rfft(inner)).sum(-2)  # (..., n//2 + 1)
    return torch.fft.irfft(spectrum, n=n).to(x.dtype)


def ldr_dense(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return _ldr_matrix(g, h).to(h.dtype)


def _ldr_matrix(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The (n, n) matrix, a column at a time, in float32 or wider: column j of Z_-1(h) is a window of
    [-h, h] (the sign flips where the skew shift wraps); Z_1(g_i) is applied to all of them in the
    frequency domain and the r spectra are summed before one inverse FFT. (A gather of the
    (r, n, n) skew-circulants built the same matrix 2-3x slower, its backward a scatter.)"""
    n = g.shape[-1]
    g, h = _fft_input(g), _fft_input(h)
    windows = torch.cat([-h, h], dim=-1).unfold(-1, n, 1)  # (r, n + 1, n): window s is [-h, h][s : s + n]
    columns = windows[..., 1:, :].flip(-2)  # (r, n, n): row j is column j of Z_-1(h_i)
    spectrum = (torch.fft.rfft(g).unsqueeze(-2) * torch.fft.rfft(columns)).sum(0)  # (n, n//2 + 1)
    return torch.fft.irfft(spectrum, n=n).T  # (n, n): column j of W


def num_params(structure: str, m: int, n: int, rank: int = 1, kronecker_a: tuple[int, int] = (1, 1)) -> int:
    """Parameters of one (m x n) structured matrix, as the ``*_matmul`` functions take them
    (SURM's zero-start ``b ⊙ a`` parameterisations hold twice these)."""
    if structure == "circulant":
        if m == n:
            return n
        return m * n // math.gcd(m, n)  # block-circulant grid, blocks of size gcd(m, n)
    if structure == "toeplitz":
        return m + n - 1
    if structure == "sym_toeplitz":
        return n
    if structure == "kronecker":
        rows, cols = kronecker_a
        return rows * cols + (m // rows) * (n // cols)
    if structure == "ldr":
        return 2 * rank * max(m, n)
    raise ValueError(f"unknown structure {structure!r}")
