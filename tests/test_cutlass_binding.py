"""Argument preparation and error paths of the CUTLASS binding (CPU only: nothing is launched)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cutlass_kernels import binding
from rayfp4.formats import nvfp4
from rayfp4.formats.quantized import fp32_gemm, gemm_alpha


def bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


# ---- memory orders of the three training GEMMs --------------------------------------------


def test_training_gemms_map_to_kernels_without_copies():
    tokens, d_in, d_out = 64, 32, 48
    x, w, dy = bf16(tokens, d_in), bf16(d_out, d_in), bf16(tokens, d_out)
    assert binding.operand_order(x, w) == ("kk", False, False)  # Fprop  x @ W^T
    assert binding.operand_order(dy, w.t()) == ("kn", False, False)  # Dgrad  dy @ W
    assert binding.operand_order(dy.t(), x.t()) == ("mn", False, False)  # Wgrad  dy^T @ x
    assert binding.operand_order(dy.t(), w.t().contiguous()) == ("mk", False, False)


def test_general_strides_are_copied_to_k_major():
    a = bf16(16, 64)[:, ::2]  # stride (64, 2): neither row- nor column-major
    b = bf16(24, 32)
    assert binding.operand_order(a, b) == ("kk", True, False)
    assert binding.operand_order(b, a) == ("kk", False, True)


def test_unbuilt_order_falls_back_to_kk_on_copies(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYFP4_CACHE", str(tmp_path))  # empty cache: nothing built
    dy, w = bf16(64, 48), bf16(48, 32)
    assert binding.kernel_for(dy, w.t()) == ("sm90a_bf16_kk", False, True)
    assert binding.kernel_for(dy.t(), dy.t()) == ("sm90a_bf16_kk", True, True)
    assert binding.kernel_for(dy, dy) == ("sm90a_bf16_kk", False, False)
    # FP32 output (Wgrad): only the kk kernel exists, so a transposed operand is always copied
    assert binding.kernel_for(dy, dy, out_dtype=torch.float32) == ("sm90a_bf16_kk_f32out", False, False)
    assert binding.kernel_for(dy.t(), dy.t(), out_dtype=torch.float32) == ("sm90a_bf16_kk_f32out", True, True)


def test_native_kernel_choice_follows_size_and_output(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYFP4_CACHE", str(tmp_path))  # nothing built: the 1-SM tile
    assert binding.nvfp4_kernel_for(4096, 4096) == "sm100a_nvfp4_128x128"
    assert binding.nvfp4_kernel_for(4096, 4096, torch.float32) == "sm100a_nvfp4_128x128_f32out"
    monkeypatch.setattr(binding, "is_built", lambda key, root=None: True)
    assert binding.nvfp4_kernel_for(4096, 4096, torch.float32) == "sm100a_nvfp4_256x256_f32out"
    assert binding.nvfp4_kernel_for(128, 4096) == "sm100a_nvfp4_128x128"


# ---- checks -------------------------------------------------------------------------------


def test_bf16_checks_accept_the_training_layouts():
    x, w, dy = bf16(64, 32), bf16(48, 32), bf16(64, 48)
    assert binding.check_bf16_operands(x, w) == (64, 48, 32)
    assert binding.check_bf16_operands(dy, w.t()) == (64, 32, 48)
    assert binding.check_bf16_operands(dy.t(), x.t()) == (48, 32, 64)
    # an FP32 output row needs N % 4 (16 bytes), a BF16 one N % 8
    assert binding.check_bf16_operands(bf16(8, 16), bf16(12, 16), out_dtype=torch.float32) == (8, 12, 16)
    with pytest.raises(ValueError, match=r"the output \[8, 6\] has contiguous extent N = 6, not a multiple of 4"):
        binding.check_bf16_operands(bf16(8, 16), bf16(6, 16), out_dtype=torch.float32)
    with pytest.raises(ValueError, match="out_dtype must be torch.bfloat16 or torch.float32"):
        binding.check_bf16_operands(x, w, out_dtype=torch.float16)


@pytest.mark.parametrize(
    "a,b,match",
    [
        (torch.randn(8, 16), bf16(8, 16), r"a must be bfloat16, got torch.float32 \(shape 8x16\)"),
        (bf16(8, 16), bf16(16), r"b must be 2-D, got shape 16"),
        (bf16(8, 16), bf16(8, 24), r"a is \[M, K\] = 8x16 and b is \[N, K\] = 8x24: K differs"),
        (bf16(8, 12), bf16(8, 12), r"a 8x12 has contiguous extent K = 12, not a multiple of 8"),
        (bf16(8, 16), bf16(12, 16), r"the output \[8, 12\] has contiguous extent N = 12"),
        (bf16(16, 12).t(), bf16(8, 16), r"contiguous extent M = 12"),
        (bf16(0, 16), bf16(8, 16), r"empty problem"),
        ([[1.0]], bf16(8, 16), r"a must be a torch.Tensor"),
    ],
)
def test_bf16_check_errors_name_the_operand_and_shape(a, b, match):
    with pytest.raises(ValueError, match=match):
        binding.check_bf16_operands(a, b)


def test_misaligned_view_is_rejected():
    base = bf16(8, 24)
    a = base[:, 1:17]  # row stride 24, start offset 2 bytes: not row-major, copied -> fine
    assert binding.check_bf16_operands(a, bf16(8, 16)) == (8, 8, 16)
    flat = bf16(8 * 16 + 1)[1:].view(8, 16)  # row-major but the pointer is 2 bytes off
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        binding.check_bf16_operands(flat, bf16(8, 16))


def test_gemm_on_cpu_tensors_is_refused_before_any_library_is_loaded():
    with pytest.raises(ValueError, match="must be CUDA tensors, got cpu"):
        binding.gemm_bf16_alpha(bf16(8, 16), bf16(8, 16), 1.0)


def test_alpha_argument_forms():
    dev = torch.device("cpu")
    assert binding._alpha_args(0.5, dev, "t")[:2] == (0.5, None)
    t = torch.tensor([0.25])
    f, ptr, keep = binding._alpha_args(t, dev, "t")
    assert f == 1.0 and ptr == keep.data_ptr()
    with pytest.raises(ValueError, match="1-element float32"):
        binding._alpha_args(torch.tensor([1.0, 2.0]), dev, "t")
    with pytest.raises(ValueError, match="1-element float32"):
        binding._alpha_args(torch.tensor(1.0, dtype=torch.float64), dev, "t")
    with pytest.raises(ValueError, match="float or a 1-element"):
        binding._alpha_args("x", dev, "t")


# ---- NVFP4 operands -------------------------------------------------------------------------


def q(rows, k, **kw):
    return nvfp4.quantize(torch.randn(rows, k), **kw)


def test_nvfp4_checks():
    a, b = q(64, 64), q(32, 64)
    assert binding.check_nvfp4_operands(a, b) == (64, 32, 64)
    with pytest.raises(ValueError, match="K = 48 .* multiple of 32"):
        binding.check_nvfp4_operands(q(8, 48), q(8, 48))
    with pytest.raises(ValueError, match="N = 12 .* multiple of 8 for the BF16 output"):
        binding.check_nvfp4_operands(q(8, 64), q(12, 64))
    assert binding.check_nvfp4_operands(q(8, 64), q(12, 64), out_dtype=torch.float32) == (8, 12, 64)
    with pytest.raises(ValueError, match="N = 6 .* multiple of 4 for the FP32 output"):
        binding.check_nvfp4_operands(q(8, 64), q(6, 64), out_dtype=torch.float32)
    with pytest.raises(ValueError, match="K differs"):
        binding.check_nvfp4_operands(q(8, 64), q(8, 128))
    with pytest.raises(ValueError, match="same .*domain"):
        binding.check_nvfp4_operands(q(16, 64, rht=True), q(16, 64))
    with pytest.raises(ValueError, match="must be an NVFP4Tensor"):
        binding.check_nvfp4_operands(torch.zeros(8, 64), q(8, 64))


def test_alpha_is_the_product_of_the_two_decode_factors_in_fp32():
    a, b = q(16, 64), q(16, 64)
    alpha = gemm_alpha(a, b)
    expect = (a.amax.float() / 2688.0) * (b.amax.float() / 2688.0)
    assert alpha.dtype == torch.float32 and alpha.shape == ()
    assert torch.equal(alpha, expect)
    zero = gemm_alpha(dataclasses.replace(a, amax=torch.tensor(0.0)), b)
    assert zero.item() == 0.0


def test_emulation_recipe_reproduces_dequantized_product():
    """dequantize_unscaled x dequantize_unscaled x alpha == what the hardware computes; check the
    preparation against the full dequantize in FP64 (only the global factors' rounding differs)."""
    torch.manual_seed(0)
    a, b = q(32, 128), q(24, 128)
    a16, b16 = a.dequantize_unscaled(torch.bfloat16), b.dequantize_unscaled(torch.bfloat16)
    assert torch.equal(a16.float(), a.dequantize_unscaled(torch.float32))  # exact in BF16
    emulated = fp32_gemm(a16, b16, gemm_alpha(a, b), torch.bfloat16)
    full = (a.dequantize(torch.float64) @ b.dequantize(torch.float64).T).to(torch.bfloat16)
    assert emulated.dtype == torch.bfloat16
    torch.testing.assert_close(emulated.float(), full.float(), rtol=1e-2, atol=1e-2)


def _cutlass_sf_offset(r: int, c: int, kb: int) -> int:
    """Offset of scale (row r, k-block c) in CUTLASS's Sm1xxBlockScaledConfig::SfKMajorAtom
    (Shape<<32,4>,<16,4>>, Stride<<16,4>,<0,1>>) tiled over (M, K) with Step<_2,_1>: the K tiles
    vary fastest. ``kb`` is the number of k-blocks padded to a multiple of 4."""
    atom = (r % 32) * 16 + ((r % 128) // 32) * 4 + (c % 4)
    return ((r // 128) * (kb // 4) + c // 4) * 512 + atom


@pytest.mark.parametrize("rows,k", [(128, 64), (200, 96), (16, 1024)])
def test_blocked_scales_match_cutlass_layout(rows, k):
    t = q(rows, k)
    flat = t.blocked_scale().view(torch.uint8)
    cols = k // 16
    kb = -(-cols // 4) * 4
    assert flat.numel() == (-(-rows // 128) * 128) * kb
    s = t.scale.view(torch.uint8)
    for r in range(rows):
        for c in range(cols):
            assert flat[_cutlass_sf_offset(r, c, kb)] == s[r, c]
    # padding is zero
    used = {_cutlass_sf_offset(r, c, kb) for r in range(rows) for c in range(cols)}
    pad = [i for i in range(flat.numel()) if i not in used]
    assert all(flat[i] == 0 for i in pad[:2048])


# ---- availability and loading ---------------------------------------------------------------


def test_cpu_is_never_available():
    av = binding.available("cpu")
    assert not av and "need a CUDA device" in av.reason and av.family is None and not av.wgrad


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_no_cuda_is_not_available():
    assert not binding.available()
    assert not binding.available("cuda")


def test_capability_to_arch_is_exact():
    assert binding._arch_for_capability((9, 0)) == "sm90a"
    assert binding._arch_for_capability((10, 0)) == "sm100a"
    for cap in ((8, 0), (8, 9), (10, 3), (11, 0), (12, 0)):
        assert binding._arch_for_capability(cap) is None  # sm_100a code never runs there


def test_load_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYFP4_CACHE", str(tmp_path))
    monkeypatch.setattr(binding, "_loaded", {})  # forget libraries loaded by earlier tests
    with pytest.raises(ValueError, match="unknown CUTLASS kernel"):
        binding.load("sm90a_nope")
    with pytest.raises(binding.KernelNotBuilt, match=r"python -m cutlass_kernels.build --arch sm90a --kernels sm90a_bf16_mn"):
        binding.load("sm90a_bf16_mn")
