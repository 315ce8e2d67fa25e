"""MS-EDEN backward quantization (Quartet II, arXiv 2601.22813): the reference in
``formats.ms_eden``, its defining properties, the Triton kernels bit for bit, the policy switch and
the linear layer's backward pass."""

import os
import warnings

import pytest
import torch

from rayfp4.formats import e2m1, hadamard, ms_eden, nvfp4
from rayfp4.formats.quantized import emulated_gemm
from rayfp4.precision import NVFP4Linear, PrecisionPolicy
from rayfp4.precision.policy import PolicyError


def _data(gen, m, k, dtype=torch.float32):
    """Rows of very different magnitudes, a few outliers, an all-zero row and a row of tiny values."""
    x = torch.randn(m, k, generator=gen) * torch.exp2(torch.randint(-8, 8, (m, 1), generator=gen).float())
    x[0, 3] = 50.0 * x[0].abs().max()
    x[1] = 0
    x[2, :16] = 1e-30  # a block far below the tensor amax: its E4M3 scale is 0
    return x.to(dtype)


def _signs(n, seed=0):
    return ms_eden.random_signs(n, torch.Generator().manual_seed(seed))


def _rel_mse(approx, x):
    return float(((approx - x.float()) ** 2).sum() / (x.float() ** 2).sum())


# ------------------------------------------------------------------------------- the rotation


@pytest.mark.parametrize("n", [16, 128])
def test_rotation_is_orthonormal_and_cancels_in_the_gemm(n):
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 256, generator=gen), torch.randn(12, 256, generator=gen)
    s = _signs(n)
    ra, rb = ms_eden.transform(a, n, s), ms_eden.transform(b, n, s)
    assert torch.allclose(ms_eden.inverse_transform(ra, n, s), a, atol=1e-5)
    assert torch.allclose(ra @ rb.t(), a @ b.t(), rtol=1e-4, atol=1e-4)
    assert torch.allclose(ra.norm(dim=1), a.norm(dim=1), rtol=1e-5)


def test_size_16_with_the_recipe_signs_is_the_recipe_rht():
    x = torch.randn(32, 64)
    s = torch.tensor(hadamard.DEFAULT_SIGNS, dtype=torch.float32)
    assert torch.equal(ms_eden.transform(x, 16, s), hadamard.rht(x))


# ------------------------------------------------------------------------ defining properties


