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

__all__ = [
    "NVFP4Tensor",
    "quantize",
    "encode_scale",
    "global_decode_scale",
    "to_blocked",
    "from_blocked",
    "blocked_size",
]


def encode_scale(amax: torch.Tensor) -> torch.Tensor:
    """S_enc = 2688 / amax in FP32, clamped to FLT_MAX, and 1 when amax (or the result) is 0."""
    amax = amax.to(torch.float32)
    s_enc = torch.tensor(FP4_FP8_MAX, dtype=torch.float32, device=amax.device) / amax
    s_enc = torch.clamp(s_enc, max=FLT_MAX)
    return torch.where((amax == 0) | (s_enc == 0), torch.ones_like(s_enc), s_enc)


def global_decode_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 2688 in FP32: the factor that turns E2M1 x E4M3 products into values (0 for amax 0)."""
    return amax.to(torch.float32) / FP4_FP8_MAX


@dataclass(kw_only=True)
class NVFP4Tensor(QuantizedTensor):
    """A quantized [M, K] tensor (the fields of :class:`QuantizedTensor`, and):

    scale:   float8_e4m3fn [M, K // 16], block decode scales
    amax:    float32 0-dim tensor amax the scales were computed from (after RHT if applied)
    """

    block: ClassVar[int] = BLOCK

    amax: torch.Tensor
    tile: tuple[int, int] = (1, 16)

    def block_scales(self) -> torch.Tensor:
        return self.scale.to(torch.float32)

    def decode_factor(self) -> torch.Tensor:
        """amax / 2688 (:func:`global_decode_scale`)."""
        return global_decode_scale(self.amax)

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
) -> NVFP4Tensor:
    """Quantize a 2-D tensor [M, K] to NVFP4 along K.

    tile:      (1, 16) blocks or (16, 16) tiles (M must then be a multiple of 16)
    rounding:  "nearest" (RTNE) or "stochastic" (random bits from ``generator``, which must live
               on ``x``'s device; the default generator when None)
    rht:       apply the 16x16 random Hadamard transform along K first (Wgrad operands only)
    amax:      the tensor amax to use instead of measuring it (a float or 0-dim tensor; after RHT
               when ``rht`` is set). Values beyond it saturate.
    rht_signs: the RHT sign vector (16 entries of +-1); the recipe's fixed vector when None
    Raises ValueError naming the problem for a non-2-D or non-float tensor, a K (or M) that does
    not fill whole blocks, an unknown tile or rounding, NaN/Inf input, or a bad amax.
    """
    what = "nvfp4.quantize"
    tile = check_tile(tile, TILES, what)
    rounding = check_rounding(rounding, what)
    check_input(x, tile, what)
    m, k = x.shape
    th, tw = tile

    xf = to_fp32(x, rht, rht_signs)
    tensor_amax = xf.abs().amax() if amax is None else check_amax(amax, x.device, what)

    s_enc = encode_scale(tensor_amax)
    s_dec = 1.0 / s_enc
    block_enc = s_enc * torch.tensor(1.0 / 6.0, dtype=torch.float32, device=x.device)
    s_b = to_e4m3_satfinite(block_amax(xf, tile) * block_enc)
    enc_b = torch.clamp(1.0 / (s_b.to(torch.float32) * s_dec), max=FLT_MAX)

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
    )


assert E4M3_MAX * 6 == FP4_FP8_MAX
