"""NVFP4 quantization: bit-exact against an independent implementation, and every edge case."""

import math

import numpy as np
import pytest
import torch

import independent_nvfp4 as ind
from rayfp4.formats import hadamard, nvfp4

FLT_MAX = torch.finfo(torch.float32).max


def random_matrix(m, k, dtype, gen, outliers=True, spread=40):
    """Gaussian rows whose magnitudes span ~2^-spread .. 2^spread across blocks, rare outliers."""
    x = torch.randn(m, k, generator=gen)
    block_exp = torch.randint(-spread, spread, (m, k // 16), generator=gen).float()
    x = x * torch.exp2(block_exp).repeat_interleave(16, dim=1)
    if outliers:
        mask = torch.rand(m, k, generator=gen) < 0.003
        x = torch.where(mask, x * 1e3, x)
    return x.to(dtype)


def assert_matches_independent(x, tile=(1, 16), rht=False, amax=None):
    t = nvfp4.quantize(x, tile=tile, rht=rht, amax=amax)
    codes, scales, t_amax = ind.quantize(
        x.float().numpy(), tile=tile, rht=rht, amax=amax, input_is_bf16=x.dtype == torch.bfloat16
    )
    assert t.amax.item() == float(t_amax)
    got_scales = t.scale.float().numpy().astype(np.float64)
    bad = np.nonzero(got_scales != scales)
    assert bad[0].size == 0, f"{bad[0].size} scales differ, first at {bad[0][0], bad[1][0]}"
    got_codes = t.codes().numpy()
    bad = np.nonzero(got_codes != codes)
    assert bad[0].size == 0, f"{bad[0].size} codes differ, first at {bad[0][0], bad[1][0]}"


@pytest.fixture
def gen():
    # Fresh random inputs each run; the seed is printed on failure through the parameter id.
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
@pytest.mark.parametrize("rht", [False, True])
def test_bit_exact_against_independent_implementation(dtype, tile, rht, gen):
    for scale in (1e-30, 1e-6, 1.0, 1e6, 1e30):
        x = random_matrix(48, 256, torch.float32, gen) 
        x = (x / x.abs().max() * scale).to(dtype)
        assert_matches_independent(x, tile=tile, rht=rht)
    # Uniform and heavy-tailed inputs without the block-magnitude spread.
    for x in (torch.rand(32, 128, generator=gen) * 2 - 1, torch.randn(32, 128, generator=gen) ** 5):
        assert_matches_independent(x.to(dtype), tile=tile, rht=rht)


def test_bit_exact_with_caller_amax(gen):
    x = torch.randn(32, 64, generator=gen)
    true_amax = x.abs().max().item()
    for amax in (true_amax, true_amax * 3.7, true_amax / 5.0):  # the last one saturates blocks
        assert_matches_independent(x, amax=amax)
    t = nvfp4.quantize(x, amax=true_amax / 5.0)
    assert (t.codes() & 7).eq(7).sum() > 0  # saturated at +-6


# Pairs (tensor amax, block amax) where e4m3(amax_b * (S_enc * (1/6))) differs from the wrong
# order e4m3((amax_b / 6) * S_enc); found by a random search over 2e7 blocks and kept.
SCALE_ORDER_CASES = [
    ("0x1.f3d616p-18", "0x1.532cb2p-18", 320.0, 288.0),
    ("0x1.f3d616p-18", "0x1.e1fc26p-18", 448.0, 416.0),
    ("0x1.a0186ap+11", "0x1.55cae6p+9", 96.0, 88.0),
    ("0x1.b62828p+17", "0x1.67ea1ep+13", 24.0, 22.0),
    ("0x1.2339e8p+20", "0x1.8b3c4cp+19", 320.0, 288.0),
    ("0x1.791c38p+11", "0x1.6ba45ap+10", 224.0, 208.0),
]


@pytest.mark.parametrize("amax,amax_b,right,wrong", SCALE_ORDER_CASES)
def test_scale_chain_order(amax, amax_b, right, wrong):
    amax, amax_b = float.fromhex(amax), float.fromhex(amax_b)
    x = torch.zeros(2, 16)
    x[0, 3] = amax
    x[1, 5] = -amax_b
    t = nvfp4.quantize(x)
    assert t.scale[0, 0].float().item() == 448.0
    assert t.scale[1, 0].float().item() == right
    # The wrong order really disagrees on this input (so the test can tell the two apart).
    s_enc = np.float32(2688.0) / np.float32(amax)
    wrong_scale = ind.e4m3_rne_satfinite(np.float32(np.float32(amax_b) / np.float32(6.0)) * s_enc)
    assert float(wrong_scale) == wrong != right


def test_e4m3_conversion_matches_independent_rounding(gen):
    # All E4M3 midpoints and neighbours, the subnormal range and the saturation edge.
    vals = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (vals[1:] + vals[:-1]) / 2
    probes = torch.cat([vals, mids, torch.nextafter(mids, torch.zeros_like(mids)),
                        torch.nextafter(mids, torch.full_like(mids, 1e9)),
                        torch.tensor([448.0, 450.0, 463.9, 464.0, 500.0, 1e30, 2.0**-10, 2.0**-9,
                                      2.0**-9 * 1.5, 2.0**-10 * 1.0001]),
                        torch.rand(10000, generator=gen) * 500,
                        torch.exp2(torch.rand(10000, generator=gen) * 30 - 20)])
    from rayfp4.formats.e4m3 import to_e4m3_satfinite
    got = to_e4m3_satfinite(probes).float().numpy().astype(np.float64)
    want = ind.e4m3_rne_satfinite(probes.numpy())
    assert np.array_equal(got, want)


def test_block_scale_underflow_to_zero_and_subnormal_scales():
    # Tensor amax 1e6 makes S_enc tiny: a block with amax 1e-6 gets scale 0, so enc_b = FLT_MAX
    # and its nonzero elements encode as +-6 but decode to 0; a block near 2^-9 relative scale
    # gets an E4M3 subnormal.
    x = torch.zeros(3, 16)
    x[0, 0] = 1e6
    x[1, :4] = torch.tensor([1e-6, -2e-6, 0.0, -0.0])
    x[2, 0] = 1e6 * 3 * 2.0**-9 / 448  # amax_b * S_enc / 6 = 3 * 2^-9: a subnormal E4M3 scale
    t = nvfp4.quantize(x)
    assert t.scale[1, 0].float().item() == 0.0
    assert t.codes()[1, :4].tolist() == [7, 15, 0, 0]
    assert torch.equal(t.dequantize()[1], torch.zeros(16))
    s2 = t.scale[2, 0].float().item()
    assert 0 < s2 < 2.0**-6 and s2 == 3 * 2.0**-9
    assert t.codes()[2, 0].item() == 7  # the block's max maps to 6
    assert_matches_independent(x)


def test_all_zero_tensor():
    for dtype in (torch.float32, torch.bfloat16):
        t = nvfp4.quantize(torch.zeros(16, 32, dtype=dtype), tile=(16, 16))
        assert t.amax.item() == 0.0
        assert not t.data.any() and not t.scale.view(torch.uint8).any()
        assert not t.dequantize().any()
    # A supplied amax of 0 behaves the same (S_enc = 1).
    t = nvfp4.quantize(torch.zeros(1, 16), amax=0.0)
    assert not t.data.any()


def test_tiny_tensor_amax_clamps_s_enc():
    # amax so small that 2688 / amax overflows FP32: S_enc is clamped to FLT_MAX.
    x = torch.zeros(1, 16)
    x[0, 0] = 1e-44
    x[0, 1] = -5e-45
    assert nvfp4.encode_scale(torch.tensor(1e-44)).item() == FLT_MAX
    assert_matches_independent(x)


def test_negative_zero_and_tiny_negatives_in_blocks():
    x = torch.zeros(1, 32)
    x[0, 0] = 6.0
    x[0, 1] = -0.0
    x[0, 2] = -1e-4      # rounds to zero, keeps the sign bit
    x[0, 3] = -0.2       # below half the smallest step of this block: -0 code
    x[0, 16] = -0.0      # a block of -0.0 and zeros only
    t = nvfp4.quantize(x)
    assert t.codes()[0, :4].tolist() == [7, 0, 8, 8]
    assert t.codes()[0, 16:].tolist() == [0] * 16
    assert t.scale[0, 1].float().item() == 0.0


def test_16x16_tiles_share_scales_and_transpose_codes(gen):
    for dtype in (torch.float32, torch.bfloat16):
        w = random_matrix(64, 96, dtype, gen)
        t = nvfp4.quantize(w, tile=(16, 16))
        tiles = t.scale.view(torch.uint8).reshape(4, 16, 6)
        assert torch.equal(tiles, tiles[:, :1].expand_as(tiles))
        tt = nvfp4.quantize(w.t().contiguous(), tile=(16, 16))
        assert torch.equal(tt.codes(), t.codes().t())
        assert torch.equal(tt.data, t.transpose().data)
        assert torch.equal(tt.scale.view(torch.uint8), t.transpose().scale.view(torch.uint8))
        assert torch.equal(tt.dequantize(), t.dequantize().t())
    # With 1x16 blocks the transposed quantization is a different function.
    w = random_matrix(64, 96, torch.float32, gen)
    assert not torch.equal(nvfp4.quantize(w.t().contiguous()).codes(), nvfp4.quantize(w).codes().t())
    with pytest.raises(ValueError, match="16x16"):
        nvfp4.quantize(w).transpose()


def test_dequantize_error_bounds(gen):
    # While a block's scale is a normal E4M3 number (block amax within ~2^-14 of the tensor
    # amax), the scale is the block amax * 448 / amax up to the E4M3 rounding (relative 1/16).
    # The E2M1 step is at most 2 units of s_b * amax / 2688, so RTNE errs by at most one unit,
    # about amax_b * (1 + 1/16) / 6, and saturation of the block maximum (when the scale rounded
    # down) by at most amax_b / 16. Blocks with subnormal or zero scales lose more (see above).
    for tile in ((1, 16), (16, 16)):
        x = random_matrix(32, 128, torch.float32, gen, outliers=False, spread=4)
        t = nvfp4.quantize(x, tile=tile)
        err = (t.dequantize() - x).abs()
        th, tw = tile
        bamax = x.abs().reshape(32 // th, th, 8, tw).amax(dim=(1, 3))
        bound = bamax.repeat_interleave(th, 0).repeat_interleave(tw, 1) * (1 / 6 + 1 / 16)
        assert (err <= bound * (1 + 1e-6)).all()
    # Gaussian data: relative RMS error of NVFP4 1x16 is around 10%.
    x = torch.randn(256, 256, generator=gen)
    rel = ((nvfp4.quantize(x).dequantize() - x).norm() / x.norm()).item()
    assert 0.05 < rel < 0.15


def test_dequantize_formula_and_dtypes(gen):
    x = torch.randn(16, 64, generator=gen, dtype=torch.bfloat16)
    t = nvfp4.quantize(x)
    unscaled = t.dequantize_unscaled(torch.bfloat16)
    # E2M1 x E4M3 products are exact in BF16.
    assert torch.equal(unscaled.float(), t.dequantize_unscaled(torch.float32))
    g = t.amax / 2688.0
    assert torch.equal(t.dequantize(), t.dequantize_unscaled(torch.float32) * g)
    assert t.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert t.data.shape == (16, 32) and t.data.dtype == torch.uint8
    assert t.scale.shape == (16, 4) and t.scale.dtype == torch.float8_e4m3fn
    assert t.amax.dim() == 0 and t.amax.dtype == torch.float32
    assert t.orig_dtype == torch.bfloat16 and t.tile == (1, 16) and not t.rht


def test_rht_quantize_uses_transformed_amax_and_bf16_rounding(gen):
    x = torch.randn(32, 64, generator=gen, dtype=torch.bfloat16)
    t = nvfp4.quantize(x, rht=True)
    y = hadamard.rht(x).to(torch.bfloat16).float()
    assert t.rht and t.amax.item() == y.abs().max().item()
    assert torch.equal(t.codes(), nvfp4.quantize(y).codes())
    # Undoing the transform on the dequantized values approximates x.
    back = hadamard.inverse_rht(t.dequantize())
    assert ((back - x.float()).norm() / x.float().norm()).item() < 0.15


def test_stochastic_quantize_reproducible_and_unbiased(gen):
    x = torch.randn(16, 64, generator=gen)
    a = nvfp4.quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    b = nvfp4.quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    c = nvfp4.quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.data, b.data) and not torch.equal(a.data, c.data)
    # SR changes codes only, never scales.
    assert torch.equal(a.scale.view(torch.uint8), nvfp4.quantize(x).scale.view(torch.uint8))
    g = torch.Generator().manual_seed(5)
    n = 1000
    mean = sum(nvfp4.quantize(x, rounding="stochastic", generator=g).dequantize() for _ in range(n)) / n
    # Per element the std of one draw is at most half the local step (<= 2 units of
    # s_b * amax / 2688). SR is unbiased inside the block's range; beyond 6 units (a block
    # maximum whose scale rounded down) it saturates like RTNE, so compare with x clamped there.
    unit = nvfp4.quantize(x).scale.float().repeat_interleave(16, 1) * x.abs().max() / 2688.0
    target = torch.maximum(torch.minimum(x, 6 * unit), -6 * unit)
    assert ((mean - target).abs() <= 2 * unit * (5 / 2 / math.sqrt(n) + 1 / 256)).all()
    rne = nvfp4.quantize(x).dequantize()
    assert (mean - x).abs().mean() < (rne - x).abs().mean() / 4


@pytest.mark.parametrize(
    "kwargs,shape,dtype,match",
    [
        ({}, (4, 20), torch.float32, r"K=20 .*\(4, 20\).* multiple of the block size 16"),
        ({"tile": (16, 16)}, (8, 32), torch.float32, r"M=8 .*\(8, 32\).* multiple of 16"),
        ({}, (2, 3, 16), torch.float32, r"2-D .*\(2, 3, 16\)"),
        ({}, (16,), torch.float32, r"2-D .*\(16,\)"),
        ({"tile": (1, 32)}, (4, 32), torch.float32, r"unknown tile \(1, 32\)"),
        ({"tile": "1x16"}, (4, 32), torch.float32, r"unknown tile '1x16'"),
        ({"rounding": "down"}, (4, 32), torch.float32, r"unknown rounding 'down'"),
        ({}, (4, 32), torch.int32, r"float32, bfloat16 or float16.*int32"),
        ({"amax": -1.0}, (4, 32), torch.float32, r"amax must be finite and >= 0, got -1.0"),
        ({"amax": float("nan")}, (4, 32), torch.float32, r"amax must be finite"),
        ({"amax": [1.0, 2.0]}, (4, 32), torch.float32, r"amax must be a scalar"),
    ],
)
def test_bad_input_errors(kwargs, shape, dtype, match):
    x = torch.ones(shape, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        nvfp4.quantize(x, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_input_errors(bad):
    x = torch.ones(4, 32)
    x[2, 7] = bad
    with pytest.raises(ValueError, match=r"\(4, 32\) contains 1 NaN/Inf .* \[2, 7\]"):
        nvfp4.quantize(x)


def test_nvfp4_tensor_bytes_are_a_quarter_of_bf16():
    t = nvfp4.quantize(torch.randn(64, 256))
    assert t.nbytes() == 64 * 128 + 64 * 16 + 4
    assert t.nbytes() / (64 * 256 * 2) < 0.29
