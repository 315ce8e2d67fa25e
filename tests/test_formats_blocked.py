"""The 128x4 blocked scale layout read by Blackwell block-scaled GEMMs."""

import pytest
import torch

from rayfp4.formats import nvfp4
from rayfp4.formats.blocked import blocked_size, from_blocked, to_blocked


def offset(r, c, cols):
    cp = -(-cols // 4) * 4
    return ((r // 128) * (cp // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + (c % 4)


@pytest.mark.parametrize("rows,cols", [(1, 1), (128, 4), (130, 5), (37, 3), (256, 8), (300, 13), (64, 256)])
def test_layout_formula_and_roundtrip(rows, cols):
    # Distinct nonzero byte per entry (mod 255) so misplacement and padding are visible.
    vals = (torch.arange(rows * cols) % 255 + 1).to(torch.uint8).reshape(rows, cols)
    b = to_blocked(vals)
    assert b.shape == (blocked_size(rows, cols),)
    expect = torch.zeros_like(b)
    for r in range(rows):
        for c in range(cols):
            expect[offset(r, c, cols)] = vals[r, c]
    assert torch.equal(b, expect)  # also: padding is zero-filled
    assert torch.equal(from_blocked(b, rows, cols), vals)


def test_keeps_e4m3_dtype():
    t = nvfp4.quantize(torch.randn(200, 80))
    b = nvfp4.to_blocked(t.scale)
    assert b.dtype == torch.float8_e4m3fn and b.numel() == 256 * 8
    back = nvfp4.from_blocked(b, 200, 5)
    assert torch.equal(back.view(torch.uint8), t.scale.view(torch.uint8))
    assert torch.equal(t.blocked_scale().view(torch.uint8), b.view(torch.uint8))


def test_errors():
    with pytest.raises(ValueError, match="2-D"):
        to_blocked(torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1-byte"):
        to_blocked(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"\[130, 5\] scale matrix has a blocked layout of 2048"):
        from_blocked(torch.zeros(100, dtype=torch.uint8), 130, 5)
