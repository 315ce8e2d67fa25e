"""Triton kernels of the NVFP4 quantizer: the device code only (host wrappers: ``triton_nvfp4``).

Every kernel reproduces :mod:`rayfp4.formats.nvfp4` bit for bit. The FP32 operation order is the
reference's (see that module's docstring); where the GPU's defaults differ from IEEE FP32 we do
the arithmetic ourselves:

- divisions use ``tl.div_rn`` (IEEE round-to-nearest; Triton's ``/`` is an approximation);
- the FP32 -> E4M3 conversion is done with integer operations (round-to-nearest-even on the
  significand, subnormals down to 2^-9 kept), so it is the same under the interpreter and on any
  GPU, and needs no FP8 hardware conversion;
- E2M1 codes are identical to ``e2m1.encode_rne`` / ``encode_stochastic`` (ties to even,
  -0.0 -> code 0, a negative value that rounds to zero -> code 8); the magnitude code is an exact
  FP32 integer, computed mostly on the FMA pipe (RTNE: magic-number rounding of a piecewise-linear
  map, see _e2m1_rne_m; SR: the FP32 bits of |y|, see _e2m1_sr_m), as the integer pipe is the
  bottleneck of these kernels;
- plain ``*`` / ``+`` of FP32 in Triton are IEEE (no flush to zero outside libdevice), and no
  product here is followed by an addition that contraction into an FMA could change.

Packed codes are written as one int64 word per block of 16: code j of the block in nibble j.
Little-endian, that is byte j//2 with element 2i in the low nibble -- the reference's packing --
so the host views the int64 [M, K/16] buffer as uint8 [M, K/2]. Some kernels build the same bytes
another way (as int32 halves, or as bytes: PACK=1), which is cheaper on the GPU; the buffer is the
same.

Whether these are compiled or interpreted is fixed when triton is imported (TRITON_INTERPRET).
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

FLT_MAX = tl.constexpr(3.4028234663852886e38)


# ---------------------------------------------------------------------------- scalar helpers


@triton.jit
def _pow2(e):
    """2^e as FP32 for integer e in the normal range (built from its bits: exact)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_rne(v):
    """FP32 v in [0, 448] -> (its E4M3 value as FP32, the E4M3 byte as int32); RNE, subnormals kept.

    The E4M3 grid near v has spacing 2^(max(e, -6) - 3) with e = floor(log2 v): round v's 24-bit
    significand to that quantum with ties to even. FP32 subnormals (and 0) round to 0.
    """
    bits = v.to(tl.int32, bitcast=True)
    e_biased = (bits >> 23) & 0xFF
    e = e_biased - 127
    sig = (bits & 0x7FFFFF) | 0x800000
    shift = tl.minimum(20 + tl.maximum(-6 - e, 0), 25)
    n = (sig + ((1 << (shift - 1)) - 1) + ((sig >> shift) & 1)) >> shift
    n = tl.where(e_biased == 0, 0, n)
    value = n.to(tl.float32) * _pow2(tl.maximum(e, -6) - 3)
    # Normal range: n in [8, 16] (16 means the next binade, mantissa 0); subnormal: n in [0, 8].
    byte = tl.where(e >= -6, ((e + 7 + (n >> 4)) << 3) | (n & 7), n)
    return value, byte


