"""Quantization telemetry: where 4 bits hurt, per layer and GEMM operand.

For each quantized operand, on the steps the policy asks for (``telemetry_every``):

- ``scale_underflow``: fraction of blocks holding nonzero values whose scale rounded to 0
  (their elements all decode to 0);
- ``saturated``: fraction of elements beyond the block's largest representable value (+-6 units),
  clipped by the quantizer;
- ``zeroed``: fraction of nonzero elements that decode to zero (code 0, or a zero block scale).

The statistics cost one extra pass over the operand and are computed only on telemetry steps.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import hadamard
from ..formats.mxfp4 import MXFP4Tensor
from ..formats.nvfp4 import encode_scale


def _per_element(q, blocks: torch.Tensor) -> torch.Tensor:
    return blocks.repeat_interleave(q.shape[1] // q.scale.shape[1], dim=1)


def _element_unit(q) -> torch.Tensor:
    """Value of one E2M1 unit per element (block scale times decode factor), FP32 [M, K]."""
    unit = q.block_scales()
    factor = q.decode_factor()
    if factor is not None:
        unit = unit * factor
    return _per_element(q, unit)


def _element_encode_scale(q) -> torch.Tensor:
    """The factor the quantizer multiplied each element by before rounding to E2M1, as it did."""
    if isinstance(q, MXFP4Tensor):
        enc = torch.ldexp(torch.ones_like(q.scale, dtype=torch.float32), -q.scale_exponents())
    else:
        s_dec = 1.0 / encode_scale(q.amax)
        enc = torch.clamp(1.0 / (q.scale.to(torch.float32) * s_dec), max=torch.finfo(torch.float32).max)
    return _per_element(q, enc)


@torch.no_grad()
def operand_stats(src: torch.Tensor, q) -> dict[str, float]:
    """Telemetry of quantized ``q`` against the 2-D tensor it was quantized from."""
    x = src.to(torch.float32)
    if q.rht:
        x = hadamard.rht(x)
        if src.dtype != torch.float32:
            x = x.to(src.dtype).to(torch.float32)
    if x.shape[0] != q.shape[0]:  # tokens padded to whole tiles for the Wgrad operands
        x = torch.nn.functional.pad(x, (0, 0, 0, q.shape[0] - x.shape[0]))
    m, k = q.shape
    block = k // q.scale.shape[1]
    codes = q.codes()
    nonzero = x != 0
    unit = _element_unit(q)
    blocks_nonzero = nonzero.reshape(m, k // block, block).any(-1)
    scale_zero = q.scale.view(torch.uint8) == 0 if not isinstance(q, MXFP4Tensor) else torch.zeros_like(blocks_nonzero)
    n_blocks = max(int(blocks_nonzero.sum()), 1)
    n_nonzero = max(int(nonzero.sum()), 1)
    return {
        "scale_underflow": float((scale_zero & blocks_nonzero).sum()) / n_blocks,
        "saturated": float(((x.abs() * _element_encode_scale(q) > 6) & (unit > 0)).sum()) / x.numel(),
        "zeroed": float((((codes & 7) == 0) | (unit == 0))[nonzero].sum()) / n_nonzero,
    }


def collect_telemetry(model: nn.Module, reset: bool = True) -> dict[str, float]:
    """``{"<layer>/<gemm>.<operand>/<metric>": value}`` recorded since the last collection."""
    out: dict[str, float] = {}
    for name, mod in model.named_modules():
        tele = getattr(mod, "telemetry", None)
        if not isinstance(tele, dict):
            continue
        for operand, stats in tele.items():
            for metric, v in stats.items():
                out[f"{name}/{operand}/{metric}"] = v
        if reset:
            tele.clear()
    return out