@pytest.mark.parametrize("n", [16, 128])
def test_scales_are_the_corrected_scales_rounded_to_a_neighbour_without_bias(n):
    """Each block scale is the RTN scale times its group's EDEN factor |y|^2 / <y, q>, rounded to
    one of its two E4M3 neighbours, up with probability (c - lo) / (hi - lo)."""
    gen = torch.Generator().manual_seed(2)
    x = _data(gen, 16, 256)
    s = _signs(n)
    m, k = x.shape
    # The corrected scales, recomputed here from the definition.
    v = ms_eden.transform(x, n, s)
    s_enc = nvfp4.encode_scale(v.abs().amax(), 256.0)
    s_b = (v.abs().reshape(m, k // 16, 16).amax(-1) * (s_enc * ms_eden.BLOCK_FACTOR)).to(torch.float8_e4m3fn).float()
    enc = torch.where(s_b == 0, 0.0, 1.0 / (s_b * (1.0 / s_enc)))
    y = (v.reshape(m, k // 16, 16) * enc[..., None]).reshape(m, k)
    codes = e2m1.encode_rne(y)
    q = e2m1.decode(codes)
    c = ms_eden.corrected_scales(y, codes, s_b, n)  # the sums in the reference's pairwise order
    corr = (y * y).reshape(m, k // n, n).sum(-1) / (y * q).reshape(m, k // n, n).sum(-1)
    corr = torch.nan_to_num(corr, nan=1.0).repeat_interleave(n // 16, dim=1)
    assert torch.allclose(c, s_b * corr, rtol=1e-5, atol=0)
    assert float((c / torch.where(s_b == 0, 1.0, s_b) - 1).abs().max()) > 0.01  # the correction does something
    lo, hi = ms_eden.e4m3_neighbours(c)
    assert bool((lo <= c).all()) and bool((c <= hi).all())

    draws = 512
    total = torch.zeros_like(c)
    for i in range(draws):
        u = torch.full_like(c, (i + 0.5) / draws)
        t = ms_eden.quantize(x, n, s, uniforms=u)
        got = t.scale.float()
        assert bool(((got == lo) | (got == hi)).all())
        total += got
    # Evenly spaced draws: the mean scale is c up to one draw's share of the gap.
    assert bool(((total / draws - c).abs() <= (hi - lo) / draws + 1e-6 * c).all())
    # The codes are RTN of y: the same for every draw.
    assert torch.equal(e2m1.decode(t.codes()), q)


def test_the_estimate_is_unbiased_where_rtn_is_not():
    """Averaged over fresh signs and scale draws, MS-EDEN's dequantized (and un-rotated) values
    converge to x like 1/sqrt(draws), with no shrinkage; round-to-nearest under the same random
    rotation shrinks x systematically (its mean keeps a gain below 1)."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 256, generator=gen) * torch.exp(torch.randn(16, 1, generator=gen))).bfloat16()
    xf = x.float()

    def mean_estimate(kind, draws):
        g = torch.Generator().manual_seed(5)
        acc = torch.zeros(x.shape)
        for _ in range(draws):
            s = ms_eden.random_signs(128, g)
            if kind == "eden":
                d = ms_eden.quantize(x, 128, s, g).dequantize()
            else:
                d = nvfp4.quantize(ms_eden.transform(x, 128, s)).dequantize()
            acc += ms_eden.inverse_transform(d, 128, s)
        m = acc / draws
        return float((m - xf).norm() / xf.norm()), float((m * xf).sum() / (xf * xf).sum())

    (e_few, _), (e_many, e_gain) = mean_estimate("eden", 64), mean_estimate("eden", 1024)
    _, r_gain = mean_estimate("rtn", 1024)
    assert e_many < 0.4 * e_few  # 1/sqrt(16) = 0.25 for an unbiased estimate
    assert abs(1 - e_gain) < 5e-4, e_gain
    assert 1 - r_gain > 2e-3, r_gain


@pytest.mark.parametrize("n", [16, 128])
def test_less_error_than_the_recipes_stochastic_rounding(n):
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(256, 1024, generator=gen) * torch.exp(torch.randn(256, 1, generator=gen))).bfloat16()
    s = _signs(n)
    eden = _rel_mse(ms_eden.inverse_transform(ms_eden.quantize(x, n, s, gen).dequantize(), n, s), x)
    sr = nvfp4.quantize(x, rounding="stochastic", rht=True, generator=gen)
    sr = _rel_mse(hadamard.inverse_rht(sr.dequantize()), x)
    assert eden < 0.65 * sr, (eden, sr)


def test_zeros_tiny_blocks_and_saturation():
    z = ms_eden.quantize(torch.zeros(4, 128), 128, _signs(128))
    assert float(z.amax) == 0 and not bool(z.codes().any()) and not bool(z.dequantize().any())
    # A block whose E4M3 scale is 0 decodes to zeros (codes 0, not +-6).
    x = torch.zeros(2, 32)
    x[0, :16] = 1e-30
    x[1, 16] = 1.0
    t = ms_eden.quantize(x, 16, torch.ones(16))
    assert float(t.scale.float()[0, 0]) == 0 and not bool(t.codes()[0, :16].any())
    # An amax below the values: they saturate at 6 and the scales at 448, nothing non-finite.
    big = ms_eden.quantize(torch.randn(8, 128) * 100, 128, _signs(128), amax=1.0)
    assert bool(torch.isfinite(big.dequantize()).all()) and float(big.scale.float().max()) <= 448


def test_result_is_an_ordinary_nvfp4_operand():
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(32, 256, generator=gen), torch.randn(48, 256, generator=gen)
    s = _signs(128)
    qa, qb = ms_eden.quantize(a, 128, s, gen), ms_eden.quantize(b, 128, s, gen)
    assert qa.scale_cap == 256.0 and qa.rht and qa.rounding == "ms_eden"
    out = emulated_gemm(qa, qb, torch.float32)
    ref = a @ b.t()
    assert float((out - ref).norm() / ref.norm()) < 0.2


def test_bad_arguments_name_the_problem():
    x = torch.randn(4, 128)
    with pytest.raises(ValueError, match="Hadamard size must be 16 or 128"):
        ms_eden.quantize(x, 64, torch.ones(64))
    with pytest.raises(ValueError, match="not a multiple of the Hadamard size 128"):
        ms_eden.quantize(torch.randn(4, 64), 128, _signs(128))
    with pytest.raises(ValueError, match="signs must be a tensor of 128"):
        ms_eden.quantize(x, 128, torch.ones(16))
    with pytest.raises(ValueError, match=r"signs must be \+-1"):
        ms_eden.quantize(x, 128, torch.zeros(128))
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        ms_eden.quantize(x, 128, _signs(128))


# ------------------------------------------------------------------------------------ triton

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="Triton compiles for the GPU in this run (the gpu test below checks it)")


def _same(a, b) -> bool:
    return (torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
            and torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))
            and torch.equal(a.amax.view(torch.int32), b.amax.view(torch.int32)))


def _check_kernels(x_of, dev):
    """The Triton quantizer against the reference, bit for bit given the same uniforms; with its
    own Philox draws, each scale one of the reference's two neighbours, reproducibly."""
    from rayfp4.kernels import triton_eden as TE

    gen = torch.Generator().manual_seed(11)
    for n in (16, 128):
        for dtype in (torch.float32, torch.bfloat16):
            for x in x_of(gen, dtype):
                x = x.to(dev)
                s = _signs(n, seed=n).to(dev)
                u = torch.rand(x.shape[0], x.shape[1] // 16, generator=gen).to(dev)
                ref = ms_eden.quantize(x, n, s, uniforms=u)
                got = TE.quantize_ms_eden(x, n, s, uniforms=u)
                assert _same(ref, got), (n, dtype, tuple(x.shape), x.stride())
                assert _same(ref, TE.quantize_ms_eden(x, n, s, amax=ref.amax, uniforms=u))
                g1 = TE.quantize_ms_eden(x, n, s, torch.Generator(dev).manual_seed(1))
                g1b = TE.quantize_ms_eden(x, n, s, torch.Generator(dev).manual_seed(1))
                assert _same(g1, g1b)
                up = ms_eden.quantize(x, n, s, uniforms=torch.zeros_like(u)).scale.view(torch.uint8)
                down = ms_eden.quantize(x, n, s, uniforms=torch.full_like(u, 0.99999994)).scale.view(torch.uint8)
                sc = g1.scale.view(torch.uint8)
                assert bool(((sc == up) | (sc == down)).all())
                assert torch.equal(g1.data, ref.data)


@interpreted
def test_triton_is_bit_exact_under_the_interpreter():
    pytest.importorskip("triton")

    def shapes(gen, dtype):
        yield _data(gen, 40, 256, dtype)             # rows past the last program masked
        yield _data(gen, 256, 48, dtype).t()         # a transposed view: K strided

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter evaluates both sides of where()
        _check_kernels(lambda gen, dtype: [t for t in shapes(gen, dtype) if t.shape[1] % 128 == 0], "cpu")


@interpreted
def test_triton_nonfinite_input_gives_nan_scales():
    pytest.importorskip("triton")
    from rayfp4.kernels import triton_eden as TE

    x = torch.randn(16, 128)
    x[3, 5] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = TE.quantize_ms_eden(x, 128, _signs(128), torch.Generator().manual_seed(0))
    assert torch.isnan(t.amax) and torch.isnan(t.scale.float()).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="triton runs interpreted in this process")
def test_triton_is_bit_exact_on_the_gpu():
    pytest.importorskip("triton")

    def shapes(gen, dtype):
        yield _data(gen, 1000, 4096, dtype)
        yield _data(gen, 4096, 1024, dtype).t()

    _check_kernels(shapes, torch.device("cuda"))


# ------------------------------------------------------------------------- policy and layer


def test_policy_switch_and_validation():
    p = PrecisionPolicy(backward_rounding="ms_eden")
    assert p.ms_eden_hadamard == 128 and not p.stochastic_rounding_grads and not p.rht_wgrad
    assert "stochastic_rounding_grads" not in p.model_dump(exclude_unset=True)
    assert PrecisionPolicy().backward_rounding == "sr"
    bad = {
        "format=mxfp4 has none": {"format": "mxfp4", "backward_rounding": "ms_eden"},
        "format=bf16 has none": {"format": "bf16", "backward_rounding": "ms_eden"},
        "leave stochastic_rounding_grads unset": {"backward_rounding": "ms_eden", "stochastic_rounding_grads": True},
        "leave rht_wgrad unset": {"backward_rounding": "ms_eden", "rht_wgrad": True},
        "ms_eden_hadamard: only applies": {"ms_eden_hadamard": 16},
        r"four_over_six on the backward operands \(dgrad.dy": {"backward_rounding": "ms_eden",
                                                                "scale_selection": "four_over_six"},
        "ms_eden_hadamard": {"backward_rounding": "ms_eden", "ms_eden_hadamard": 64},
    }
    for message, data in bad.items():
        with pytest.raises(PolicyError, match=message):
            PrecisionPolicy.from_dict(data)
    fwd46 = {"fprop.x": "four_over_six", "fprop.w": "four_over_six"}
    ok = PrecisionPolicy(backward_rounding="ms_eden", scale_selection=fwd46)
    assert ok.selection_for("fprop.x") == "four_over_six"
    # A policy dumped in full (as the workers receive it) reads back the same.
    for p in (PrecisionPolicy(), ok, PrecisionPolicy(backward_rounding="ms_eden", ms_eden_hadamard=16),
              PrecisionPolicy(scale_selection=fwd46), PrecisionPolicy(format="mxfp4")):
        assert PrecisionPolicy.from_dict(p.model_dump()) == p


def test_layer_refuses_an_output_width_the_rotation_does_not_divide():
    with pytest.raises(PolicyError, match=r"precision.ms_eden_hadamard: layer l has out_features=96"):
        NVFP4Linear(64, 96, policy=PrecisionPolicy(backward_rounding="ms_eden"), name="l")
    NVFP4Linear(64, 96, policy=PrecisionPolicy(backward_rounding="ms_eden", ms_eden_hadamard=16), name="l")


def _layer(n, **kw):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 256, bias=False)
    pol = PrecisionPolicy(backend="reference", backward_rounding="ms_eden", ms_eden_hadamard=n, **kw)
    return NVFP4Linear.from_linear(lin, policy=pol, name="l", layer_index=3)


@pytest.mark.parametrize("n", [16, 128])
def test_layer_backward_is_an_unbiased_estimate_of_the_quantized_forwards_gradient(n):
    """The operands are the values Fprop multiplied (Quartet II): averaged over steps (fresh signs
    and draws), dx -> dy W_hat and dW -> dy^T x_hat, where W_hat and x_hat are Fprop's operands."""
    layer = _layer(n)
    layer.capture = {}
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(70, 128, generator=gen).bfloat16()  # 70 tokens: padded to the rotation along tokens
    dy = torch.randn(70, 256, generator=gen).bfloat16()
    steps, sx, sw = 48, 0, 0
    for step in range(steps):
        layer.runtime.set_step(step)
        layer.weight.grad = None
        xx = x.clone().requires_grad_()
        layer(xx).backward(dy)
        sx, sw = sx + xx.grad.float(), sw + layer.weight.grad
    assert {"dgrad.dy", "dgrad.w", "wgrad.dy", "wgrad.x"} <= set(layer.capture)
    assert all(layer.capture[r].rounding == "ms_eden" for r in ("dgrad.dy", "wgrad.x"))
    w_hat, x_hat = layer.capture["fprop.w"].dequantize(), layer.capture["fprop.x"].dequantize()
    ex, ew = dy.float() @ w_hat, dy.float().t() @ x_hat
    one = xx.grad.float()
    err1 = float((one - ex).norm() / ex.norm())
    errn = float((sx / steps - ex).norm() / ex.norm())
    assert errn < 0.3 * err1, (err1, errn)  # 1/sqrt(48) = 0.14 for an unbiased estimate
    assert float((sw / steps - ew).norm() / ew.norm()) < 0.3 * float((layer.weight.grad - ew).norm() / ew.norm())


def test_layer_is_reproducible_per_step_and_differs_between_steps():
    layer = _layer(128)
    x = torch.randn(32, 128).bfloat16()
    dy = torch.randn(32, 256).bfloat16()

    def grads(step):
        layer.runtime.set_step(step)
        layer.weight.grad = None
        xx = x.clone().requires_grad_()
        layer(xx).backward(dy)
        return xx.grad.clone(), layer.weight.grad.clone()

    a, b, c = grads(5), grads(5), grads(6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    assert "backward_rounding=ms_eden/128" in repr(layer)


def test_late_switched_forward_quantizes_the_backward_from_x_itself():
    """With the forward pass switched to BF16 (scope forward), MS-EDEN quantizes x and W."""
    layer = _layer(128, late_switch={"at_step": 0, "scope": "forward"})
    x = torch.randn(32, 128).bfloat16().requires_grad_()
    layer.capture = {}
    layer(x).backward(torch.randn(32, 256).bfloat16())
    assert "fprop.x" not in layer.capture and layer.capture["wgrad.x"].rounding == "ms_eden"
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
