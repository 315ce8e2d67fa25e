"""The CUTLASS GEMMs on a GPU: bit-exact against the reference emulation (skipped without one).

Bit-exactness trick: when every product and every partial sum is exactly representable in FP32,
the FP32 sum does not depend on the order of additions, so CUTLASS (whatever its tiling and
split of K) must equal ``bf16(fp32(a) @ fp32(b).T * alpha)`` bit for bit. The operands are what
the NVFP4 emulation multiplies (E2M1 value x E4M3 block scale); with scales between 1 and 3.75
(4 significant bits) every value is a multiple of 2^-3, every product a multiple of 2^-6, and each
test asserts that the sum of |products| stays below 2^18 = 2^24 units of 2^-6, so that no partial
sum, in any order, can round.

Run on the H200 with ``python -m pytest -q -s tests/test_cutlass_gpu.py`` after carrying the
built libraries (``RAYFP4_CACHE``). The sm_100a test runs only on compute capability 10.0.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import pytest
import torch

from cutlass_kernels import binding
from rayfp4.formats.quantized import fp32_gemm, gemm_alpha

pytestmark = pytest.mark.gpu

_av = binding.available() if torch.cuda.is_available() else binding.Availability(False, "no CUDA device")
needs_sm90 = pytest.mark.skipif(_av.family != "bf16_alpha", reason=f"needs an sm_90a GPU with the kernels built: {_av.reason}")
needs_sm100 = pytest.mark.skipif(_av.family != "nvfp4", reason=f"needs an sm_100a GPU with the kernels built: {_av.reason}")

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
#: E4M3 block scales of a narrow range (exact in E4M3): 1 .. 3.75 with 4 significant bits.
SCALES = torch.tensor([1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 3.75]).to(torch.float8_e4m3fn).float()


def nvfp4_like(rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[rows, k] BF16 values e2m1 * s_b with one scale per 16 along k: NVFP4 without the tensor factor."""
    codes = torch.randint(0, 16, (rows, k), generator=gen)
    scales = SCALES[torch.randint(0, len(SCALES), (rows, k // 16), generator=gen)]
    return (E2M1[codes] * scales.repeat_interleave(16, dim=1)).to(torch.bfloat16)


def _unit(t: torch.Tensor) -> float:
    """The largest power of two that divides every value of ``t`` (1.0 for an all-zero tensor)."""
    exps = []
    for v in t.detach().abs().double().unique().tolist():
        if v:
            m, e = math.frexp(v)  # v = m * 2^e, 0.5 <= m < 1
            mant = int(m * 2**53)
            exps.append(e - 53 + ((mant & -mant).bit_length() - 1))
    return 2.0 ** min(exps) if exps else 1.0


def assert_exact_sums(a: torch.Tensor, b: torch.Tensor) -> None:
    """Precondition of the trick: all partial sums exact in FP32 in any order, i.e. every product
    is a multiple of unit(a) * unit(b) and the sum of |products| stays below 2^24 such units."""
    bound = (a.double().abs() @ b.double().abs().T).max().item()
    unit = _unit(a) * _unit(b)
    assert bound < 2.0**24 * unit, f"sum of |products| {bound} is too large for the exactness trick (unit {unit})"


def narrow_scales(q, gen: torch.Generator):
    """``q`` with its block scales replaced by ones from SCALES: still a valid NVFP4Tensor (the same
    codes and amax), whose dequantized operands satisfy the exactness trick at any K used here
    (quantizing sets the scales relative to the tensor amax, up to 448, and their products
    overflow the trick's budget)."""
    idx = torch.randint(0, len(SCALES), tuple(q.scale.shape), generator=gen)
    return dataclasses.replace(q, scale=SCALES[idx].to(torch.float8_e4m3fn).to(q.scale.device))


def layouts(order: str, m: int, n: int, k: int, gen: torch.Generator):
    """Operands a [M, K], b [N, K] in the memory order of one training GEMM, on the GPU."""
    if order == "kk":  # Fprop: x [T, in], W [out, in]
        a, b = nvfp4_like(m, k, gen).cuda(), nvfp4_like(n, k, gen).cuda()
    elif order == "kn":  # Dgrad: dy [T, out], b = W.t() with W [out=K, in=N] contiguous
        a, b = nvfp4_like(m, k, gen).cuda(), nvfp4_like(n, k, gen).t().contiguous().cuda().t()
    elif order == "mn":  # Wgrad: a = dy.t() (dy [T=K, out=M]), b = x.t() (x [T=K, in=N])
        a = nvfp4_like(m, k, gen).t().contiguous().cuda().t()
        b = nvfp4_like(n, k, gen).t().contiguous().cuda().t()
    else:
        raise ValueError(order)
    assert binding.operand_order(a, b) == (order, False, False)
    return a, b


def bits_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    return torch.equal(x.view(torch.int16), y.view(torch.int16))


@needs_sm90
@pytest.mark.parametrize("order", ["kk", "kn", "mn"])
@pytest.mark.parametrize("mnk", [(1024, 768, 2048), (1000, 264, 528), (256, 4096, 4096)])
def test_bf16_alpha_is_bit_exact(order, mnk):
    m, n, k = mnk
    gen = torch.Generator().manual_seed(zlib.crc32(f"{order}{mnk}".encode()))
    a, b = layouts(order, m, n, k, gen)
    assert_exact_sums(a, b)
    key, ca, cb = binding.kernel_for(a, b)
    for alpha in (0.7131, torch.tensor([3.0517578125e-05 * 1.37], device="cuda")):  # host and device alpha
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")  # poison
        y = binding.gemm_bf16_alpha(a, b, alpha, out=out)
        torch.cuda.synchronize()
        ref = fp32_gemm(a, b, alpha, torch.bfloat16)
        a_t = alpha if isinstance(alpha, torch.Tensor) else torch.tensor([alpha], device="cuda")
        ref64 = ((a.double() @ b.double().T).float() * a_t.float().reshape(())).to(torch.bfloat16)
        assert bits_equal(ref, ref64)  # the reference itself is order-independent here
        ndiff = int((y.view(torch.int16) != ref.view(torch.int16)).sum())
        print(f"exact {order} {m}x{n}x{k} kernel={key} copies={ca, cb} alpha={'device' if isinstance(alpha, torch.Tensor) else 'host'}: "
              f"{ndiff} of {y.numel()} elements differ in bits")
        assert ndiff == 0


needs_wgrad = pytest.mark.skipif(not _av.wgrad, reason=f"needs the FP32-output (Wgrad) kernel built: {_av.reason}")


@needs_sm90
@needs_wgrad
@pytest.mark.parametrize("mnk", [(1024, 768, 2048), (1000, 260, 528), (4096, 256, 4096)])
def test_fp32_output_kernel_is_bit_exact(mnk):
    """The Wgrad kernel (``sm90a_bf16_kk_f32out``): fp32(alpha * acc), no BF16 rounding."""
    m, n, k = mnk
    gen = torch.Generator().manual_seed(zlib.crc32(f"f32{mnk}".encode()))
    a, b = layouts("kk", m, n, k, gen)
    assert_exact_sums(a, b)
    assert binding.kernel_for(a, b, out_dtype=torch.float32) == ("sm90a_bf16_kk_f32out", False, False)
    for alpha in (0.7131, torch.tensor([3.0517578125e-05 * 1.37], device="cuda")):
        out = torch.full((m, n), float("nan"), dtype=torch.float32, device="cuda")  # poison
        y = binding.gemm_bf16_alpha(a, b, alpha, out=out, out_dtype=torch.float32)
        torch.cuda.synchronize()
        ref = fp32_gemm(a, b, alpha, torch.float32)
        ndiff = int((y.view(torch.int32) != ref.view(torch.int32)).sum())
        print(f"exact f32-out {m}x{n}x{k}: {ndiff} of {y.numel()} elements differ in bits")
        assert ndiff == 0
    # A transposed layout is copied to the kk kernel, with the same result.
    y2 = binding.gemm_bf16_alpha(a.t().contiguous().t(), b, 0.7131, out_dtype=torch.float32)
    assert torch.equal(y2, fp32_gemm(a, b, 0.7131, torch.float32))


@needs_sm90
@needs_wgrad
def test_cutlass_backend_runs_wgrad_and_matches_triton():
    """Wgrad through the backend: the FP32 CUTLASS kernel, equal to the Triton path up to the FP32
    summation order, and bit-exact on operands whose sums are exact."""
    pytest.importorskip("triton")
    from rayfp4.formats import nvfp4
    from rayfp4.kernels import resolve

    cut, tri = resolve("cutlass", "cuda"), resolve("triton", "cuda")
    torch.manual_seed(5)
    dy = torch.randn(2048, 768, device="cuda", dtype=torch.bfloat16)  # [T, out]
    x = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)  # [T, in]
    g = torch.Generator(device="cuda").manual_seed(6)
    a = tri.quantize_nvfp4(dy.t(), (1, 16), "stochastic", True, g)
    b = tri.quantize_nvfp4(x.t(), (1, 16), "nearest", True, None)
    y = cut.gemm(a, b, torch.float32)
    ref = tri.gemm(a, b, torch.float32)
    assert y.dtype == torch.float32 and y.shape == (768, 1024)
    d = (y - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"wgrad cutlass vs triton 768x1024x2048: max diff {d:.3g} (max |dW| {scale:.3g})")
    assert d <= 1e-5 * scale  # FP32 summation order only
    gen = torch.Generator().manual_seed(7)
    qa = narrow_scales(nvfp4.quantize(torch.randn(256, 1024, device="cuda")), gen)
    qb = narrow_scales(nvfp4.quantize(torch.randn(512, 1024, device="cuda")), gen)
    ea, eb = qa.dequantize_unscaled(torch.bfloat16), qb.dequantize_unscaled(torch.bfloat16)
    assert_exact_sums(ea, eb)
    assert torch.equal(cut.gemm(qa, qb, torch.float32), fp32_gemm(ea, eb, gemm_alpha(qa, qb), torch.float32))


@needs_sm90
@pytest.mark.parametrize("order", ["kk", "kn", "mn"])
def test_bf16_alpha_general_inputs_close(order):
    m, n, k = 2048, 1024, 4096
    torch.manual_seed(1)
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    if order == "kn":
        b = b.t().contiguous().t()
    if order == "mn":
        a, b = a.t().contiguous().t(), b.t().contiguous().t()
    alpha = 0.03125 * 1.1
    y = binding.gemm_bf16_alpha(a, b, alpha).float()
    ref = fp32_gemm(a, b, alpha, torch.bfloat16).float()
    ref64 = ((a.double() @ b.double().T) * alpha).float()
    diff = (y - ref).abs()
    n_diff = int((diff > 0).sum())
    rel = ((y - ref64).norm() / ref64.norm()).item()
    rel_ref = ((ref - ref64).norm() / ref64.norm()).item()
    print(f"general {order} {m}x{n}x{k}: max|cutlass-ref| {diff.max().item():.3g} "
          f"({n_diff} of {y.numel()} differ, <= 1 bf16 ulp expected), rel err vs fp64 {rel:.3g} (ref's own {rel_ref:.3g})")
    assert rel < 4e-3  # one BF16 rounding (2^-9 relative) dominates
    # Only the FP32 summation order differs: a BF16 ulp of the largest outputs at most.
    assert diff.max().item() <= torch.finfo(torch.bfloat16).eps * ref.abs().max().item()


@needs_sm90
def test_nvfp4_emulation_matches_reference_backend():
    from rayfp4.formats import nvfp4

    torch.manual_seed(2)
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(768, 1024, device="cuda", dtype=torch.bfloat16)
    qx, qw = nvfp4.quantize(x), nvfp4.quantize(w, tile=(16, 16))
    y = binding.gemm_nvfp4_emulated(qx, qw)
    ref = fp32_gemm(qx.dequantize_unscaled(torch.bfloat16), qw.dequantize_unscaled(torch.bfloat16), gemm_alpha(qx, qw),
                    torch.bfloat16)
    d = (y.float() - ref.float()).abs()
    print(f"nvfp4 emulation 512x768x1024 random: {int((d > 0).sum())} of {d.numel()} differ, max {d.max().item():.3g}")
    assert d.max().item() <= torch.finfo(torch.bfloat16).eps * ref.float().abs().max().item()


@needs_sm90
def test_cutlass_backend_is_the_binding_emulation_with_triton_operands():
    """The backend hands gemm_nvfp4_emulated the Triton quantizers' BF16 operands and the on-device
    alpha; both equal the defaults bit for bit, so the GEMM does too (same kernel, same layout)."""
    pytest.importorskip("triton")
    from rayfp4.formats import nvfp4
    from rayfp4.kernels import resolve, triton_nvfp4

    torch.manual_seed(4)
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(768, 1024, device="cuda")
    a, b = triton_nvfp4.quantize_nvfp4(x), triton_nvfp4.quantize_nvfp4(w, tile=(16, 16))
    assert a.gemm_operand is not None and b.gemm_operand is not None  # written while quantizing
    y = resolve("cutlass", "cuda").gemm(a, b, torch.bfloat16)
    assert bits_equal(y, binding.gemm_nvfp4_emulated(nvfp4.quantize(x), nvfp4.quantize(w, tile=(16, 16))))


@needs_sm90
def test_nvfp4_on_hopper_is_refused_natively():
    from rayfp4.formats import nvfp4

    q = nvfp4.quantize(torch.randn(64, 64, device="cuda"))
    with pytest.raises(RuntimeError, match="sm100a kernels need compute capability 10.0"):
        binding.gemm_nvfp4(q, q)


@needs_sm100
def test_native_nvfp4_matches_emulation_exactly():  # pragma: no cover - no Blackwell GPU here
    from rayfp4.formats import nvfp4

    gen = torch.Generator().manual_seed(3)
    m, n, k = 1024, 768, 2048
    qa = narrow_scales(nvfp4.quantize(torch.randn(m, k, device="cuda")), gen)
    qb = narrow_scales(nvfp4.quantize(torch.randn(n, k, device="cuda")), gen)
    ea, eb = qa.dequantize_unscaled(torch.bfloat16), qb.dequantize_unscaled(torch.bfloat16)
    assert_exact_sums(ea, eb)
    ref = fp32_gemm(ea, eb, gemm_alpha(qa, qb), torch.bfloat16)
    for kernel in ("sm100a_nvfp4_256x256", "sm100a_nvfp4_128x128"):
        if binding.is_built(kernel):
            assert bits_equal(binding.gemm_nvfp4(qa, qb, kernel=kernel), ref), kernel
    ref32 = fp32_gemm(ea, eb, gemm_alpha(qa, qb), torch.float32)
    for kernel in ("sm100a_nvfp4_256x256_f32out", "sm100a_nvfp4_128x128_f32out"):
        if binding.is_built(kernel):
            assert torch.equal(binding.gemm_nvfp4(qa, qb, kernel=kernel, out_dtype=torch.float32), ref32), kernel
