"""E4M3 block scales: the FP32 -> float8_e4m3fn conversion the recipe uses (RNE, satfinite).

E4M3 (``float8_e4m3fn``) has no infinity; its largest finite value is 448 and its smallest
subnormal 2^-9. ``torch``'s cast rounds to nearest-even but turns values beyond the range into
NaN, so we clamp first: clamping to 448 before rounding equals rounding then saturating, since
every value in (448, 464) rounds to 448 anyway.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0


def to_e4m3_satfinite(v: torch.Tensor) -> torch.Tensor:
    """Round non-negative FP32 values to E4M3 (RNE), saturating at 448; subnormals and 0 kept."""
    return v.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
