"""E2M1 (FP4) elements: encode with round-to-nearest-even or stochastic rounding, decode, pack.

E2M1 codes 0..7 are the magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}; bit 3 is the sign. Encoding
saturates (|y| > 6 gives +-6). Two codes share a byte, element 2j in the low nibble.

Everything here works on already-scaled FP32 values; block scales live in ``nvfp4``/``mxfp4``.
"""

from __future__ import annotations

import functools

import torch

#: The eight E2M1 magnitudes, indexed by code (the sign is bit 3).
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
SIGN_BIT = 8

# Round-to-nearest-even as a count of thresholds passed. Between two neighbours the midpoint goes
# to the even code: the odd codes (0.5, 1.5, 3, 6) take their midpoints from neither side, so
# their lower threshold is strict-greater and the even codes' is greater-or-equal.
#   code:        1      2      3      4      5      6     7
#   threshold: >0.25  >=0.75 >1.25  >=1.75 >2.5   >=3.5  >5
_RNE_STRICT = (0.25, 1.25, 2.5, 5.0)   # a tie here stays below (the code below is even)
_RNE_INCLUSIVE = (0.75, 1.75, 3.5)     # a tie here goes up (the code above is even)


@functools.lru_cache(maxsize=None)
def _decode_table(device: torch.device) -> torch.Tensor:
    # Built once per device: a table copied from host memory on each call stops the host until
    # the GPU has caught up (on every dequantize of a training step).
    with torch.inference_mode(False):  # a normal tensor even when first built under inference mode
        mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
        return torch.cat([mags, -mags])


def _lookup(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    # index_select, not table[codes]: advanced indexing is ~300x slower on CPU here.
    return table.index_select(0, codes.reshape(-1).long()).view(codes.shape)


def _sign_bits(y: torch.Tensor) -> torch.Tensor:
    # Strictly negative values keep their sign even when they round to zero (code 8); -0.0 is
    # not < 0 and encodes as code 0, as the reference and the hardware conversion agree.
    return (y < 0).to(torch.uint8) * SIGN_BIT


def encode_rne(y: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15) of FP32 values ``y``, round-to-nearest-even, saturating at 6.

    ``y`` must be free of NaN (callers validate their input); +-inf saturates to +-6.
    """
    a = y.abs()
    code = torch.zeros(y.shape, dtype=torch.uint8, device=y.device)
    for t in _RNE_STRICT:
        code += a > t
    for t in _RNE_INCLUSIVE:
        code += a >= t
    return code | _sign_bits(y)


def _floor_code(a: torch.Tensor) -> torch.Tensor:
    """Code of the largest E2M1 magnitude <= a (a >= 0, saturating at 7)."""
    code = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for t in E2M1_MAGNITUDES[1:]:
        code += a >= t
    return code


def random_bits(shape, *, generator: torch.Generator | None, device) -> torch.Tensor:
    """8 random bits per element, the resolution of Blackwell's ``cvt.rs`` stochastic rounding."""
    return torch.randint(0, 256, shape, generator=generator, device=device, dtype=torch.int16)


def encode_stochastic(y: torch.Tensor, rand8: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of ``y`` with stochastic rounding driven by 8-bit random integers ``rand8``.

    Between the neighbouring magnitudes lo <= |y| < hi the value rounds up with probability
    (|y| - lo) / (hi - lo), decided as ``u < p`` with u = rand8 / 256; representable values never
    move, and |y| >= 6 saturates to 6. The expectation of the decoded value is |y| up to the 2^-8
    resolution of u (exactly unbiased where p is a multiple of 1/256).
    """
    if rand8.shape != y.shape:
        raise ValueError(f"random bits of shape {tuple(rand8.shape)} do not match values {tuple(y.shape)}")
    a = y.abs()
    lo_code = _floor_code(a)
    table = _decode_table(y.device)
    lo = _lookup(table, lo_code)
    top = lo_code >= 7
    hi = _lookup(table, lo_code + (~top).to(torch.uint8))
    spacing = torch.where(top, torch.ones_like(hi), hi - lo)
    # (a - lo) is exact (Sterbenz) and spacing is a power of two, so p is the exact fraction.
    p = (a - lo) / spacing
    u = rand8.to(torch.float32) * (1.0 / 256.0)
    up = (u < p) & ~top
    code = lo_code + up.to(torch.uint8)
    return code | _sign_bits(y)


def decode(codes: torch.Tensor) -> torch.Tensor:
    """FP32 values of E2M1 codes (uint8, 0..15)."""
    return _lookup(_decode_table(codes.device), codes)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes [..., K] (K even) into bytes [..., K // 2]: element 2j low nibble, 2j+1 high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of E2M1 codes (last dim {codes.shape[-1]})")
    low = codes[..., 0::2]
    high = codes[..., 1::2]
    return (low | (high << 4)).to(torch.uint8)


def unpack(data: torch.Tensor) -> torch.Tensor:
    """Unpack bytes [..., K // 2] into codes [..., K] (uint8, 0..15)."""
    low = data & 0x0F
    high = data >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)
