"""MS-EDEN: unbiased NVFP4 quantization of the backward operands by stochastic rounding of the
block *scales* (Quartet II, arXiv 2601.22813), the reference semantics of rayfp4.

The recipe's backward pass makes its gradient estimate unbiased by rounding every element of dY
stochastically (SR). MS-EDEN rounds the elements to nearest instead and makes the estimate
unbiased another way: the operand is rotated by a random Hadamard transform, quantized with
round-to-nearest, and each group of ``n`` rotated elements gets one correction factor (EDEN's:
``|y|^2 / <y, q>``, so the corrected codes project onto the values exactly). The factor is folded
into the group's block scales, and only those scales are rounded stochastically, to one of their
two E4M3 neighbours. Per element that is far less noise than SR (the paper reports more than 2x
lower error). Both operands of a backward GEMM are rotated with the same random signs along their
shared K, so the rotation cancels in the product.

For an operand [M, K] quantized along K with Hadamard size n (16 or 128, K a multiple of n),
random signs s (n entries of +-1, drawn per GEMM and step) and FP32 arithmetic in this order::

    v     = butterfly_n(x * s) * r_n               r_16 = 1/4, r_128 = fp32(2^-3.5)
    amax  = max |v|                                 (or given)
    S_enc = 1536 / amax                             cap 256 (clamped to FLT_MAX; 1 for amax 0)
    S_dec = 1 / S_enc
    s_b   = e4m3_rne_satfinite(amax_b * (S_enc * k))          k = fp32(((17/16) * 0.93) / 6)
    enc_b = min(1 / (float(s_b) * S_dec), FLT_MAX), 0 where s_b = 0 (the block encodes as zeros)
    y     = v * enc_b ;  q = e2m1_rtne(y)           block amax -> 6 / 0.988 = 6.07: a slight clip
    per group g of n elements along K (sums in a pairwise tree, elements 2i and 2i+1 first):
    num_g = sum y^2 ;  den_g = sum y * e2m1(q) ;  corr_g = num_g / den_g (1 where den_g = 0)
    c_b   = float(s_b) * corr_g
    lo, hi = the E4M3 values next to c_b (lo <= c_b <= hi; both 448 above 448)
    s'_b  = hi if u_b < (c_b - lo) / (hi - lo) else lo      u_b uniform in [0, 1), one per block

The result is an ordinary :class:`NVFP4Tensor` (codes q, scales s'_b, the amax, cap 256, ``rht``
set: its values are in the rotated domain), so every NVFP4 GEMM multiplies it unchanged. The
constants are Quartet II's: the cap of 256 leaves the corrected scales room to grow (up to 1.75x),
and mapping the block amax slightly past 6 trades a little clipping, which the correction
absorbs, for finer steps everywhere else.
"""

from __future__ import annotations

import torch

from . import e2m1
from ._blocks import FLT_MAX, block_amax, check_amax, check_input, scale_rows
from .e4m3 import E4M3_MAX, to_e4m3_satfinite
from .hadamard import _butterfly
from .nvfp4 import BLOCK, NVFP4Tensor, encode_scale

#: Hadamard sizes MS-EDEN rotates by (and the size of its correction groups).
HADAMARD_SIZES = (16, 128)
#: The block-scale cap of the tensor scale: S_enc = 6 * 256 / amax.
MS_EDEN_CAP = 256.0
#: Quartet II's backward "scale override": the block amax maps to 6 / 0.988 instead of 6.
SCALE_OVERRIDE = (17.0 / 16.0) * 0.93
#: The one FP32 constant the block scales are computed with: S_enc * BLOCK_FACTOR.
BLOCK_FACTOR = float(torch.tensor(SCALE_OVERRIDE / 6.0, dtype=torch.float32))
#: The FP32 normalisation of each Hadamard size: 1 / sqrt(n), rounded once to FP32.
NORM = {n: float(torch.tensor(n ** -0.5, dtype=torch.float32)) for n in HADAMARD_SIZES}

__all__ = ["quantize", "transform", "inverse_transform", "random_signs", "check_hadamard",
           "check_signs", "HADAMARD_SIZES", "MS_EDEN_CAP"]


def check_hadamard(n, what: str) -> int:
    if n not in HADAMARD_SIZES:
        raise ValueError(f"{what}: Hadamard size must be 16 or 128, got {n!r}")
    return int(n)


def check_signs(signs: torch.Tensor, n: int, what: str, values: bool = True) -> None:
    """The shape always; the +-1 values unless ``values`` is false: a fast path passes false for
    signs on a GPU, where reading them back would stop the host for every operand."""
    if not isinstance(signs, torch.Tensor) or signs.shape != (n,):
        shape = tuple(signs.shape) if isinstance(signs, torch.Tensor) else type(signs).__name__
        raise ValueError(f"{what}: signs must be a tensor of {n} entries of +-1, got {shape}")
    if values and not bool(((signs == 1) | (signs == -1)).all()):
        raise ValueError(f"{what}: signs must be +-1")


