"""The Triton NVFP4 kernels under the Triton interpreter (CPU): bit for bit against the reference.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it is decided for the whole test
process: conftest sets it where there is no CUDA GPU (or with RAYFP4_TEST_INTERPRET=1). On a GPU
machine the kernels compile instead and test_kernels_triton_gpu.py checks them at scale; this
module then skips.
"""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton compiles for the GPU in this run (test_kernels_triton_gpu.py checks the kernels); "
                "RAYFP4_TEST_INTERPRET=1 runs this module through the interpreter", allow_module_level=True)

import torch  # noqa: E402

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from rayfp4 import kernels  # noqa: E402
from rayfp4.formats import nvfp4  # noqa: E402
from rayfp4.formats.quantized import emulated_gemm  # noqa: E402
from rayfp4.kernels import _triton_nvfp4_kernels as K  # noqa: E402
from rayfp4.kernels import triton_nvfp4 as T  # noqa: E402

from test_formats_nvfp4 import SCALE_ORDER_CASES, random_matrix  # noqa: E402

FLT_MAX = torch.finfo(torch.float32).max


@pytest.fixture
def gen():
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def assert_same(x, tile=(1, 16), rht=False, amax=None):
    """Codes, scales, amax (and the cached BF16 operand, the transpose) equal the reference's."""
    ref = nvfp4.quantize(x, tile=tile, rht=rht, amax=amax)
    got = T.quantize_nvfp4(x, tile=tile, rht=rht, amax=amax)
    assert got.shape == ref.shape and got.tile == ref.tile and got.rht == ref.rht
    assert got.amax.dtype == torch.float32 and got.amax.shape == ()
    assert torch.equal(got.amax, ref.amax), (got.amax.item(), ref.amax.item())
    bad = (got.scale.view(torch.uint8) != ref.scale.view(torch.uint8)).nonzero()
    assert bad.shape[0] == 0, f"{bad.shape[0]} scales differ, first at {bad[0].tolist()}"
    bad = (got.data != ref.data).nonzero()
    assert bad.shape[0] == 0, f"{bad.shape[0]} code bytes differ, first at {bad[0].tolist()}"
    want = ref.dequantize_unscaled(torch.bfloat16)
    deq = T.dequantize_unscaled(got)
    assert torch.equal(deq.view(torch.int16), want.view(torch.int16))  # -0.0 included
    if tile == (16, 16):
        assert got.transposed is not None  # written by the quantizer, returned by transpose()
        rt, gt = ref.transpose(), got.transpose()
        assert torch.equal(gt.data, rt.data) and torch.equal(gt.scale.view(torch.uint8), rt.scale.view(torch.uint8))
        assert torch.equal(T.dequantize_unscaled(gt), rt.dequantize_unscaled(torch.bfloat16))
    return got


# ------------------------------------------------------------------------- scalar helpers


