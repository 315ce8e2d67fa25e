"""E2M1 element codec: hand-computed ties, saturation, signs, packing, stochastic rounding."""

import math

import pytest
import torch

from rayfp4.formats import e2m1

# (scaled value, expected code) worked out by hand from the E2M1 grid {0,.5,1,1.5,2,3,4,6}:
# every midpoint goes to the neighbour with the even code.
RNE_CASES = [
    (0.0, 0), (0.1, 0), (0.25, 0), (0.2500001, 1), (0.5, 1), (0.7499999, 1), (0.75, 2),
    (1.0, 2), (1.25, 2), (1.2500001, 3), (1.5, 3), (1.75, 4), (2.0, 4), (2.5, 4),
    (2.5000002, 5), (3.0, 5), (3.4999998, 5), (3.5, 6), (4.0, 6), (5.0, 6), (5.0000005, 7),
    (6.0, 7), (6.5, 7), (1e30, 7), (float("inf"), 7),
]


@pytest.mark.parametrize("value,code", RNE_CASES)
def test_rne_ties_and_saturation(value, code):
    y = torch.tensor([value, -value], dtype=torch.float32)
    got = e2m1.encode_rne(y).tolist()
    assert got[0] == code
    # Negative values keep the sign bit, also when they round to zero; -0.0 does not.
    assert got[1] == (code | 8 if value != 0.0 else 0)


def test_negative_zero_and_tiny_negatives():
    y = torch.tensor([-0.0, -1e-30, -0.25, 0.0, -torch.finfo(torch.float32).tiny])
    assert e2m1.encode_rne(y).tolist() == [0, 8, 8, 0, 8]
    assert e2m1.decode(torch.tensor([8], dtype=torch.uint8)).item() == 0.0


def test_decode_all_codes():
    codes = torch.arange(16, dtype=torch.uint8)
    mags = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert e2m1.decode(codes).tolist() == mags + [-m for m in mags]
    # Decoding then encoding is the identity on the 15 distinct values (+0 and -0 both give 0).
    back = e2m1.encode_rne(e2m1.decode(codes))
    assert back.tolist() == list(range(8)) + [0] + list(range(9, 16))


def test_pack_low_nibble_first_and_roundtrip():
    codes = torch.tensor([[1, 2, 15, 8]], dtype=torch.uint8)
    packed = e2m1.pack(codes)
    assert packed.tolist() == [[0x21, 0x8F]]
    rand = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    assert torch.equal(e2m1.unpack(e2m1.pack(rand)), rand)
    with pytest.raises(ValueError, match="odd"):
        e2m1.pack(torch.zeros(3, dtype=torch.uint8))


def test_stochastic_rounding_never_moves_representable_values():
    grid = e2m1.decode(torch.arange(16, dtype=torch.uint8)).repeat(200)
    g = torch.Generator().manual_seed(1)
    codes = e2m1.encode_stochastic(grid, e2m1.random_bits(grid.shape, generator=g, device="cpu"))
    assert torch.equal(e2m1.decode(codes), grid)
    big = torch.tensor([6.0, 7.5, 1e9, -100.0]).repeat(100)
    codes = e2m1.encode_stochastic(big, e2m1.random_bits(big.shape, generator=g, device="cpu"))
    assert torch.equal(e2m1.decode(codes).abs(), torch.full_like(big, 6.0))


def test_stochastic_rounding_unbiased_and_reproducible():
    # Values spread over every interval of the grid, both signs.
    x = torch.linspace(-5.99, 5.99, 241)
    n = 4000
    g = torch.Generator().manual_seed(1234)
    draws = torch.stack([
        e2m1.decode(e2m1.encode_stochastic(x, e2m1.random_bits(x.shape, generator=g, device="cpu")))
        for _ in range(n)
    ])
    mean = draws.mean(0)
    # Each draw is one of the two neighbours; its std is at most spacing/2 <= 1, so the mean of
    # n draws is within 5 / sqrt(n) of its expectation except with probability ~6e-7 per value.
    # The expectation itself differs from x by at most spacing * 2^-8 (8-bit random numbers).
    bound = 5.0 / math.sqrt(n) + 2.0 / 256
    assert (mean - x).abs().max().item() < bound
    # Unbiased beats round-to-nearest on the mean error over the whole sweep.
    rne = e2m1.decode(e2m1.encode_rne(x))
    assert (mean - x).abs().mean() < (rne - x).abs().mean() / 4
    # The same seed gives the same codes.
    r1 = e2m1.random_bits(x.shape, generator=torch.Generator().manual_seed(7), device="cpu")
    r2 = e2m1.random_bits(x.shape, generator=torch.Generator().manual_seed(7), device="cpu")
    assert torch.equal(e2m1.encode_stochastic(x, r1), e2m1.encode_stochastic(x, r2))
