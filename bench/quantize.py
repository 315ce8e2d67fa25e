"""Achieved bandwidth of the Triton NVFP4 kernels against a device-to-device copy of the same bytes.

    python -m bench.quantize [--tokens 16384] [--features 4096]

For each kernel: bytes it must move (each input read once, each output written once), its median
time (triton.testing.do_bench), GB/s, and the ratio to a plain copy (``torch.Tensor.copy_``) of a
buffer whose read + write equal those bytes, timed in the same process (target: >= 0.70). The
activation is a [tokens, features] BF16 tensor (x or dY), the weight a [features, features] FP32
master weight. The torch reference (formats.nvfp4.quantize, eager) is timed once for scale. The last two rows
are what NVFP4Linear runs per activation and per gradient (several kernels, bytes summed).
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from bench.common import header
from rayfp4.formats import nvfp4
from rayfp4.kernels import triton_nvfp4 as T


def ms(fn) -> float:
    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def copy_ms(nbytes: int) -> float:
    """A copy moving ``nbytes`` in total (half read, half written)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return ms(lambda: dst.copy_(src))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--features", type=int, default=4096)
    a = p.parse_args()
    t, f = a.tokens, a.features
    print(header())
    x = torch.randn(t, f, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(f, f, device="cuda") * 0.02
    xb, xq = x.numel() * 2, x.numel() // 2 + x.numel() // 16  # BF16 bytes; packed codes + scales
    wb, wq = w.numel() * 4, w.numel() // 2 + w.numel() // 16
    am = T.tensor_amax(x)[0:1]
    words = torch.empty(t, f // 16, dtype=torch.int64, device="cuda")
    sc = torch.empty(t, f // 16, dtype=torch.uint8, device="cuda")
    deq = torch.empty(t, f, dtype=torch.bfloat16, device="cuda")
    wt_words = torch.empty(f, t // 16, dtype=torch.int64, device="cuda")
    wt_sc = torch.empty(f, t // 16, dtype=torch.uint8, device="cuda")
    xt = x.t()
    g = torch.Generator(device="cuda")
    g.manual_seed(0)

    # The kernels alone, with the launch parameters of triton_nvfp4.LAUNCH.
    def rows(sr, write_deq):
        return lambda: T.launch_quant_rows(x, words, sc, deq if write_deq else None, am, None, None, 1234, 1, sr)

    def cols(rht, sr, write_deq=False):
        return lambda: T.launch_quant_groups(xt, wt_words, wt_sc, am, 1234, rht, sr, deq=deq.t() if write_deq else None)

    xq_t = T.quantize_nvfp4(x)
    cases = [
        ("amax x (BF16)", lambda: T.tensor_amax(x), xb),
        ("amax x + amax RHT(x^T) fused", lambda: T.tensor_amax(xt, rht=True), xb),
        ("quant rows RTNE (codes+scales)", rows(False, False), xb + xq),
        ("quant rows RTNE + BF16 operand", rows(False, True), xb + xq + xb),
        ("quant rows SR + BF16 operand", rows(True, True), xb + xq + xb),
        ("quant cols (x^T) RTNE", cols(False, False), xb + xq),
        ("quant cols (x^T) RHT RTNE", cols(True, False), xb + xq),
        ("quant cols (x^T) RHT SR", cols(True, True), xb + xq),
        ("quant cols (x^T) RHT SR + BF16 operand", cols(True, True, True), xb + xq + xb),
        ("dequant packed -> BF16", lambda: T.dequantize_words(xq_t.data, xq_t.scale, (t, f)), xq + xb),
        ("quantize_nvfp4 x rows (amax+quant+BF16)", lambda: T.quantize_nvfp4(x), 2 * xb + xq + xb),
        ("quantize_nvfp4 x^T RHT (amax+quant)", lambda: T.quantize_nvfp4(xt, rht=True), 2 * xb + xq),
        ("quantize_nvfp4 W 16x16 FP32 (+BF16, +W^T)", lambda: T.quantize_nvfp4(w, tile=(16, 16)),
         2 * wb + 2 * wq + w.numel() * 2),
    ]

    def layer_x():  # what NVFP4Linear does with x: one amax pass for both of its operands
        a0, a1 = T.TritonBackend().amaxes(xt, True)
        T.quantize_nvfp4(x, amax=a0, trust_amax=True)
        T.quantize_nvfp4(xt, rht=True, amax=a1, trust_amax=True, write_gemm_operand=False)

    def layer_dy():  # and with dY (SR, the Wgrad operand written as BF16 too)
        a0, a1 = T.TritonBackend().amaxes(xt, True)
        T.quantize_nvfp4(x, rounding="stochastic", generator=g, amax=a0, trust_amax=True)
        T.quantize_nvfp4(xt, rht=True, rounding="stochastic", generator=g, amax=a1, trust_amax=True, write_gemm_operand=True)
    cases += [("layer: x -> x rows + x^T RHT (one amax)", layer_x, 3 * xb + 2 * xq + xb),
              ("layer: dY -> rows SR + dY^T RHT SR, both BF16", layer_dy, 3 * xb + 2 * xq + 2 * xb)]
    ref_ms = ms(lambda: nvfp4.quantize(x))
    print(f"{'kernel':44s} {'MB':>8s} {'ms':>8s} {'GB/s':>8s} {'copy GB/s':>9s} {'ratio':>6s}")
    for name, fn, nbytes in cases:
        t_k, t_c = ms(fn), copy_ms(nbytes)
        print(f"{name:44s} {nbytes / 1e6:8.1f} {t_k:8.4f} {nbytes / t_k / 1e6:8.0f} {nbytes / t_c / 1e6:9.0f} "
              f"{t_c / t_k:6.2f}")
    print(f"reference nvfp4.quantize(x) eager: {ref_ms:.3f} ms ({(xb + xq) / ref_ms / 1e6:.0f} GB/s of essential bytes)")


if __name__ == "__main__":
    main()
