"""Triton kernels of the MXFP4 quantizer: the device code only (host wrapper: ``triton_mxfp4``).

Every kernel reproduces :func:`rayfp4.formats.mxfp4.quantize` bit for bit (codes and UE8M0 scale
bytes; stochastic rounding given the same random bits). The E2M1 encoders, the 16x16 RHT and the
loaders are the NVFP4 kernels' own (``_triton_nvfp4_kernels``): one definition of each, already
checked against ``formats.e2m1`` and ``formats.hadamard``. What is MXFP4's:

- the block amax and the scale exponent are computed on the FP32 bits, with integer operations
  only: for non-negative floats the bit patterns order like the values, so the integer max of
  ``bits & 0x7FFFFFFF`` is max |x| exactly, and a NaN or Inf anywhere in the block gives an
  amax whose biased exponent is 255 (the GPU's float max drops NaN; the integer max cannot);
- ``e`` is ``mxfp4.scale_exponents``: from the binary exponent and mantissa of the amax (what
  ``torch.frexp`` returns), ``exp - 3`` for "floor", ``+ 1`` when the mantissa exceeds 0.75 for
  "ceil", clamped to [-127, 127] (which covers all-zero blocks and subnormal amaxes);
- the element factor ``2^-e`` (always a normal FP32 number) and the decode scale ``2^e`` (2^-127 is
  subnormal) are built from their bits, so ``x * 2^-e`` is the reference's one FP32 product.

Non-finite input: a block (or 32x32 tile) holding NaN or Inf gets the E8M0 NaN scale byte 0xFF
and all-zero codes; its BF16 operand is NaN. ``MXFP4Tensor.dequantize`` decodes that block to
NaN as well (code 0 times 2^128 = inf). Blocks without NaN/Inf are quantized as usual.

Packed codes: the row kernel writes the reference's bytes (element 2i in the low nibble of byte
i); the strided kernel writes one int64 word per 16 elements (code j in nibble j), the same
bytes on a little-endian machine, as the NVFP4 kernels do.

Stochastic rounding draws 8 bits per element from Philox keyed by ``seed``: the counter is the
index of the element's 16-element half-block in the row-major [M, K/16] grid and the bits of
element j of a half-block are byte j % 4 of Philox output j // 4 -- the NVFP4 kernels' stream.
Both kernels draw the same bits for the same logical element whatever the memory layout, and
:func:`sr_bits_kernel` writes them out so that tests can give the reference the very same bits.

Whether these are compiled or interpreted is fixed when triton is imported (TRITON_INTERPRET).
"""

import triton
import triton.language as tl

from ._triton_nvfp4_kernels import (
    _absmax16,
    _code,
    _dequant_m,
    _e2m1_rne_m,
    _e2m1_sr_m,
    _load16,
    _mx,
    _rand8,
    _rht16,
    _to_f32,
    _word32,
)

# ---------------------------------------------------------------------------- scales


