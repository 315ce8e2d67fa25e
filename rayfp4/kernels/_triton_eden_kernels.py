"""Triton kernels of the MS-EDEN quantizer: the device code only (host wrapper: ``triton_eden``).

They reproduce :func:`rayfp4.formats.ms_eden.quantize` bit for bit: the codes, the tensor amax,
and the E4M3 scale bytes given the same uniform draws (``EXPLICIT_U``; otherwise the draws come
from Philox, ``tl.rand(seed, block index)``, and each scale is still one of the reference's two
neighbours). Each program owns BM rows and one group of N (16 or 128) elements along K:

- the rotation is the reference's FP32 sequence: the sign flip (exact), log2(N) butterfly
  stages ``a + b`` / ``a - b`` in Sylvester order (built with reshape / permute / split / join, so
  each stage pairs exactly the elements the reference pairs), then one product by the rounded
  normalisation;
- the group sums ``sum y^2`` and ``sum y * q`` are the reference's pairwise tree (elements 2i and
  2i+1 first); launched with FMA contraction off, so every product is rounded before it is added;
- E4M3 and E2M1 conversions, the IEEE divisions and the tensor scales are the NVFP4 kernels'
  helpers (``_triton_nvfp4_kernels``), already checked against the reference.

The amax kernel rotates the same way and folds max |v| into an int32 word with an atomic max (NaN
propagates, as in ``amax_kernel``). Whether these are compiled or interpreted is fixed when triton
is imported (TRITON_INTERPRET).
"""

import triton
import triton.language as tl

from ._triton_nvfp4_kernels import (
    FLT_MAX,
    _code,
    _e2m1_mag_f,
    _e2m1_rne_m,
    _e4m3_decode,
    _e4m3_rne,
    _global_scales_cap,
    _nan_bits,
    _to_f32,
)