@triton.jit
def _e4m3_probe(x_ptr, val_ptr, byte_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    v, b = K._e4m3_rne(tl.load(x_ptr + offs, mask=m, other=0.0))
    tl.store(val_ptr + offs, v, mask=m)
    tl.store(byte_ptr + offs, b, mask=m)
    tl.store(val_ptr + N + offs, K._e4m3_decode(b), mask=m)


def test_e4m3_conversion_matches_torch_at_every_midpoint():
    # Every E4M3 value, the midpoints between neighbours (ties), and one FP32 ulp either side.
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (grid[1:] + grid[:-1]) / 2
    pts = torch.cat([grid, mids, torch.nextafter(mids, torch.zeros(())), torch.nextafter(mids, grid[-1:] * 2),
                     torch.tensor([1e-38, 2.0**-10, 3 * 2.0**-11, 2.0**-127, 448.0])])
    n = pts.numel()
    val = torch.empty(2 * n)
    byte = torch.empty(n, dtype=torch.int32)
    _e4m3_probe[(triton.cdiv(n, 256),)](pts, val, byte, n, BLOCK=256)
    want = pts.to(torch.float8_e4m3fn)
    assert torch.equal(byte, want.view(torch.uint8).to(torch.int32))
    assert torch.equal(val[:n], want.float())
    assert torch.equal(val[n:], want.float())  # the decoder inverts the encoder


# ------------------------------------------------------------------------- bit exactness


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["rows", "tile16", "cols", "cols_rht", "rows_rht"])
def test_bit_exact_on_random_inputs(dtype, case, gen):
    x = random_matrix(32, 64, torch.float32, gen)
    scales = (1e-30, 1.0, 1e30) if case in ("rows", "tile16") else (1e-6, 1e6)
    for s in scales:
        xs = (x / x.abs().max() * s).to(dtype)
        if case == "rows":
            assert_same(xs)
        elif case == "tile16":
            assert_same(xs, tile=(16, 16))
        elif case == "cols":
            assert_same(xs.t())  # a transposed view: quantized along its K without a copy
        elif case == "cols_rht":
            assert_same(xs.t(), rht=True)
        else:
            assert_same(xs, rht=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bit_exact_magnitude_sweep(dtype, gen):
    for s in (1e-30, 1e-6, 1.0, 1e4 if dtype == torch.float16 else 1e30):
        x = random_matrix(48, 256, torch.float32, gen)
        x = (x / x.abs().max() * s).to(dtype)
        for tile, rht, view in (((1, 16), False, x), ((16, 16), False, x), ((1, 16), False, x.t()),
                                ((1, 16), True, x.t()), ((1, 16), True, x)):
            assert_same(view, tile=tile, rht=rht)
    for x in (torch.rand(32, 128, generator=gen) * 2 - 1, torch.randn(32, 128, generator=gen) ** 5):
        assert_same(x.to(dtype))
        assert_same(x.to(dtype).t(), rht=True)


def test_edge_cases():
    z = torch.zeros(16, 32)
    t = assert_same(z)
    assert t.amax.item() == 0 and not t.data.any() and not t.scale.view(torch.uint8).any()
    # -0.0 gives code 0; a tiny negative that rounds to zero keeps its sign (code 8).
    x = torch.full((16, 32), 1.0)
    x[0, 0], x[0, 1], x[0, 2] = -0.0, -1e-3, 1e-3
    codes = assert_same(x).codes()
    assert codes[0, 0] == 0 and codes[0, 1] == 8 and codes[0, 2] == 0
    # RTNE ties of the E2M1 grid, scaled so the block scale is exactly 1 (amax_b = 6).
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0])
    t = assert_same(ties.repeat(16, 2), amax=2688.0)
    assert t.codes()[0, :8].tolist() == [0, 2, 2, 4, 4, 6, 6, 7]
    # A tiny tensor amax clamps S_enc to FLT_MAX: S_dec and the scales are subnormal.
    assert_same(torch.randn(16, 64) * 1e-38)
    assert_same(torch.randn(16, 64, dtype=torch.float64).mul(1e-44).float())
    # Blocks whose scale underflows to 0 (enc_b = FLT_MAX) next to a huge block.
    x = torch.randn(16, 64) * 1e-30
    x[3, 5] = 1e30
    t = assert_same(x)
    assert (t.scale.view(torch.uint8) == 0).any()
    assert_same(x, tile=(16, 16))
    assert_same(x.t(), rht=True)
    # Subnormal FP32 inputs and BF16 subnormals.
    assert_same((torch.randn(16, 32) * 1e-39).to(torch.bfloat16))
    # Saturation with a caller-supplied amax below the data.
    x = torch.randn(16, 64)
    t = assert_same(x, amax=x.abs().max().item() / 5)
    assert ((t.codes() & 7) == 7).any()


def test_scale_order_cases():
    """The (tensor amax, block amax) pairs where the wrong scale order rounds differently."""
    for amax_hex, block_hex, good, _wrong in SCALE_ORDER_CASES:
        amax, bamax = float.fromhex(amax_hex), float.fromhex(block_hex)
        x = torch.zeros(16, 32)
        x[0, 0], x[1, 16] = amax, bamax
        t = assert_same(x)
        assert t.scale[1, 1].float().item() == good


def test_input_errors():
    with pytest.raises(ValueError, match="multiple of the block size 16"):
        T.quantize_nvfp4(torch.zeros(4, 20))
    with pytest.raises(ValueError, match="multiple of 16"):
        T.quantize_nvfp4(torch.zeros(8, 32), tile=(16, 16))
    with pytest.raises(ValueError, match="2-D"):
        T.quantize_nvfp4(torch.zeros(4))
    with pytest.raises(ValueError, match="NaN/Inf"):
        T.quantize_nvfp4(torch.full((4, 16), float("nan")), check_finite=True)


