"""CUTLASS sm_90a BF16+alpha GEMM vs cuBLAS (``torch.mm``, BF16) on the linear layers' shapes.

    python -m bench.gemm [--reps 30] [--rounds 3] [--json OUT.json] [--variants] [--with-dequant]

For each (tokens, out, in) of bench/linear.py's shapes it times the three GEMMs of a linear
layer, each in the memory order training has (no transposes materialised):

    Fprop  y  = x  @ W.T   M=tokens N=out K=in     gemm_bf16_alpha(x, W, alpha)
    Dgrad  dx = dy @ W     M=tokens N=in  K=out    gemm_bf16_alpha(dy, W.t(), alpha)
    Wgrad  dW = dy.T @ x   M=out    N=in  K=tokens gemm_bf16_alpha(dy.t(), x.t(), alpha)
    Wgrad-f32              M=out    N=in  K=tokens gemm_bf16_alpha(dyT, xT, alpha, out_dtype=fp32)

``Wgrad-f32`` is the NVFP4 layer's Wgrad on Hopper: both operands K-major (the dequantized
NVFP4 rows along tokens) and an FP32 output (``sm90a_bf16_kk_f32out``, when built), against
``torch.mm(..., out_dtype=torch.float32)``, which is what the Triton backend runs there.

and the same product with ``torch.mm`` in the same process, on the same tensors. ``alpha`` is a
device tensor (the training path: no host sync). Each implementation is timed in ``--rounds``
interleaved rounds (CUTLASS, torch, CUTLASS, torch, ...) of ``--reps`` CUDA-event timings after
warm-up; a round's figure is its median, the reported one the median of the rounds, and the
spread (min-max of the round medians) is printed too, so clock drift shows instead of biasing one
side. The inputs (>= 128 MB each) exceed the 60 MB L2, so repeats do not run from cache.
``ratio`` = torch.mm time / CUTLASS time (> 1: CUTLASS faster). ``--variants`` also times every
built tuning variant of the Fprop kernel (``sm90a_bf16_kk_*``). ``--with-dequant`` adds the whole
Hopper NVFP4 emulation of Fprop (eager dequantize of both operands + the GEMM) for scale.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

import torch

from bench.common import time_ms
from cutlass_kernels import binding
from cutlass_kernels.specs import KERNELS

SHAPES = [(16384, 4096, 4096), (16384, 11008, 4096), (16384, 4096, 11008)]  # (tokens, out, in)


def interleaved(fns: dict, reps: int, rounds: int) -> dict[str, tuple[float, float, float]]:
    """name -> (median of round medians, min, max) with the implementations' rounds interleaved."""
    per = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per[name].append(time_ms(fn, reps))
    return {name: (statistics.median(v), min(v), max(v)) for name, v in per.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--with-dequant", action="store_true")
    a = p.parse_args(argv)

    av = binding.available()
    if not av or av.family != "bf16_alpha":
        print(f"bench/gemm.py needs an sm_90a GPU with the kernels built: {av.reason}", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    header = {
        "device": torch.cuda.get_device_name(dev),
        "sms": props.multi_processor_count,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": "python " + " ".join(sys.argv),
        "kernels": {s.key: binding.load(s.key).cutlass_name for s in KERNELS if s.arch == "sm90a" and binding.is_built(s.key)},
    }
    print(f"# {header['device']} ({header['sms']} SMs), torch {header['torch']} (CUDA {header['cuda']}), {header['date']}")
    for k, name in header["kernels"].items():
        print(f"#   {k}: {name}")
    rows = []
    torch.manual_seed(0)
    alpha = torch.tensor([1.0], device=dev)
    variants = [s.key for s in KERNELS if s.key.startswith("sm90a_bf16_kk_") and binding.is_built(s.key)] if a.variants else []
    fmt = "{:<6} {:>6} {:>6} {:>6} | {:>22} {:>8} | {:>22} {:>8} | {:>6} | {:>9} {}"
    print(fmt.format("gemm", "M", "N", "K", "cutlass ms [spread]", "TFLOP/s", "torch.mm ms [spread]", "TFLOP/s", "ratio", "max|diff|", "kernel"))

    def cell(t):
        return f"{t[0]:.3f} [{t[1]:.3f}-{t[2]:.3f}]"

    for tokens, d_out, d_in in SHAPES:
        x = torch.randn(tokens, d_in, device=dev, dtype=torch.bfloat16)
        w = torch.randn(d_out, d_in, device=dev, dtype=torch.bfloat16) * 0.02
        dy = torch.randn(tokens, d_out, device=dev, dtype=torch.bfloat16)
        cases = [
            ("Fprop", (tokens, d_out, d_in), (x, w), lambda: torch.mm(x, w.t())),
            ("Dgrad", (tokens, d_in, d_out), (dy, w.t()), lambda: torch.mm(dy, w)),
            ("Wgrad", (d_out, d_in, tokens), (dy.t(), x.t()), lambda: torch.mm(dy.t(), x)),
        ]
        if binding.is_built("sm90a_bf16_kk_f32out"):
            dyT, xT = dy.t().contiguous(), x.t().contiguous()
            cases.append(("Wgrad-f32", (d_out, d_in, tokens), (dyT, xT),
                          lambda dyT=dyT, xT=xT: torch.mm(dyT, xT.t(), out_dtype=torch.float32)))
        for name, (m, n, k), (ca, cb), torch_fn in cases:
            out_dtype = torch.float32 if name.endswith("f32") else torch.bfloat16
            key, copy_a, copy_b = binding.kernel_for(ca, cb, out_dtype=out_dtype)
            out = torch.empty(m, n, device=dev, dtype=out_dtype)
            fns = {key: (lambda ca=ca, cb=cb, out=out, od=out_dtype: binding.gemm_bf16_alpha(ca, cb, alpha, out=out, out_dtype=od))}
            if name == "Fprop":
                for v in variants:
                    fns[v] = lambda ca=ca, cb=cb, out=out, v=v: binding.gemm_bf16_alpha(ca, cb, alpha, out=out, kernel=v)
            fns["torch.mm"] = torch_fn
            ref = torch_fn().float()
            diffs = {kk: (fn().float() - ref).abs().max().item() for kk, fn in fns.items() if kk != "torch.mm"}
            times = interleaved(fns, a.reps, a.rounds)
            flops = 2.0 * m * n * k
            t_t = times["torch.mm"]
            for kk in fns:
                if kk == "torch.mm":
                    continue
                t_c = times[kk]
                row = {
                    "gemm": name, "M": m, "N": n, "K": k, "kernel": kk + (" (copies)" if copy_a or copy_b else ""),
                    "cutlass_ms": t_c[0], "cutlass_ms_spread": t_c[1:], "torch_ms": t_t[0], "torch_ms_spread": t_t[1:],
                    "cutlass_tflops": flops / t_c[0] / 1e9, "torch_tflops": flops / t_t[0] / 1e9,
                    "ratio": t_t[0] / t_c[0], "max_abs_diff_vs_torch": diffs[kk],
                }
                rows.append(row)
                print(fmt.format(name, m, n, k, cell(t_c), f"{row['cutlass_tflops']:.0f}", cell(t_t),
                                 f"{row['torch_tflops']:.0f}", f"{row['ratio']:.2f}", f"{diffs[kk]:.3g}", row["kernel"]))
        if a.with_dequant:
            from rayfp4.formats import nvfp4

            qx, qw = nvfp4.quantize(x), nvfp4.quantize(w, tile=(16, 16))
            t_e = time_ms(lambda: binding.gemm_nvfp4_emulated(qx, qw), max(5, a.reps // 3), warmup=2)
            t_t = time_ms(lambda: torch.mm(x, w.t()), a.reps)
            rows.append({"gemm": "Fprop NVFP4 emulation incl. eager dequantize", "M": tokens, "N": d_out, "K": d_in,
                         "cutlass_ms": t_e, "torch_ms": t_t, "ratio": t_t / t_e})
            print(f"  Fprop NVFP4 emulation incl. eager dequantize: {t_e:.3f} ms (torch.mm bf16 {t_t:.3f} ms)")
        del x, w, dy, cases
        torch.cuda.empty_cache()
    if a.json:
        a.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