def random_signs(n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """n random signs (FP32 +-1) from ``generator`` (on ``device``): one draw per GEMM and step,
    shared by both of its operands."""
    bits = torch.randint(0, 2, (n,), generator=generator, device=device, dtype=torch.int32)
    return (1 - 2 * bits).to(torch.float32)


def transform(x: torch.Tensor, n: int, signs: torch.Tensor) -> torch.Tensor:
    """``v = butterfly_n(x * signs) * r_n`` along the last dim of a 2-D tensor, per group of n
    elements: an orthonormal rotation (up to the FP32 rounding of r_n). FP32 out."""
    m, k = x.shape
    s = signs.to(device=x.device, dtype=torch.float32)
    v = x.to(torch.float32).reshape(m, k // n, n) * s
    return (_butterfly(v) * NORM[n]).reshape(m, k)


def inverse_transform(v: torch.Tensor, n: int, signs: torch.Tensor) -> torch.Tensor:
    """Undo :func:`transform` (up to FP32 rounding): butterfly, normalisation, then the signs."""
    m, k = v.shape
    s = signs.to(device=v.device, dtype=torch.float32)
    w = _butterfly(v.to(torch.float32).reshape(m, k // n, n)) * NORM[n]
    return (w * s).reshape(m, k)


def pairwise_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (a power of two) in a fixed pairwise tree: elements 2i and 2i+1
    first, then pairs of those, and so on; every addition rounded to FP32."""
    while t.shape[-1] > 1:
        t = t[..., 0::2] + t[..., 1::2]
    return t[..., 0]


def e4m3_neighbours(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi): the E4M3 values with lo <= c <= hi, adjacent on the E4M3 grid (equal when c is
    representable), for finite c >= 0; both 448 for c >= 448. FP32."""
    r = to_e4m3_satfinite(c)
    rv = r.to(torch.float32)
    byte = r.view(torch.uint8).to(torch.int32)
    below = (byte - 1).clamp(min=0).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    above = (byte + 1).clamp(max=0x7E).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    lo = torch.where(rv > c, below, rv)
    hi = torch.where(rv < c, above, rv)
    return lo, hi


def corrected_scales(y: torch.Tensor, codes: torch.Tensor, s_b: torch.Tensor, n: int) -> torch.Tensor:
    """c_b = s_b * num_g / den_g for the scaled values y [M, K], their RTNE codes and the block
    scales s_b [M, K // 16] (FP32): the EDEN correction of each group of n, folded into its
    blocks' scales."""
    m, k = y.shape
    q = e2m1.decode(codes)
    num = pairwise_sum((y * y).reshape(m, k // n, n))
    den = pairwise_sum((y * q).reshape(m, k // n, n))
    corr = torch.where(den == 0, torch.ones_like(num), num / den)
    return s_b * corr.repeat_interleave(n // BLOCK, dim=1)


def quantize(x: torch.Tensor, hadamard: int = 128, signs: torch.Tensor | None = None,
             generator: torch.Generator | None = None, amax=None,
             uniforms: torch.Tensor | None = None) -> NVFP4Tensor:
    """MS-EDEN quantization of a 2-D tensor [M, K] along K (module docstring).

    hadamard: 16 or 128, the rotation size and the size of the correction groups (K % n == 0)
    signs:    the rotation's n signs (FP32 +-1); drawn from ``generator`` when None. Both operands
              of a GEMM must use the same signs.
    generator: the random stream of the sign draw (when signs is None) and of the scale rounding
    amax:     the tensor amax of the *rotated* values to use instead of measuring it
    uniforms: [M, K // 16] FP32 in [0, 1), the scale rounding's draws instead of the generator's
              (for tests that compare implementations bit for bit)
    Raises ValueError naming the problem for a bad shape, dtype, size, signs or non-finite input.
    """
    what = "ms_eden.quantize"
    n = check_hadamard(hadamard, what)
    check_input(x, (1, BLOCK), what)
    m, k = x.shape
    if k % n:
        raise ValueError(f"{what}: K={k} of shape {tuple(x.shape)} is not a multiple of the Hadamard size {n}")
    if signs is None:
        signs = random_signs(n, generator, x.device)
    check_signs(signs, n, what)

    v = transform(x, n, signs)
    tensor_amax = v.abs().amax() if amax is None else check_amax(amax, x.device, what)
    s_enc = encode_scale(tensor_amax, MS_EDEN_CAP)
    s_dec = 1.0 / s_enc
    block_enc = s_enc * torch.full_like(s_enc, BLOCK_FACTOR)
    s_b = to_e4m3_satfinite(block_amax(v, (1, BLOCK)) * block_enc).to(torch.float32)
    enc_b = torch.where(s_b == 0, torch.zeros_like(s_b), torch.clamp(1.0 / (s_b * s_dec), max=FLT_MAX))
    y = scale_rows(v, enc_b, BLOCK)
    codes = e2m1.encode_rne(y)

    c = corrected_scales(y, codes, s_b, n).clamp(max=E4M3_MAX)
    lo, hi = e4m3_neighbours(c)
    p = torch.where(hi > lo, (c - lo) / (hi - lo), torch.zeros_like(c))
    if uniforms is None:
        uniforms = torch.rand(c.shape, generator=generator, device=x.device, dtype=torch.float32)
    elif uniforms.shape != c.shape:
        raise ValueError(f"{what}: uniforms of shape {tuple(uniforms.shape)}, expected {tuple(c.shape)}")
    scale = torch.where(uniforms.to(c.device) < p, hi, lo)

    return NVFP4Tensor(
        data=e2m1.pack(codes),
        scale=scale.to(torch.float8_e4m3fn),
        amax=tensor_amax.reshape(()).to(torch.float32),
        shape=(m, k),
        tile=(1, BLOCK),
        rht=True,
        rounding="ms_eden",
        orig_dtype=x.dtype,
        scale_cap=MS_EDEN_CAP,
    )