@triton.jit
def _abs_bits(x):
    """Bits of |x| (FP32) as int32: exact, NaN stays NaN (biased exponent 255)."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _mx_scales(amax_bits, CEIL: tl.constexpr):
    """From the bits of block amaxes (non-negative FP32, NaN/Inf allowed):
    (the UE8M0 byte e + 127 as int32, 2^e as FP32, the element factor 2^-e as FP32, non-finite).

    A non-finite block gets the byte 255 (the E8M0 NaN) and a NaN decode scale.
    """
    biased = amax_bits >> 23
    # frexp: amax = mant * 2^exp with mant in [0.5, 1), exp = biased - 126 for a normal amax;
    # "floor": floor(log2(amax)) - 2 = exp - 3; "ceil": one more when mant > 0.75.
    e = biased - 129
    if CEIL:
        e += ((amax_bits & 0x7FFFFF) > 0x400000).to(tl.int32)
    # Zero and subnormal amaxes need no case of their own: their zero exponent field gives
    # e = -129 or -128, clamped to the -127 the reference gives them.
    e = tl.minimum(tl.maximum(e, -127), 127)
    bad = biased == 255
    byte = tl.where(bad, 255, e + 127)
    # 2^e: normal from -126 on, the subnormal 2^-127 (mantissa bit 22) below.
    sb = tl.where(e >= -126, (e + 127) << 23, 0x400000).to(tl.float32, bitcast=True)
    sb = tl.where(bad, float("nan"), sb)
    # 2^-e for e in [-127, 126] is normal; e = 127 occurs only for non-finite blocks (codes zeroed).
    inv = ((127 - tl.minimum(e, 126)) << 23).to(tl.float32, bitcast=True)
    return byte, sb, inv, bad


@triton.jit
def _tile_max(v, BM: tl.constexpr, W: tl.constexpr):
    """Per [BM, W] tensor: the max over each group of 32 rows, repeated on those rows."""
    t = tl.max(tl.reshape(v, [BM // 32, 32, W]), axis=1)
    return tl.reshape(tl.broadcast_to(t[:, None, :], [BM // 32, 32, W]), [BM, W])


@triton.jit
def _halves(v, BM: tl.constexpr, G: tl.constexpr):
    """[BM, G] per block -> [BM, 2G] per 16-element half-block (each value twice)."""
    return tl.reshape(tl.broadcast_to(v[:, :, None], [BM, G, 2]), [BM, 2 * G])


@triton.jit
def _store_deq(ptrs, v, mask):
    """Store the FP32 values e2m1 * 2^e in the pointers' dtype. BF16 takes the upper half of the
    FP32 bits: exact, as the values are exact in BF16, FP32 subnormals (e < -126) included, which
    the interpreter's FP32 -> BF16 cast gets wrong (the GPU's does not)."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        h = (v.to(tl.int32, bitcast=True) >> 16).to(tl.int16)
        tl.store(ptrs, h.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- random bits


@triton.jit
def _rand8_rows(seed, rows, hgrp, NH, BM: tl.constexpr, H: tl.constexpr):
    """8 random bits ([BM, H, 16], int32) for the elements of half-blocks ``hgrp`` of ``rows``:
    Philox at counter row * NH + half-block, byte j % 4 of output j // 4 for element j."""
    ctr = (rows[:, None].to(tl.int64) * NH + hgrp[None, :]).to(tl.uint32, bitcast=False)
    r0, r1, r2, r3 = tl.randint4x(seed, ctr)
    j = tl.arange(0, 16)
    q = j[None, None, :] // 4
    r = tl.where(q == 0, r0[:, :, None], tl.where(q == 1, r1[:, :, None],
                 tl.where(q == 2, r2[:, :, None], r3[:, :, None])))
    return ((r >> (8 * (j[None, None, :] % 4)).to(tl.uint32)) & 0xFF).to(tl.int32)


@triton.jit
def sr_bits_kernel(out_ptr, M, K, seed, BM: tl.constexpr, H: tl.constexpr):
    """The 8 random bits the quantizers draw for each element of an [M, K] tensor (int16 out,
    row-major): what ``e2m1.random_bits`` draws in the reference, for checking SR bit for bit."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    hgrp = tl.program_id(1) * H + tl.arange(0, H)
    j = tl.arange(0, 16)
    r8 = _rand8_rows(seed, rows, hgrp, K // 16, BM, H)
    mask = (rows[:, None, None] < M) & (hgrp[None, :, None] < K // 16)
    offs = rows[:, None, None].to(tl.int64) * K + (hgrp[None, :, None] * 16 + j[None, None, :]).to(tl.int64)
    tl.store(out_ptr + offs, r8.to(tl.int16), mask=mask)


# ---------------------------------------------------------------------------- row-wise


@triton.jit
def mx_quant_rows_kernel(x_ptr, data_ptr, scale_ptr, deq_ptr, M, K, stride_m, seed,
                         TILE_ROWS: tl.constexpr, CEIL: tl.constexpr, SR: tl.constexpr,
                         WRITE_DEQ: tl.constexpr, BM: tl.constexpr, G: tl.constexpr):
    """MXFP4 along a contiguous K: 1x32 blocks (TILE_ROWS=1) or 32x32 tiles (32).

    Each program takes BM rows and G blocks of 32, held as [BM, 2G, 16] half-blocks (the SR
    stream's unit). Writes the packed bytes [M, K/2] and the UE8M0 bytes [M, K/32] (for tiles,
    every row holds its tile's byte); with WRITE_DEQ also e2m1 * 2^e in deq's dtype, [M, K].
    """
    H: tl.constexpr = 2 * G
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    grp = tl.program_id(1) * G + tl.arange(0, G)
    hgrp = tl.program_id(1) * H + tl.arange(0, H)
    j = tl.arange(0, 16)
    nb = K // 32
    hmask = (rows[:, None] < M) & (hgrp[None, :] < 2 * nb)
    mask3 = hmask[:, :, None]
    offs = rows[:, None, None].to(tl.int64) * stride_m + (hgrp[None, :, None] * 16 + j[None, None, :]).to(tl.int64)
    x = _to_f32(tl.load(x_ptr + offs, mask=mask3, other=0.0))  # [BM, H, 16]

    hbits = tl.max(_abs_bits(x), axis=2)  # [BM, H]
    bits = tl.max(tl.reshape(hbits, [BM, G, 2]), axis=2)  # [BM, G]: the block amax
    if TILE_ROWS == 32:
        bits = _tile_max(bits, BM, G)
    byte, sb, inv, bad = _mx_scales(bits, CEIL)

    y = x * _halves(inv, BM, G)[:, :, None]
    if SR:
        m = _e2m1_sr_m(y, _rand8_rows(seed, rows, hgrp, K // 16, BM, H))
    else:
        m = _e2m1_rne_m(y)
    code = _code(m, y)

    lo, hi = tl.split(tl.reshape(code, [BM, H, 8, 2]))
    p = lo | (hi << 4)  # byte i of a half-block: elements 2i (low nibble) and 2i + 1
    p = tl.where(_halves(bad.to(tl.int32), BM, G)[:, :, None] != 0, 0, p)
    i8 = tl.arange(0, 8)
    poffs = rows[:, None, None].to(tl.int64) * (K // 2) + (hgrp[None, :, None] * 8 + i8[None, None, :]).to(tl.int64)
    tl.store(data_ptr + poffs, p.to(tl.uint8), mask=mask3)
    smask = (rows[:, None] < M) & (grp[None, :] < nb)
    tl.store(scale_ptr + rows[:, None].to(tl.int64) * nb + grp[None, :], byte.to(tl.uint8), mask=smask)
    if WRITE_DEQ:
        deq = _dequant_m(m, code, _halves(sb, BM, G)[:, :, None])
        doffs = rows[:, None, None].to(tl.int64) * K + (hgrp[None, :, None] * 16 + j[None, None, :]).to(tl.int64)
        _store_deq(deq_ptr + doffs, deq, mask3)


# ---------------------------------------------------------------------------- strided K
#
# As the NVFP4 column-wise kernel: 32 separate [BM, G] tensors, x_j holding element j of every
# block of the tile, each one strided load (coalesced along M when K is the physical row index,
# a transposed view). The RHT works on each 16-element half elementwise.


@triton.jit
def _code_h(x, inv, sb, r0, r1, r2, r3, deq_ptr, doffs, mask, j: tl.constexpr, SR: tl.constexpr,
            WRITE_DEQ: tl.constexpr):
    """Code of element j of each half-block, shifted into nibble j % 8 of an int32 half-word;
    with WRITE_DEQ also stores its e2m1 * 2^e at deq_ptr + doffs."""
    y = x * inv
    if SR:
        m = _e2m1_sr_m(y, _rand8(r0, r1, r2, r3, j))
    else:
        m = _e2m1_rne_m(y)
    c = _code(m, y)
    if WRITE_DEQ:
        _store_deq(deq_ptr + doffs, _dequant_m(m, c, sb), mask)
    return c << (4 * (j % 8))


@triton.jit
def _halfword(x0, x1, x2, x3, x4, x5, x6, x7, inv, sb, r0, r1, r2, r3, deq_ptr, d, sd, mask,
              J: tl.constexpr, SR: tl.constexpr, WRITE_DEQ: tl.constexpr):
    """Codes of 8 consecutive elements (J .. J + 7 of their half-block) in one int32."""
    w = (_code_h(x0, inv, sb, r0, r1, r2, r3, deq_ptr, d + 0 * sd, mask, J + 0, SR, WRITE_DEQ)
         | _code_h(x1, inv, sb, r0, r1, r2, r3, deq_ptr, d + 1 * sd, mask, J + 1, SR, WRITE_DEQ))
    w |= (_code_h(x2, inv, sb, r0, r1, r2, r3, deq_ptr, d + 2 * sd, mask, J + 2, SR, WRITE_DEQ)
          | _code_h(x3, inv, sb, r0, r1, r2, r3, deq_ptr, d + 3 * sd, mask, J + 3, SR, WRITE_DEQ))
    w |= (_code_h(x4, inv, sb, r0, r1, r2, r3, deq_ptr, d + 4 * sd, mask, J + 4, SR, WRITE_DEQ)
          | _code_h(x5, inv, sb, r0, r1, r2, r3, deq_ptr, d + 5 * sd, mask, J + 5, SR, WRITE_DEQ))
    w |= (_code_h(x6, inv, sb, r0, r1, r2, r3, deq_ptr, d + 6 * sd, mask, J + 6, SR, WRITE_DEQ)
          | _code_h(x7, inv, sb, r0, r1, r2, r3, deq_ptr, d + 7 * sd, mask, J + 7, SR, WRITE_DEQ))
    return w


@triton.jit
def mx_quant_groups_kernel(x_ptr, data_ptr, scale_ptr, deq_ptr, M, K, stride_m, stride_k,
                           stride_dm, stride_dk, seed,
                           TILE_ROWS: tl.constexpr, CEIL: tl.constexpr, RHT: tl.constexpr,
                           SIGNS: tl.constexpr, ROUND: tl.constexpr, SR: tl.constexpr,
                           WRITE_DEQ: tl.constexpr, BM: tl.constexpr, G: tl.constexpr):
    """MXFP4 of a strided [M, K] view along K (1x32 blocks or 32x32 tiles, the 16x16 RHT first
    when RHT is set): int64 words [M, K/16] and UE8M0 bytes [M, K/32], row-major. A transposed
    view (K the physical row index) is read with coalesced loads; its transpose is never written.

    With WRITE_DEQ, e2m1 * 2^e goes to deq_ptr, element (m, k) at m * stride_dm + k * stride_dk
    (given x's own strides: in x's memory order).
    """
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    grp = tl.program_id(1) * G + tl.arange(0, G)
    nb = K // 32
    mask = (rows[:, None] < M) & (grp[None, :] < nb)
    offs = rows[:, None].to(tl.int64) * stride_m + grp[None, :].to(tl.int64) * 32 * stride_k
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _load16(
        x_ptr, offs, stride_k, mask)
    x16, x17, x18, x19, x20, x21, x22, x23, x24, x25, x26, x27, x28, x29, x30, x31 = _load16(
        x_ptr, offs + 16 * stride_k, stride_k, mask)
    if RHT:
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _rht16(
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, SIGNS, ROUND)
        x16, x17, x18, x19, x20, x21, x22, x23, x24, x25, x26, x27, x28, x29, x30, x31 = _rht16(
            x16, x17, x18, x19, x20, x21, x22, x23, x24, x25, x26, x27, x28, x29, x30, x31, SIGNS, ROUND)
    a = _mx(_absmax16(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15),
            _absmax16(x16, x17, x18, x19, x20, x21, x22, x23, x24, x25, x26, x27, x28, x29, x30, x31))
    bits = _abs_bits(a)  # NaN-propagating float max: a NaN of either sign has exponent 255
    if TILE_ROWS == 32:
        bits = _tile_max(bits, BM, G)
    byte, sb, inv, bad = _mx_scales(bits, CEIL)

    ctr = rows[:, None].to(tl.int64) * (K // 16) + grp[None, :] * 2  # the first half-block's
    if SR:
        r0, r1, r2, r3 = tl.randint4x(seed, ctr.to(tl.uint32, bitcast=False))
        s0, s1, s2, s3 = tl.randint4x(seed, (ctr + 1).to(tl.uint32, bitcast=False))
    else:
        r0 = 0
        r1 = 0
        r2 = 0
        r3 = 0
        s0 = 0
        s1 = 0
        s2 = 0
        s3 = 0
    sd = stride_dk
    d = rows[:, None].to(tl.int64) * stride_dm + grp[None, :].to(tl.int64) * 32 * sd
    w0 = _word32(_halfword(x0, x1, x2, x3, x4, x5, x6, x7, inv, sb, r0, r1, r2, r3,
                           deq_ptr, d, sd, mask, 0, SR, WRITE_DEQ),
                 _halfword(x8, x9, x10, x11, x12, x13, x14, x15, inv, sb, r0, r1, r2, r3,
                           deq_ptr, d + 8 * sd, sd, mask, 8, SR, WRITE_DEQ))
    w1 = _word32(_halfword(x16, x17, x18, x19, x20, x21, x22, x23, inv, sb, s0, s1, s2, s3,
                           deq_ptr, d + 16 * sd, sd, mask, 0, SR, WRITE_DEQ),
                 _halfword(x24, x25, x26, x27, x28, x29, x30, x31, inv, sb, s0, s1, s2, s3,
                           deq_ptr, d + 24 * sd, sd, mask, 8, SR, WRITE_DEQ))
    w0 = tl.where(bad, 0, w0)
    w1 = tl.where(bad, 0, w1)
    tl.store(data_ptr + ctr, w0, mask=mask)
    tl.store(data_ptr + ctr + 1, w1, mask=mask)
    tl.store(scale_ptr + rows[:, None].to(tl.int64) * nb + grp[None, :], byte.to(tl.uint8), mask=mask)


# ---------------------------------------------------------------------------- dequantize


@triton.jit
def mx_dequant_rows_kernel(data_ptr, scale_ptr, deq_ptr, M, K, BM: tl.constexpr, G: tl.constexpr):
    """Packed MXFP4 (bytes [M, K/2], UE8M0 bytes [M, K/32]) -> e2m1 * 2^e in deq's dtype, [M, K]:
    ``MXFP4Tensor.dequantize_unscaled`` (the byte 255 decodes as 2^128 = inf there and here)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    grp = tl.program_id(1) * G + tl.arange(0, G)
    i = tl.arange(0, 16)
    j = tl.arange(0, 32)
    nb = K // 32
    mask2 = (rows[:, None] < M) & (grp[None, :] < nb)
    boffs = rows[:, None, None].to(tl.int64) * (K // 2) + (grp[None, :, None] * 16 + i[None, None, :]).to(tl.int64)
    b = tl.load(data_ptr + boffs, mask=mask2[:, :, None], other=0).to(tl.int32)
    code = tl.reshape(tl.join(b & 15, b >> 4), [BM, G, 32])  # element 2i: low nibble of byte i
    byte = tl.load(scale_ptr + rows[:, None].to(tl.int64) * nb + grp[None, :], mask=mask2, other=0).to(tl.int32)
    e = byte - 127
    sb = tl.where(e >= -126, (e + 127) << 23, 0x400000).to(tl.float32, bitcast=True)
    sb = tl.where(byte == 255, float("inf"), sb)
    deq = _dequant_m((code & 7).to(tl.float32), code, sb[:, :, None])
    doffs = rows[:, None, None].to(tl.int64) * K + (grp[None, :, None] * 32 + j[None, None, :]).to(tl.int64)
    _store_deq(deq_ptr + doffs, deq, mask2[:, :, None])
