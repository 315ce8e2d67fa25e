"""Triton MXFP4 quantization: :func:`rayfp4.formats.mxfp4.quantize` bit for bit, one pass.

MXFP4 has no tensor scale, so one pass over x does it all: block amax, UE8M0 exponent, E2M1
codes (RTNE or SR), and optionally the BF16 GEMM operand ``e2m1 * 2^e`` (``gemm_operand``).
Every argument of the reference is supported: 1x32 blocks and 32x32 tiles, both scale rules,
RTNE and stochastic rounding, the 16x16 RHT (any sign vector) and FP32/BF16/FP16 input.

Layouts follow the NVFP4 path (:mod:`.triton_nvfp4`): a K-contiguous x without RHT goes to the
row kernel; a transposed view (M contiguous) and any RHT to the strided kernel, which reads the
view in place (never materialising the transpose); other strides are copied contiguous first.

Stochastic rounding: a 63-bit Philox key is drawn from ``generator`` as for NVFP4, so the stream
differs from the reference's ``torch.randint``; :func:`sr_bits` returns the bits a key gives each
element, and with those bits the reference computes the same codes (tests/test_kernels_triton_mxfp4.py).

Non-finite input (the reference raises; raising here would cost a host sync): each 32-element
block, or 32x32 tile, holding NaN or Inf gets the E8M0 NaN scale byte 0xFF and zero codes, and
decodes to NaN (its ``gemm_operand`` too), so the error reaches the GEMM output. Unlike NVFP4,
whose tensor amax makes every block NaN, blocks without NaN/Inf keep their values: MXFP4 has no
tensor-wide quantity to carry it. ``check_finite=True`` raises like the reference instead.

Kernels run compiled on CUDA tensors, or on CPU tensors through the Triton interpreter when
TRITON_INTERPRET=1 is set before triton is first imported (as for NVFP4).
"""

from __future__ import annotations

import torch

from ..formats import mxfp4
from ..formats._blocks import check_input, check_rounding, check_tile
from ..formats.mxfp4 import MXFP4Tensor
from .triton_nvfp4 import (
    _ROUND_CODE,
    DEFAULT_SIGN_MASK,
    _cdiv,
    _layout,
    _sr_seed,
    kernel_loader,
)

#: Launch parameters (none changes a bit of the output). "rows", "rows_sr", "rows_tile": the row
#: kernel along a contiguous K (G blocks of 32 per program); "groups*": the strided kernel
#: (transposed views, the RHT). First guesses scaled from the NVFP4 kernels' tuned LAUNCH (the
#: same elements per program), not yet swept on a GPU: bench/quantize.py times them. "sr_bits":
#: the random bits alone (tests); "dequant": packed -> BF16.
LAUNCH = {
    "rows": {"BM": 16, "G": 8, "num_warps": 4},
    "rows_sr": {"BM": 16, "G": 4, "num_warps": 4},
    "rows_tile": {"BM": 32, "G": 4, "num_warps": 4},
    "groups": {"BM": 128, "G": 2, "num_warps": 4},
    "groups_sr": {"BM": 64, "G": 2, "num_warps": 4},
    "groups_rht": {"BM": 128, "G": 4, "num_warps": 8},
    "groups_rht_sr": {"BM": 64, "G": 2, "num_warps": 4},
    "groups_deq": {"BM": 64, "G": 2, "num_warps": 4},
    "sr_bits": {"BM": 16, "H": 8, "num_warps": 4},
    "dequant": {"BM": 16, "G": 8, "num_warps": 4},
}

_kernel_module = kernel_loader("_triton_mxfp4_kernels")


def _sign_mask(rht_signs, what: str) -> int:
    """The RHT sign vector as the kernels' bit mask (bit j set: sign j is -1)."""
    if rht_signs is None:
        return DEFAULT_SIGN_MASK
    s = torch.as_tensor(rht_signs).flatten().tolist()
    if len(s) != 16 or any(v not in (1, -1) for v in s):
        raise ValueError(f"{what}: RHT signs must be a vector of 16 entries of +-1, got {len(s)} entries")
    return sum(1 << j for j, v in enumerate(s) if v < 0)


