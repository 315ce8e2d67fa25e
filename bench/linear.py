"""NVFP4Linear forward+backward (full recipe, Triton backend) against nn.Linear in BF16.

    python bench/linear.py [--modes device,host,triton] [--reps 20]

For (tokens, out, in) in the issue's three shapes: median time of one forward+backward
(triton.testing.do_bench) and the peak memory allocated during it (above what the parameters
and inputs already hold), for

- ``bf16``: ``nn.Linear`` with BF16 weights on BF16 x (the baseline; ratios are against it);
- ``nvfp4[mode]``: NVFP4Linear, FP32 master weights, 2-D weight tiles, SR on dY, RHT on Wgrad,
  the emulated GEMM applying alpha by ``mode`` (see ``triton_nvfp4.GEMM_MODES``);
- ``gemms only``: the three emulation GEMMs on ready BF16 operands with FP32 accumulation and
  output (``torch.mm(out_dtype=float32)``) -- the floor of the emulation without quantization;
- ``quantize only``: the five quantizations of one step without any GEMM -- where the rest goes;
- three pieces of glue in NVFP4Linear itself (the reference's W.transpose(), the host-synced
  finiteness checks, the FP32 -> BF16 cast of y), timed alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from rayfp4.kernels import triton_nvfp4 as T  # noqa: E402
from rayfp4.precision import NVFP4Linear, PrecisionPolicy  # noqa: E402

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
    p.add_argument("--modes", default="device,host,triton")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--cutlass", action="store_true", help="also time the cutlass backend (sm_90a GEMMs)")
    a = p.parse_args()
    print(f"# {dt.date.today()} {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    print(f"{'shape (T,out,in)':22s} {'variant':16s} {'ms':>8s} {'x bf16':>7s} {'peak MB':>8s} {'x bf16':>7s}")
    for t, n, k in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(t, n, device="cuda", dtype=torch.bfloat16)
        base = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        rows = []
        t0, m0 = measure(fwd_bwd(base, x, dy), a.reps)
        rows.append(("bf16", t0, m0))
        layer = NVFP4Linear(k, n, bias=False, policy=PrecisionPolicy(backend="triton"), device="cuda")
        torch.nn.init.normal_(layer.weight, 0, 0.02)
        for mode in a.modes.split(","):
            T.gemm_mode = mode
            tm, mm = measure(fwd_bwd(layer, x, dy), a.reps)
            rows.append((f"nvfp4[{mode}]", tm, mm))
        T.gemm_mode = "device"
        if a.cutlass:
            lc = NVFP4Linear(k, n, bias=False, policy=PrecisionPolicy(backend="cutlass"), device="cuda")
            lc.weight.data.copy_(layer.weight.data)
            tm, mm = measure(fwd_bwd(lc, x, dy), a.reps)
            rows.append(("nvfp4[cutlass]", tm, mm))
            del lc
        A = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        W = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        D = torch.randn(t, n, device="cuda", dtype=torch.bfloat16)
        DT = D.t().contiguous()
        XT = A.t().contiguous()

        def gemms():
            torch.mm(A, W.t(), out_dtype=torch.float32)
            torch.mm(D, W, out_dtype=torch.float32)
            torch.mm(DT, XT.t(), out_dtype=torch.float32)
        tg, mg = measure(gemms, a.reps)
        rows.append(("gemms only", tg, mg))
        wf = layer.weight.detach()
        g = torch.Generator(device="cuda")
        g.manual_seed(0)

        def quants():
            T.quantize_nvfp4(x.detach())
            T.quantize_nvfp4(wf, tile=(16, 16))
            T.quantize_nvfp4(x.detach().t(), rht=True)
            T.quantize_nvfp4(dy, rounding="stochastic", generator=g)
            T.quantize_nvfp4(dy.t(), rht=True, rounding="stochastic", generator=g)
        tq, mq = measure(quants, a.reps)
        rows.append(("quantize only", tq, mq))
        # Glue inside NVFP4Linear that is neither a quantize kernel nor a GEMM (precision/linear.py).
        from rayfp4.precision.linear import _finite
        wq = T.quantize_nvfp4(wf, tile=(16, 16))
        y32 = torch.empty(t, n, device="cuda")
        glue = [
            ("  ref W.transpose", lambda: wq.transpose()),
            ("  _finite x,W,dy", lambda: (_finite(None, x.detach(), wf), _finite(None, dy))),
            ("  y fp32->bf16", lambda: y32.to(torch.bfloat16)),
        ]
        for name, fn in glue:
            rows.append((name, do_bench(fn, warmup=10, rep=50, return_mode="median"), 0))
        for name, tm, mm in rows:
            print(f"{str((t, n, k)):22s} {name:16s} {tm:8.3f} {tm / t0:7.2f} {mm / 2**20:8.0f} {mm / m0:7.2f}")
        del layer, base, x, dy, A, W, D, DT, XT
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
