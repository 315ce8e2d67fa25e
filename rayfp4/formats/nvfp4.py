"""NVFP4: E2M1 elements, an E4M3 scale per 16 elements, and an FP32 tensor amax.

The reference semantics of the project (NVFP4_RECIPE.md sections 1-5), in plain torch on any
device. Quantization is along the last dimension of a 2-D tensor [M, K] with 1x16 blocks or
16x16 tiles (one scale per tile, stored once per row so that ``scale`` is always [M, K // 16]).

The scale chain, all in FP32 and in exactly this order::

    S_enc = 2688 / amax          (clamped to FLT_MAX; 1 when amax == 0)     2688 = 6 * 448
    S_dec = 1 / S_enc
    s_b   = e4m3_rne_satfinite(amax_b * (S_enc * (1/6)))    # one product with a pre-rounded constant
    enc_b = min(1 / (float(s_b) * S_dec), FLT_MAX)
    q     = e2m1(x * enc_b)                                   # RTNE or stochastic, saturating
    x_hat = (e2m1(q) * float(s_b)) * (amax / 2688)            # the global factor rounded once

``(amax_b / 6) * S_enc`` rounds differently on some blocks and is not what hardware computes.
No lower clamp on ``s_b``: E4M3 subnormals and 0 are legal; a block whose scale is 0 encodes its
nonzero elements as +-6 (enc_b = FLT_MAX) and still decodes to 0.

With ``rht=True`` the 16x16 random Hadamard transform is applied along K first (values rounded
back to the input dtype when that is BF16/FP16, as Transformer Engine does), the amax is taken
after it, and ``dequantize`` returns values in the transformed domain.

``scale_selection="four_over_six"`` ("Four Over Six", arXiv 2512.02010) quantizes each block (or
16x16 tile) twice and keeps the candidate with the lower error (docs/numerics.md, "Four Over Six")::

    S_enc = (6 * cap) / amax                      cap = 256 (default for 4/6) or 448
    base  = amax_b * (S_enc * (1/6))              # as above
    s6    = e4m3_rne_satfinite(base)              # block amax -> 6
    s4    = e4m3_rne_satfinite(base * 1.5)        # block amax -> 4 (one more FP32 product)
    q6, q4 = e2m1_rtne(x * enc(s6)), e2m1_rtne(x * enc(s4))
    err_c = sum_j metric(e2m1(q_c) * s_c - x * S_enc)   # FP32, j = 0..15 in order; metric d*d or |d|
    pick 4 iff err_4 < err_6 (ties keep 6)
    x_hat = (e2m1(q) * s) * (amax / (6 * cap))

16x16 tiles add the 16 row errors of a tile in a fixed tree (rows r and r + 8, then r + 4, ...).
With stochastic rounding the choice is made on the RTNE candidates above, and the elements are
then rounded stochastically with the chosen scale (so SR stays unbiased given the scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import e2m1
from ._blocks import (
    FLT_MAX,
    block_amax,
    check_amax,
    check_input,
    check_rounding,
    check_tile,
    encode,
    per_row,
    scale_rows,
    to_fp32,
)
from .blocked import blocked_size, from_blocked, to_blocked  # noqa: F401  (public API)
from .e4m3 import E4M3_MAX, to_e4m3_satfinite
from .quantized import QuantizedTensor

BLOCK = 16
TILES = ((1, 16), (16, 16))
#: 6 * 448: the largest magnitude a scaled NVFP4 value can have, E2M1 max times E4M3 max.
FP4_FP8_MAX = 2688.0
#: Block-scale selection rules: the recipe's (block amax -> 6) and Four Over Six (4 or 6 per block).
SCALE_SELECTIONS = ("max6", "four_over_six")
#: Error metrics of the Four Over Six choice: sum of squared or of absolute errors over the block.
ERROR_METRICS = ("mse", "mae")
#: The caps on the block scale the tensor scale is computed for: E4M3's maximum (the recipe), or
#: 256, so that the 1.5x larger map-to-4 scale stays representable (Four Over Six's default).
SCALE_CAPS = (448.0, 256.0)
#: The 4/6 cap when none is given.
FOUR_OVER_SIX_CAP = 256.0

__all__ = [
    "NVFP4Tensor",
    "quantize",
    "check_scale_selection",
    "candidate_errors",
    "encode_scale",
    "global_decode_scale",
    "to_blocked",
    "from_blocked",
    "blocked_size",
]


def encode_scale(amax: torch.Tensor, scale_cap: float = E4M3_MAX) -> torch.Tensor:
    """S_enc = (6 * cap) / amax in FP32 (2688 / amax for the recipe's cap 448), clamped to
    FLT_MAX, and 1 when amax (or the result) is 0."""
    amax = amax.to(torch.float32)
    s_enc = torch.full_like(amax, 6.0 * scale_cap) / amax  # full_like: no copy from the host (no sync)
    s_enc = torch.clamp(s_enc, max=FLT_MAX)
    return torch.where((amax == 0) | (s_enc == 0), torch.ones_like(s_enc), s_enc)


def global_decode_scale(amax: torch.Tensor, scale_cap: float = E4M3_MAX) -> torch.Tensor:
    """amax / (6 * cap) in FP32 (amax / 2688 for the recipe's cap 448): the factor that turns
    E2M1 x E4M3 products into values (0 for amax 0)."""
    return amax.to(torch.float32) / (6.0 * scale_cap)


def check_scale_selection(scale_selection, error_metric, scale_cap, what: str) -> float:
    """Validate the block-scale selection arguments; returns the cap (448 for max6 and 256 for
    four_over_six when ``scale_cap`` is None)."""
    if scale_selection not in SCALE_SELECTIONS:
        raise ValueError(f"{what}: unknown scale_selection {scale_selection!r}; expected 'max6' or 'four_over_six'")
    if error_metric not in ERROR_METRICS:
        raise ValueError(f"{what}: unknown error_metric {error_metric!r}; expected 'mse' or 'mae'")
    if scale_cap is None:
        return FOUR_OVER_SIX_CAP if scale_selection == "four_over_six" else float(E4M3_MAX)
    try:
        cap = float(scale_cap)
    except (TypeError, ValueError):
        cap = None
    if cap not in SCALE_CAPS:
        raise ValueError(f"{what}: scale_cap must be 448 or 256, got {scale_cap!r}")
    return cap


def candidate_errors(xf: torch.Tensor, unscaled: torch.Tensor, s_enc: torch.Tensor, tile, metric: str) -> torch.Tensor:
    """The Four Over Six error of one candidate, one value per block or tile [M // th, K // 16]:
    ``d = unscaled - x * S_enc`` per element in FP32 (``unscaled`` = e2m1 * s_b, exact), ``d * d``
    (mse) or ``|d|`` (mae), summed over the 16 elements of a block in order j = 0..15, and for
    16x16 tiles the 16 row sums in a fixed tree: rows r and r + 8, then r + 4, r + 2, r + 1."""
    m, k = xf.shape
    d = unscaled - xf * s_enc
    e = (d * d if metric == "mse" else d.abs()).reshape(m, k // BLOCK, BLOCK)
    acc = e[:, :, 0]
    for j in range(1, BLOCK):
        acc = acc + e[:, :, j]
    if tile[0] == 1:
        return acc
    rows = acc.reshape(m // BLOCK, BLOCK, k // BLOCK)
    for h in (8, 4, 2, 1):
        rows = rows[:, :h] + rows[:, h:2 * h]
    return rows[:, 0]


@dataclass(kw_only=True)
class NVFP4Tensor(QuantizedTensor):
    """A quantized [M, K] tensor (the fields of :class:`QuantizedTensor`, and):

    scale:   float8_e4m3fn [M, K // 16], block decode scales
    amax:    float32 0-dim tensor amax the scales were computed from (after RHT if applied)
    scale_cap: the block-scale cap the tensor scale was computed for: 448 (the recipe) or 256
             (Four Over Six's default); the decode factor is amax / (6 * scale_cap)
    scale_selection: "max6" or "four_over_six", how the block scales were chosen (informative:
             decoding needs only the codes, the scales and the decode factor)
    """

    block: ClassVar[int] = BLOCK

    amax: torch.Tensor
    tile: tuple[int, int] = (1, 16)
    scale_cap: float = E4M3_MAX
    scale_selection: str = "max6"

    def block_scales(self) -> torch.Tensor:
        return self.scale.to(torch.float32)

    def decode_factor(self) -> torch.Tensor:
        """amax / (6 * scale_cap): amax / 2688 for the recipe (:func:`global_decode_scale`)."""
        return global_decode_scale(self.amax, self.scale_cap)

    def nbytes(self) -> int:
        return super().nbytes() + 4  # and the FP32 amax


def quantize(
    x: torch.Tensor,
    tile=(1, 16),
    rounding: str = "nearest",
    rht: bool = False,
    generator: torch.Generator | None = None,
    amax=None,
    rht_signs: torch.Tensor | None = None,
    scale_selection: str = "max6",
    error_metric: str = "mse",
    scale_cap: float | None = None,
) -> NVFP4Tensor:
    """Quantize a 2-D tensor [M, K] to NVFP4 along K.

    tile:      (1, 16) blocks or (16, 16) tiles (M must then be a multiple of 16)
    rounding:  "nearest" (RTNE) or "stochastic" (random bits from ``generator``, which must live
               on ``x``'s device; the default generator when None)
    rht:       apply the 16x16 random Hadamard transform along K first (Wgrad operands only)
    amax:      the tensor amax to use instead of measuring it (a float or 0-dim tensor; after RHT
               when ``rht`` is set). Values beyond it saturate.
    rht_signs: the RHT sign vector (16 entries of +-1); the recipe's fixed vector when None
    scale_selection: "max6" (the recipe: block amax -> 6) or "four_over_six" (per block or tile,
               the map-to-4 or map-to-6 candidate with the lower ``error_metric``)
    error_metric: "mse" or "mae", the Four Over Six error (ignored for max6)
    scale_cap: 448 or 256, the block-scale cap of the tensor scale (S_enc = 6 * cap / amax); None
               means 448 for max6 and 256 for four_over_six
    Raises ValueError naming the problem for a non-2-D or non-float tensor, a K (or M) that does
    not fill whole blocks, an unknown tile, rounding, scale selection, metric or cap, NaN/Inf
    input, or a bad amax.
    """
    what = "nvfp4.quantize"
    tile = check_tile(tile, TILES, what)
    rounding = check_rounding(rounding, what)
    cap = check_scale_selection(scale_selection, error_metric, scale_cap, what)
    check_input(x, tile, what)
    m, k = x.shape
    th, tw = tile

    xf = to_fp32(x, rht, rht_signs)
    tensor_amax = xf.abs().amax() if amax is None else check_amax(amax, x.device, what)

    s_enc = encode_scale(tensor_amax, cap)
    s_dec = 1.0 / s_enc
    block_enc = s_enc * torch.full_like(s_enc, 1.0 / 6.0)
    base = block_amax(xf, tile) * block_enc
    s_b = to_e4m3_satfinite(base)
    enc_b = torch.clamp(1.0 / (s_b.to(torch.float32) * s_dec), max=FLT_MAX)
    if scale_selection == "four_over_six":
        s_4 = to_e4m3_satfinite(base * 1.5)
        enc_4 = torch.clamp(1.0 / (s_4.to(torch.float32) * s_dec), max=FLT_MAX)
        errs = []
        for s_c, enc_c in ((s_b, enc_b), (s_4, enc_4)):
            q = e2m1.encode_rne(scale_rows(xf, per_row(enc_c, th), tw))
            unscaled = scale_rows(e2m1.decode(q), per_row(s_c.to(torch.float32), th), tw)
            errs.append(candidate_errors(xf, unscaled, s_enc, tile, error_metric))
        pick4 = errs[1] < errs[0]  # ties keep the map-to-6 candidate
        s_b = torch.where(pick4, s_4.view(torch.uint8), s_b.view(torch.uint8)).view(torch.float8_e4m3fn)
        enc_b = torch.where(pick4, enc_4, enc_b)

    codes = encode(scale_rows(xf, per_row(enc_b, th), tw), rounding, generator)

    return NVFP4Tensor(
        data=e2m1.pack(codes),
        scale=per_row(s_b.view(torch.uint8), th).view(torch.float8_e4m3fn),
        amax=tensor_amax.reshape(()).to(torch.float32),
        shape=(m, k),
        tile=tile,
        rht=bool(rht),
        rounding=rounding,
        orig_dtype=x.dtype,
        scale_cap=cap,
        scale_selection=scale_selection,
    )


assert E4M3_MAX * 6 == FP4_FP8_MAX