def test_non_finite_input_propagates_as_nan():
    x = torch.randn(16, 32)
    x[2, 3] = float("inf")
    t = T.quantize_nvfp4(x)
    assert not torch.isfinite(t.amax)
    assert torch.isnan(t.scale.float()).all()
    assert torch.isnan(T.dequantize_unscaled(t).float()).all()


# ------------------------------------------------------------------------- stochastic rounding


def test_stochastic_rounding_is_unbiased_and_reproducible(gen):
    x = torch.randn(16, 32, generator=gen)
    ref = nvfp4.quantize(x)
    draws = 40
    acc = torch.zeros(16, 32, dtype=torch.float64)
    for i in range(draws):
        t = T.quantize_nvfp4(x, rounding="stochastic", generator=torch.Generator().manual_seed(i))
        assert torch.equal(t.scale, ref.scale) and t.amax == ref.amax  # SR touches codes only
        acc += t.dequantize(torch.float32).double()
    mean = (acc / draws).float()
    rtne_err = (ref.dequantize() - x).abs().mean()
    sr_err = (mean - x).abs().mean()
    assert sr_err < rtne_err * 0.6, (sr_err, rtne_err)
    # The bias of the mean is small relative to the quantization step.
    assert (mean - x).mean().abs() < 0.02 * x.abs().mean()
    a = T.quantize_nvfp4(x, rounding="stochastic", generator=torch.Generator().manual_seed(7))
    b = T.quantize_nvfp4(x, rounding="stochastic", generator=torch.Generator().manual_seed(7))
    c = T.quantize_nvfp4(x, rounding="stochastic", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.data, b.data) and not torch.equal(a.data, c.data)


def test_stochastic_rounding_only_moves_to_neighbours(gen):
    x = torch.randn(16, 64, generator=gen).t()  # column-wise with RHT, as for the Wgrad dY
    ref = nvfp4.quantize(x, rht=True)
    t = T.quantize_nvfp4(x, rht=True, rounding="stochastic", generator=gen)
    assert torch.equal(t.scale, ref.scale) and torch.equal(t.amax, ref.amax)
    v, r = t.dequantize(torch.float32), ref.dequantize(torch.float32)
    step = (ref.scale.float().repeat_interleave(16, 1) * ref.amax / 2688.0) * 2  # largest E2M1 spacing
    assert ((v - r).abs() <= step * 1.001).all()
    assert not torch.equal(t.data, ref.data)


# ------------------------------------------------------------------------- device seeds

#: Every stochastic launch: (view of an [M, K] x, quantize_nvfp4 keywords). Rows, 16x16 tiles and
#: Four Over Six go through quant_rows_kernel; the transposed views and the RHT through
#: quant_groups_kernel.
SR_CASES = {
    "rows": (lambda x: x, {}),
    "tile16": (lambda x: x, {"tile": (16, 16)}),
    "rows_four6": (lambda x: x, {"scale_selection": "four_over_six"}),
    "cols": (lambda x: x.t(), {}),
    "cols_rht": (lambda x: x.t(), {"rht": True}),
    "rows_rht": (lambda x: x, {"rht": True}),
}


def assert_same_quantized(a, b):
    assert torch.equal(a.data, b.data) and torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))
    assert torch.equal(a.amax, b.amax)
    for x, y in ((a.gemm_operand, b.gemm_operand), (a.transposed, b.transposed)):
        assert (x is None) == (y is None)
    if a.gemm_operand is not None:
        assert torch.equal(a.gemm_operand.view(torch.int16), b.gemm_operand.view(torch.int16))
    if a.transposed is not None:
        assert torch.equal(a.transposed.data, b.transposed.data)


