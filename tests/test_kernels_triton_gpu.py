"""The Triton NVFP4 kernels compiled on a CUDA GPU: bit for bit against the reference at scale.

On a GPU machine conftest leaves TRITON_INTERPRET unset, so these run with the whole suite (or
alone: ``pytest -m gpu tests``); with the interpreter forced (RAYFP4_TEST_INTERPRET=1) they skip.
"""

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("triton runs interpreted in this process; run this module on its own", allow_module_level=True)
pytest.importorskip("triton")

from rayfp4 import kernels  # noqa: E402
from rayfp4.formats import nvfp4  # noqa: E402
from rayfp4.formats.quantized import emulated_gemm, gemm_alpha  # noqa: E402
from rayfp4.kernels import triton_nvfp4 as T  # noqa: E402

from fusion_checks import CountCalls, same_bits, train_with_and_without  # noqa: E402
from test_formats_nvfp4 import random_matrix  # noqa: E402

DEV = torch.device("cuda")


def check(x, tile=(1, 16), rht=False, amax=None):
    ref = nvfp4.quantize(x, tile=tile, rht=rht, amax=amax)
    got = T.quantize_nvfp4(x, tile=tile, rht=rht, amax=amax)
    assert torch.equal(got.amax, ref.amax), (got.amax.item(), ref.amax.item())
    nb = (got.scale.view(torch.uint8) != ref.scale.view(torch.uint8)).sum().item()
    nc = (got.data != ref.data).sum().item()
    assert nb == 0 and nc == 0, f"{nb} scales and {nc} code bytes differ"
    assert torch.equal(T.dequantize_unscaled(got).view(torch.int16), ref.dequantize_unscaled(torch.bfloat16).view(torch.int16))
    if tile == (16, 16):
        assert got.transposed is not None  # written by the quantizer, returned by transpose()
        rt, gt = ref.transpose(), got.transpose()
        assert torch.equal(gt.data, rt.data) and torch.equal(gt.scale.view(torch.uint8), rt.scale.view(torch.uint8))
    return got


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bit_exact_at_scale(dtype):
    gen = torch.Generator().manual_seed(1234)
    for s in (1e-30, 1e-6, 1.0, 1e30):
        x = random_matrix(2048, 4096, torch.float32, gen)
        x = (x / x.abs().max() * s).to(dtype).to(DEV)
        check(x)
        check(x, tile=(16, 16))
        check(x.t())
        check(x.t(), rht=True)
        check(x, rht=True)
    x = torch.randn(4096, 1024, device=DEV).to(dtype)
    check(x, amax=x.abs().max().item() / 5)


def test_edge_cases_on_gpu():
    x = torch.full((16, 64), 1.0)
    x[0, 0], x[0, 1], x[0, 2] = -0.0, -1e-3, 1e-3
    check(x.to(DEV))
    check((torch.randn(256, 64) * 1e-38).to(DEV))               # subnormal S_dec
    check((torch.randn(256, 64) * 1e-39).to(torch.bfloat16).to(DEV))  # subnormal inputs
    y = torch.randn(256, 64) * 1e-30
    y[3, 5] = 1e30                                               # scales underflowing to 0
    for t in (y, y.to(torch.bfloat16)):
        check(t.to(DEV))
        check(t.to(DEV), tile=(16, 16))
        check(t.to(DEV).t(), rht=True)
    assert torch.isnan(T.quantize_nvfp4(torch.full((16, 32), float("nan"), device=DEV)).scale.float()).all()


def test_stochastic_rounding_statistics_on_gpu():
    x = torch.randn(1024, 1024, device=DEV)
    ref = nvfp4.quantize(x)
    acc = torch.zeros_like(x, dtype=torch.float64)
    for i in range(64):
        g = torch.Generator(device=DEV)
        g.manual_seed(i)
        t = T.quantize_nvfp4(x, rounding="stochastic", generator=g)
        assert torch.equal(t.scale, ref.scale)
        acc += t.dequantize().double()
    mean = (acc / 64).float()
    assert (mean - x).abs().mean() < 0.5 * (ref.dequantize() - x).abs().mean()
    g1, g2 = torch.Generator(device=DEV), torch.Generator(device=DEV)
    g1.manual_seed(5)
    g2.manual_seed(5)
    a = T.quantize_nvfp4(x.t(), rht=True, rounding="stochastic", generator=g1)
    b = T.quantize_nvfp4(x.t(), rht=True, rounding="stochastic", generator=g2)
    assert torch.equal(a.data, b.data)