def launch_rows(x, words, scale, deq, seed, tile_rows, ceil, sr, cfg=None):
    """mx_quant_rows_kernel over a K-contiguous [M, K] x into ``words`` (int64 [M, K/16], the
    packed bytes), ``scale`` (uint8 [M, K/32]) and the optional BF16 ``deq`` [M, K]."""
    if cfg is None:
        cfg = LAUNCH["rows_tile" if tile_rows == 32 else "rows_sr" if sr else "rows"]
    m, k = x.shape
    grid = (_cdiv(m, cfg["BM"]), _cdiv(k // 32, cfg["G"]))
    _kernel_module().mx_quant_rows_kernel[grid](
        x, words.view(torch.uint8), scale, deq if deq is not None else words, m, k, x.stride(0), seed,
        TILE_ROWS=tile_rows, CEIL=ceil, SR=sr, WRITE_DEQ=deq is not None, **cfg)


def launch_groups(x, words, scale, deq, seed, tile_rows, ceil, rht, sr, signs=DEFAULT_SIGN_MASK, cfg=None):
    """mx_quant_groups_kernel over a strided [M, K] view x (optional RHT); ``deq`` an [M, K] view
    (best with x's strides) for the BF16 operand, or None."""
    write_deq = deq is not None
    if cfg is None:
        key = "groups" + ("_rht" if rht else "") + ("_sr" if sr else "")
        cfg = LAUNCH["groups_deq" if key == "groups" and write_deq else key]
    m, k = x.shape
    grid = (_cdiv(m, cfg["BM"]), _cdiv(k // 32, cfg["G"]))
    _kernel_module().mx_quant_groups_kernel[grid](
        x, words, scale, deq if write_deq else words, m, k, x.stride(0), x.stride(1),
        deq.stride(0) if write_deq else 0, deq.stride(1) if write_deq else 0, seed,
        TILE_ROWS=tile_rows, CEIL=ceil, RHT=bool(rht), SIGNS=signs, ROUND=_ROUND_CODE[x.dtype], SR=sr,
        WRITE_DEQ=write_deq, **cfg)


def sr_bits(seed: int, m: int, k: int, device) -> torch.Tensor:
    """The 8 random bits (int16 [M, K], values 0..255) the quantizers use for element (i, j) of
    an [M, K] tensor under the Philox key ``seed``: the reference's ``e2m1.random_bits`` given
    these makes ``mxfp4.quantize`` produce the Triton codes."""
    if k % 16:
        raise ValueError(f"sr_bits: K={k} of shape {(m, k)} is not a multiple of 16")
    out = torch.empty(m, k, dtype=torch.int16, device=device)
    cfg = LAUNCH["sr_bits"]
    if out.numel():
        _kernel_module().sr_bits_kernel[(_cdiv(m, cfg["BM"]), _cdiv(k // 16, cfg["H"]))](out, m, k, seed, **cfg)
    return out


def quantize_mxfp4(x: torch.Tensor, tile=(1, 32), rounding: str = "nearest", rht: bool = False,
                   generator: torch.Generator | None = None, scale_rule: str = "ceil",
                   rht_signs: torch.Tensor | None = None, *, write_gemm_operand: bool = False,
                   check_finite: bool = False) -> MXFP4Tensor:
    """:func:`rayfp4.formats.mxfp4.quantize` with Triton kernels (same arguments, same result).

    x may be any 2-D view whose K or M dimension is contiguous; a transposed view (M contiguous)
    is quantized along its K without copying. ``write_gemm_operand`` also writes the BF16 operand
    ``e2m1 * 2^e`` (exact) in the same pass as the result's ``gemm_operand`` (for a transposed
    view in x's memory order, kept as a view); off by default, since the MXFP4 GEMM of the
    Triton backend decodes the packed operand itself. SR streams come from ``generator`` (a
    Philox key drawn from it) and differ from the reference's; NaN/Inf: see the module docstring.
    """
    what = "triton.quantize_mxfp4"
    tile = check_tile(tile, mxfp4.TILES, what)
    rounding = check_rounding(rounding, what)
    if scale_rule not in mxfp4.SCALE_RULES:
        raise ValueError(f"{what}: unknown scale_rule {scale_rule!r}; expected 'ceil' or 'floor'")
    check_input(x, tile, what, finite=False)  # the reference's checks but the finiteness scan
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: input of shape {tuple(x.shape)} contains NaN/Inf values")
    signs = _sign_mask(rht_signs, what) if rht else DEFAULT_SIGN_MASK

    m, k = x.shape
    dev = x.device
    in_dtype = x.dtype
    x, orient = _layout(x)
    sr = rounding == "stochastic"
    if isinstance(generator, torch.Tensor):
        raise TypeError(f"{what}: generator must be a torch.Generator; device seeds (an int64 tensor) are "
                        f"read by the NVFP4 kernels only")
    seed = _sr_seed(generator, dev) if sr else 0
    ceil = scale_rule == "ceil"

    words = torch.empty(m, k // 16, dtype=torch.int64, device=dev)
    scale = torch.empty(m, k // 32, dtype=torch.uint8, device=dev)
    deq = None
    if write_gemm_operand:
        # In x's memory order (a transposed view stays one): coalesced stores.
        phys = x.t() if orient == "cols" else x
        deq = torch.empty(phys.shape, dtype=torch.bfloat16, device=dev)
        deq = deq.t() if orient == "cols" else deq
    if x.numel():
        if orient == "rows" and not rht:
            launch_rows(x, words, scale, deq, seed, tile[0], ceil, sr)
        else:
            launch_groups(x, words, scale, deq, seed, tile[0], ceil, rht, sr, signs)
    t = MXFP4Tensor(data=words.view(torch.uint8), scale=scale, shape=(m, k), tile=tile,
                    scale_rule=scale_rule, rounding=rounding, rht=bool(rht), orig_dtype=in_dtype)
    t.gemm_operand = deq
    return t


def dequantize_unscaled(t: MXFP4Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``t.dequantize_unscaled(dtype)`` (exact: e2m1 * 2^e): the quantizer's ``gemm_operand`` if
    it wrote one in ``dtype``, else one Triton pass over the packed codes and scales."""
    if t.gemm_operand is not None and t.gemm_operand.dtype == dtype:
        return t.gemm_operand
    m, k = t.shape
    data = t.data.contiguous()
    scale = t.scale.contiguous()
    out = torch.empty(m, k, dtype=dtype, device=data.device)
    cfg = LAUNCH["dequant"]
    if out.numel():
        _kernel_module().mx_dequant_rows_kernel[(_cdiv(m, cfg["BM"]), _cdiv(k // 32, cfg["G"]))](
            data, scale, out, m, k, **cfg)
    return out
