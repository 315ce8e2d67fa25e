"""Achieved bandwidth of the Triton NVFP4 and MXFP4 kernels against a device-to-device copy of the same bytes.

    python -m bench.quantize [--tokens 16384] [--features 4096] [--formats nvfp4,mxfp4]

For each kernel: bytes it must move (each input read once, each output written once), its median
time (triton.testing.do_bench), GB/s, and the ratio to a plain copy (``torch.Tensor.copy_``) of a
buffer whose read + write equal those bytes, timed in the same process (target: >= 0.70). The
activation is a [tokens, features] BF16 tensor (x or dY), the weight a [features, features] FP32
master weight. The torch reference (formats.nvfp4.quantize, eager) is timed once for scale. The last two rows
are what NVFP4Linear runs per activation and per gradient (several kernels, bytes summed).

The MXFP4 table (after the NVFP4 one) has the same columns for ``triton_mxfp4`` (one pass, no
tensor amax) and, where there is one, the time of the torch reference doing the same work
(``formats.mxfp4.quantize`` / ``dequantize_unscaled``, eager: what the backend ran before) and
the speedup over it.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import copy_ms, header
from bench.common import median_ms as ms
from rayfp4.formats import mxfp4, nvfp4
from rayfp4.kernels import triton_mxfp4 as X
from rayfp4.kernels import triton_nvfp4 as T


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--formats", default="nvfp4,mxfp4", help="comma-separated: which tables to print")
    a = p.parse_args()
    t, f = a.tokens, a.features
    print(header())
    x = torch.randn(t, f, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(f, f, device="cuda") * 0.02
    formats = a.formats.split(",")
    if "nvfp4" in formats:
        nvfp4_table(x, w)
    if "mxfp4" in formats:
        mxfp4_table(x, w)


def nvfp4_table(x: torch.Tensor, w: torch.Tensor) -> None:
    t, f = x.shape
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

    four6 = ("four_over_six", "mse", 256.0)  # Four Over Six: both candidates and their errors per block

    def rows46(sr, write_deq):
        return lambda: T.launch_quant_rows(x, words, sc, deq if write_deq else None, am, None, None, 1234, 1, sr,
                                           selection=four6)

    def cols46(rht, sr):
        return lambda: T.launch_quant_groups(xt, wt_words, wt_sc, am, 1234, rht, sr, selection=four6)

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
        ("4/6 quant rows RTNE + BF16 operand", rows46(False, True), xb + xq + xb),
        ("4/6 quant rows SR + BF16 operand", rows46(True, True), xb + xq + xb),
        ("4/6 quant cols (x^T) RHT SR", cols46(True, True), xb + xq),
        ("4/6 quantize_nvfp4 W 16x16 FP32 (+BF16, +W^T)",
         lambda: T.quantize_nvfp4(w, tile=(16, 16), scale_selection="four_over_six"), 2 * wb + 2 * wq + w.numel() * 2),
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


def mxfp4_table(x: torch.Tensor, w: torch.Tensor) -> None:
    """The MXFP4 kernels (launch parameters of triton_mxfp4.LAUNCH) and the whole quantizer calls
    the backend makes, each against a copy of its bytes and, where given, the eager reference."""
    t, f = x.shape
    xb, xq = x.numel() * 2, x.numel() // 2 + x.numel() // 32  # BF16 bytes; packed codes + UE8M0 bytes
    wb, wq = w.numel() * 4, w.numel() // 2 + w.numel() // 32
    xt = x.t()
    words = torch.empty(t, f // 16, dtype=torch.int64, device="cuda")
    sc = torch.empty(t, f // 32, dtype=torch.uint8, device="cuda")
    deq = torch.empty(t, f, dtype=torch.bfloat16, device="cuda")
    words_t = torch.empty(f, t // 16, dtype=torch.int64, device="cuda")
    sc_t = torch.empty(f, t // 32, dtype=torch.uint8, device="cuda")
    w_words = torch.empty(f, f // 16, dtype=torch.int64, device="cuda")
    w_sc = torch.empty(f, f // 32, dtype=torch.uint8, device="cuda")
    g = torch.Generator(device="cuda")
    g.manual_seed(0)

    def rows(sr=False, write_deq=False, ceil=True):
        return lambda: X.launch_rows(x, words, sc, deq if write_deq else None, 1234, 1, ceil, sr)

    def cols(rht, sr):
        return lambda: X.launch_groups(xt, words_t, sc_t, None, 1234, 1, True, rht, sr)

    def layer_x(q):  # what MXFP4Linear quantizes of x: Fprop rows, the Wgrad x^T with the RHT
        return lambda: (q(x), q(xt, rht=True))

    def layer_dy(q):  # and of dY: Dgrad rows SR, the Wgrad dY^T with the RHT, SR
        return lambda: (q(x, rounding="stochastic", generator=g), q(xt, rht=True, rounding="stochastic", generator=g))

    def layer_w(q):  # and of W: 32x32 tiles (Fprop) and their transpose (Dgrad reuses the codes)
        return lambda: q(w, tile=(32, 32)).transpose()

    xq_t = X.quantize_mxfp4(x)
    ref, fast = mxfp4.quantize, X.quantize_mxfp4
    cases = [
        ("mx quant rows RTNE (codes+scales)", rows(), xb + xq, lambda: ref(x)),
        ("mx quant rows RTNE floor rule", rows(ceil=False), xb + xq, lambda: ref(x, scale_rule="floor")),
        ("mx quant rows RTNE + BF16 operand", rows(write_deq=True), xb + xq + xb, None),
        ("mx quant rows SR (codes+scales)", rows(sr=True), xb + xq,
         lambda: ref(x, rounding="stochastic", generator=g)),
        ("mx quant W 32x32 FP32", lambda: X.launch_rows(w, w_words, w_sc, None, 0, 32, True, False), wb + wq,
         lambda: ref(w, tile=(32, 32))),
        ("mx quant cols (x^T) RTNE", cols(False, False), xb + xq, lambda: ref(xt)),
        ("mx quant cols (x^T) RHT RTNE", cols(True, False), xb + xq, lambda: ref(xt, rht=True)),
        ("mx quant cols (x^T) RHT SR", cols(True, True), xb + xq,
         lambda: ref(xt, rht=True, rounding="stochastic", generator=g)),
        ("mx dequant packed -> BF16", lambda: X.dequantize_unscaled(xq_t), xq + xb,
         lambda: xq_t.dequantize_unscaled(torch.bfloat16)),
        ("quantize_mxfp4 x rows", lambda: fast(x), xb + xq, lambda: ref(x)),
        ("quantize_mxfp4 x^T RHT SR", lambda: fast(xt, rht=True, rounding="stochastic", generator=g), xb + xq,
         lambda: ref(xt, rht=True, rounding="stochastic", generator=g)),
        ("layer: x -> x rows + x^T RHT", layer_x(fast), 2 * (xb + xq), layer_x(ref)),
        ("layer: dY -> rows SR + dY^T RHT SR", layer_dy(fast), 2 * (xb + xq), layer_dy(ref)),
        ("layer: W -> 32x32 + transpose()", layer_w(fast), wb + 3 * wq, layer_w(ref)),
    ]
    print()
    print(f"{'MXFP4 kernel':44s} {'MB':>8s} {'ms':>8s} {'GB/s':>8s} {'copy GB/s':>9s} {'ratio':>6s} "
          f"{'ref ms':>8s} {'x ref':>6s}")
    for name, fn, nbytes, ref_fn in cases:
        t_k, t_c = ms(fn), copy_ms(nbytes)
        line = (f"{name:44s} {nbytes / 1e6:8.1f} {t_k:8.4f} {nbytes / t_k / 1e6:8.0f} {nbytes / t_c / 1e6:9.0f} "
                f"{t_c / t_k:6.2f}")
        if ref_fn is not None:
            t_r = ms(ref_fn)
            line += f" {t_r:8.3f} {t_r / t_k:6.1f}"
        print(line)


if __name__ == "__main__":
    main()