@pytest.mark.parametrize("case", sorted(SR_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_device_seed_draws_the_bits_of_the_generator_it_stands_for(case, dtype, gen):
    """SR with a device seed holding generator_seed(s) equals SR with a fresh generator seeded
    with s, bit for bit, in every stochastic launch (the kernel loads the key instead of taking
    it as an argument; nothing else changes)."""
    view, kw = SR_CASES[case]
    x = view(random_matrix(32, 64, torch.float32, gen).to(dtype))
    s = int(torch.randint(0, 2**62, (), generator=gen))
    want = T.quantize_nvfp4(x, rounding="stochastic", generator=torch.Generator().manual_seed(s), **kw)
    seed = torch.tensor([T.generator_seed(s, x.device)], dtype=torch.int64)
    got = T.quantize_nvfp4(x, rounding="stochastic", generator=seed, **kw)
    assert_same_quantized(got, want)
    other = T.quantize_nvfp4(x, rounding="stochastic", generator=seed + 1, **kw)
    assert not torch.equal(other.data, want.data)  # the key read is the one used


@pytest.mark.parametrize("key", [0, 5, 2**31 - 1, 2**31 + 3, 2**32 + 7, 2**62 + 12345, 2**63 - 1])
def test_a_loaded_key_of_any_width_equals_the_host_integer(key, gen, monkeypatch):
    """Triton types a host integer key i32 or i64 by its size; the loaded one is always int64.
    randint4x widens both to uint64, so every non-negative key below 2**63 draws the same bits."""
    x = random_matrix(32, 64, torch.float32, gen)
    seed = torch.tensor([key], dtype=torch.int64)
    for view, kw in (SR_CASES["rows"], SR_CASES["cols_rht"]):
        got = T.quantize_nvfp4(view(x), rounding="stochastic", generator=seed, **kw)
        with monkeypatch.context() as m:
            m.setattr(T, "_sr_seed", lambda generator, device: key)
            want = T.quantize_nvfp4(view(x), rounding="stochastic", generator=None, **kw)
        assert_same_quantized(got, want)


def test_a_device_seed_must_be_one_int64_on_the_device():
    x = torch.randn(16, 32)
    for bad in (torch.tensor([1], dtype=torch.int32), torch.tensor([1, 2]), torch.tensor([[1]], device="meta")):
        with pytest.raises(ValueError, match="1-element int64 tensor"):
            T.quantize_nvfp4(x, rounding="stochastic", generator=bad)


def test_the_mxfp4_and_ms_eden_quantizers_refuse_a_device_seed_by_name():
    """Only the NVFP4 kernels read a device seed; the others say so instead of failing in a launch."""
    from rayfp4.kernels import triton_eden, triton_mxfp4

    seed = torch.tensor([T.generator_seed(1, torch.device("cpu"))], dtype=torch.int64)
    with pytest.raises(TypeError, match="triton.quantize_mxfp4: .*device seeds"):
        triton_mxfp4.quantize_mxfp4(torch.randn(32, 64), rounding="stochastic", generator=seed)
    with pytest.raises(TypeError, match="quantize_ms_eden: .*device seeds"):
        triton_eden.quantize_ms_eden(torch.randn(32, 128), hadamard=128, generator=seed)


class _CudaGeneratorState:
    """A stand-in for a CUDA generator as _sr_seed reads it (seed, offset), so the CUDA key's
    arithmetic is checked on the CPU too (tests/test_kernels_triton_gpu.py checks a real one)."""

    device = torch.device("cuda")

    def __init__(self, seed):
        self.seed, self.offset = seed, 0

    def initial_seed(self):
        return self.seed

    def get_offset(self):
        return self.offset

    def set_offset(self, offset):
        self.offset = offset


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**62 + 12345, 2**63 - 1])
def test_generator_seed_is_the_key_of_a_fresh_generator(seed):
    cpu = torch.device("cpu")
    assert T.generator_seed(seed, cpu) == T._sr_seed(torch.Generator().manual_seed(seed), cpu)
    g = _CudaGeneratorState(seed)
    assert T.generator_seed(seed, "cuda") == T._sr_seed(g, torch.device("cuda")) < 2**63
    assert g.offset == 4  # read at offset 0 (a fresh generator), then advanced as on a real one
    with pytest.raises(ValueError, match="seed must be in"):
        T.generator_seed(-1, cpu)


# ------------------------------------------------------------------------- GEMM and backend


