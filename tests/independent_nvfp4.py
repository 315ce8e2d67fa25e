"""An independent implementation of the NVFP4 recipe, written from the recipe (docs/numerics.md) in numpy.

It shares no code with ``rayfp4.formats``: E4M3 rounding by binade arithmetic instead of torch's
float8 cast, E2M1 by nearest-value search with ties to the even code instead of threshold
counting, the Hadamard transform as the textbook in-place loop. ``numpy.float32`` arithmetic is
IEEE single precision, so each step rounds exactly as the recipe prescribes.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
FLT_MAX = F32(np.finfo(np.float32).max)
E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
SIGNS = np.array([1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1], dtype=np.float32)


def e4m3_rne_satfinite(v: np.ndarray) -> np.ndarray:
    """Non-negative FP32 -> nearest E4M3 value (ties to even), saturating at 448; as float64."""
    v = np.asarray(v, dtype=np.float64)
    out = np.zeros_like(v)
    nz = v > 0
    _, e = np.frexp(v[nz])                      # v = m * 2^e, m in [0.5, 1)
    binade = np.maximum(e - 1, -6)              # below 2^-6: subnormal spacing 2^-9
    quantum = np.ldexp(1.0, binade - 3)         # 3 mantissa bits
    out[nz] = np.round(v[nz] / quantum) * quantum  # exact division; np.round: half to even
    return np.minimum(out, 448.0)


def e2m1_rne(y: np.ndarray) -> np.ndarray:
    """FP32 values -> E2M1 codes by nearest grid value, ties to the even code, saturating."""
    y = np.asarray(y, dtype=np.float64)
    a = np.abs(y)
    dist = np.abs(a[..., None] - E2M1_GRID)
    best = dist.min(axis=-1, keepdims=True)
    cand = dist == best
    even = cand & (np.arange(8) % 2 == 0)
    code = np.where(even.any(-1), even.argmax(-1), cand.argmax(-1))
    code = np.where(a > 6.0, 7, code)
    return (code + 8 * (y < 0)).astype(np.uint8)


def fwht16_f32(v: np.ndarray) -> np.ndarray:
    """v @ ((1/4) diag(s) H16) for each 16-vector in the last axis, in FP32 butterfly order."""
    v = (np.asarray(v, dtype=np.float32) * SIGNS).copy()
    h = 1
    while h < 16:
        for i in range(0, 16, 2 * h):
            for j in range(i, i + h):
                a, b = v[..., j].copy(), v[..., j + h].copy()
                v[..., j] = a + b
                v[..., j + h] = a - b
        h *= 2
    return v * F32(0.25)


def bf16_round(v: np.ndarray) -> np.ndarray:
    """FP32 -> nearest BF16 (ties to even), returned as FP32, by bit manipulation."""
    bits = np.asarray(v, dtype=np.float32).view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def quantize(x: np.ndarray, tile=(1, 16), amax=None, rht=False, input_is_bf16=False):
    """Codes [M, K] (uint8) and per-row block scales [M, K/16] (float64 values) of FP32 ``x``."""
    x = np.asarray(x, dtype=np.float32)
    m, k = x.shape
    th, tw = tile
    if rht:
        x = fwht16_f32(x.reshape(m, k // 16, 16)).reshape(m, k)
        if input_is_bf16:
            x = bf16_round(x)
    with np.errstate(over="ignore", divide="ignore"):
        t_amax = F32(np.abs(x).max()) if amax is None else F32(amax)
        s_enc = F32(2688.0) / t_amax if t_amax != 0 else F32(1.0)
        s_enc = min(s_enc, FLT_MAX)
        if s_enc == 0:
            s_enc = F32(1.0)
        s_dec = F32(1.0) / s_enc
        c = F32(s_enc * F32(1.0 / 6.0))
        tiles = np.abs(x).reshape(m // th, th, k // tw, tw).max(axis=(1, 3)).astype(np.float32)
        s_b = e4m3_rne_satfinite((tiles * c).astype(np.float32))
        enc = (F32(1.0) / (s_b.astype(np.float32) * s_dec)).astype(np.float32)
        enc = np.minimum(enc, FLT_MAX).astype(np.float32)
        enc_rows = np.repeat(enc, th, axis=0)
        y = (x.reshape(m, k // tw, tw) * enc_rows[..., None]).astype(np.float32).reshape(m, k)
    return e2m1_rne(y), np.repeat(s_b, th, axis=0), t_amax
