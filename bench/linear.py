"""NVFP4Linear forward+backward (full recipe, Triton backend) against nn.Linear in BF16.

    python -m bench.linear [--modes lt,device,host,triton] [--reps 20]

For (tokens, out, in) in the issue's three shapes: median time of one forward+backward
(triton.testing.do_bench) and the peak memory allocated during it (above what the parameters
and inputs already hold), for

- ``bf16``: ``nn.Linear`` with BF16 weights on BF16 x (the baseline; ratios are against it);
- ``nvfp4[mode]``: NVFP4Linear, FP32 master weights, 2-D weight tiles, SR on dY, RHT on Wgrad,
  the emulated GEMM applying alpha by ``mode`` (see ``triton_nvfp4.GEMM_MODES``);
- ``gemms only``: the three emulation GEMMs on ready BF16 operands with FP32 accumulation and
  output (``torch.mm(out_dtype=float32)``) -- the floor of the emulation without quantization;
- ``quantize only``: the five quantizations of one step (and the two shared amax passes) without
  any GEMM -- where the rest goes.

``--profile`` prints, instead of times, the device time of each variant's kernels by category
(bench/common.py): which kernels the NVFP4 layer spends its time in.
"""

from __future__ import annotations

import argparse
import copy

import torch
from triton.testing import do_bench

from bench.common import breakdown, header, in_gemm_mode, print_table
from rayfp4.kernels import triton_nvfp4 as T
from rayfp4.precision import NVFP4Linear, PrecisionPolicy

SHAPES = [(16384, 4096, 4096), (16384, 11008, 4096), (16384, 4096, 11008)]


def measure(fn, reps):
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return do_bench(fn, warmup=20, rep=reps * 10, return_mode="median"), peak


def fwd_bwd(layer, x, dy):
    def fn():
        x.grad = None
        layer.weight.grad = None
        layer(x).backward(dy)
    return fn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--modes", default="device,lt")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--cutlass", action="store_true", help="also time the cutlass backend (sm_90a GEMMs)")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, print the device time per kernel category of each variant "
                        "(a separate run: the profiler slows every later launch of its process)")
    a = p.parse_args()
    print(header())
    if not a.profile:
        print(f"{'shape (T,out,in)':22s} {'variant':16s} {'ms':>8s} {'x bf16':>7s} {'peak MB':>8s} {'x bf16':>7s}")
    for t, n, k in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(t, n, device="cuda", dtype=torch.bfloat16)
        base = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        layer = NVFP4Linear(k, n, bias=False, policy=PrecisionPolicy(backend="triton"), device="cuda")
        torch.nn.init.normal_(layer.weight, 0, 0.02)
        # One layer object per GEMM mode, sharing the weight: each has its own backend instance.
        variants = [("bf16", fwd_bwd(base, x, dy))]
        variants += [(f"nvfp4[{mode}]", fwd_bwd(in_gemm_mode(copy.copy(layer), mode), x, dy))
                     for mode in a.modes.split(",")]
        if a.cutlass:
            lc = NVFP4Linear(k, n, bias=False, policy=PrecisionPolicy(backend="cutlass"), device="cuda")
            lc.weight.data.copy_(layer.weight.data)
            variants.append(("nvfp4[cutlass]", fwd_bwd(lc, x, dy)))
        if a.profile:
            prof = {name: breakdown(fn, steps=5) for name, fn in variants}
            print_table(prof, f"forward+backward of {(t, n, k)}")
            continue
        rows = [(name, *measure(fn, a.reps)) for name, fn in variants]
        t0, m0 = rows[0][1], rows[0][2]
        A = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        W = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        D = torch.randn(t, n, device="cuda", dtype=torch.bfloat16)
        DT = D.t().contiguous()
        XT = A.t().contiguous()

        def gemms():
            torch.mm(A, W.t(), out_dtype=torch.float32)
            torch.mm(D, W, out_dtype=torch.float32)
            torch.mm(DT, XT.t(), out_dtype=torch.float32)
        rows.append(("gemms only", *measure(gemms, a.reps)))
        wf = layer.weight.detach()
        g = torch.Generator(device="cuda")
        g.manual_seed(0)

        be = T.TritonBackend()

        def quants():  # as NVFP4Linear calls them (one amax pass per activation/gradient)
            ax, axt = be.amaxes(x.detach().t(), True)
            be.quantize_nvfp4(x.detach(), (1, 16), "nearest", False, None, ax)
            be.quantize_nvfp4(wf, (16, 16), "nearest", False, None)
            be.quantize_nvfp4(x.detach().t(), (1, 16), "nearest", True, None, axt, False)
            ad, adt = be.amaxes(dy.t(), True)
            be.quantize_nvfp4(dy, (1, 16), "stochastic", False, g, ad)
            be.quantize_nvfp4(dy.t(), (1, 16), "stochastic", True, g, adt, True)
        rows.append(("quantize only", *measure(quants, a.reps)))
        for name, tm, mm in rows:
            print(f"{str((t, n, k)):22s} {name:16s} {tm:8.3f} {tm / t0:7.2f} {mm / 2**20:8.0f} {mm / m0:7.2f}")
        del variants, layer, base, x, dy, A, W, D, DT, XT
        if a.cutlass:
            del lc
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