@pytest.mark.parametrize("mode", T.GEMM_MODES)
def test_gemm_modes_match_reference(mode):
    a = T.quantize_nvfp4(torch.randn(512, 1024, device=DEV, dtype=torch.bfloat16))
    b = T.quantize_nvfp4(torch.randn(768, 1024, device=DEV), tile=(16, 16))
    want = emulated_gemm(a, b, torch.float32).double()
    for out_dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        got = T.gemm(a, b, out_dtype, mode=mode).double()
        assert got.dtype == torch.float64 and got.shape == want.shape
        assert ((got - want).norm() / want.norm()).item() < tol


def test_lt_gemm_applies_alpha_from_device_memory_in_every_layout():
    """cuBLASLt with alpha read by its epilogue (gemm mode "lt") against the FP32 GEMM and the
    separate rescale ("device"): both one FP32 product and one rounding, so they agree to the
    summation order (here: to the last BF16 bit but for a few elements, and within FP32 noise),
    for each operand row- or column-major (the layer's Fprop, Dgrad and Wgrad layouts), BF16 and
    FP32 outputs; an operand cuBLASLt cannot take falls back to "device" (the same values)."""
    from rayfp4.kernels import cublaslt

    x = torch.randn(1040, 768, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(512, 768, device=DEV) * 3
    a, b = T.quantize_nvfp4(x), T.quantize_nvfp4(w, tile=(16, 16))
    A, B = T.dequantize_unscaled(a), T.dequantize_unscaled(b)
    al = T.alpha(a, b)
    want = (A.double() @ B.double().t()) * al.double()
    for A_, B_ in ((A, B), (A.t().contiguous().t(), B), (A, B.t().contiguous().t()),
                   (A.t().contiguous().t(), B.t().contiguous().t())):
        for out_dtype in (torch.bfloat16, torch.float32):
            got = cublaslt.gemm_device_alpha(A_, B_, al, out_dtype)
            assert got is not None and got.dtype == out_dtype and got.shape == (1040, 512)
            ref = T.gemm(a, b, out_dtype, mode="device")
            tol = 1e-5 if out_dtype == torch.float32 else 1e-2
            assert ((got.double() - want).norm() / want.norm()).item() < tol
            if out_dtype == torch.bfloat16:
                assert (got != ref).float().mean().item() < 0.01
            else:
                assert torch.allclose(got, ref, rtol=1e-5, atol=1e-3 * want.abs().max().item())
    # Through the backend, and a layout cuBLASLt is not given (a strided view): "device"'s values.
    assert torch.equal(T.gemm(a, b, torch.float32, mode="lt"), cublaslt.gemm_device_alpha(A, B, al, torch.float32))
    strided = A[:, ::2]
    assert cublaslt.gemm_device_alpha(strided, B[:, ::2], al, torch.bfloat16) is None


def test_registry_picks_triton_on_cuda_and_linear_agrees():
    assert kernels.resolve("auto", DEV).name in ("triton", "cutlass")
    from rayfp4.precision import NVFP4Linear, PrecisionPolicy

    outs = {}
    for be in ("reference", "triton"):
        torch.manual_seed(0)
        layer = NVFP4Linear(256, 128, bias=False, policy=PrecisionPolicy(backend=be, stochastic_rounding_grads=False),
                            device=DEV)
        x = torch.randn(512, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        layer.capture = {}
        y = layer(x)
        y.backward(torch.randn_like(y))
        outs[be] = (y.float(), x.grad.float(), layer.weight.grad, layer.capture)
    (y0, dx0, dw0, c0), (y1, dx1, dw1, c1) = outs["reference"], outs["triton"]
    for k, q in c0.items():  # every quantized operand is identical
        assert torch.equal(q.data, c1[k].data) and torch.equal(q.scale.view(torch.uint8), c1[k].scale.view(torch.uint8)), k
    for a, b in ((y0, y1), (dx0, dx1), (dw0, dw1)):  # GEMMs equal up to FP32 summation order
        assert ((a - b).norm() / a.norm()).item() < 1e-2


def test_in_kernel_alpha_equals_the_reference_factor():
    """The epilogue computes alpha from both amaxes on the GPU: bit for bit formats' gemm_alpha
    (torch's CUDA arithmetic), over amaxes spanning the FP32 range, zero included."""
    x = T.quantize_nvfp4(torch.randn(32, 64, device=DEV))
    e = torch.randint(-120, 120, (2000, 2), device=DEV).float()
    amaxes = torch.rand(2000, 2, device=DEV) * torch.exp2(e)
    amaxes[:4] = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2688.0, 2688.0], [3.4e38, 1e-38]], device=DEV)
    for row in amaxes:
        a, b = dataclasses.replace(x, amax=row[0].clone()), dataclasses.replace(x, amax=row[1].clone())
        want = gemm_alpha(a, b).reshape(1)
        got = T.alpha(a, b)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (row.tolist(), got.item(), want.item())
    # and the device-mode GEMM applies exactly that factor: FP32 out == FP32 accumulation * alpha
    a = T.quantize_nvfp4(torch.randn(256, 512, device=DEV, dtype=torch.bfloat16))
    b = T.quantize_nvfp4(torch.randn(128, 512, device=DEV), tile=(16, 16))
    acc = torch.mm(T.dequantize_unscaled(a), T.dequantize_unscaled(b).t(), out_dtype=torch.float32)
    assert torch.equal(T.gemm(a, b, torch.float32, mode="device"), acc * gemm_alpha(a, b))
    assert torch.equal(T.gemm(a, b, torch.bfloat16, mode="device"), (acc * gemm_alpha(a, b)).to(torch.bfloat16))


