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


def assert_exact_sums(a: torch.Tensor, b: torch.Tensor) -> None:
    """Precondition of the trick: all partial sums exact in FP32 in any order."""
    bound = (a.double().abs() @ b.double().abs().T).max().item()
    # products are multiples of 2^-6 (values: multiples of 0.5 * 2^-2 from the 1.25/1.75/... scales)
    assert bound < 2.0**24 * 2.0**-6, f"sum of |products| {bound} too large for the exactness trick"


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
    a16, b16 = nvfp4_like(m, k, gen).cuda(), nvfp4_like(n, k, gen).cuda()
    qa, qb = nvfp4.quantize(a16), nvfp4.quantize(b16)
    ea, eb = qa.dequantize_unscaled(torch.bfloat16), qb.dequantize_unscaled(torch.bfloat16)
    assert_exact_sums(ea, eb)
    ref = fp32_gemm(ea, eb, gemm_alpha(qa, qb), torch.bfloat16)
    for kernel in ("sm100a_nvfp4_256x256", "sm100a_nvfp4_128x128"):
        if binding.is_built(kernel):
            assert bits_equal(binding.gemm_nvfp4(qa, qb, kernel=kernel), ref), kernel
