"""The Triton MXFP4 quantizer bit for bit against ``formats.mxfp4.quantize``.

Through the Triton interpreter on small shapes where conftest sets TRITON_INTERPRET=1 (no CUDA
GPU): codes, UE8M0 scale bytes and the BF16 operand, for both tiles, both scale rules, RTNE and
stochastic rounding (the reference given the very bits the kernels draw), the RHT, transposed
views, and the edge cases of the scale rule. On a GPU machine those skip and the ``gpu`` tests at
the end check the compiled kernels at 4096x4096 (``pytest -m gpu tests/test_kernels_triton_mxfp4.py``).
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from test_formats_mxfp4 import spread_matrix

from rayfp4.formats import e2m1, hadamard, mxfp4
from rayfp4.kernels import triton_mxfp4 as X
from rayfp4.kernels import triton_nvfp4 as T

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRETED, reason="Triton compiles for the GPU in this run (the gpu tests "
                            "below check the kernels); RAYFP4_TEST_INTERPRET=1 runs these through the interpreter")

TILES = [(1, 32), (32, 32)]
RULES = ["ceil", "floor"]


@pytest.fixture
def gen():
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def first_diff(a, b) -> str:
    bad = (a != b).nonzero()
    return f"{bad.shape[0]} differ, first at {bad[0].tolist()}" if bad.shape[0] else "equal"


def assert_same(x, operand=True, bits=None, monkeypatch=None, **kw):
    """Quantize x with the reference and the Triton kernels: same fields, code bytes, UE8M0
    bytes, and (``operand``) the BF16 operand equal to the reference's dequantized values (the
    sign of zero included), stored in x's memory order. For SR, ``bits`` are the random bits
    the kernels draw (:func:`triton_mxfp4.sr_bits`), handed to the reference."""
    if bits is not None:
        monkeypatch.setattr(e2m1, "random_bits", lambda shape, *, generator=None, device=None: bits)
        ref = mxfp4.quantize(x, **{k: v for k, v in kw.items() if k != "generator"})
        monkeypatch.undo()
    else:
        ref = mxfp4.quantize(x, **kw)
    got = X.quantize_mxfp4(x, write_gemm_operand=operand, **kw)
    for f in ("shape", "tile", "scale_rule", "rounding", "rht", "orig_dtype"):
        assert getattr(got, f) == getattr(ref, f), f
    assert got.data.dtype == torch.uint8 and got.data.shape == ref.data.shape
    assert got.scale.dtype == torch.uint8 and got.scale.shape == ref.scale.shape
    assert torch.equal(got.scale, ref.scale), "scales: " + first_diff(got.scale, ref.scale)
    assert torch.equal(got.data, ref.data), "code bytes: " + first_diff(got.data, ref.data)
    if operand:
        op = got.gemm_operand
        assert op.dtype == torch.bfloat16 and op.shape == x.shape and op.stride() == x.stride()
        want = ref.dequantize_unscaled(torch.bfloat16).view(torch.int16)
        assert torch.equal(op.contiguous().view(torch.int16), want), "operand: " + first_diff(op.view(torch.int16), want)
    else:
        assert got.gemm_operand is None
    return got


def sr_args(x, seed):
    """(generator, the kernels' bits for it): the Philox key is drawn from a generator seeded
    ``seed``, so an identically seeded one tells which."""
    key = T._sr_seed(torch.Generator().manual_seed(seed), torch.device("cpu"))
    return torch.Generator().manual_seed(seed), X.sr_bits(key, *x.shape, x.device)


# ------------------------------------------------------------------------- random inputs


@interp
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("tile", TILES)
def test_rows_bit_exact(tile, rule, gen):
    """K-contiguous input, the row kernel: FP32, BF16 and FP16, block magnitudes spread over
    2^-60 .. 2^60 (FP16: a range it holds)."""
    x = spread_matrix(64, 128, gen)
    assert_same(x, tile=tile, scale_rule=rule)
    assert_same(x.to(torch.bfloat16), tile=tile, scale_rule=rule)
    e = torch.randint(-28, 8, (64, 4), generator=gen).float()  # FP16 subnormals and underflow too
    x16 = (torch.randn(64, 128, generator=gen) * torch.exp2(e).repeat_interleave(32, 1)).to(torch.float16)
    assert_same(x16, tile=tile, scale_rule=rule)


@interp
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("tile", TILES)
def test_transposed_view_bit_exact(tile, rule, gen):
    """An M-contiguous view (x^T, the Wgrad operands' layout): quantized in place by the strided
    kernel, the operand written in x's memory order. Rows 0-3 of the view hold edge cases: ties
    with amax 6, tiny and subnormal amaxes (the exponent clamp), zeros next to 7.5, and 1e30 among
    1e-10 (subnormal products)."""
    x = spread_matrix(64, 64, gen)
    x[:, :4] = 0
    x[:8, 0] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -6.0])
    x[32:40, 0] = torch.tensor([2.0**-125, 2.0**-140, -1e-45, 0.0, -0.0, 7.5, 1e-30, 3.0])
    x[:, 1] = torch.randn(64, generator=gen) * 1e-39
    x[0, 2], x[1:32, 2] = 1e30, 1e-10
    x[40, 3] = -2.0**-126
    dtype = torch.bfloat16 if rule == "ceil" else torch.float32
    t = assert_same(x.to(dtype).t(), tile=tile, scale_rule=rule)
    assert t.gemm_operand.stride() == (1, 64)


@interp
def test_rht_bit_exact(gen):
    """The 16x16 RHT before the scales: BF16 (rounded back to BF16, as the reference does) in both
    layouts, FP16 with 32x32 tiles, and another sign vector."""
    x = spread_matrix(64, 64, gen)
    assert_same(x.to(torch.bfloat16).t(), rht=True)
    assert_same(x.to(torch.bfloat16), rht=True, scale_rule="floor", operand=False)
    x16 = (torch.randn(64, 64, generator=gen) * 10).to(torch.float16)
    assert_same(x16, rht=True, tile=(32, 32), rht_signs=hadamard.random_signs(int(torch.randint(0, 99, ()))))


# ------------------------------------------------------------------------- stochastic rounding


@interp
@pytest.mark.parametrize("case", ["rows", "tile", "cols_rht"])
def test_stochastic_rounding_bit_exact_given_the_same_bits(case, gen, monkeypatch):
    """The reference's SR fed the random bits the kernels draw gives the kernels' codes: the SR
    arithmetic is the reference's, whichever kernel (the row kernel, and the strided kernel on
    the Wgrad dY^T operand) draws the bits."""
    seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
    x = spread_matrix(64, 64, gen)
    if case == "rows":
        x, kw = x.to(torch.bfloat16), {}
    elif case == "tile":
        kw = {"tile": (32, 32), "scale_rule": "floor"}
    else:
        x, kw = x.to(torch.bfloat16).t(), {"rht": True}
    g, bits = sr_args(x, seed)
    t = assert_same(x, rounding="stochastic", generator=g, bits=bits, monkeypatch=monkeypatch, **kw)
    assert not torch.equal(t.data, mxfp4.quantize(x, **kw).data)  # it did round stochastically


@interp
def test_stochastic_rounding_bits_and_streams(gen):
    """The bits are bytes, uniform enough; a generator seeded alike repeats the codes, another
    seed changes them. (The strided kernel draws the same bits: test above, case cols_rht.)"""
    seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
    bits = X.sr_bits(seed, 64, 128, "cpu")
    assert bits.dtype == torch.int16 and int(bits.min()) >= 0 and int(bits.max()) <= 255
    assert torch.unique(bits).numel() == 256 and abs(bits.float().mean().item() - 127.5) < 4
    x = torch.randn(64, 128, generator=gen)

    def q(v, s):
        return X.quantize_mxfp4(v, rounding="stochastic", generator=torch.Generator().manual_seed(s))
    a, b, c = q(x, seed), q(x, seed), q(x, seed + 1)
    assert torch.equal(a.data, b.data) and not torch.equal(a.data, c.data)
    assert torch.equal(a.scale, mxfp4.quantize(x).scale)  # SR touches codes only


# ------------------------------------------------------------------------- edge cases


@interp
@pytest.mark.parametrize("rule", RULES)
def test_edge_cases(rule):
    """Zero blocks, signed zeros, the E2M1 ties, the ceil rule's boundary, saturation under floor,
    the UE8M0 clamp at 2^-127 for tiny and subnormal amaxes, FP32's largest values, and tiny
    elements under a large block amax (subnormal products)."""
    x = torch.zeros(32, 32 * 12)
    blocks = x.view(32, 12, 32)
    # 0: zeros; row 1 has -0.0 and tiny negatives (code 8) next to 1.0
    blocks[1, 0, :3] = torch.tensor([-0.0, -1e-3, 1.0])
    # 1: the ties of the E2M1 grid with amax 6 (e = 0 under both rules), both signs
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    blocks[:, 1, :8], blocks[:, 1, 8:16] = ties, -ties
    blocks[:, 1, 16:24] = torch.nextafter(ties, torch.zeros(())) # one ulp inside each tie
    # 2: amax exactly 6 * 2^-3, 3: one ulp above it (ceil: e = -3, then -2)
    blocks[:, 2, 0] = 0.75
    blocks[:, 3, 0] = torch.nextafter(torch.tensor(0.75), torch.tensor(1.0))
    blocks[:, 2:4, 1:] = torch.linspace(-0.7, 0.7, 31)
    # 4: floor saturates: amax in [4, 8) gets e = 0, so 6 .. 8 all code to 6
    blocks[:, 4, :6] = torch.tensor([7.99999, 7.5, 6.5, 6.0, -7.0, 4.0])
    # 5-8: amax 2^-124 (e = -126), 2^-125 (-127), 1.5 * 2^-126 (-128, clamped to -127) and a
    # subnormal amax (clamped): tiny elements among them
    for i, a in ((5, 2.0**-124), (6, 2.0**-125), (7, 1.5 * 2.0**-126)):
        blocks[:, i, 0] = a
        blocks[:, i, 1:] = torch.linspace(-a, a, 31)
    blocks[:, 8] = torch.tensor([2.0**-140, 1e-45, -3e-44, 2.0**-127] * 8)
    # 9: FP32's largest values; 10: a large amax with tiny elements (products underflow)
    big = torch.finfo(torch.float32).max
    blocks[:, 9, :4] = torch.tensor([big, -big / 3, big / 7, 1.0])
    blocks[:, 10, 0] = 1e30
    blocks[:, 10, 1:] = torch.linspace(-1e-10, 1e-10, 31)
    # 11: random per row (so each 32x32 tile has different rows)
    blocks[:, 11] = torch.randn(32, 32) * torch.exp2(torch.randint(-30, 30, (32, 1)).float())
    for tile in TILES:
        t = assert_same(x, tile=tile, scale_rule=rule)
        e = t.scale_exponents()
        if tile == (1, 32):
            codes = t.codes()
            assert e[0, 0] == -127 and not codes[0, :32].any()  # zero block: 2^-127, codes 0
            assert codes[1, :3].tolist() == [0, 8, 6]  # e = -2: 1.0 -> 4
            assert codes[0, 32:48].tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 8, 10, 10, 12, 12, 14, 14, 15]
            assert e[0, 1] == 0 and e[0, 2] == -3 and e[0, 3] == (-2 if rule == "ceil" else -3)
            if rule == "floor":
                assert e[0, 4] == 0 and codes[0, 128:134].tolist() == [7, 7, 7, 7, 15, 6]
            assert e[0, 5] == -126 and e[0, 6:9].tolist() == [-127] * 3
            assert e[0, 9] == (126 if rule == "ceil" else 125)
    assert_same(x.clamp(-1e38, 1e38).to(torch.bfloat16), scale_rule=rule)  # BF16 subnormals too


def test_input_errors():
    with pytest.raises(ValueError, match=r"K=48 of shape \(4, 48\) is not a multiple of the block size 32"):
        X.quantize_mxfp4(torch.zeros(4, 48))
    with pytest.raises(ValueError, match=r"M=16 of shape \(16, 64\)"):
        X.quantize_mxfp4(torch.zeros(16, 64), tile=(32, 32))
    with pytest.raises(ValueError, match=r"2-D tensor \[M, K\], got shape \(4,\)"):
        X.quantize_mxfp4(torch.zeros(4))
    with pytest.raises(ValueError, match="unknown scale_rule 'round'"):
        X.quantize_mxfp4(torch.zeros(4, 32), scale_rule="round")
    with pytest.raises(ValueError, match="unknown tile"):
        X.quantize_mxfp4(torch.zeros(4, 32), tile=(1, 16))
    with pytest.raises(ValueError, match="unknown rounding"):
        X.quantize_mxfp4(torch.zeros(4, 32), rounding="up")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        X.quantize_mxfp4(torch.zeros(4, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="RHT signs must be a vector of 16"):
        X.quantize_mxfp4(torch.zeros(4, 32), rht=True, rht_signs=torch.ones(8))
    with pytest.raises(ValueError, match=r"shape \(4, 32\) contains NaN/Inf"):
        X.quantize_mxfp4(torch.full((4, 32), float("inf")), check_finite=True)


def test_empty_input():
    ref, got = mxfp4.quantize(torch.zeros(0, 64)), X.quantize_mxfp4(torch.zeros(0, 64))  # nothing to launch
    assert got.data.shape == ref.data.shape == (0, 32) and got.scale.shape == ref.scale.shape == (0, 2)


@interp
@pytest.mark.parametrize("layout", ["rows", "tile", "cols_rht"])
def test_non_finite_blocks_become_nan(layout):
    """No error and no host sync: each block (or 32x32 tile) holding NaN/Inf gets the E8M0 NaN
    byte 0xFF and zero codes, and decodes to NaN (operand and ``dequantize``); every other block
    is what the reference gives with those blocks zeroed."""
    x = torch.randn(64, 64)
    x[1, 3], x[40, 40], x[63, 0] = float("nan"), float("inf"), float("-inf")
    tile, rht, view = {"rows": ((1, 32), False, x), "tile": ((32, 32), False, x),
                       "cols_rht": ((1, 32), True, x.t())}[layout]
    th = tile[0]
    bad = (~torch.isfinite(view)).reshape(64 // th, th, 2, 32).any(dim=(1, 3))  # [tiles, blocks]
    bad = bad.repeat_interleave(th, dim=0)  # [M, K/32]
    t = X.quantize_mxfp4(view, tile=tile, rht=rht, write_gemm_operand=True)
    assert bad.sum() == (3 if th == 1 else 3 * 32)
    assert (t.scale[bad] == 255).all() and (t.scale[~bad] != 255).all()
    per_elem = bad.repeat_interleave(32, dim=1)
    assert not t.codes()[per_elem].any()
    assert t.gemm_operand[per_elem].isnan().all() and not t.gemm_operand[~per_elem].isnan().any()
    assert t.dequantize()[per_elem].isnan().all()
    ref = mxfp4.quantize(torch.where(per_elem, 0.0, view), tile=tile, rht=rht)
    keep = (~per_elem).reshape(64, 32, 2).all(-1)  # bytes of good blocks
    assert torch.equal(t.data[keep], ref.data[keep]) and torch.equal(t.scale[~bad], ref.scale[~bad])


@interp
@pytest.mark.parametrize("tile", TILES)
def test_dequantize_kernel(tile, gen):
    """The packed -> BF16/FP32 pass equals ``dequantize_unscaled`` (subnormal scales 2^-127 and
    signed zeros included); a 0xFF scale decodes as the reference decodes it (2^128 = inf)."""
    e = torch.randint(-140, 100, (64, 4), generator=gen).float()
    x = torch.randn(64, 128, generator=gen) * torch.exp2(e).repeat_interleave(32, 1)
    x[0, :32] = 0
    x[0, 1], x[1, 2] = -0.0, -1e-30
    t = mxfp4.quantize(x, tile=tile)
    for dtype, view in ((torch.bfloat16, torch.int16), (torch.float32, torch.int32)):
        assert torch.equal(X.dequantize_unscaled(t, dtype).view(view), t.dequantize_unscaled(dtype).view(view))
    t.scale[1, 1] = 255
    got, want = X.dequantize_unscaled(t, torch.float32), t.dequantize_unscaled(torch.float32)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    assert torch.equal(got[1, 32:64].isinf(), (t.codes()[1, 32:64] & 7) != 0)  # 0 * inf is NaN
    q = X.quantize_mxfp4(x, tile=tile, write_gemm_operand=True)
    assert X.dequantize_unscaled(q) is q.gemm_operand  # written by the quantizer, not recomputed


# ------------------------------------------------------------------------- backend and layer


@interp
def test_backend_quantizes_mxfp4_with_the_kernels(gen):
    x = spread_matrix(32, 64, gen).to(torch.bfloat16)
    t = T.TritonBackend().quantize_mxfp4(x, (32, 32), "nearest", False, None, "floor")
    ref = mxfp4.quantize(x, tile=(32, 32), scale_rule="floor")
    assert torch.equal(t.data, ref.data) and torch.equal(t.scale, ref.scale) and t.gemm_operand is None
    assert torch.equal(T.gemm(t, t, torch.float32), T.gemm(ref, ref, torch.float32))


@interp
def test_mxfp4_linear_on_the_triton_backend_equals_the_reference_backend(gen):
    """MXFP4Linear with the Triton backend (its quantizers interpreted here) gives the reference
    backend's outputs, gradients and quantized operands, with RHT, 32x32 weight tiles and a token
    count that Wgrad pads (SR off: the streams differ between backends)."""
    from rayfp4.precision import PrecisionPolicy
    from rayfp4.precision.linear import MXFP4Linear

    pol = PrecisionPolicy(format="mxfp4", stochastic_rounding_grads=False, mxfp4_scale_rule="floor")
    x = (torch.randn(40, 64, generator=gen) * 3).to(torch.bfloat16)
    dy = torch.randn(40, 32, generator=gen).to(torch.bfloat16)
    out = {}
    for name in ("reference", "triton"):
        torch.manual_seed(0)
        layer = MXFP4Linear(64, 32, bias=True, policy=pol)
        if name == "triton":
            layer.backend = T.TritonBackend()  # the registry offers it on CUDA only
        layer.capture = {}
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(dy)
        out[name] = (y.detach(), xi.grad, layer.weight.grad, layer.bias.grad, layer.capture)
    ref, got = out["reference"], out["triton"]
    for a, b in zip(ref[:4], got[:4]):
        assert torch.equal(a, b)
    assert ref[4].keys() == got[4].keys() and len(ref[4]) >= 5
    for key, q in ref[4].items():
        assert torch.equal(got[4][key].data, q.data) and torch.equal(got[4][key].scale, q.scale), key


# ------------------------------------------------------------------------- GPU (compiled)


def _check_gpu(x, monkeypatch=None, seed=None, **kw):
    """The compiled kernels against the reference on the GPU, and on the CPU for the first 256
    rows (the definition, whatever CUDA's torch arithmetic does)."""
    bits = None
    if seed is not None:
        key = T._sr_seed(torch.Generator(device=x.device).manual_seed(seed), x.device)
        bits = X.sr_bits(key, *x.shape, x.device)
        g = torch.Generator(device=x.device).manual_seed(seed)
        monkeypatch.setattr(e2m1, "random_bits",
                            lambda shape, *, generator=None, device=None: bits[: shape[0]].to(device))
        kw = dict(kw, rounding="stochastic")
    ref = mxfp4.quantize(x, **kw)
    ref_cpu = mxfp4.quantize(x[:256].cpu(), **kw)
    if monkeypatch is not None:
        monkeypatch.undo()
    got = X.quantize_mxfp4(x, generator=g if seed is not None else None, write_gemm_operand=True, **kw)
    ns, nc = (got.scale != ref.scale).sum().item(), (got.data != ref.data).sum().item()
    assert ns == 0 and nc == 0, f"{kw}: {ns} scales and {nc} code bytes differ"
    want = ref.dequantize_unscaled(torch.bfloat16)
    assert torch.equal(got.gemm_operand.contiguous().view(torch.int16), want.view(torch.int16)), kw
    assert torch.equal(X.dequantize_unscaled(ref).view(torch.int16), want.view(torch.int16)), kw  # the kernel
    assert torch.equal(got.scale[:256].cpu(), ref_cpu.scale) and torch.equal(got.data[:256].cpu(), ref_cpu.data), kw
    return got


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(INTERPRETED, reason="triton runs interpreted in this process; run the gpu tests on their own")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_bit_exact_at_scale(dtype, monkeypatch):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(4321)
    x = (spread_matrix(4096, 4096, gen) * 1e-3).to(dtype).to(dev)
    for tile in TILES:
        for rule in RULES:
            _check_gpu(x, tile=tile, scale_rule=rule)
            _check_gpu(x.t(), tile=tile, scale_rule=rule)
            _check_gpu(x, monkeypatch, seed=7, tile=tile, scale_rule=rule)
        _check_gpu(x.t(), tile=tile, rht=True)
        _check_gpu(x, tile=tile, rht=True, scale_rule="floor")
    _check_gpu(x.t(), monkeypatch, seed=8, rht=True)  # the Wgrad dY^T operand
    # Edge magnitudes: tiny (exponent clamp, subnormals) and huge blocks, zeros.
    e = torch.randint(-149, 120, (4096, 32), generator=gen).float()
    y = torch.randn(4096, 1024, generator=gen) * torch.exp2(e).repeat_interleave(32, 1)
    y[:, :32] = 0
    y = y.to(dtype).to(dev)
    for rule in RULES:
        _check_gpu(y, scale_rule=rule)
        _check_gpu(y.t(), scale_rule=rule, tile=(32, 32))
    z = torch.randn(256, 256, device=dev)
    z[3, 7] = float("nan")
    t = X.quantize_mxfp4(z)
    assert t.scale[3, 0] == 255 and (t.scale != 255).sum() == z.numel() // 32 - 1


@interp
def test_mxfp4_linear_on_the_triton_backend_propagates_non_finite_values_without_a_check(gen, monkeypatch):
    """NaN/Inf reach the output and gradients as NaN through the kernels' NaN scales: the layer
    asks no finiteness question (a host sync per operand) of a backend that propagates them."""
    from rayfp4.precision import PrecisionPolicy
    from rayfp4.precision import linear as L

    checks = []
    isfinite = torch.isfinite
    layer = L.MXFP4Linear(64, 32, bias=False, policy=PrecisionPolicy(format="mxfp4"))
    layer.backend = T.TritonBackend()
    x = torch.randn(40, 64, generator=gen)
    x[3, 5] = float("inf")
    xi = x.clone().requires_grad_(True)
    monkeypatch.setattr(L.torch, "isfinite", lambda t: checks.append(t.shape) or isfinite(t))
    y = layer(xi)
    y.backward(torch.ones_like(y))
    xj = torch.randn(40, 64, generator=gen).requires_grad_(True)
    w_grad = layer.weight.grad.clone()
    layer.weight.grad = None
    layer(xj).backward(torch.full((40, 32), float("nan")))
    monkeypatch.undo()
    assert checks == []
    assert torch.isnan(y[3]).all() and torch.isfinite(y[:3]).all()
    assert torch.isnan(w_grad).any()
    assert torch.isnan(xj.grad).all() and torch.isnan(layer.weight.grad).all()
