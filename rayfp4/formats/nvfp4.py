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

import torch

from . import e2m1
from ._blocks import (
    FLT_MAX,
    block_amax,
    check_amax,
    check_input,
    check_rounding,
    check_tile,
    per_row,
    scale_rows,
)
from .blocked import blocked_size, from_blocked, to_blocked  # noqa: F401  (public API)
from .e4m3 import E4M3_MAX, to_e4m3_satfinite
from .hadamard import rht as _rht

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


@dataclass
class NVFP4Tensor:
    """A quantized [M, K] tensor.

    data:    uint8 [M, K // 2], two E2M1 codes a byte (element 2j in the low nibble)
    scale:   float8_e4m3fn [M, K // 16], block decode scales (for 16x16 tiles each row holds
             its tile's scale)
    amax:    float32 0-dim tensor amax the scales were computed from (after RHT if applied)
    shape:   (M, K)
    tile:    (1, 16) or (16, 16)
    rht:     whether the values were Hadamard-transformed along K before quantizing
    rounding: "nearest" or "stochastic"
    orig_dtype: dtype of the quantized input (the default dtype to dequantize into)
    """

    data: torch.Tensor
    scale: torch.Tensor
    amax: torch.Tensor
    shape: tuple[int, int]
    tile: tuple[int, int] = (1, 16)
    rht: bool = False
    rounding: str = "nearest"
    orig_dtype: torch.dtype = torch.float32

    @property
    def device(self) -> torch.device:
        return self.data.device

    def codes(self) -> torch.Tensor:
        """E2M1 codes (uint8 0..15) as [M, K]."""
        return e2m1.unpack(self.data)

    def tile_scales(self) -> torch.Tensor:
        """One scale per block/tile: [M // th, K // 16] (float8_e4m3fn)."""
        return self.scale[:: self.tile[0]]

    def dequantize_unscaled(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """E2M1 value x block scale, without the tensor factor: exact in BF16, FP16 and FP32.

        This is what an exact emulation of the block-scaled GEMM multiplies; the tensor factors
        of both operands are applied afterwards as one FP32 ``alpha``.
        """
        v = scale_rows(e2m1.decode(self.codes()), self.scale.to(torch.float32), BLOCK)
        return v.to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Values ``(e2m1 * s_b) * (amax / 2688)`` computed in FP32, then cast to ``dtype``."""
        v = self.dequantize_unscaled(torch.float32) * global_decode_scale(self.amax)
        return v.to(dtype)

    def transpose(self) -> "NVFP4Tensor":
        """The quantized transpose [K, M] without requantizing: only for 16x16 tiles.

        With one scale per 16x16 tile, quantizing W^T gives exactly codes(W)^T and the transposed
        tile scales, so the Dgrad GEMM reuses the Fprop weight codes (recipe section 5).
        """
        if self.tile != (16, 16):
            raise ValueError(
                f"transpose() needs 16x16 tiles (1x16 blocks of W^T are different blocks); got tile {self.tile}"
            )
        if self.rht:
            raise ValueError("transpose() of a Hadamard-transformed tensor is not the transform of the transpose")
        m, k = self.shape
        codes_t = self.codes().t().contiguous()
        tiles_t = self.tile_scales().view(torch.uint8).t().contiguous()
        scale_t = per_row(tiles_t, 16).view(torch.float8_e4m3fn)
        return NVFP4Tensor(
            data=e2m1.pack(codes_t),
            scale=scale_t,
            amax=self.amax,
            shape=(k, m),
            tile=self.tile,
            rht=False,
            rounding=self.rounding,
            orig_dtype=self.orig_dtype,
        )

    def nbytes(self) -> int:
        """Bytes held (codes + scales + amax): what saving this instead of the input costs."""
        return self.data.numel() + self.scale.numel() + 4

    def blocked_scale(self) -> torch.Tensor:
        """The scales in the 128x4 blocked layout of Blackwell GEMMs (flat)."""
        return to_blocked(self.scale)


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

    xf = x.to(torch.float32)
    if rht:
        xf = _rht(xf, rht_signs)
        if x.dtype != torch.float32:
            xf = xf.to(x.dtype).to(torch.float32)
    tensor_amax = xf.abs().amax() if amax is None else check_amax(amax, x.device, what)

    s_enc = encode_scale(tensor_amax)
    s_dec = 1.0 / s_enc
    block_enc = s_enc * torch.tensor(1.0 / 6.0, dtype=torch.float32, device=x.device)
    s_b = to_e4m3_satfinite(block_amax(xf, tile) * block_enc)
    enc_b = torch.clamp(1.0 / (s_b.to(torch.float32) * s_dec), max=FLT_MAX)

    y = scale_rows(xf, per_row(enc_b, th), tw)
    if rounding == "nearest":
        codes = e2m1.encode_rne(y)
    else:
        codes = e2m1.encode_stochastic(y, e2m1.random_bits(y.shape, generator=generator, device=y.device))

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