@triton.jit
def _stage(v, H: tl.constexpr, N: tl.constexpr, BM: tl.constexpr):
    """One radix-2 butterfly stage over the last dim of v [BM, N]: element pairs H apart within
    each run of 2H become (a + b, a - b), as ``hadamard._butterfly`` does at step H."""
    w = tl.permute(tl.reshape(v, [BM, N // (2 * H), 2, H]), (0, 1, 3, 2))
    a, b = tl.split(w)
    w = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
    return tl.reshape(w, [BM, N])


@triton.jit
def _rotate(x_ptr, signs_ptr, rows, g, M, sm, sk, N: tl.constexpr, NORM: tl.constexpr, BM: tl.constexpr):
    """The rotated group g of rows ``rows`` as FP32 [BM, N] (rows past M read as 0), and the mask."""
    cols = g * N + tl.arange(0, N)
    mask = rows[:, None] < M
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sm + cols[None, :].to(tl.int64) * sk, mask=mask, other=0.0)
    v = _to_f32(x) * tl.load(signs_ptr + tl.arange(0, N))[None, :]
    v = _stage(v, 1, N, BM)
    v = _stage(v, 2, N, BM)
    v = _stage(v, 4, N, BM)
    v = _stage(v, 8, N, BM)
    if N == 128:
        v = _stage(v, 16, N, BM)
        v = _stage(v, 32, N, BM)
        v = _stage(v, 64, N, BM)
    return v * NORM, mask


@triton.jit
def _halve(t):
    """Sum of the element pairs (2i, 2i+1) along the last dim: one level of the pairwise tree."""
    a, b = tl.split(tl.reshape(t, [t.shape[0], t.shape[1] // 2, 2]))
    return a + b


@triton.jit
def _pairwise(t, N: tl.constexpr):
    """The reference's ``pairwise_sum`` of t [BM, N] along N, as [BM, 1]."""
    t = _halve(t)
    t = _halve(t)
    t = _halve(t)
    t = _halve(t)
    if N == 128:
        t = _halve(t)
        t = _halve(t)
        t = _halve(t)
    return t


@triton.jit
def eden_amax_kernel(x_ptr, signs_ptr, out_ptr, M, K, sm, sk,
                     N: tl.constexpr, NORM: tl.constexpr, BM: tl.constexpr):
    """max |rotated x| over a strided [M, K] view into out_ptr (int32 bits, atomic max)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    v, _mask = _rotate(x_ptr, signs_ptr, rows, tl.program_id(1), M, sm, sk, N, NORM, BM)
    m = tl.max(tl.max(tl.abs(v), axis=1), axis=0)
    tl.atomic_max(out_ptr, _nan_bits(m, tl.max(tl.max((v != v).to(tl.int32), axis=1), axis=0)))


@triton.jit
def eden_quant_kernel(x_ptr, signs_ptr, amax_ptr, data_ptr, scale_ptr, u_ptr, M, K, sm, sk, seed,
                      N: tl.constexpr, NORM: tl.constexpr, KFAC: tl.constexpr, BM: tl.constexpr,
                      EXPLICIT_U: tl.constexpr):
    """MS-EDEN codes (uint8 [M, K/2], element 2i in the low nibble) and E4M3 scale bytes
    (uint8 [M, K/16]) of a strided [M, K] view. Launch with FMA contraction off."""
    NB: tl.constexpr = N // 16
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    g = tl.program_id(1)
    v, mask = _rotate(x_ptr, signs_ptr, rows, g, M, sm, sk, N, NORM, BM)
    s_dec, _s_enc, block_enc, bad = _global_scales_cap(amax_ptr, KFAC, 1536.0)

    vb = tl.reshape(v, [BM, NB, 16])
    bamax = tl.max(tl.abs(vb), axis=2)
    sb, _byte = _e4m3_rne(tl.minimum(bamax * block_enc, 448.0))
    enc = tl.where(sb == 0, 0.0, tl.minimum(tl.div_rn(1.0, sb * s_dec), FLT_MAX))
    y = vb * enc[:, :, None]
    m = _e2m1_rne_m(y)
    qmag = _e2m1_mag_f(m)
    q = tl.where(y < 0, -qmag, qmag)

    num = _pairwise(tl.reshape(y * y, [BM, N]), N)
    den = _pairwise(tl.reshape(y * q, [BM, N]), N)
    corr = tl.where(den == 0, 1.0, tl.div_rn(num, den))
    c = tl.minimum(sb * corr, 448.0)  # [BM, NB]: the group's factor on each of its blocks

    rv, rbyte = _e4m3_rne(c)
    lo_b = tl.where(rv > c, tl.maximum(rbyte - 1, 0), rbyte)
    hi_b = tl.where(rv < c, tl.minimum(rbyte + 1, 0x7E), rbyte)
    lo = tl.where(rv > c, _e4m3_decode(lo_b), rv)
    hi = tl.where(rv < c, _e4m3_decode(hi_b), rv)
    p = tl.where(hi > lo, tl.div_rn(c - lo, hi - lo), 0.0)
    sidx = rows[:, None].to(tl.int64) * (K // 16) + g * NB + tl.arange(0, NB)[None, :]
    if EXPLICIT_U:
        u = tl.load(u_ptr + sidx, mask=mask, other=1.0)
    else:
        u = tl.rand(seed, sidx.to(tl.uint32, bitcast=False))
    sbyte = tl.where(u < p, hi_b, lo_b)
    sbyte = tl.where(bad, 0x7F, sbyte)
    tl.store(scale_ptr + sidx, sbyte.to(tl.uint8), mask=mask)

    code = tl.reshape(_code(m, y), [BM, N // 2, 2])
    c0, c1 = tl.split(code)
    cols = g * (N // 2) + tl.arange(0, N // 2)
    tl.store(data_ptr + rows[:, None].to(tl.int64) * (K // 2) + cols[None, :], (c0 | (c1 << 4)).to(tl.uint8),
             mask=mask)