@pytest.mark.parametrize("extra", [{}, {"backward_rounding": "ms_eden"}, {"format": "mxfp4"},
                                   {"scale_selection": "four_over_six"}],
                         ids=["recipe", "ms_eden", "mxfp4", "4over6"])
def test_a_training_step_on_the_triton_backend_never_stops_the_host(extra):
    """Every quantized linear's forward and backward enqueue work and return: a host sync in them
    (a value read back, a copy from pageable memory) costs a step its overlap with the GPU, and
    several runs sharing one GPU far more. CUDA's sync debug mode turns any such call into an error."""
    from rayfp4.model import ModelConfig, build_model
    from rayfp4.precision import apply_precision_policy

    cfg = ModelConfig(vocab_size=320, seq_len=256, n_layers=2, d_model=256, n_heads=4, n_kv_heads=2, d_ff=768)
    torch.manual_seed(0)
    model = build_model(cfg, device=DEV)
    summary = apply_precision_policy(model, {"format": "nvfp4", "backend": "triton", "bf16_last_blocks": 0, **extra},
                                     total_steps=10, device=DEV)
    tokens = torch.randint(0, 320, (4, 257), device=DEV)
    for step in range(3):  # the first step compiles the kernels: not what is checked
        summary.runtime.set_step(step)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(loss).item()
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("tile,selection", [((1, 16), {}), ((16, 16), {}),
                                            ((1, 16), {"scale_selection": "four_over_six"})])
def test_backend_dequantize_is_the_reference_values_on_gpu(tile, selection):
    """MS-EDEN's backward re-quantizes the forward operands from ``backend.dequantize``: compiled,
    it equals ``dequantize()`` bit for bit, with and without the BF16 operand the quantizer wrote."""
    gen = torch.Generator().manual_seed(4321)
    for s in (1e-30, 1.0, 1e30):
        x = random_matrix(1024, 2048, torch.float32, gen)
        x = x / x.abs().max() * s
        x[0, :16] = 0.0
        x[1, 3] = s * 1e-9
        x = x.to(DEV)
        for write in (False, True):
            q = T.quantize_nvfp4(x, tile=tile, write_gemm_operand=write, **selection)
            want = q.dequantize(torch.float32)
            got = T.TritonBackend().dequantize(q)
            assert got.dtype == torch.float32
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (s, write)


