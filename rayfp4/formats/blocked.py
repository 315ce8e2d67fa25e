"""The 128x4 blocked scale-factor layout that Blackwell block-scaled GEMMs read.

For a scale matrix [R, C] padded with zeros to [Rp, Cp] = [ceil(R/128)*128, ceil(C/4)*4], scale
(r, c) sits at byte offset

    ((r // 128) * (Cp // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + (c % 4)

i.e. 128x4 tiles stored one after another along C, each tile as 32 rows of 16 bytes where byte
``4 * j + c`` of row ``i`` holds the scale of row ``i + 32 * j``. The result is flat (1-D).
Works for any 1-byte scale type (E4M3 for NVFP4, UE8M0 as uint8 for MXFP4).
"""

from __future__ import annotations

import torch


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def blocked_size(rows: int, cols: int) -> int:
    """Number of bytes of the blocked layout of a [rows, cols] scale matrix."""
    return _ceil_to(rows, 128) * _ceil_to(cols, 4)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    if t.element_size() != 1:
        raise ValueError(f"scale factors must be a 1-byte dtype, got {t.dtype}")
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def to_blocked(scale: torch.Tensor) -> torch.Tensor:
    """Scale matrix [R, C] -> flat blocked layout of ``blocked_size(R, C)`` entries, same dtype."""
    if scale.dim() != 2:
        raise ValueError(f"to_blocked: expected a 2-D scale matrix, got shape {tuple(scale.shape)}")
    rows, cols = scale.shape
    rp, cp = _ceil_to(rows, 128), _ceil_to(cols, 4)
    padded = torch.zeros(rp, cp, dtype=torch.uint8, device=scale.device)
    padded[:rows, :cols] = _as_bytes(scale.contiguous())
    # (rb, r4, r32, cb, c4) -> (rb, cb, r32, r4, c4): r = rb*128 + r4*32 + r32, c = cb*4 + c4.
    tiles = padded.view(rp // 128, 4, 32, cp // 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(-1).view(scale.dtype)


def from_blocked(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`to_blocked`: flat blocked scales -> [rows, cols] (padding dropped)."""
    rp, cp = _ceil_to(rows, 128), _ceil_to(cols, 4)
    if blocked.dim() != 1 or blocked.numel() != rp * cp:
        raise ValueError(
            f"from_blocked: a [{rows}, {cols}] scale matrix has a blocked layout of {rp * cp} "
            f"entries, got shape {tuple(blocked.shape)}"
        )
    tiles = _as_bytes(blocked).view(rp // 128, cp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(rp, cp)[:rows, :cols].contiguous().view(blocked.dtype)
