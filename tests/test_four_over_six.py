"""Four Over Six (4/6) block-scale selection for NVFP4 (arXiv 2512.02010): the reference, its
GEMM factor, the policy switch, the linear layer, and the Triton kernels bit for bit.

Most blocks here are built with a tensor amax of 1536 = 6 * 256, so that S_enc = 1, the map-to-6
scale of a block holding 1536 is exactly 256 and the map-to-4 scale 384: the E2M1 grids are then
{0, 128, 256, 384, 512, 768, 1024, 1536} (6) and {0, 192, 384, 576, 768, 1152, 1536} (4), and each
candidate's error can be read off by hand.
"""

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from rayfp4.formats import nvfp4
from rayfp4.formats.quantized import emulated_gemm, gemm_alpha
from rayfp4.precision import NVFP4Linear, PrecisionPolicy
from rayfp4.precision.policy import PolicyError

F46 = "four_over_six"
SIX, FOUR = 256.0, 384.0  # the two candidate scales of a block holding the amax 1536


def row(*values) -> torch.Tensor:
    """One 1x16 block: ``values`` then zeros."""
    x = torch.zeros(1, 16)
    x[0, : len(values)] = torch.tensor(values)
    return x


def q46(x, **kw):
    kw.setdefault("amax", 1536.0)
    return nvfp4.quantize(x, scale_selection=F46, **kw)


def block_sse(t, x) -> torch.Tensor:
    """Squared error of ``t.dequantize()`` per 1x16 block, in FP64."""
    d = (t.dequantize().double() - x.double()).reshape(x.shape[0], -1, 16)
    return (d * d).sum(-1)


# ------------------------------------------------------------------------------- the choice


def test_near_max_values_better_at_4_pick_4():
    # 1152: at scale 256 it is 4.5 units, a tie between 1024 and 1536 (error 128); at 384, exactly 3.
    t = q46(row(1536.0, 1152.0, -1152.0))
    assert t.scale.float().item() == FOUR
    assert t.dequantize().tolist()[0][:3] == [1536.0, 1152.0, -1152.0]


def test_values_better_at_6_pick_6():
    # 1024 is 4 units at 256, but 2.67 units at 384 (-> 1152, error 128).
    t = q46(row(1536.0, 1024.0, 512.0))
    assert t.scale.float().item() == SIX
    assert t.dequantize().tolist()[0][:3] == [1536.0, 1024.0, 512.0]


@pytest.mark.parametrize("metric", ["mse", "mae"])
def test_equal_errors_keep_6(metric):
    # Both exact (768 = 3 units of 256 = 2 units of 384), and both off by 192 (1344: 5.25 -> 6 at
    # 256; 3.5 -> 4 at 384, ties to even): equal errors keep the recipe's map-to-6.
    for x in (row(1536.0, 768.0), row(1536.0, 1344.0)):
        assert q46(x, error_metric=metric).scale.float().item() == SIX


def test_mse_and_mae_can_choose_differently():
    # Errors at 6: 1280 -> 1024 (256), 1024 exact. At 4: 1280 -> 1152 (128), 1024 -> 1152 (128) twice.
    # MAE: 256 < 384 -> 6.  MSE: 65536 > 3 * 16384 -> 4.
    x = row(1536.0, 1280.0, 1024.0, 1024.0)
    assert q46(x, error_metric="mae").scale.float().item() == SIX
    assert q46(x, error_metric="mse").scale.float().item() == FOUR


def test_zeros():
    z = torch.zeros(16, 32)
    for tile in ((1, 16), (16, 16)):
        t = nvfp4.quantize(z, tile=tile, scale_selection=F46)
        assert not t.data.any() and not t.scale.float().any() and t.amax.item() == 0
        assert not t.dequantize().any()
    # a zero block inside a nonzero tensor: scale 0 either way, decodes to 0
    x = torch.cat([row(1536.0, 1152.0), torch.zeros(1, 16)], 1)
    t = q46(x)
    assert t.scale.float().tolist() == [[FOUR, 0.0]]
    assert not t.dequantize()[0, 16:].any()