def _adamw_steps(model, fwd, runtime, tokens):
    """(losses, parameters) after one AdamW step (lr 1e-3, BF16 autocast) per ``tokens[step]``
    through ``fwd`` (the model, or what runs it), the runtime set to each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(len(tokens)):
        runtime.set_step(step)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(tokens[step, :, :-1], tokens[step, :, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("extra", [{}, {"backward_rounding": "ms_eden"}], ids=["recipe", "ms_eden"])
def test_a_compiled_step_on_the_triton_backend_equals_the_eager_step(extra):
    """train.compile: aot_eager on the GPU: the 4-bit layers as custom ops (rayfp4.precision.ops)
    around the Triton kernels, one graph for the whole model, the same losses and weights."""
    from rayfp4.model import ModelConfig, build_model
    from rayfp4.precision import apply_precision_policy

    cfg = ModelConfig(vocab_size=320, seq_len=256, n_layers=2, d_model=256, n_heads=4, n_kv_heads=2, d_ff=768)
    tokens = torch.randint(0, 320, (3, 4, 257), device=DEV)
    out = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, device=DEV)
        summary = apply_precision_policy(model, {"format": "nvfp4", "backend": "triton", "bf16_last_blocks": 0, **extra},
                                         total_steps=10, device=DEV)
        torch._dynamo.reset()
        fwd = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        out.append(_adamw_steps(model, fwd, summary.runtime, tokens))
    (la, pa), (lb, pb) = out
    assert torch.equal(la, lb), (la, lb)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**62 + 12345, 2**63 - 1])
def test_a_device_seed_draws_the_bits_of_a_fresh_cuda_generator(seed):
    """generator_seed computes a fresh CUDA generator's key on the host (manual_seed keeps the
    uint64 seed, offset 0), and the compiled kernels loading it from device memory draw what the
    generator's key, passed as a host integer, draws: in every stochastic launch."""
    g = torch.Generator(device=DEV)
    g.manual_seed(seed)
    key = T.generator_seed(seed, DEV)
    assert key == T._sr_seed(g, DEV)
    dev_seed = torch.tensor([key], dtype=torch.int64, device=DEV)
    x = random_matrix(256, 512, torch.float32, torch.Generator().manual_seed(seed % 2**32)).to(DEV)
    for view, kw in ((x, {}), (x, {"tile": (16, 16)}), (x, {"scale_selection": "four_over_six"}), (x.t(), {}),
                     (x.t(), {"rht": True}), (x.to(torch.bfloat16).t(), {"rht": True})):
        g = torch.Generator(device=DEV)
        g.manual_seed(seed)
        want = T.quantize_nvfp4(view, rounding="stochastic", generator=g, **kw)
        got = T.quantize_nvfp4(view, rounding="stochastic", generator=dev_seed, **kw)
        assert torch.equal(got.data, want.data) and torch.equal(got.scale.view(torch.uint8),
                                                                want.scale.view(torch.uint8)), kw
        assert torch.equal(got.amax, want.amax), kw


def test_a_captured_quantization_draws_the_device_seed_of_each_replay():
    """What device seeds are for: a CUDA graph replays the launch it captured, key argument
    included, but reads the device seed afresh, so rewriting the seed between replays gives each
    replay the streams of its own key."""
    x = torch.randn(256, 512, device=DEV)
    seed = torch.tensor([T.generator_seed(1, DEV)], dtype=torch.int64, device=DEV)
    for _ in range(2):  # compile the kernels outside the capture
        T.quantize_nvfp4(x.t(), rht=True, rounding="stochastic", generator=seed)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q = T.quantize_nvfp4(x.t(), rht=True, rounding="stochastic", generator=seed)
    for s in (2, 3):
        seed.fill_(T.generator_seed(s, DEV))
        graph.replay()
        g = torch.Generator(device=DEV)
        g.manual_seed(s)
        want = T.quantize_nvfp4(x.t(), rht=True, rounding="stochastic", generator=g)
        assert torch.equal(q.data, want.data), s


