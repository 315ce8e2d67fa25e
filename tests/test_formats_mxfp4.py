"""MXFP4: power-of-two block scales, both scale rules, never saturating by default."""

import math

import pytest
import torch

from rayfp4.formats import mxfp4


def spread_matrix(m, k, gen):
    x = torch.randn(m, k, generator=gen)
    return x * torch.exp2(torch.randint(-60, 60, (m, k // 32), generator=gen).float()).repeat_interleave(32, 1)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))


def test_ceil_rule_is_exact_and_never_saturates(gen):
    x = spread_matrix(64, 256, gen)
    # Block maxima exactly at 6 * 2^e and just above it: the boundary of the rule.
    x[0, :32] = 0
    x[0, 0] = 6.0 * 2.0**-3
    x[1, :32] = 0
    x[1, 0] = (6.0 + 2.0**-21) * 2.0**5  # the next FP32 value after 6 * 2^5
    t = mxfp4.quantize(x)
    e = t.scale_exponents()
    amax_b = x.abs().reshape(64, 8, 32).amax(-1).double()
    # The smallest e with 6 * 2^e >= amax_b (float64 check of the integer rule).
    assert (6 * torch.exp2(e.double()) >= amax_b).all()
    assert (6 * torch.exp2(e.double() - 1) < amax_b).all()
    assert e[0, 0].item() == -3 and e[1, 0].item() == 6
    y = x.reshape(64, 8, 32) * torch.exp2(-e.double()).unsqueeze(-1)
    assert y.abs().max().item() <= 6.0  # nothing beyond the largest E2M1 value
    # amax_b lies in (3 * 2^e, 6 * 2^e] and the E2M1 step is at most 2 * 2^e: error <= amax_b / 3.
    rel = (t.dequantize() - x).abs().reshape(64, 8, 32).amax(-1) / amax_b
    assert rel.max().item() <= 1 / 3


def test_floor_rule_is_ocp_and_can_saturate(gen):
    x = torch.zeros(1, 32)
    x[0, 0] = 7.5  # floor(log2 7.5) - 2 = 0: scaled 7.5 saturates to 6
    t = mxfp4.quantize(x, scale_rule="floor")
    assert t.scale_exponents()[0, 0].item() == 0 and t.dequantize()[0, 0].item() == 6.0
    t = mxfp4.quantize(x)  # ceil: e = 1, 7.5 / 2 = 3.75 -> 4 -> 8
    assert t.scale_exponents()[0, 0].item() == 1 and t.dequantize()[0, 0].item() == 8.0
    x = spread_matrix(32, 128, gen)
    e = mxfp4.quantize(x, scale_rule="floor").scale_exponents()
    amax_b = x.abs().reshape(32, 4, 32).amax(-1)
    assert torch.equal(e, (torch.floor(torch.log2(amax_b.double())) - 2).int())


def test_zero_blocks_layout_and_dtypes(gen):
    x = torch.zeros(32, 64, dtype=torch.bfloat16)
    t = mxfp4.quantize(x)
    assert t.scale.dtype == torch.uint8 and t.scale.shape == (32, 2) and t.data.shape == (32, 32)
    assert (t.scale == 0).all()  # 2^-127, the smallest UE8M0 scale
    assert not t.dequantize().any()
    w = spread_matrix(64, 64, gen)
    t2 = mxfp4.quantize(w, tile=(32, 32))
    tiles = t2.scale.reshape(2, 32, 2)
    assert torch.equal(tiles, tiles[:, :1].expand_as(tiles))
    assert torch.equal(mxfp4.quantize(w.t().contiguous(), tile=(32, 32)).codes(), t2.codes().t())


def test_decoded_values_are_exact_in_bf16(gen):
    x = torch.randn(16, 64, generator=gen) * 100
    t = mxfp4.quantize(x)
    assert torch.equal(t.dequantize(torch.bfloat16).float(), t.dequantize())


def test_stochastic_unbiased(gen):
    x = torch.randn(8, 64, generator=gen)
    n = 1000
    g = torch.Generator().manual_seed(9)
    mean = sum(mxfp4.quantize(x, rounding="stochastic", generator=g).dequantize() for _ in range(n)) / n
    unit = torch.exp2(mxfp4.quantize(x).scale_exponents().float()).repeat_interleave(32, 1)
    assert ((mean - x).abs() <= 2 * unit * (2.5 / math.sqrt(n) + 1 / 256)).all()


@pytest.mark.parametrize(
    "kwargs,shape,match",
    [({}, (4, 48), r"K=48 .* multiple of the block size 32"), ({"tile": (32, 32)}, (16, 64), r"M=16"),
     ({"scale_rule": "round"}, (4, 32), "unknown scale_rule 'round'"), ({"tile": (1, 16)}, (4, 32), "unknown tile")],
)
def test_errors(kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
        mxfp4.quantize(torch.ones(shape), **kwargs)