def test_cap_keeps_the_map_to_4_scale_representable():
    # With the default cap 256 the block holding the amax has the scale 256 (6) or 384 (4) <= 448;
    # every scale is finite and at most 1.5 * 256.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g) * torch.exp2(torch.randint(-8, 8, (64, 1), generator=g).float())
    t = nvfp4.quantize(x, scale_selection=F46)
    assert t.scale_cap == 256.0
    s = t.scale.float()
    assert torch.isfinite(s).all() and s.max().item() <= 384.0
    assert q46(row(1536.0, 1152.0)).scale.float().item() == 384.0  # the amax block at 4: 1.5 * 256
    # With cap 448 (Transformer Engine's option) a map-to-4 scale beyond 448 saturates at 448.
    t = nvfp4.quantize(row(2688.0, 2016.0), scale_selection=F46, scale_cap=448)
    assert t.scale.float().item() <= 448.0 and t.scale_cap == 448.0
    assert t.decode_factor().item() == 1.0  # amax 2688 / (6 * 448)


def test_tiles_choose_once_per_16x16_tile():
    x = torch.zeros(32, 32)
    x[:16, :16] = torch.where(torch.arange(256).reshape(16, 16) % 3 == 0, 1152.0, 1536.0)  # better at 4
    x[:16, 16:] = torch.where(torch.arange(256).reshape(16, 16) % 3 == 0, 1024.0, 1536.0)  # better at 6
    x[16:, :16] = 1536.0 * (torch.arange(256).reshape(16, 16) % 2)  # exact both ways: keeps 6
    t = nvfp4.quantize(x, tile=(16, 16), scale_selection=F46)
    assert t.tile_scales().float().tolist() == [[FOUR, SIX], [SIX, 0.0]]
    assert torch.equal(t.scale.float(), t.tile_scales().float().repeat_interleave(16, 0))
    # the tile's error is the whole tile's: 1x16 blocks of the same rows choose alike here
    assert torch.equal(nvfp4.quantize(x, scale_selection=F46).scale.float(), t.scale.float())
    # W^T's codes are the transposed codes, as for the recipe's tiles
    tt = nvfp4.quantize(x.t().contiguous(), tile=(16, 16), scale_selection=F46)
    assert torch.equal(t.transpose().data, tt.data) and t.transpose().scale_cap == 256.0


def test_each_block_errs_no_more_than_its_map_to_6_candidate():
    """Per block (MSE), 4/6 dequantizes at least as well as max6 with the same cap (its map-to-6
    candidate), and over the tensor better than the recipe's max6 (cap 448)."""
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g) * 8).to(dtype)
        xf = x.float()
        f46 = nvfp4.quantize(x, scale_selection=F46)
        six = nvfp4.quantize(x, scale_cap=256)
        e46, e6 = block_sse(f46, xf), block_sse(six, xf)
        assert (e46 <= e6 * (1 + 1e-5)).all()
        assert (f46.scale.float() != six.scale.float()).float().mean() > 0.2  # it does choose 4 often
        assert e46.sum() < 0.95 * block_sse(nvfp4.quantize(x), xf).sum()


def test_max6_default_is_unchanged():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 64, generator=g)
    a, b = nvfp4.quantize(x), nvfp4.quantize(x, scale_selection="max6", scale_cap=448)
    assert torch.equal(a.data, b.data) and torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))
    assert a.scale_cap == 448.0 and a.scale_selection == "max6"
    assert torch.equal(a.decode_factor(), a.amax / 2688.0)