def test_a_model_trained_on_device_seeds_equals_it_on_generators_without_stopping_the_host():
    """The runtime's device seed table on CUDA: refreshed each step and micro-batch by one copy
    from pinned memory (no host sync: CUDA's sync debug mode errs on one), and the model trains
    bit for bit as with a generator per quantization."""
    from rayfp4.model import ModelConfig, build_model
    from rayfp4.precision import apply_precision_policy

    cfg = ModelConfig(vocab_size=320, seq_len=256, n_layers=2, d_model=256, n_heads=4, n_kv_heads=2, d_ff=768)
    tokens = torch.randint(0, 320, (3, 2, 4, 257), device=DEV)
    out = []
    for device_seeds in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, device=DEV)
        rt = apply_precision_policy(model, {"format": "nvfp4", "backend": "triton", "bf16_last_blocks": 0},
                                    total_steps=10, device=DEV).runtime
        if device_seeds:
            table = rt.enable_device_seeds(DEV)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(3):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if step else "default")  # step 0 compiles
            try:
                rt.set_step(step)
                for mb in range(2):
                    rt.set_micro_batch(mb)
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        loss = model(tokens[step, mb, :, :-1], tokens[step, mb, :, 1:])
                    loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            opt.step()
            opt.zero_grad(set_to_none=True)
        out.append([p.detach().clone() for p in model.parameters()])
    assert rt.device_seeds is table and len(rt._seed_slots) > 0
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_swiglu_product_is_torchs_cuda_kernels_for_every_bf16_gate():
    """The fused SwiGLU (CUDA's expf through libdevice) against torch's CUDA silu and product: every
    BF16 gate value, each with 64 up values of magnitudes 2^-140 .. 2^130 and the edge values."""
    g = torch.arange(-2**15, 2**15, dtype=torch.int32, device=DEV).to(torch.int16).view(torch.bfloat16)
    gen = torch.Generator(device=DEV).manual_seed(7)
    gate = g.repeat(64)[torch.randperm(2**22, generator=gen, device=DEV)].view(4096, 1024)
    u = torch.randn(4096, 1024, generator=gen, device=DEV) * torch.exp2(
        torch.randint(-140, 130, (4096, 1024), generator=gen, device=DEV).float())
    edges = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 3e38, 1e-38, 9.2e-41],
                         device=DEV)
    pick = torch.rand(4096, 1024, generator=gen, device=DEV) < 1 / 16
    u[pick] = edges[torch.randint(0, len(edges), (int(pick.sum()),), generator=gen, device=DEV)]
    gu = torch.cat([gate, u.to(torch.bfloat16)], dim=1)
    gate, up = gu.chunk(2, dim=-1)
    for rht in (False, True):
        h, _ = T.swiglu_amax(gate, up, rht=rht)
        assert same_bits(h, F.silu(gate) * up)
    h, _ = T.swiglu_amax(gate, torch.ones_like(up), rht=False)
    assert same_bits(h, F.silu(gate))
    # At scale, finite: the amaxes of the unfused pass over the padded product.
    gate, up = (torch.randn(4004, 2 * 2048, device=DEV) * 3).to(torch.bfloat16).chunk(2, dim=-1)
    h, amax = T.swiglu_amax(gate, up, rht=True)
    want = F.pad(F.silu(gate) * up, (0, 0, 0, 12))
    assert same_bits(h, want) and torch.equal(amax, T.tensor_amax(want.t(), rht=True))


def test_swiglu_backward_is_autograds_cuda_kernels_for_every_bf16_gate():
    """The fused SwiGLU backward (swiglu_backward_amax: CUDA's expf through libdevice, the FMA of
    torch's silu_backward) against autograd's gradient of gate_up on CUDA: every BF16 gate value,
    each with 64 up and dh values of magnitudes 2^-140 .. 2^130 and the edge values; at scale, the
    amaxes of the unfused pass over the padded gradient."""
    g = torch.arange(-2**15, 2**15, dtype=torch.int32, device=DEV).to(torch.int16).view(torch.bfloat16)
    gen = torch.Generator(device=DEV).manual_seed(9)
    edges = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 3e38, 1e-38, 9.2e-41],
                         device=DEV)

    def wide():
        v = torch.randn(4096, 1024, generator=gen, device=DEV) * torch.exp2(
            torch.randint(-140, 130, (4096, 1024), generator=gen, device=DEV).float())
        pick = torch.rand(4096, 1024, generator=gen, device=DEV) < 1 / 16
        v[pick] = edges[torch.randint(0, len(edges), (int(pick.sum()),), generator=gen, device=DEV)]
        return v.to(torch.bfloat16)

    def autograd_grad(gu, dh):
        gu = gu.detach().clone().requires_grad_(True)
        gate, up = gu.chunk(2, dim=-1)
        (F.silu(gate) * up).backward(dh)
        return gu.grad

    gate = g.repeat(64)[torch.randperm(2**22, generator=gen, device=DEV)].view(4096, 1024)
    gu, dh = torch.cat([gate, wide()], dim=1), wide()
    dgu, _ = T.swiglu_backward_amax(*gu.chunk(2, dim=-1), dh, rht=True)
    assert same_bits(dgu, autograd_grad(gu, dh))
    # At scale, finite: the amaxes of the unfused pass over the padded gradient.
    gu = (torch.randn(4004, 2 * 2048, device=DEV) * 3).to(torch.bfloat16)
    dh = torch.randn(4004, 2048, device=DEV).to(torch.bfloat16)
    dgu, amax = T.swiglu_backward_amax(*gu.chunk(2, dim=-1), dh, rht=True)
    want = F.pad(autograd_grad(gu, dh), (0, 0, 0, 12))
    assert same_bits(dgu, want) and torch.equal(amax, T.tensor_amax(want.t(), rht=True))