def test_gemm_matches_reference_emulation(gen):
    a = T.quantize_nvfp4(torch.randn(32, 64, generator=gen).to(torch.bfloat16))
    w = torch.randn(48, 64, generator=gen)
    b = T.quantize_nvfp4(w, tile=(16, 16))
    # On the CPU both multiply the same exact FP32 operands with the same matmul: equal.
    assert torch.equal(T.gemm(a, b, torch.float32), emulated_gemm(a, b, torch.float32))
    assert torch.equal(T.gemm(a, b, torch.bfloat16), emulated_gemm(a, b, torch.bfloat16))
    # The transposed weight (Dgrad operand) the quantizer wrote, against the reference's transpose.
    dy = T.quantize_nvfp4(torch.randn(32, 48, generator=gen))
    wt_ref = nvfp4.quantize(w, tile=(16, 16)).transpose()
    assert torch.allclose(T.gemm(dy, b.transpose(), torch.float32), emulated_gemm(dy, wt_ref, torch.float32),
                          rtol=1e-6, atol=0)


def test_auto_prefers_triton_on_hopper_and_cutlass_elsewhere(monkeypatch):
    """On compute capability 9.x both fast backends emulate with BF16 GEMMs and the Triton
    backend's (cuBLASLt, alpha on device) is the faster; elsewhere CUTLASS comes first (Blackwell's
    native FP4 GEMM). The CPU keeps the default order."""
    from rayfp4.kernels import registry

    for cap, want in (((9, 0), registry.HOPPER_PREFERENCE), ((10, 0), registry.PREFERENCE),
                      ((8, 0), registry.PREFERENCE)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        assert registry.preference("cuda:0") == want
    assert registry.HOPPER_PREFERENCE[0] == "triton" and registry.PREFERENCE[0] == "cutlass"
    assert registry.preference("cpu") == registry.PREFERENCE


def test_registry_keeps_reference_on_cpu():
    assert kernels.available_backends("cpu") == ["reference"]
    assert kernels.resolve("auto", "cpu").name == "reference"
    with pytest.raises(kernels.BackendUnavailable, match="no CUDA device"):
        kernels.resolve("triton", "cpu")


# ------------------------------------------------------------------------- fused passes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_amax_pass_and_column_operand_written_in_place(dtype, gen):
    """tensor_amax of x^T with RHT gives both operands' amaxes in one read; the column quantizer
    fed that amax equals the reference, and the BF16 operand it writes (in x's memory order) is
    the reference's dequantized operand, for RTNE and, against its own codes, for SR."""
    x = (random_matrix(48, 64, torch.float32, gen) * 1e-3).to(dtype)
    xt = x.t()
    am = T.tensor_amax(xt, rht=True)
    ref_rows, ref_cols = nvfp4.quantize(x), nvfp4.quantize(xt, rht=True)
    assert torch.equal(am[0], ref_rows.amax) and torch.equal(am[1], ref_cols.amax)
    rows = T.quantize_nvfp4(x, amax=am[0], trust_amax=True)
    assert torch.equal(rows.data, ref_rows.data) and torch.equal(rows.scale.view(torch.uint8), ref_rows.scale.view(torch.uint8))
    cols = T.quantize_nvfp4(xt, rht=True, amax=am[1], trust_amax=True, write_gemm_operand=True)
    assert torch.equal(cols.data, ref_cols.data) and torch.equal(cols.amax, ref_cols.amax)
    assert torch.equal(cols.scale.view(torch.uint8), ref_cols.scale.view(torch.uint8))
    op = cols.gemm_operand
    assert op.shape == (64, 48) and op.stride() == xt.stride()  # x's memory order, a view
    want = ref_cols.dequantize_unscaled(torch.bfloat16)
    assert torch.equal(op.contiguous().view(torch.int16), want.view(torch.int16))
    for rht in (False, True):
        sr = T.quantize_nvfp4(xt, rht=rht, rounding="stochastic", generator=gen, write_gemm_operand=True)
        own = T.dequantize_words(sr.data, sr.scale, sr.shape)
        assert torch.equal(sr.gemm_operand.contiguous().view(torch.int16), own.view(torch.int16))
    # Without the hint nothing extra is written for the (saved, packed) column operand.
    assert T.quantize_nvfp4(xt, rht=True).gemm_operand is None


@pytest.mark.parametrize("tokens", [64, 40])
def test_linear_layer_on_the_triton_backend_equals_the_reference_backend(tokens, gen):
    """NVFP4Linear with the Triton backend (interpreted here; shared amax passes, BF16 operands
    written by the quantizers) gives the reference backend's outputs, gradients and operands."""
    from rayfp4.precision import NVFP4Linear, PrecisionPolicy

    pol = PrecisionPolicy(stochastic_rounding_grads=False)  # SR streams differ between backends
    x = (torch.randn(tokens, 64, generator=gen) * 3).to(torch.bfloat16)
    dy = torch.randn(tokens, 48, generator=gen).to(torch.bfloat16)
    out = {}
    for name in ("reference", "triton"):
        torch.manual_seed(0)
        layer = NVFP4Linear(64, 48, bias=True, policy=pol)
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
    for key, q in ref[4].items():
        g = got[4][key]
        assert torch.equal(g.data, q.data) and torch.equal(g.scale.view(torch.uint8), q.scale.view(torch.uint8)), key
        assert torch.equal(g.amax, q.amax), key


def test_a_layer_trained_on_device_seeds_equals_the_layer_on_generators(gen):
    """NVFP4Linear (Triton backend, SR and RHT on, two micro-batches a step) trains bit for bit
    the same with the runtime's device seeds as with its generators: the same keys reach the
    kernels, now from the table. The reference backend keeps its generators."""
    from rayfp4.precision import NVFP4Linear, PrecisionPolicy, PrecisionRuntime

    pol = PrecisionPolicy()
    assert pol.stochastic_rounding_grads and pol.rht_wgrad
    xs = (torch.randn(3, 2, 32, 64, generator=gen) * 3).to(torch.bfloat16)
    dys = torch.randn(3, 2, 32, 48, generator=gen).to(torch.bfloat16)
    out = {}
    for device_seeds in (False, True):
        torch.manual_seed(0)
        rt = PrecisionRuntime(pol, seed=11, rank=1)
        layer = NVFP4Linear(64, 48, bias=True, policy=pol, runtime=rt, layer_index=2)
        layer.backend = T.TritonBackend()  # the registry offers it on CUDA only
        if device_seeds:
            rt.enable_device_seeds("cpu")
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        grads = []
        for step in range(3):
            rt.set_step(step)
            for mb in range(2):
                rt.set_micro_batch(mb)
                x = xs[step, mb].clone().requires_grad_(True)
                layer(x).backward(dys[step, mb])
                grads.append(x.grad)
            grads.append(layer.weight.grad.clone())
            opt.step()
            opt.zero_grad()
        out[device_seeds] = (grads, layer.weight.detach().clone(), layer.bias.detach().clone())
    assert list(rt._seed_slots) == [(2, "dgrad"), (2, "wgrad")]  # the table was drawn from
    for a, b in zip(out[False][0], out[True][0]):
        assert torch.equal(a, b)
    assert torch.equal(out[False][1], out[True][1]) and torch.equal(out[False][2], out[True][2])
    ref = NVFP4Linear(64, 48, policy=pol, runtime=PrecisionRuntime(pol))
    ref.runtime.enable_device_seeds("cpu")
    ref(xs[0, 0]).backward(dys[0, 0])
    assert not ref.runtime._seed_slots


def test_mxfp4_layer_on_a_fast_backend_skips_a_non_finite_step_instead_of_raising(gen):
    """The fast backends' MXFP4 quantizers, like their NVFP4 ones, turn a NaN/Inf block into a NaN
    scale instead of raising: the NaN reaches the output rows (so the loss, and the loop skips the
    step) and the backward pass runs, without crashing the run."""
    from rayfp4.precision import PrecisionPolicy
    from rayfp4.precision.linear import MXFP4Linear

    layer = MXFP4Linear(64, 32, bias=False, policy=PrecisionPolicy(format="mxfp4"))
    layer.backend = T.TritonBackend()
    x = torch.randn(32, 64, generator=gen)
    x[3, 5] = float("nan")
    x.requires_grad_(True)
    y = layer(x)
    assert torch.isnan(y[3]).all() and torch.isnan(y.sum())
    y.sum().backward()
    assert torch.isnan(layer.weight.grad).any()


@pytest.mark.parametrize("tile,selection", [((1, 16), {}), ((16, 16), {}),
                                            ((1, 16), {"scale_selection": "four_over_six"})])
def test_backend_dequantize_is_the_reference_values(tile, selection, gen):
    """What MS-EDEN's backward re-quantizes the forward operands from: the FP32 values of a packed
    operand (no BF16 operand kept, as after save_for_backward) equal ``dequantize()`` bit for bit."""
    x = random_matrix(64, 256, torch.float32, gen) * 3.0
    x[0, :16] = 0.0  # an all-zero block
    x[1, 3] = 1e-30  # a subnormal scale's block
    q = T.quantize_nvfp4(x, tile=tile, write_gemm_operand=False, **selection)
    assert q.gemm_operand is None
    want = q.dequantize(torch.float32)
    for t in (q, T.quantize_nvfp4(x, tile=tile, write_gemm_operand=True, **selection)):
        got = T.TritonBackend().dequantize(t)
        assert got.dtype == torch.float32 and torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_gemm_mode_picks_the_triton_backends_alpha_path_and_stays_out_of_the_fingerprint(monkeypatch):
    """``precision.gemm_mode`` (lt, the default; device): which way the triton backend's GEMM
    applies alpha, given to every layer of a run (one shared backend per mode); a different value
    resumes the same checkpoint (the same arithmetic up to the summation order), and a wrong one
    names the field."""
    from pydantic import ValidationError

    from rayfp4.config import RunConfig
    from rayfp4.precision import NVFP4Linear, PrecisionPolicy
    from rayfp4.precision import linear as L

    triton = T.TritonBackend()
    assert triton.gemm_mode == "lt" and PrecisionPolicy().gemm_mode == "lt"
    # As on a CUDA machine, where auto and "triton" resolve to the registered triton backend.
    monkeypatch.setattr(L, "resolve", lambda name, device: triton)
    dev = PrecisionPolicy(gemm_mode="device")
    layers = [NVFP4Linear(32, 16, policy=dev) for _ in range(2)]
    assert layers[0].backend is layers[1].backend and layers[0].backend.gemm_mode == "device"
    assert L.backend_for(PrecisionPolicy(), "cpu") is triton
    monkeypatch.undo()
    assert L.backend_for(dev, "cpu").name == "reference"  # other backends have no GEMM modes
    with pytest.raises(ValidationError, match="gemm_mode"):
        PrecisionPolicy(gemm_mode="cublas")
    assert RunConfig().fingerprint() == RunConfig(precision={"gemm_mode": "device"}).fingerprint()


def test_cublaslt_layouts_and_fallbacks_on_the_host():
    """The host-side logic of the cuBLASLt GEMM (gemm mode "lt"), which runs only on CUDA: D [M, N]
    = A [M, K] @ B [N, K]^T row-major is cuBLASLt's column-major D^T = op(B) op(A^T), so each
    operand's (op, rows, cols, ld) follows from which of its dimensions is contiguous; an operand
    with neither, or one it is not given (CPU, FP32, an offset start), makes it return None, and
    the backend then takes the two-pass GEMM."""
    from rayfp4.kernels import cublaslt as C

    a = torch.zeros(48, 32, dtype=torch.bfloat16)  # A [M=48, K=32]
    b = torch.zeros(64, 32, dtype=torch.bfloat16)  # B [N=64, K=32]
    # Row-major A is column-major A^T [K, M]: used as it lies (op N); column-major A needs op T.
    assert C._operand_layout(a, True) == (C._OP_N, 32, 48, 32)
    assert C._operand_layout(a.t().contiguous().t(), True) == (C._OP_T, 48, 32, 48)
    # Row-major B is column-major B^T [K, N]: transposed to B (op T); column-major B as it lies.
    assert C._operand_layout(b, False) == (C._OP_T, 32, 64, 32)
    assert C._operand_layout(b.t().contiguous().t(), False) == (C._OP_N, 64, 32, 64)
    # A row slice keeps its leading dimension; a column stride of 2 has no contiguous dimension.
    assert C._operand_layout(torch.zeros(48, 64, dtype=torch.bfloat16)[:, :32], True) == (C._OP_N, 32, 48, 64)
    assert C._operand_layout(torch.zeros(48, 64, dtype=torch.bfloat16)[:, ::2], True) is None
    alpha = torch.ones(1)
    assert C.gemm_device_alpha(a, b, alpha, torch.bfloat16) is None  # CPU tensors
    assert C.gemm_device_alpha(a.float(), b, alpha, torch.bfloat16) is None
    assert C.gemm_device_alpha(a, b[:, :16], alpha, torch.bfloat16) is None
    assert C.ALIGNMENT == 256 and C.WORKSPACE_BYTES == 32 * 2**20