@triton.jit
def _e4m3_decode(byte):
    """E4M3 byte (int32) -> FP32 value; 0x7F/0xFF are NaN."""
    ex = (byte >> 3) & 0xF
    man = byte & 7
    sub = man.to(tl.float32) * 0.001953125  # man * 2^-9
    norm = (8 + man).to(tl.float32) * _pow2(tl.maximum(ex, 1) - 10)
    v = tl.where(ex == 0, sub, norm)
    return tl.where((byte & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def _dequant(c, sb):
    """e2m1(c) * s_b in FP32 for codes c (int32 0..15), the sign set on the bits: code 8 gives -0.0
    as in the reference (a select between -v and v lost the sign of zero when compiled)."""
    return _dequant_m((c & 7).to(tl.float32), c, sb)


@triton.jit
def _dequant_m(m, c, sb):
    """_dequant with the magnitude code also given as an FP32 integer m (0..7)."""
    v = _e2m1_mag_f(m) * sb
    return (v.to(tl.int32, bitcast=True) | ((c & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_mag_f(m):
    """Magnitude of the E2M1 code given as an FP32 integer m in 0..7 (0, .5, 1, 1.5, 2, 3, 4, 6):
    0.5 m + 0.5 max(m - 4, 0) + max(m - 6, 0), every
    term and sum exact (0, .5, 1, 1.5, 2, 3, 4, 6), with FP32 operations instead of integer ones."""
    return (m * 0.5 + tl.maximum(m - 4.0, 0.0) * 0.5) + tl.maximum(m - 6.0, 0.0)


@triton.jit
def _small_int(s):
    """int32 of an FP32 integer s in [0, 2^23) (exact: 2^23 + s is exact, s its low mantissa bits).

    The E2M1 encoders count threshold comparisons (and add 8 for the sign) in FP32 rather than
    int32: the same exact integer, but a compare that yields 1.0 is one instruction on the GPU and
    the additions run on the FMA pipe, where the int32 count took a compare, a select and an add
    on the integer pipe for every threshold.
    """
    return (s + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000


@triton.jit
def _code(m, y):
    """E2M1 code (int32) from the magnitude code m (FP32 integer 0..7) and the sign of y."""
    return _small_int(m + (y < 0).to(tl.float32) * 8.0)


@triton.jit
def _e2m1_rne_m(y):
    """Magnitude code of FP32 y as an FP32 integer: the threshold count of ``e2m1.encode_rne``.

    The code is L(a) = min(2a, a + 2, a/2 + 4) (piecewise linear, the grid points at the integers)
    rounded to the nearest integer, ties to even (even code = even E2M1 mantissa), clamped to 7.
    Rounding is monotone, so it commutes with the min: each line is rounded with the magic number
    C = 1.5 * 2^23 (the FADD rounds to nearest even at spacing 1; the products by 2 and 0.5 are
    exact, so FMA contraction changes nothing) and the three are min'ed. max(|y|, 0) maps NaN to 0
    (maxnum: the same on the GPU and in the interpreter). 6 FMA-pipe ops + 4 min/max, no compares.
    """
    a = tl.maximum(tl.abs(y), 0.0)
    q0 = (a * 2.0 + 12582912.0) - 12582912.0  # rne(2a)
    q1 = (a + 12582912.0) - 12582910.0  # rne(a) + 2
    q2 = (a * 0.5 + 12582912.0) - 12582908.0  # rne(a/2) + 4
    return tl.minimum(tl.minimum(q0, q1), tl.minimum(q2, 7.0))


@triton.jit
def _e2m1_sr_m(y, r8):
    """Magnitude code (FP32 integer) of y, rounding up with probability (|y| - lo) / (hi - lo)
    decided by u = r8 / 256: the rule of ``e2m1.encode_stochastic`` (representable values never
    move, |y| >= 6 gives 6).

    Rounding up is u < p, i.e. |y| > lo + spacing * r8/256 (exact), in two parts:
    - below 1 (grid 0, .5, 1): the count of |y| > r8/512 and |y| > .5 + r8/512, thresholds read
      off v = 1 + r8/512 built from its bits (no int -> float conversion); both are 1 for |y| >= 1;
    - from 1 on, the grid is FP32 with its mantissa cut to 1 bit and p is the 22 mantissa bits
      below: with c = |y| clamped to [1, 6 - ulp] (NaN -> 1), (bits(c) - (r8 << 14) - 1) >> 22 is
      bits(lo) >> 22 = code(lo) + 252, minus 1 unless p > u; that minus 253 is code(lo) - 2 + up
      (0 for |y| < 1, 5 for |y| >= 6), made an FP32 integer with the 2^23 magic number.
    """
    a = tl.abs(y)
    rb = r8 << 14  # r8 / 256 as a 22-bit mantissa fraction
    v = (rb | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + r8/512
    low = (a > v - 1.0).to(tl.float32) + (a > v - 0.5).to(tl.float32)
    c = tl.minimum(tl.maximum(a, 1.0), 5.999999523162842)  # maxnum: NaN -> 1 here and on the GPU
    hi = ((c.to(tl.int32, bitcast=True) - rb - 1) >> 22) + (0x4B000000 - 253)
    return low + (hi.to(tl.float32, bitcast=True) - 8388608.0)


@triton.jit
def _to_f32(x):
    """Widen to FP32. BF16 goes through its bits: exact for subnormals too (the interpreter's cast
    flushes BF16 subnormals; the GPU's does not, and this is the same instruction count there)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _global_scales(amax_ptr, one_sixth):
    """From the tensor amax: (S_dec, S_enc * (1/6), amax is non-finite), in the reference's order."""
    s_dec, _s_enc, block_enc, bad = _global_scales_cap(amax_ptr, one_sixth, 2688.0)
    return s_dec, block_enc, bad


@triton.jit
def _block_scales(bamax, block_enc, s_dec, bad):
    """Per block: (s_b as FP32, s_b as E4M3 byte, enc_b). A non-finite tensor amax gives NaN scales."""
    sb, byte = _e4m3_rne(tl.minimum(bamax * block_enc, 448.0))
    enc = tl.minimum(tl.div_rn(1.0, sb * s_dec), FLT_MAX)
    sb = tl.where(bad, float("nan"), sb)
    byte = tl.where(bad, 0x7F, byte)
    return sb, byte, enc


@triton.jit
def _global_scales_cap(amax_ptr, one_sixth, GMAX: tl.constexpr):
    """_global_scales for the tensor-scale numerator GMAX = 6 * cap (2688 for the recipe's cap 448,
    1536 for Four Over Six's 256): (S_dec, S_enc, S_enc * (1/6), amax is non-finite)."""
    amax = tl.load(amax_ptr)
    s_enc = tl.minimum(tl.div_rn(GMAX, amax), FLT_MAX)
    s_enc = tl.where((amax == 0) | (s_enc == 0), 1.0, s_enc)
    s_dec = tl.div_rn(1.0, s_enc)
    bad = (amax != amax) | (amax > FLT_MAX)
    return s_dec, s_enc, s_enc * one_sixth, bad


@triton.jit
def _candidate(base, s_dec):
    """One block-scale candidate from its unrounded FP32 scale: (s_b, E4M3 byte, enc_b)."""
    sb, byte = _e4m3_rne(tl.minimum(base, 448.0))
    enc = tl.minimum(tl.div_rn(1.0, sb * s_dec), FLT_MAX)
    return sb, byte, enc


@triton.jit
def _err(x, enc, sb, s_enc, MAE: tl.constexpr):
    """Four Over Six error term of element x for one candidate: d = e2m1(rtne(x * enc)) * s_b -
    x * S_enc in FP32 (two separate roundings: launched with FMA contraction off), d * d or |d|."""
    y = x * enc
    m = _e2m1_rne_m(y)
    d = _dequant_m(m, _code(m, y), sb) - x * s_enc
    if MAE:
        return tl.abs(d)
    else:
        return d * d


@triton.jit
def _err16(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, enc, sb, s_enc,
           MAE: tl.constexpr):
    """The candidate's error over the 16 elements of each block, summed in order j = 0..15."""
    acc = _err(x0, enc, sb, s_enc, MAE) + _err(x1, enc, sb, s_enc, MAE)
    acc = acc + _err(x2, enc, sb, s_enc, MAE)
    acc = acc + _err(x3, enc, sb, s_enc, MAE)
    acc = acc + _err(x4, enc, sb, s_enc, MAE)
    acc = acc + _err(x5, enc, sb, s_enc, MAE)
    acc = acc + _err(x6, enc, sb, s_enc, MAE)
    acc = acc + _err(x7, enc, sb, s_enc, MAE)
    acc = acc + _err(x8, enc, sb, s_enc, MAE)
    acc = acc + _err(x9, enc, sb, s_enc, MAE)
    acc = acc + _err(x10, enc, sb, s_enc, MAE)
    acc = acc + _err(x11, enc, sb, s_enc, MAE)
    acc = acc + _err(x12, enc, sb, s_enc, MAE)
    acc = acc + _err(x13, enc, sb, s_enc, MAE)
    acc = acc + _err(x14, enc, sb, s_enc, MAE)
    acc = acc + _err(x15, enc, sb, s_enc, MAE)
    return acc


@triton.jit
def _evens_odds(t):
    """[BM, G, n] -> (elements 0, 2, 4, ..., elements 1, 3, 5, ...), each [BM, G, n / 2] (n > 2)."""
    return tl.split(tl.reshape(t, [t.shape[0], t.shape[1], t.shape[2] // 2, 2]))


@triton.jit
def _quarters(t):
    """[BM, G, 4] holding elements 8l + c of a block (l = 0, 1 twice: c, c + 4 for the two halves)
    -> the four [BM, G] tensors of its positions 0, 2, 1, 3."""
    a, b = _evens_odds(t)  # positions 0, 2 and 1, 3, each [BM, G, 2]
    p0, p2 = tl.split(a)
    p1, p3 = tl.split(b)
    return p0, p2, p1, p3


@triton.jit
def _err_rows(x, enc, sb, s_enc, MAE: tl.constexpr):
    """_err16 for x [BM, G, 16] and per-block enc, sb [BM, G]: the error of each block [BM, G],
    summed in order j = 0..15 (the 16 elements taken apart by splits, which move no bits)."""
    e = _err(x, enc[:, :, None], sb[:, :, None], s_enc, MAE)
    ev, od = _evens_odds(e)  # j = 2i, 2i + 1
    e0mod4, e2mod4 = _evens_odds(ev)  # j = 4k, 4k + 2  ([BM, G, 4], k = 0..3)
    e1mod4, e3mod4 = _evens_odds(od)  # j = 4k + 1, 4k + 3
    e0, e8, e4, e12 = _quarters(e0mod4)
    e2, e10, e6, e14 = _quarters(e2mod4)
    e1, e9, e5, e13 = _quarters(e1mod4)
    e3, e11, e7, e15 = _quarters(e3mod4)
    acc = e0 + e1
    acc = acc + e2
    acc = acc + e3
    acc = acc + e4
    acc = acc + e5
    acc = acc + e6
    acc = acc + e7
    acc = acc + e8
    acc = acc + e9
    acc = acc + e10
    acc = acc + e11
    acc = acc + e12
    acc = acc + e13
    acc = acc + e14
    acc = acc + e15
    return acc


@triton.jit
def _tile_err(err, BM: tl.constexpr, G: tl.constexpr):
    """Per-row block errors [BM, G] -> the 16x16 tile's error, broadcast back to its rows [BM, G]:
    the 16 rows of a tile added in the reference's tree (rows r and r + 8, then r + 4, r + 2, r + 1)."""
    t = tl.reshape(err, [BM // 16, 2, 8, G])
    a, b = tl.split(tl.permute(t, (0, 2, 3, 1)))  # rows r, r + 8: [BM // 16, 8, G]
    t = tl.reshape(a + b, [BM // 16, 2, 4, G])
    a, b = tl.split(tl.permute(t, (0, 2, 3, 1)))
    t = tl.reshape(a + b, [BM // 16, 2, 2, G])
    a, b = tl.split(tl.permute(t, (0, 2, 3, 1)))
    t = tl.reshape(a + b, [BM // 16, 2, 1, G])
    a, b = tl.split(tl.permute(t, (0, 2, 3, 1)))
    s = tl.reshape(a + b, [BM // 16, G])
    return tl.reshape(tl.broadcast_to(s[:, None, :], [BM // 16, 16, G]), [BM, G])


@triton.jit
def _rand8(r0, r1, r2, r3, j: tl.constexpr):
    """8 random bits for element j of a block from the block's four 32-bit Philox outputs."""
    if j // 4 == 0:
        r = r0
    elif j // 4 == 1:
        r = r1
    elif j // 4 == 2:
        r = r2
    else:
        r = r3
    return ((r >> (8 * (j % 4))) & 0xFF).to(tl.int32)


@triton.jit
def _key(seed, seed_ptr, SEED_PTR: tl.constexpr):
    """The Philox key of stochastic rounding: the host integer ``seed``, or with SEED_PTR the
    int64 at ``seed_ptr`` (a "device seed", which a CUDA graph reads afresh at every replay
    where a host integer would be baked into the captured launch). ``tl.randint4x`` widens either
    to uint64, so a non-negative key gives the same bits both ways."""
    if SEED_PTR:
        key = tl.load(seed_ptr)
    else:
        key = seed
    return key


# ---------------------------------------------------------------------------- amax


@triton.jit
def _nan_bits(m, any_nan):
    """Bits of the partial amax m for the integer atomic max, or of a NaN when any input was NaN.

    The GPU's max ignores NaN (the interpreter's propagates it), so NaN is tracked separately to
    make a NaN input give a NaN tensor amax -- and with it NaN scales -- on both.
    """
    return tl.where(any_nan > 0, 0x7FC00000, m.to(tl.int32, bitcast=True))


@triton.jit
def amax_kernel(x_ptr, out_ptr, M, K, stride_m, stride_k, BM: tl.constexpr, BK: tl.constexpr):
    """max |x| over a strided [M, K] view, folded into out_ptr (int32 bits of a non-negative FP32).

    For non-negative floats the bit patterns order like the values, so an integer atomic max is an
    exact, order-independent reduction; NaN's bits exceed every finite value's, so NaN propagates.
    """
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :].to(tl.int64) * stride_k,
                mask=mask, other=0.0)
    xf = _to_f32(x)
    m = tl.max(tl.max(tl.abs(xf), axis=1), axis=0)
    tl.atomic_max(out_ptr, _nan_bits(m, tl.max(tl.max((xf != xf).to(tl.int32), axis=1), axis=0)))


# ---------------------------------------------------------------------------- 16-wide groups
#
# The RHT and the column-wise quantization work on 16 separate [BM, G] tensors: x_j holds element
# j of every block of the tile. Each x_j is one strided load; when the logical K is the physical
# row index (a transposed view), each load is coalesced along M, and the butterfly is elementwise.


@triton.jit
def _load16(base, offs, sk, mask):
    x0 = _to_f32(tl.load(base + offs + 0 * sk, mask=mask, other=0.0))
    x1 = _to_f32(tl.load(base + offs + 1 * sk, mask=mask, other=0.0))
    x2 = _to_f32(tl.load(base + offs + 2 * sk, mask=mask, other=0.0))
    x3 = _to_f32(tl.load(base + offs + 3 * sk, mask=mask, other=0.0))
    x4 = _to_f32(tl.load(base + offs + 4 * sk, mask=mask, other=0.0))
    x5 = _to_f32(tl.load(base + offs + 5 * sk, mask=mask, other=0.0))
    x6 = _to_f32(tl.load(base + offs + 6 * sk, mask=mask, other=0.0))
    x7 = _to_f32(tl.load(base + offs + 7 * sk, mask=mask, other=0.0))
    x8 = _to_f32(tl.load(base + offs + 8 * sk, mask=mask, other=0.0))
    x9 = _to_f32(tl.load(base + offs + 9 * sk, mask=mask, other=0.0))
    x10 = _to_f32(tl.load(base + offs + 10 * sk, mask=mask, other=0.0))
    x11 = _to_f32(tl.load(base + offs + 11 * sk, mask=mask, other=0.0))
    x12 = _to_f32(tl.load(base + offs + 12 * sk, mask=mask, other=0.0))
    x13 = _to_f32(tl.load(base + offs + 13 * sk, mask=mask, other=0.0))
    x14 = _to_f32(tl.load(base + offs + 14 * sk, mask=mask, other=0.0))
    x15 = _to_f32(tl.load(base + offs + 15 * sk, mask=mask, other=0.0))
    return x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15


@triton.jit
def _sgn(x, SIGNS: tl.constexpr, j: tl.constexpr):
    """x times the j-th RHT sign (bit j of SIGNS set means -1): an exact negation."""
    if (SIGNS >> j) & 1:
        return -x
    else:
        return x


@triton.jit
def _bfly(a, b):
    return a + b, a - b


@triton.jit
def _finish(v, ROUND: tl.constexpr):
    """The exact *0.25, then the rounding to the input dtype that TE applies (1: BF16, 2: FP16)."""
    v = v * 0.25
    if ROUND == 1:
        # RNE to BF16 on the bits: the interpreter's FP32 -> BF16 cast truncates, the GPU's rounds.
        b = v.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        v = b.to(tl.float32, bitcast=True)
    elif ROUND == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _rht16(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
           SIGNS: tl.constexpr, ROUND: tl.constexpr):
    """v -> v @ H for one block: sign flip, four radix-2 stages (h = 1, 2, 4, 8), *0.25, round.

    Stage h pairs elements i and i + h (i with bit h clear) into (a + b, a - b): the order of
    ``hadamard._butterfly``.
    """
    x0 = _sgn(x0, SIGNS, 0)
    x1 = _sgn(x1, SIGNS, 1)
    x2 = _sgn(x2, SIGNS, 2)
    x3 = _sgn(x3, SIGNS, 3)
    x4 = _sgn(x4, SIGNS, 4)
    x5 = _sgn(x5, SIGNS, 5)
    x6 = _sgn(x6, SIGNS, 6)
    x7 = _sgn(x7, SIGNS, 7)
    x8 = _sgn(x8, SIGNS, 8)
    x9 = _sgn(x9, SIGNS, 9)
    x10 = _sgn(x10, SIGNS, 10)
    x11 = _sgn(x11, SIGNS, 11)
    x12 = _sgn(x12, SIGNS, 12)
    x13 = _sgn(x13, SIGNS, 13)
    x14 = _sgn(x14, SIGNS, 14)
    x15 = _sgn(x15, SIGNS, 15)
    # h = 1
    x0, x1 = _bfly(x0, x1)
    x2, x3 = _bfly(x2, x3)
    x4, x5 = _bfly(x4, x5)
    x6, x7 = _bfly(x6, x7)
    x8, x9 = _bfly(x8, x9)
    x10, x11 = _bfly(x10, x11)
    x12, x13 = _bfly(x12, x13)
    x14, x15 = _bfly(x14, x15)
    # h = 2
    x0, x2 = _bfly(x0, x2)
    x1, x3 = _bfly(x1, x3)
    x4, x6 = _bfly(x4, x6)
    x5, x7 = _bfly(x5, x7)
    x8, x10 = _bfly(x8, x10)
    x9, x11 = _bfly(x9, x11)
    x12, x14 = _bfly(x12, x14)
    x13, x15 = _bfly(x13, x15)
    # h = 4
    x0, x4 = _bfly(x0, x4)
    x1, x5 = _bfly(x1, x5)
    x2, x6 = _bfly(x2, x6)
    x3, x7 = _bfly(x3, x7)
    x8, x12 = _bfly(x8, x12)
    x9, x13 = _bfly(x9, x13)
    x10, x14 = _bfly(x10, x14)
    x11, x15 = _bfly(x11, x15)
    # h = 8
    x0, x8 = _bfly(x0, x8)
    x1, x9 = _bfly(x1, x9)
    x2, x10 = _bfly(x2, x10)
    x3, x11 = _bfly(x3, x11)
    x4, x12 = _bfly(x4, x12)
    x5, x13 = _bfly(x5, x13)
    x6, x14 = _bfly(x6, x14)
    x7, x15 = _bfly(x7, x15)
    return (_finish(x0, ROUND), _finish(x1, ROUND), _finish(x2, ROUND), _finish(x3, ROUND),
            _finish(x4, ROUND), _finish(x5, ROUND), _finish(x6, ROUND), _finish(x7, ROUND),
            _finish(x8, ROUND), _finish(x9, ROUND), _finish(x10, ROUND), _finish(x11, ROUND),
            _finish(x12, ROUND), _finish(x13, ROUND), _finish(x14, ROUND), _finish(x15, ROUND))


@triton.jit
def _absmax16(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15):
    """max |x_j| over the 16 elements of each block; NaN propagates (the GPU's default max drops it)."""
    a = _mx(_mx(tl.abs(x0), tl.abs(x1)), _mx(tl.abs(x2), tl.abs(x3)))
    b = _mx(_mx(tl.abs(x4), tl.abs(x5)), _mx(tl.abs(x6), tl.abs(x7)))
    c = _mx(_mx(tl.abs(x8), tl.abs(x9)), _mx(tl.abs(x10), tl.abs(x11)))
    d = _mx(_mx(tl.abs(x12), tl.abs(x13)), _mx(tl.abs(x14), tl.abs(x15)))
    return _mx(_mx(a, b), _mx(c, d))


@triton.jit
def _mx(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def amax_groups_kernel(x_ptr, out_ptr, M, K, stride_m, stride_k,
                       RHT: tl.constexpr, SIGNS: tl.constexpr, ROUND: tl.constexpr,
                       BM: tl.constexpr, G: tl.constexpr):
    """Tensor amax of a strided [M, K] view, after the 16x16 RHT along K when RHT is set.

    out_ptr[0] receives max |x| and out_ptr[1] max |RHT(x)| (int32 bits, atomic max): one read of
    x serves the row-wise and the Wgrad quantizations of the same tensor.
    """
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    grp = tl.program_id(1) * G + tl.arange(0, G)
    mask = (rows[:, None] < M) & (grp[None, :] < K // 16)
    offs = rows[:, None].to(tl.int64) * stride_m + grp[None, :].to(tl.int64) * 16 * stride_k
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _load16(
        x_ptr, offs, stride_k, mask)
    _fold_amaxes(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, out_ptr, RHT, SIGNS, ROUND)


@triton.jit
def _fold_amaxes(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, out_ptr,
                 RHT: tl.constexpr, SIGNS: tl.constexpr, ROUND: tl.constexpr):
    """Fold the tile's max |x| into out_ptr[0] and, when RHT, its max |RHT(x)| into out_ptr[1]."""
    m = _absmax16(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
    nan = tl.max(tl.max((m != m).to(tl.int32), axis=1), axis=0)
    tl.atomic_max(out_ptr, _nan_bits(tl.max(tl.max(m, axis=1), axis=0), nan))
    if RHT:
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _rht16(
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, SIGNS, ROUND)
        m = _absmax16(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
        tl.atomic_max(out_ptr + 1, _nan_bits(tl.max(tl.max(m, axis=1), axis=0), nan))


# ---------------------------------------------------------------------------- SwiGLU + amax
#
# The input of the MLP's down projection, h = silu(gate) * up, computed where its amax pass reads
# it: gate and up are read once, h is written once, and no silu(gate) goes through memory.


@triton.jit
def _bf16_rne(v):
    """FP32 v rounded to the nearest BF16 (ties to even), as FP32. On the bits, since the
    interpreter's cast truncates; a NaN stays NaN (the carry could reach a NaN's sign bit)."""
    b = v.to(tl.int32, bitcast=True)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, r)


@triton.jit
def _silu_mul(g, u, LIBDEVICE: tl.constexpr):
    """``F.silu(g) * u`` of BF16 tensors (g, u: their FP32 values), as torch computes it: silu in
    FP32 as g / (1 + exp(-g)) (torch's CUDA and CPU kernels both), rounded to BF16, then the
    product in FP32 (exact: two 8-bit significands) rounded to BF16. exp is CUDA's expf
    (libdevice) when compiled and numpy's under the interpreter: they agree with torch's exp after
    the rounding to BF16 for every BF16 input (the tests check all of them), not in FP32."""
    if LIBDEVICE:
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    s = _bf16_rne(tl.div_rn(g, 1.0 + e))
    return _bf16_rne(s * u)


@triton.jit
def _swiglu_at(g_ptr, u_ptr, h_ptr, feat, tok, T, TP, F, sgt, sgf, sut, suf, LIBDEVICE: tl.constexpr):
    """h = silu(g) * u at [feat, tok] ([BM, G] tensors): loaded from gate and up, stored into the
    [TP, F] row-major BF16 h (the rows T..TP-1 of padding get silu(0) * 0 = +0.0), returned as FP32."""
    m = (feat < F) & (tok < T)
    g = _to_f32(tl.load(g_ptr + tok.to(tl.int64) * sgt + feat.to(tl.int64) * sgf, mask=m, other=0.0))
    u = _to_f32(tl.load(u_ptr + tok.to(tl.int64) * sut + feat.to(tl.int64) * suf, mask=m, other=0.0))
    h = _silu_mul(g, u, LIBDEVICE)
    # Stored as its upper 16 bits (h is a BF16 value): the interpreter's cast garbles BF16 subnormals.
    hb = (h.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    tl.store(h_ptr + tok.to(tl.int64) * F + feat.to(tl.int64), hb, mask=(feat < F) & (tok < TP))
    return h


@triton.jit
def swiglu_amax_kernel(g_ptr, u_ptr, h_ptr, out_ptr, T, TP, F, sgt, sgf, sut, suf,
                       RHT: tl.constexpr, SIGNS: tl.constexpr, LIBDEVICE: tl.constexpr,
                       BM: tl.constexpr, G: tl.constexpr):
    """h = silu(gate) * up (BF16, [T, F] gate and up of any strides) into the row-major [TP, F] h,
    its rows padded with zeros to TP = a multiple of 16, and ``amax_groups_kernel`` of h^T [F, TP]
    (out_ptr[0]: max |h|; out_ptr[1]: max |RHT(h^T)| along the tokens when RHT) from the same
    registers: the tile is h^T's, BM features by G blocks of 16 tokens, element j of each block
    token 16 g + j, each load and store coalesced along the features."""
    feat = (tl.program_id(0) * BM + tl.arange(0, BM))[:, None]
    tok = (tl.program_id(1) * G + tl.arange(0, G))[None, :] * 16
    x0 = _swiglu_at(g_ptr, u_ptr, h_ptr, feat, tok + 0, T, TP, F, sgt, sgf, sut, suf, LIBDEVICE)
    x1 = _swiglu_at(g_ptr, u_ptr, h_ptr, feat, tok + 1, T, TP, F, sgt, sgf, sut, suf, LIBDEVICE)
    x2 = _swiglu_at(g_ptr, u_ptr, h_ptr, feat, tok + 2, T, TP, F, sgt, sgf, sut, suf, LIBDEVICE)
    x3 = _swiglu_at(g_ptr, u_ptr, h_ptr, feat, tok + 3, T, TP, F, sgt, sgf, sut, suf, LIBDEVICE)
    x4 = _swiglu_at(g_ptr, u_ptr, h_ptr, feat, tok + 4, T, TP, F, sgt, sgf, sut, suf, LIBDEVICE)
    x5 = _swiglu_at(g_ptr, u_ptr, h_ptr, feat, tok + 5, T, TP, F, sgt, sgf, sut, suf, LIBDEVICE)
    x6 = _swiglu_at(g_ptr, u_ptr, h_ptr, feat, tok + 6, T, TP, F, sgt, sgf, sut, suf, LIBDEVICE)
    x7 = _swiglu_at(g_ptr, u_ptr, h_ptr, feat, tok + 7, T, TP, F, sgt, sgf, sut, suf, LIBDEVICE)
    x8 = _swiglu_at(g_ptr, u_ptr, h_ptr, feat, tok + 8, T, TP, F, sgt, sgf, sut, suf, LIBDEVICE)
    x9 = _swiglu_at(g_ptr, u_ptr, h_ptr, feat, tok + 9, T, TP, F, sgt, sgf, sut, suf, LIBDEVICE)
    x10 = _swiglu_at(g_ptr, u_ptr, h_ptr, feat, tok + 10, T, TP, F, sgt, sgf, sut, suf, LIBDEVICE)
    x11 = _swiglu_at(g_ptr, u_ptr, h_ptr, feat, tok + 11, T, TP, F, sgt, sgf, sut, suf, LIBDEVICE)
    x12 = _swiglu_at(g_ptr, u_ptr, h_ptr, feat, tok + 12, T, TP, F, sgt, sgf, sut, suf, LIBDEVICE)
    x13 = _swiglu_at(g_ptr, u_ptr, h_ptr, feat, tok + 13, T, TP, F, sgt, sgf, sut, suf, LIBDEVICE)
    x14 = _swiglu_at(g_ptr, u_ptr, h_ptr, feat, tok + 14, T, TP, F, sgt, sgf, sut, suf, LIBDEVICE)
    x15 = _swiglu_at(g_ptr, u_ptr, h_ptr, feat, tok + 15, T, TP, F, sgt, sgf, sut, suf, LIBDEVICE)
    # ROUND=1: the RHT's output rounded to BF16, as for the BF16 h the unfused pass reads.
    _fold_amaxes(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, out_ptr, RHT, SIGNS, 1)


@triton.jit
def _silu_grads(g, u, dh, LIBDEVICE: tl.constexpr):
    """(d gate, d up) of h = ``F.silu(gate) * up`` for the gradient dh of h (g, u, dh: the FP32
    values of BF16 tensors), as autograd computes them with torch's ops: d up = bf16(dh *
    bf16(silu(g))) (the product's backward, silu recomputed as in ``_silu_mul``), d gate =
    ``silu_backward(bf16(dh * u), g)``: in FP32, with sig = 1 / (1 + exp(-g)), (ds * sig) *
    (1 + g * (1 - sig)), the last sum one FMA (torch's CUDA kernel, compiled with contraction;
    its CPU kernel agrees after the rounding), then rounded to BF16. exp as in ``_silu_mul``."""
    if LIBDEVICE:
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    sig = tl.div_rn(1.0, 1.0 + e)
    ds = _bf16_rne(dh * u)
    dg = _bf16_rne((ds * sig) * tl.fma(g, 1.0 - sig, 1.0))
    du = _bf16_rne(dh * _bf16_rne(tl.div_rn(g, 1.0 + e)))
    return dg, du


@triton.jit
def _bf16_bits(v):
    """A BF16 value held in FP32 as the BF16 tensor element (its upper 16 bits: the interpreter's
    cast garbles BF16 subnormals)."""
    return (v.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _swiglu_bwd_at(g_ptr, u_ptr, d_ptr, o_ptr, feat, tok, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                   LIBDEVICE: tl.constexpr):
    """(d gate, d up) at [feat, tok] ([BM, G] tensors) from gate, up and dh, stored into the
    [TP, 2F] row-major BF16 gradient of gate_up (d gate in columns 0..F-1, d up in F..2F-1; the
    rows T..TP-1 of padding get +0.0), returned as FP32."""
    m = (feat < F) & (tok < T)
    t64, f64 = tok.to(tl.int64), feat.to(tl.int64)
    g = _to_f32(tl.load(g_ptr + t64 * sgt + f64 * sgf, mask=m, other=0.0))
    u = _to_f32(tl.load(u_ptr + t64 * sut + f64 * suf, mask=m, other=0.0))
    dh = _to_f32(tl.load(d_ptr + t64 * sdt + f64 * sdf, mask=m, other=0.0))
    dg, du = _silu_grads(g, u, dh, LIBDEVICE)
    o = o_ptr + t64 * (2 * F) + f64
    sm = (feat < F) & (tok < TP)
    tl.store(o, _bf16_bits(dg), mask=sm)
    tl.store(o + F, _bf16_bits(du), mask=sm)
    return dg, du


@triton.jit
def swiglu_backward_amax_kernel(g_ptr, u_ptr, d_ptr, o_ptr, out_ptr, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                                RHT: tl.constexpr, SIGNS: tl.constexpr, LIBDEVICE: tl.constexpr,
                                BM: tl.constexpr, G: tl.constexpr):
    """The SwiGLU's backward where the gate_up projection's dY amax pass reads its output: from
    gate and up ([T, F], any strides) and dh (the gradient of h = silu(gate) * up, [T, F], any
    strides), the gradient of gate_up = [d gate | d up] into the row-major [TP, 2F] o, rows padded
    with zeros to TP = a multiple of 16, and ``amax_groups_kernel`` of its transpose [2F, TP] from
    the same registers (out_ptr[0]: max |dY|; out_ptr[1]: max |RHT(dY^T)| along the tokens when
    RHT). The tile is as in ``swiglu_amax_kernel`` (BM features by G blocks of 16 tokens), once
    for the gate's half and once for the up's."""
    feat = (tl.program_id(0) * BM + tl.arange(0, BM))[:, None]
    tok = (tl.program_id(1) * G + tl.arange(0, G))[None, :] * 16
    g0, u0 = _swiglu_bwd_at(g_ptr, u_ptr, d_ptr, o_ptr, feat, tok + 0, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                            LIBDEVICE)
    g1, u1 = _swiglu_bwd_at(g_ptr, u_ptr, d_ptr, o_ptr, feat, tok + 1, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                            LIBDEVICE)
    g2, u2 = _swiglu_bwd_at(g_ptr, u_ptr, d_ptr, o_ptr, feat, tok + 2, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                            LIBDEVICE)
    g3, u3 = _swiglu_bwd_at(g_ptr, u_ptr, d_ptr, o_ptr, feat, tok + 3, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                            LIBDEVICE)
    g4, u4 = _swiglu_bwd_at(g_ptr, u_ptr, d_ptr, o_ptr, feat, tok + 4, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                            LIBDEVICE)
    g5, u5 = _swiglu_bwd_at(g_ptr, u_ptr, d_ptr, o_ptr, feat, tok + 5, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                            LIBDEVICE)
    g6, u6 = _swiglu_bwd_at(g_ptr, u_ptr, d_ptr, o_ptr, feat, tok + 6, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                            LIBDEVICE)
    g7, u7 = _swiglu_bwd_at(g_ptr, u_ptr, d_ptr, o_ptr, feat, tok + 7, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                            LIBDEVICE)
    g8, u8 = _swiglu_bwd_at(g_ptr, u_ptr, d_ptr, o_ptr, feat, tok + 8, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                            LIBDEVICE)
    g9, u9 = _swiglu_bwd_at(g_ptr, u_ptr, d_ptr, o_ptr, feat, tok + 9, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                            LIBDEVICE)
    g10, u10 = _swiglu_bwd_at(g_ptr, u_ptr, d_ptr, o_ptr, feat, tok + 10, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                              LIBDEVICE)
    g11, u11 = _swiglu_bwd_at(g_ptr, u_ptr, d_ptr, o_ptr, feat, tok + 11, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                              LIBDEVICE)
    g12, u12 = _swiglu_bwd_at(g_ptr, u_ptr, d_ptr, o_ptr, feat, tok + 12, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                              LIBDEVICE)
    g13, u13 = _swiglu_bwd_at(g_ptr, u_ptr, d_ptr, o_ptr, feat, tok + 13, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                              LIBDEVICE)
    g14, u14 = _swiglu_bwd_at(g_ptr, u_ptr, d_ptr, o_ptr, feat, tok + 14, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                              LIBDEVICE)
    g15, u15 = _swiglu_bwd_at(g_ptr, u_ptr, d_ptr, o_ptr, feat, tok + 15, T, TP, F, sgt, sgf, sut, suf, sdt, sdf,
                              LIBDEVICE)
    # ROUND=1: the RHT's output rounded to BF16, as for the BF16 dY the unfused pass reads.
    _fold_amaxes(g0, g1, g2, g3, g4, g5, g6, g7, g8, g9, g10, g11, g12, g13, g14, g15, out_ptr, RHT, SIGNS, 1)
    _fold_amaxes(u0, u1, u2, u3, u4, u5, u6, u7, u8, u9, u10, u11, u12, u13, u14, u15, out_ptr, RHT, SIGNS, 1)


# --------------------------------------------------------------------------- RMSNorm + amax
#
# The input of a projection after an RMSNorm (attention's qkv, the MLP's gate_up): y = x * rstd * w
# computed where its amax pass reads it, from the residual x, the per-token rstd (torch's
# reduction, computed before) and the norm's weight; x is read once and y written once in BF16,
# where torch's two products and casts write and read FP32 copies of it first.


@triton.jit
def _rmsnorm_at(x_ptr, r_ptr, w_ptr, y_ptr, feat, tok, T, TP, D, sxt, sxd):
    """y = bf16((x * rstd) * w) at [feat, tok] ([BM, G] tensors), in torch's order (two FP32
    products, one rounding to BF16), stored into the [TP, D] row-major BF16 y (the rows T..TP-1 of
    padding get +0.0), returned as FP32."""
    m = (feat < D) & (tok < T)
    x = _to_f32(tl.load(x_ptr + tok.to(tl.int64) * sxt + feat.to(tl.int64) * sxd, mask=m, other=0.0))
    r = tl.load(r_ptr + tok, mask=tok < T, other=0.0)
    w = _to_f32(tl.load(w_ptr + feat, mask=feat < D, other=0.0))
    y = tl.where(tok < T, _bf16_rne((x * r) * w), 0.0)  # padding: +0.0 (not 0 * a negative weight)
    yb = (y.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    tl.store(y_ptr + tok.to(tl.int64) * D + feat.to(tl.int64), yb, mask=(feat < D) & (tok < TP))
    return y


@triton.jit
def rmsnorm_amax_kernel(x_ptr, r_ptr, w_ptr, y_ptr, out_ptr, T, TP, D, sxt, sxd,
                        RHT: tl.constexpr, SIGNS: tl.constexpr, BM: tl.constexpr, G: tl.constexpr):
    """y = RMSNorm's output (BF16) from x [T, D] (FP32 or BF16, any strides), the FP32 rstd [T]
    and the weight [D] into the row-major [TP, D] y, rows padded with zeros to TP = a multiple of
    16, and ``amax_groups_kernel`` of y^T [D, TP] from the same registers (out_ptr[0]: max |y|;
    out_ptr[1]: max |RHT(y^T)| along the tokens when RHT). The tile is y^T's, as in
    ``swiglu_amax_kernel``: BM features by G blocks of 16 tokens, loads and stores coalesced along
    the features."""
    feat = (tl.program_id(0) * BM + tl.arange(0, BM))[:, None]
    tok = (tl.program_id(1) * G + tl.arange(0, G))[None, :] * 16
    x0 = _rmsnorm_at(x_ptr, r_ptr, w_ptr, y_ptr, feat, tok + 0, T, TP, D, sxt, sxd)
    x1 = _rmsnorm_at(x_ptr, r_ptr, w_ptr, y_ptr, feat, tok + 1, T, TP, D, sxt, sxd)
    x2 = _rmsnorm_at(x_ptr, r_ptr, w_ptr, y_ptr, feat, tok + 2, T, TP, D, sxt, sxd)
    x3 = _rmsnorm_at(x_ptr, r_ptr, w_ptr, y_ptr, feat, tok + 3, T, TP, D, sxt, sxd)
    x4 = _rmsnorm_at(x_ptr, r_ptr, w_ptr, y_ptr, feat, tok + 4, T, TP, D, sxt, sxd)
    x5 = _rmsnorm_at(x_ptr, r_ptr, w_ptr, y_ptr, feat, tok + 5, T, TP, D, sxt, sxd)
    x6 = _rmsnorm_at(x_ptr, r_ptr, w_ptr, y_ptr, feat, tok + 6, T, TP, D, sxt, sxd)
    x7 = _rmsnorm_at(x_ptr, r_ptr, w_ptr, y_ptr, feat, tok + 7, T, TP, D, sxt, sxd)
    x8 = _rmsnorm_at(x_ptr, r_ptr, w_ptr, y_ptr, feat, tok + 8, T, TP, D, sxt, sxd)
    x9 = _rmsnorm_at(x_ptr, r_ptr, w_ptr, y_ptr, feat, tok + 9, T, TP, D, sxt, sxd)
    x10 = _rmsnorm_at(x_ptr, r_ptr, w_ptr, y_ptr, feat, tok + 10, T, TP, D, sxt, sxd)
    x11 = _rmsnorm_at(x_ptr, r_ptr, w_ptr, y_ptr, feat, tok + 11, T, TP, D, sxt, sxd)
    x12 = _rmsnorm_at(x_ptr, r_ptr, w_ptr, y_ptr, feat, tok + 12, T, TP, D, sxt, sxd)
    x13 = _rmsnorm_at(x_ptr, r_ptr, w_ptr, y_ptr, feat, tok + 13, T, TP, D, sxt, sxd)
    x14 = _rmsnorm_at(x_ptr, r_ptr, w_ptr, y_ptr, feat, tok + 14, T, TP, D, sxt, sxd)
    x15 = _rmsnorm_at(x_ptr, r_ptr, w_ptr, y_ptr, feat, tok + 15, T, TP, D, sxt, sxd)
    # ROUND=1: the RHT's output rounded to BF16, as for the BF16 y the unfused pass reads.
    _fold_amaxes(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, out_ptr, RHT, SIGNS, 1)


@triton.jit
def _code16h(x, enc, sb, r0, r1, r2, r3, deq_ptr, doffs, mask, j: tl.constexpr, SR: tl.constexpr,
             WRITE_DEQ: tl.constexpr):
    """Code of element j of each block, shifted into nibble j % 8 of an int32 half-word; with
    WRITE_DEQ also stores its e2m1 * s_b at deq_ptr + doffs (the GEMM operand, written where the
    element was read from)."""
    y = x * enc
    if SR:
        m = _e2m1_sr_m(y, _rand8(r0, r1, r2, r3, j))
    else:
        m = _e2m1_rne_m(y)
    c = _code(m, y)
    if WRITE_DEQ:
        tl.store(deq_ptr + doffs, _dequant_m(m, c, sb).to(deq_ptr.dtype.element_ty), mask=mask)
    return c << (4 * (j % 8))


@triton.jit
def _word32(lo, hi):
    """int64 word from its low and high int32 halves (zero-extended: no sign leaks into hi)."""
    return lo.to(tl.uint32, bitcast=True).to(tl.int64) | (hi.to(tl.uint32, bitcast=True).to(tl.int64) << 32)


@triton.jit
def quant_groups_kernel(x_ptr, data_ptr, scale_ptr, amax_ptr, deq_ptr, M, K, stride_m, stride_k,
                        stride_dm, stride_dk, seed, seed_ptr, one_sixth,
                        RHT: tl.constexpr, SIGNS: tl.constexpr, ROUND: tl.constexpr, SR: tl.constexpr,
                        BM: tl.constexpr, G: tl.constexpr, WRITE_DEQ: tl.constexpr = False,
                        FOUR6: tl.constexpr = False, MAE: tl.constexpr = False, GMAX: tl.constexpr = 2688.0,
                        SEED_PTR: tl.constexpr = False):
    """1x16 quantization of a strided [M, K] view along K (optionally RHT first): packed int64 words
    [M, K/16] and E4M3 scale bytes [M, K/16], both row-major. For K = the physical row index (the
    transposed, column-wise quantization) the transpose is never written to memory.

    With WRITE_DEQ the unscaled dequantized values e2m1 * s_b (of the transformed values when RHT)
    go to deq_ptr, element (m, k) at m * stride_dm + k * stride_dk: given x's own strides, the GEMM
    operand is written in x's memory order, coalesced like the loads, and is used as a view.

    GMAX is 6 * the block-scale cap (2688 for the recipe). FOUR6 picks each block's scale by Four
    Over Six (the map-to-4 or map-to-6 candidate with the lower error, MAE or squared; ties: 6),
    as ``formats.nvfp4.quantize`` does; launch it with FMA contraction off.

    SR's Philox key is ``seed``, or with SEED_PTR the int64 at ``seed_ptr`` (see :func:`_key`).
    """
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    grp = tl.program_id(1) * G + tl.arange(0, G)
    nb = K // 16
    mask = (rows[:, None] < M) & (grp[None, :] < nb)
    offs = rows[:, None].to(tl.int64) * stride_m + grp[None, :].to(tl.int64) * 16 * stride_k
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _load16(
        x_ptr, offs, stride_k, mask)
    if RHT:
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _rht16(
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, SIGNS, ROUND)
    bamax = _absmax16(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
    s_dec, s_enc, block_enc, bad = _global_scales_cap(amax_ptr, one_sixth, GMAX)
    if FOUR6:
        base = bamax * block_enc
        sb, byte, enc = _candidate(base, s_dec)
        sb4, byte4, enc4 = _candidate(base * 1.5, s_dec)
        e6 = _err16(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, enc, sb, s_enc, MAE)
        e4 = _err16(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, enc4, sb4, s_enc, MAE)
        pick4 = e4 < e6
        sb = tl.where(pick4, sb4, sb)
        byte = tl.where(pick4, byte4, byte)
        enc = tl.where(pick4, enc4, enc)
        sb = tl.where(bad, float("nan"), sb)
        byte = tl.where(bad, 0x7F, byte)
    else:
        sb, byte, enc = _block_scales(bamax, block_enc, s_dec, bad)
    out = rows[:, None].to(tl.int64) * nb + grp[None, :]
    if SR:
        r0, r1, r2, r3 = tl.randint4x(_key(seed, seed_ptr, SEED_PTR), out.to(tl.uint32, bitcast=False))
    else:
        r0 = 0
        r1 = 0
        r2 = 0
        r3 = 0
    d = rows[:, None].to(tl.int64) * stride_dm + grp[None, :].to(tl.int64) * 16 * stride_dk
    sd = stride_dk
    # The block's int64 word from two int32 halves (nibbles 0-7 and 8-15): 32-bit shifts and ORs.
    lo = (_code16h(x0, enc, sb, r0, r1, r2, r3, deq_ptr, d + 0 * sd, mask, 0, SR, WRITE_DEQ)
          | _code16h(x1, enc, sb, r0, r1, r2, r3, deq_ptr, d + 1 * sd, mask, 1, SR, WRITE_DEQ))
    lo |= (_code16h(x2, enc, sb, r0, r1, r2, r3, deq_ptr, d + 2 * sd, mask, 2, SR, WRITE_DEQ)
           | _code16h(x3, enc, sb, r0, r1, r2, r3, deq_ptr, d + 3 * sd, mask, 3, SR, WRITE_DEQ))
    lo |= (_code16h(x4, enc, sb, r0, r1, r2, r3, deq_ptr, d + 4 * sd, mask, 4, SR, WRITE_DEQ)
           | _code16h(x5, enc, sb, r0, r1, r2, r3, deq_ptr, d + 5 * sd, mask, 5, SR, WRITE_DEQ))
    lo |= (_code16h(x6, enc, sb, r0, r1, r2, r3, deq_ptr, d + 6 * sd, mask, 6, SR, WRITE_DEQ)
           | _code16h(x7, enc, sb, r0, r1, r2, r3, deq_ptr, d + 7 * sd, mask, 7, SR, WRITE_DEQ))
    hi = (_code16h(x8, enc, sb, r0, r1, r2, r3, deq_ptr, d + 8 * sd, mask, 8, SR, WRITE_DEQ)
          | _code16h(x9, enc, sb, r0, r1, r2, r3, deq_ptr, d + 9 * sd, mask, 9, SR, WRITE_DEQ))
    hi |= (_code16h(x10, enc, sb, r0, r1, r2, r3, deq_ptr, d + 10 * sd, mask, 10, SR, WRITE_DEQ)
           | _code16h(x11, enc, sb, r0, r1, r2, r3, deq_ptr, d + 11 * sd, mask, 11, SR, WRITE_DEQ))
    hi |= (_code16h(x12, enc, sb, r0, r1, r2, r3, deq_ptr, d + 12 * sd, mask, 12, SR, WRITE_DEQ)
           | _code16h(x13, enc, sb, r0, r1, r2, r3, deq_ptr, d + 13 * sd, mask, 13, SR, WRITE_DEQ))
    hi |= (_code16h(x14, enc, sb, r0, r1, r2, r3, deq_ptr, d + 14 * sd, mask, 14, SR, WRITE_DEQ)
           | _code16h(x15, enc, sb, r0, r1, r2, r3, deq_ptr, d + 15 * sd, mask, 15, SR, WRITE_DEQ))
    w = _word32(lo, hi)
    tl.store(data_ptr + out, w, mask=mask)
    tl.store(scale_ptr + out, byte.to(tl.uint8), mask=mask)


# ---------------------------------------------------------------------------- row-wise


@triton.jit
def quant_rows_kernel(x_ptr, data_ptr, scale_ptr, deq_ptr, amax_ptr, datat_ptr, scalet_ptr,
                      M, K, stride_m, seed, seed_ptr, one_sixth,
                      TILE_ROWS: tl.constexpr, SR: tl.constexpr, WRITE_DEQ: tl.constexpr,
                      WRITE_T: tl.constexpr, BM: tl.constexpr, G: tl.constexpr,
                      PACK: tl.constexpr = 0, FOUR6: tl.constexpr = False, MAE: tl.constexpr = False,
                      GMAX: tl.constexpr = 2688.0, SEED_PTR: tl.constexpr = False):
    """Quantization along a contiguous K with 1x16 blocks (TILE_ROWS=1) or 16x16 tiles (16).

    Writes packed int64 words and E4M3 bytes [M, K/16]; with WRITE_DEQ also the unscaled
    dequantized values e2m1 * s_b in the dtype of deq_ptr ([M, K], exact in BF16), the GEMM
    operand of the emulation; with WRITE_T (16x16 tiles only) also the codes and scales of the
    transpose [K, M] -- the same codes, as the recipe's Dgrad reuses them -- so W^T is never
    requantized or repacked on the host.

    PACK picks how the codes are packed (the bytes written are the same; each is the faster one
    for some of the launches in ``triton_nvfp4.LAUNCH``): 0, one int64 word per block by a 64-bit
    sum over the block (data_ptr: int64 [M, K/16]); 1, bytes from the pairs of neighbours
    (data_ptr: uint8 [M, K/2]).

    GMAX is 6 * the block-scale cap (2688 for the recipe). FOUR6 picks each block's (or tile's)
    scale by Four Over Six, as ``formats.nvfp4.quantize`` does (launch with FMA contraction off).

    SR's Philox key is ``seed``, or with SEED_PTR the int64 at ``seed_ptr`` (see :func:`_key`).
    """
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    grp = tl.program_id(1) * G + tl.arange(0, G)
    j = tl.arange(0, 16)
    nb = K // 16
    mask2 = (rows[:, None] < M) & (grp[None, :] < nb)
    mask3 = mask2[:, :, None]
    offs = (rows[:, None, None].to(tl.int64) * stride_m
            + (grp[None, :, None] * 16 + j[None, None, :]).to(tl.int64))
    x = _to_f32(tl.load(x_ptr + offs, mask=mask3, other=0.0))  # [BM, G, 16]

    bamax = tl.max(tl.abs(x), axis=2)  # [BM, G]
    if TILE_ROWS == 16:
        t = tl.max(tl.reshape(bamax, [BM // 16, 16, G]), axis=1)
        bamax = tl.reshape(tl.broadcast_to(t[:, None, :], [BM // 16, 16, G]), [BM, G])
    s_dec, s_enc, block_enc, bad = _global_scales_cap(amax_ptr, one_sixth, GMAX)
    if FOUR6:
        base = bamax * block_enc
        sb, byte, enc = _candidate(base, s_dec)
        sb4, byte4, enc4 = _candidate(base * 1.5, s_dec)
        e6 = _err_rows(x, enc, sb, s_enc, MAE)
        e4 = _err_rows(x, enc4, sb4, s_enc, MAE)
        if TILE_ROWS == 16:
            e6 = _tile_err(e6, BM, G)
            e4 = _tile_err(e4, BM, G)
        pick4 = e4 < e6
        sb = tl.where(pick4, sb4, sb)
        byte = tl.where(pick4, byte4, byte)
        enc = tl.where(pick4, enc4, enc)
        sb = tl.where(bad, float("nan"), sb)
        byte = tl.where(bad, 0x7F, byte)
    else:
        sb, byte, enc = _block_scales(bamax, block_enc, s_dec, bad)

    y = x * enc[:, :, None]
    if SR:
        out0 = (rows[:, None].to(tl.int64) * nb + grp[None, :]).to(tl.uint32, bitcast=False)
        r0, r1, r2, r3 = tl.randint4x(_key(seed, seed_ptr, SEED_PTR), out0)
        # Byte j % 4 of Philox output j // 4 for element j (as _rand8 does per element).
        q = j[None, None, :] // 4
        r = tl.where(q == 0, r0[:, :, None], tl.where(q == 1, r1[:, :, None],
                     tl.where(q == 2, r2[:, :, None], r3[:, :, None])))
        r8 = ((r >> (8 * (j[None, None, :] % 4)).to(tl.uint32)) & 0xFF).to(tl.int32)
        m = _e2m1_sr_m(y, r8)
    else:
        m = _e2m1_rne_m(y)
    code = _code(m, y)

    out = rows[:, None].to(tl.int64) * nb + grp[None, :]
    if PACK == 0:
        word = tl.sum(code.to(tl.int64) << (4 * j[None, None, :]).to(tl.int64), axis=2)
        tl.store(data_ptr + out, word, mask=mask2)
    else:
        lo, hi = tl.split(tl.reshape(code, [BM, G, 8, 2]))
        p = lo | (hi << 4)  # byte i of the block: elements 2i (low nibble) and 2i + 1
        i8 = tl.arange(0, 8)
        poffs = rows[:, None, None].to(tl.int64) * (K // 2) + (grp[None, :, None] * 8 + i8[None, None, :]).to(tl.int64)
        tl.store(data_ptr + poffs, p.to(tl.uint8), mask=mask3)
    tl.store(scale_ptr + out, byte.to(tl.uint8), mask=mask2)
    if WRITE_DEQ:
        deq = _dequant_m(m, code, sb[:, :, None])
        doffs = (rows[:, None, None].to(tl.int64) * K
                 + (grp[None, :, None] * 16 + j[None, None, :]).to(tl.int64))
        tl.store(deq_ptr + doffs, deq.to(deq_ptr.dtype.element_ty), mask=mask3)
    if WRITE_T:
        # Transpose [K, M]: row k = 16 * g + jj, block mb = m // 16, nibble m % 16.
        i = tl.arange(0, 16)
        c4 = tl.reshape(code, [BM // 16, 16, G, 16])  # [mb, i, g, jj]
        wt = tl.sum(c4.to(tl.int64) << (4 * i[None, :, None, None]).to(tl.int64), axis=1)  # [mb, g, jj]
        mbs = tl.program_id(0) * (BM // 16) + tl.arange(0, BM // 16)
        kk = grp[None, :, None] * 16 + j[None, None, :]  # [1, G, 16]
        toffs = kk.to(tl.int64) * (M // 16) + mbs[:, None, None]
        tmask = (mbs[:, None, None] < M // 16) & (grp[None, :, None] < nb)
        tl.store(datat_ptr + toffs, wt, mask=tmask)
        bt = tl.max(tl.reshape(byte, [BM // 16, 16, G]), axis=1)  # one byte per tile
        tl.store(scalet_ptr + toffs, tl.broadcast_to(bt[:, :, None], [BM // 16, G, 16]).to(tl.uint8),
                 mask=tmask)


@triton.jit
def dequant_rows_kernel(data_ptr, scale_ptr, deq_ptr, M, K, BM: tl.constexpr, G: tl.constexpr):
    """Packed NVFP4 (int64 words + E4M3 bytes, [M, K/16]) -> e2m1 * s_b in deq's dtype, [M, K]."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    grp = tl.program_id(1) * G + tl.arange(0, G)
    j = tl.arange(0, 16)
    nb = K // 16
    mask2 = (rows[:, None] < M) & (grp[None, :] < nb)
    out = rows[:, None].to(tl.int64) * nb + grp[None, :]
    word = tl.load(data_ptr + out, mask=mask2, other=0)
    sb = _e4m3_decode(tl.load(scale_ptr + out, mask=mask2, other=0).to(tl.int32))
    code = ((word[:, :, None] >> (4 * j[None, None, :]).to(tl.int64)) & 15).to(tl.int32)
    deq = _dequant(code, sb[:, :, None])
    doffs = rows[:, None, None].to(tl.int64) * K + (grp[None, :, None] * 16 + j[None, None, :]).to(tl.int64)
    tl.store(deq_ptr + doffs, deq.to(deq_ptr.dtype.element_ty), mask=mask2[:, :, None])


@triton.jit
def _alpha(amax_a_ptr, amax_b_ptr, inv_a, inv_b):
    """The GEMM's FP32 factor from both tensor amaxes: (amax_a / (6 cap_a)) * (amax_b / (6 cap_b))
    (6 cap = 2688 for the recipe), each quotient computed as torch computes a CUDA tensor divided
    by a Python scalar -- a product with the FP32 reciprocal ``inv_a`` / ``inv_b`` -- so it equals
    ``formats.quantized.gemm_alpha`` on the GPU bit for bit."""
    return (tl.load(amax_a_ptr) * inv_a) * (tl.load(amax_b_ptr) * inv_b)


@triton.jit
def alpha_kernel(amax_a_ptr, amax_b_ptr, out_ptr, inv_a, inv_b):
    """out[0] = the GEMM factor (one launch instead of three tiny torch kernels)."""
    tl.store(out_ptr, _alpha(amax_a_ptr, amax_b_ptr, inv_a, inv_b))


@triton.jit
def scale_cast_kernel(acc_ptr, out_ptr, amax_a_ptr, amax_b_ptr, inv_a, inv_b, N, BLOCK: tl.constexpr):
    """out = (acc * alpha) in out's dtype (out may be acc: in place): the GEMM epilogue, alpha
    computed from the two amaxes in device memory (no host sync, no separate kernels)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    alpha = _alpha(amax_a_ptr, amax_b_ptr, inv_a, inv_b)
    v = tl.load(acc_ptr + offs, mask=m) * alpha
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def gemm_alpha_kernel(a_ptr, b_ptr, c_ptr, alpha_ptr, M, N, K,
                      stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """C = alpha * (A @ B^T), A [M, K] and B [N, K] in BF16, FP32 accumulation, alpha (FP32) read
    from device memory and applied once before the single rounding to C's dtype (no host sync)."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_p = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    b_p = b_ptr + rn[None, :].to(tl.int64) * stride_bn + rk[:, None] * stride_bk
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        kmask = rk < K - k * BK
        a = tl.load(a_p, mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        b = tl.load(b_p, mask=(rn[None, :] < N) & kmask[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
        a_p += BK * stride_ak
        b_p += BK * stride_bk
    acc = acc * tl.load(alpha_ptr)
    c_p = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :] * stride_cn
    tl.store(c_p, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))
