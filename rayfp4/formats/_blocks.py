"""Input validation, block bookkeeping and the steps shared by the NVFP4 and MXFP4 quantizers."""

from __future__ import annotations

import torch

from . import e2m1
from .hadamard import rht as _rht

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROUNDINGS = ("nearest", "stochastic")
FLT_MAX = torch.finfo(torch.float32).max


def check_tile(tile, allowed: tuple[tuple[int, int], ...], what: str) -> tuple[int, int]:
    try:
        t = tuple(int(v) for v in tile) if not isinstance(tile, str) else None
    except (TypeError, ValueError):
        t = None
    if t not in allowed:
        raise ValueError(f"{what}: unknown tile {tile!r}; expected one of {', '.join(map(str, allowed))}")
    return t


def check_rounding(rounding, what: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"{what}: unknown rounding {rounding!r}; expected 'nearest' or 'stochastic'")
    return rounding


def check_input(x, tile: tuple[int, int], what: str, finite: bool = True) -> None:
    """A 2-D floating tensor whose dims fill whole tiles and (with ``finite``) finite values.

    Fast kernels pass ``finite=False``: they propagate NaN/Inf instead, without a host sync.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D tensor [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what}: expected float32, bfloat16 or float16 input, got {x.dtype}")
    m, k = x.shape
    th, tw = tile
    if k % tw:
        raise ValueError(
            f"{what}: K={k} of shape {tuple(x.shape)} is not a multiple of the block size {tw} "
            f"(pad K to a multiple of {tw})"
        )
    if m % th:
        raise ValueError(
            f"{what}: M={m} of shape {tuple(x.shape)} is not a multiple of {th}, needed for "
            f"{th}x{tw} tiles (pad M to a multiple of {th})"
        )
    if not finite:
        return
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        i, j = (int(v) for v in bad[0])
        raise ValueError(
            f"{what}: input of shape {tuple(x.shape)} contains {bad.shape[0]} NaN/Inf value(s), "
            f"the first at [{i}, {j}] = {x[i, j].item()}"
        )


def check_amax(amax, device, what: str) -> torch.Tensor:
    """A caller-supplied tensor amax as a 0-dim FP32 tensor, finite and non-negative."""
    a = torch.as_tensor(amax, dtype=torch.float32, device=device)
    if a.numel() != 1:
        raise ValueError(f"{what}: amax must be a scalar, got shape {tuple(a.shape)}")
    a = a.reshape(())
    if not bool(torch.isfinite(a)) or float(a) < 0:
        raise ValueError(f"{what}: amax must be finite and >= 0, got {float(a)}")
    return a


def block_amax(xf: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """Per-tile absolute maximum of FP32 [M, K] as [M // th, K // tw]."""
    m, k = xf.shape
    th, tw = tile
    return xf.abs().reshape(m // th, th, k // tw, tw).amax(dim=(1, 3))


def per_row(blocks: torch.Tensor, th: int) -> torch.Tensor:
    """Tile values [M // th, nb] as one value per row and block, [M, nb]."""
    return blocks.repeat_interleave(th, dim=0) if th > 1 else blocks


def scale_rows(xf: torch.Tensor, factors: torch.Tensor, tw: int) -> torch.Tensor:
    """Multiply each block of ``tw`` elements of FP32 [M, K] by its factor in [M, K // tw]."""
    m, k = xf.shape
    return (xf.reshape(m, k // tw, tw) * factors.unsqueeze(-1)).reshape(m, k)


def to_fp32(x: torch.Tensor, rht: bool, rht_signs: torch.Tensor | None) -> torch.Tensor:
    """x in FP32, Hadamard-transformed along K first when ``rht``; the transformed values are
    rounded back to x's dtype when that is BF16/FP16, as Transformer Engine does."""
    xf = x.to(torch.float32)
    if rht:
        xf = _rht(xf, rht_signs)
        if x.dtype != torch.float32:
            xf = xf.to(x.dtype).to(torch.float32)
    return xf


def encode(y: torch.Tensor, rounding: str, generator: torch.Generator | None) -> torch.Tensor:
    """E2M1 codes of the scaled FP32 values ``y``: RTNE, or stochastic rounding with 8 random bits
    per element drawn from ``generator``."""
    if rounding == "nearest":
        return e2m1.encode_rne(y)
    return e2m1.encode_stochastic(y, e2m1.random_bits(y.shape, generator=generator, device=y.device))