def test_stochastic_rounding_chooses_like_rtne_and_stays_unbiased():
    """SR: the scale is chosen on the RTNE candidates (independent of the random bits), then the
    elements are rounded stochastically with it, so SR stays unbiased given the scale."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 64, generator=g)
    rtne = nvfp4.quantize(x, scale_selection=F46)
    acc = torch.zeros_like(x, dtype=torch.float64)
    n = 64
    for i in range(n):
        t = nvfp4.quantize(x, scale_selection=F46, rounding="stochastic", generator=torch.Generator().manual_seed(i))
        assert torch.equal(t.scale.view(torch.uint8), rtne.scale.view(torch.uint8))
        acc += t.dequantize().double()
    unit = rtne.scale.float().repeat_interleave(16, 1) * rtne.decode_factor()  # one E2M1 unit
    # spacing <= 2 units: the mean of n draws is within ~4 sigma of x (sigma <= 1 unit / sqrt(n))
    assert ((acc / n - x.double()).abs() <= 4 * 2 * unit.double() / n**0.5 + 1e-12).all()


def test_rht_chooses_on_the_transformed_values():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 64, generator=g).to(torch.bfloat16)
    t = nvfp4.quantize(x, rht=True, scale_selection=F46)
    from rayfp4.formats._blocks import to_fp32
    xr = to_fp32(x, True, None)
    manual = nvfp4.quantize(xr, scale_selection=F46)  # the transformed values, quantized as they are
    assert torch.equal(t.data, manual.data) and torch.equal(t.scale.view(torch.uint8), manual.scale.view(torch.uint8))


def test_bad_arguments_name_the_problem():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="scale_selection"):
        nvfp4.quantize(x, scale_selection="max4")
    with pytest.raises(ValueError, match="error_metric"):
        nvfp4.quantize(x, scale_selection=F46, error_metric="l2")
    with pytest.raises(ValueError, match="scale_cap"):
        nvfp4.quantize(x, scale_selection=F46, scale_cap=300)


# ------------------------------------------------------------------------------- decode and GEMM


def test_decode_factor_and_alpha_follow_the_cap():
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(16, 64, generator=g), torch.randn(32, 64, generator=g)
    a, b = nvfp4.quantize(x, scale_selection=F46), nvfp4.quantize(w, tile=(16, 16), scale_selection=F46)
    assert torch.equal(a.decode_factor(), a.amax / 1536.0)
    v = (a.dequantize_unscaled(torch.float32) * (a.amax / 1536.0))
    assert torch.equal(a.dequantize(), v)
    assert torch.equal(gemm_alpha(a, b), (a.amax / 1536.0) * (b.amax / 1536.0))
    m6 = nvfp4.quantize(w)  # mixed with a recipe operand: each its own factor
    assert torch.equal(gemm_alpha(a, m6), (a.amax / 1536.0) * (m6.amax / 2688.0))
    # the emulated GEMM is the product of the dequantized operands
    ref = a.dequantize().double() @ m6.dequantize().double().t()
    assert torch.allclose(emulated_gemm(a, m6, torch.float32).double(), ref, rtol=1e-5, atol=1e-5)


def test_gemm_of_4over6_operands_is_at_least_as_accurate():
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(64, 256, generator=g), torch.randn(48, 256, generator=g)
    exact = x.double() @ w.double().t()

    def err(**kw):
        a, b = nvfp4.quantize(x, **kw), nvfp4.quantize(w, tile=(16, 16), **kw)
        return ((emulated_gemm(a, b, torch.float32).double() - exact).norm() / exact.norm()).item()

    e6, e46 = err(), err(scale_selection=F46)
    assert e46 <= e6, (e46, e6)


# ------------------------------------------------------------------------------- policy and layer


def test_policy_switch_and_validation():
    p = PrecisionPolicy()
    assert p.scale_selection == "max6" and all(p.selection_for(r) == "max6" for r in ("fprop.x", "wgrad.dy"))
    p = PrecisionPolicy.from_dict({"scale_selection": {"fprop.x": F46, "fprop.w": F46}, "scale_selection_metric": "mae"})
    assert p.selection_for("fprop.x") == F46 and p.selection_for("dgrad.w") == F46  # 2-D: follows fprop.w
    assert p.selection_for("dgrad.dy") == "max6"
    bad = [
        ({"format": "mxfp4", "scale_selection": F46}, "scale_selection.*format=mxfp4"),
        ({"format": "bf16", "scale_selection": {"wgrad.x": F46}}, "scale_selection.*format=bf16"),
        ({"scale_selection": {"fprop.q": F46}}, r"precision\.scale_selection: unknown operand role 'fprop\.q'"),
        ({"scale_selection": "four_over_eight"}, r"precision\.scale_selection: unknown rule"),
        ({"scale_selection": {"fprop.w": F46, "dgrad.w": "max6"}}, "scale_selection: dgrad.w is max6 but fprop.w"),
        ({"scale_selection_metric": "l2"}, r"precision\.scale_selection_metric"),
        ({"scale_selection_cap": 300}, r"precision\.scale_selection_cap"),
    ]
    for data, msg in bad:
        with pytest.raises(PolicyError, match=msg):
            PrecisionPolicy.from_dict(data)
    # with 1x16 weights Dgrad quantizes W^T itself: the two weight roles may differ
    p = PrecisionPolicy.from_dict({"weight_2d_scaling": False, "scale_selection": {"fprop.w": F46}})
    assert p.selection_for("dgrad.w") == "max6"


def test_a_run_level_selection_applies_to_the_nvfp4_variants_only():
    from rayfp4.config import ConfigError, load_config

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    variants = ("variants=[{name: b, set: {precision.format: bf16, precision.bf16_last_blocks: 0}}, "
                "{name: n}, {name: m, set: {precision.format: mxfp4}}]")
    cfg = load_config(tiny, [variants, "baseline=b", "precision.scale_selection=four_over_six",
                             "precision.scale_selection_metric=mae"])
    got = {name: (c.precision.format, c.precision.scale_selection, c.precision.scale_selection_metric)
           for name, c in cfg.variant_configs()}
    assert got == {"b": ("bf16", "max6", "mse"), "n": ("nvfp4", F46, "mae"), "m": ("mxfp4", "max6", "mse")}
    # a variant's own setting is still checked against its format
    with pytest.raises(ConfigError, match="variant m: precision: scale_selection: four_over_six .*format=mxfp4"):
        load_config(tiny, ["variants=[{name: m, set: {precision.format: mxfp4, precision.scale_selection: "
                           "four_over_six}}]", "baseline=m"])


def _layer(policy, seed=0):
    torch.manual_seed(seed)
    layer = NVFP4Linear(64, 32, policy=policy)
    layer.capture = {}
    return layer


def _run(layer, x, dy):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad


def test_linear_with_the_switch_on():
    g = torch.Generator().manual_seed(7)
    x, dy = torch.randn(32, 64, generator=g), torch.randn(32, 32, generator=g)
    off = _layer(PrecisionPolicy(backend="reference"))
    on = _layer(PrecisionPolicy(backend="reference", scale_selection=F46))
    y0, dx0, dw0 = _run(off, x, dy)
    y1, dx1, dw1 = _run(on, x, dy)
    assert all(torch.isfinite(t).all() for t in (y1, dx1, dw1))
    assert not torch.equal(y0, y1) and not torch.equal(dx0, dx1) and not torch.equal(dw0, dw1)
    for name, q in on.capture.items():
        assert q.scale_cap == 256.0 and q.scale_selection == F46, name
    for name, q in off.capture.items():
        assert q.scale_cap == 448.0 and q.scale_selection == "max6", name
    # the forward pass is the GEMM of the 4/6 operands, quantized as the formats define them
    xq = nvfp4.quantize(x, scale_selection=F46)
    wq = nvfp4.quantize(on.weight.detach(), tile=(16, 16), scale_selection=F46)
    assert torch.equal(y1, emulated_gemm(xq, wq, torch.float32) + on.bias.detach())
    # SR gradients choose the scale on the RTNE candidates
    dyq = on.capture["dgrad.dy"]
    assert dyq.rounding == "stochastic"
    assert torch.equal(dyq.scale.view(torch.uint8), nvfp4.quantize(dy, scale_selection=F46).scale.view(torch.uint8))
    # and still close to the unquantized layer
    ref = x @ on.weight.detach().t() + on.bias.detach()
    assert (y1 - ref).norm() / ref.norm() < 0.15


def test_linear_per_role():
    g = torch.Generator().manual_seed(8)
    x, dy = torch.randn(32, 64, generator=g), torch.randn(32, 32, generator=g)
    layer = _layer(PrecisionPolicy(backend="reference", scale_selection={"wgrad.dy": F46, "wgrad.x": F46},
                                   scale_selection_metric="mae"))
    _run(layer, x, dy)
    chosen = {k: q.scale_selection for k, q in layer.capture.items()}
    assert chosen == {"fprop.x": "max6", "fprop.w": "max6", "dgrad.dy": "max6", "dgrad.w": "max6",
                      "wgrad.dy": F46, "wgrad.x": F46}
    assert layer.capture["wgrad.x"].rht and layer.capture["wgrad.x"].scale_cap == 256.0


# ------------------------------------------------------------------------------- Triton kernels

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="Triton compiles for the GPU in this run (the gpu test below checks it)")


def _same(a, b):
    return (torch.equal(a.data, b.data) and torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))
            and torch.equal(a.amax, b.amax) and a.scale_cap == b.scale_cap and a.scale_selection == b.scale_selection)


def _mixed(gen, m, k, dtype):
    """Random rows with a few blocks built to prefer 4 (values at 1 and 0.75 of the block amax)."""
    x = torch.randn(m, k, generator=gen) * torch.exp2(torch.randint(-6, 6, (m, 1), generator=gen).float())
    pat = torch.where(torch.rand(16, 16, generator=gen) < 0.5, 1.0, 0.75) * torch.randn(16, 16, generator=gen).sign()
    x[:16, :16] = pat * 3
    return x.to(dtype)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_is_bit_exact_under_the_interpreter(dtype):
    pytest.importorskip("triton")
    from rayfp4.kernels import triton_nvfp4 as T

    gen = torch.Generator().manual_seed(9)
    x = _mixed(gen, 32, 64, dtype)
    for tile, metric in (((1, 16), "mse"), ((16, 16), "mse"), ((1, 16), "mae"), ((16, 16), "mae")):
        ref = nvfp4.quantize(x, tile=tile, scale_selection=F46, error_metric=metric)
        got = T.quantize_nvfp4(x, tile=tile, scale_selection=F46, error_metric=metric)
        assert _same(ref, got), (tile, metric)
        assert torch.equal(got.gemm_operand.float(), ref.dequantize_unscaled(torch.float32))
        if tile == (16, 16):
            assert _same(ref.transpose(), got.transposed)
    # max6 with the 4/6 cap: the map-to-6 candidate alone
    assert _same(nvfp4.quantize(x, scale_cap=256), T.quantize_nvfp4(x, scale_cap=256))
    # the column-wise (strided) kernel, with and without the RHT, and with cap 448
    xt = _mixed(gen, 64, 32, dtype)
    for rht, cap in ((False, None), (True, None), (True, 448)):
        ref = nvfp4.quantize(xt.t(), rht=rht, scale_selection=F46, scale_cap=cap)
        got = T.quantize_nvfp4(xt.t(), rht=rht, scale_selection=F46, scale_cap=cap, write_gemm_operand=True)
        assert _same(ref, got), (rht, cap)
        assert torch.equal(got.gemm_operand.float(), ref.dequantize_unscaled(torch.float32))
    # SR: the same scales (chosen on the RTNE candidates), codes from the kernel's own stream
    for tile in ((1, 16), (16, 16)):
        ref = nvfp4.quantize(x, tile=tile, scale_selection=F46)
        got = T.quantize_nvfp4(x, tile=tile, scale_selection=F46, rounding="stochastic",
                               generator=torch.Generator().manual_seed(1))
        assert torch.equal(ref.scale.view(torch.uint8), got.scale.view(torch.uint8))
    got = T.quantize_nvfp4(xt.t(), rht=True, scale_selection=F46, rounding="stochastic",
                           generator=torch.Generator().manual_seed(1))
    assert torch.equal(got.scale.view(torch.uint8), nvfp4.quantize(xt.t(), rht=True, scale_selection=F46).scale.view(torch.uint8))


@interpreted
def test_triton_nonfinite_input_gives_nan_scales():
    pytest.importorskip("triton")
    from rayfp4.kernels import triton_nvfp4 as T

    x = torch.randn(16, 32)
    x[3, 5] = float("nan")
    t = T.quantize_nvfp4(x, scale_selection=F46)
    assert torch.isnan(t.scale.float()).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="triton runs interpreted in this process")
def test_triton_is_bit_exact_on_the_gpu():
    """Compiled kernels (FMA contraction off for 4/6) against the reference on realistic shapes,
    and the in-kernel alpha of 4/6 and mixed operands against gemm_alpha (torch's CUDA arithmetic)."""
    pytest.importorskip("triton")
    from rayfp4.kernels import triton_nvfp4 as T

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(10)
    for dtype in (torch.bfloat16, torch.float32):
        x = _mixed(gen, 1024, 4096, dtype).to(dev)
        for tile in ((1, 16), (16, 16)):
            for metric in ("mse", "mae"):
                ref = nvfp4.quantize(x, tile=tile, scale_selection=F46, error_metric=metric)
                got = T.quantize_nvfp4(x, tile=tile, scale_selection=F46, error_metric=metric)
                assert _same(ref, got), (dtype, tile, metric)
                assert torch.equal(got.gemm_operand.float(), ref.dequantize_unscaled(torch.float32))
        xt = _mixed(gen, 4096, 1024, dtype).to(dev)
        for rht in (False, True):
            ref = nvfp4.quantize(xt.t(), rht=rht, scale_selection=F46)
            got = T.quantize_nvfp4(xt.t(), rht=rht, scale_selection=F46)
            assert _same(ref, got), (dtype, rht)
    a = T.quantize_nvfp4(torch.randn(256, 512, device=dev), scale_selection=F46)
    b6 = T.quantize_nvfp4(torch.randn(128, 512, device=dev), tile=(16, 16))
    for bb in (b6, dataclasses.replace(b6, scale_cap=256.0)):
        assert torch.equal(T.alpha(a, bb).view(torch.int32), gemm_alpha(a, bb).reshape(1).view(torch.int32))
        got = T.gemm(a, bb, torch.float32)
        want = emulated_gemm(a, bb, torch.float32)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