def _trained_with_and_without(flag: str, policy: dict):
    """Three AdamW steps of a BF16-autocast NVFP4 model on the triton backend (SR streams from the
    same generators) with the fusion ``flag`` off and on: the same losses and weights, bit for bit.
    Returns the fused run's model."""
    from rayfp4.model import ModelConfig, build_model
    from rayfp4.precision import apply_precision_policy

    cfg = ModelConfig(vocab_size=320, seq_len=256, n_layers=2, d_model=256, n_heads=4, n_kv_heads=2, d_ff=768)
    tokens = torch.randint(0, 320, (3, 4, 250), device=DEV)  # 4 x 249 tokens: x^T padded
    built = []

    def build():
        model = build_model(cfg, device=DEV)
        built.append(model)
        return model, apply_precision_policy(model, {"format": "nvfp4", "backend": "triton", **policy}, seed=3,
                                             device=DEV).runtime

    out = train_with_and_without(flag, lambda model, rt: _adamw_steps(model, model, rt, tokens), build)
    assert torch.equal(out[False][0], out[True][0]), (out[False][0], out[True][0])
    assert all(torch.equal(a, b) for a, b in zip(out[False][1], out[True][1]))
    return built[-1]


@pytest.mark.parametrize("policy", [{}, {"rht_wgrad": False, "weight_2d_scaling": False},
                                    {"scale_selection": "four_over_six"}])
def test_a_model_trains_the_same_with_the_swiglu_fused_on_gpu(policy, monkeypatch):
    """The same losses and weights with the SwiGLU product fused into the down projection's amax
    pass, and its backward into the gate_up projection's dY amax pass, as with torch computing them."""
    count = CountCalls(monkeypatch, T, "swiglu_amax")
    backward = CountCalls(monkeypatch, T, "swiglu_backward_amax")
    model = _trained_with_and_without("fuse_swiglu", policy)
    assert count.n == backward.n == 3 * len(model.layers)


def test_rmsnorm_output_is_torchs_cuda_kernels():
    """The fused RMSNorm products (rmsnorm_amax) against the model's RMSNorm on CUDA, cast to BF16
    as the quantized layer casts its input: FP32 and BF16 residuals at scale, rows of magnitudes
    2^-60 .. 2^60, a weight with zeros, tiny and huge values; and the amaxes of the unfused pass."""
    from rayfp4.model import RMSNorm

    gen = torch.Generator(device=DEV).manual_seed(11)
    x = torch.randn(4004, 2048, generator=gen, device=DEV) * torch.exp2(
        torch.randint(-60, 60, (4004, 1), generator=gen, device=DEV).float())
    x[1] = 0.0
    norm = RMSNorm(2048, 1e-5).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(2048, generator=gen, device=DEV) * 2)
        norm.weight[:5] = torch.tensor([0.0, -0.0, 1e-38, 3e38, -1.0], device=DEV)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        with torch.no_grad():
            want = F.pad(norm(xd).to(torch.bfloat16), (0, 0, 0, 12))
            rstd = norm.rstd(xd.float()).reshape(-1)
        for rht in (False, True):
            y, amax = T.rmsnorm_amax(xd, rstd, norm.weight, rht=rht)
            assert same_bits(y, want), (dtype, rht)
            assert torch.equal(amax, T.tensor_amax(want.t(), rht=rht)), (dtype, rht)


@pytest.mark.parametrize("policy", [{}, {"rht_wgrad": False, "weight_2d_scaling": False}])
def test_a_model_trains_the_same_with_the_norms_fused_on_gpu(policy, monkeypatch):
    """The same losses and weights (the norms' included) with the RMSNorms fused into the qkv and
    gate_up projections' amax passes as with torch computing them."""
    from rayfp4.precision import QuantizedLinear

    count = CountCalls(monkeypatch, T, "rmsnorm_amax")
    model = _trained_with_and_without("fuse_rmsnorm", policy)
    quantized = sum(isinstance(b.attn.qkv, QuantizedLinear) + isinstance(b.mlp.gate_up, QuantizedLinear)
                    for b in model.layers)
    assert quantized > 0 and count.n == 3 * quantized
