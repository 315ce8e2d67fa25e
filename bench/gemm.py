"""CUTLASS sm_90a BF16+alpha GEMM vs cuBLAS (``torch.mm``, BF16) on the linear layers' shapes.

    python bench/gemm.py [--reps 30] [--json OUT.json] [--with-dequant]

For each (tokens, out, in) of bench/linear.py's shapes it times the three GEMMs of a linear
layer, each in the memory order training has (no transposes materialised):

    Fprop  y  = x  @ W.T   M=tokens N=out K=in     gemm_bf16_alpha(x, W, alpha)
    Dgrad  dx = dy @ W     M=tokens N=in  K=out    gemm_bf16_alpha(dy, W.t(), alpha)
    Wgrad  dW = dy.T @ x   M=out    N=in  K=tokens gemm_bf16_alpha(dy.t(), x.t(), alpha)

and the same product with ``torch.mm`` in the same process, on the same tensors. ``alpha`` is a
device tensor (the training path: no host sync). Times are medians of CUDA-event timings after
warm-up; the inputs (>= 128 MB each) are larger than the 60 MB L2, so repeats do not run from
cache. ``ratio`` = torch.mm time / CUTLASS time (> 1: CUTLASS faster). ``--with-dequant`` adds the
whole Hopper NVFP4 emulation of Fprop (eager dequantize of both operands + the GEMM) for scale.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cutlass_kernels import binding  # noqa: E402

SHAPES = [(16384, 4096, 4096), (16384, 11008, 4096), (16384, 4096, 11008)]  # (tokens, out, in)


def time_ms(fn, reps: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
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
        "kernels": {k: binding.load(k).cutlass_name for k in ("sm90a_bf16_kk", "sm90a_bf16_kn", "sm90a_bf16_mn") if binding.is_built(k)},
    }
    print(f"# {header['device']} ({header['sms']} SMs), torch {header['torch']} (CUDA {header['cuda']}), {header['date']}")
    for k, name in header["kernels"].items():
        print(f"#   {k}: {name}")
    rows = []
    torch.manual_seed(0)
    alpha = torch.tensor([1.0], device=dev)
    fmt = "{:<6} {:>6} {:>6} {:>6} | {:>10} {:>8} | {:>10} {:>8} | {:>6} | {:>9} {}"
    print(fmt.format("gemm", "M", "N", "K", "cutlass ms", "TFLOP/s", "torch ms", "TFLOP/s", "ratio", "max|diff|", "kernel"))
    for tokens, d_out, d_in in SHAPES:
        x = torch.randn(tokens, d_in, device=dev, dtype=torch.bfloat16)
        w = torch.randn(d_out, d_in, device=dev, dtype=torch.bfloat16) * 0.02
        dy = torch.randn(tokens, d_out, device=dev, dtype=torch.bfloat16)
        cases = [
            ("Fprop", (tokens, d_out, d_in), (x, w), lambda: torch.mm(x, w.t())),
            ("Dgrad", (tokens, d_in, d_out), (dy, w.t()), lambda: torch.mm(dy, w)),
            ("Wgrad", (d_out, d_in, tokens), (dy.t(), x.t()), lambda: torch.mm(dy.t(), x)),
        ]
        for name, (m, n, k), (ca, cb), torch_fn in cases:
            key, copy_a, copy_b = binding.kernel_for(ca, cb)
            out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)

            def cutlass_fn(ca=ca, cb=cb, out=out):
                return binding.gemm_bf16_alpha(ca, cb, alpha, out=out)

            y = cutlass_fn().float()
            ref = torch_fn().float()
            diff = (y - ref).abs().max().item()
            t_c = time_ms(cutlass_fn, a.reps)
            t_t = time_ms(torch_fn, a.reps)
            flops = 2.0 * m * n * k
            row = {
                "gemm": name, "M": m, "N": n, "K": k, "cutlass_ms": t_c, "torch_ms": t_t,
                "cutlass_tflops": flops / t_c / 1e9, "torch_tflops": flops / t_t / 1e9,
                "ratio": t_t / t_c, "max_abs_diff": diff, "kernel": key + (" (copies)" if copy_a or copy_b else ""),
            }
            rows.append(row)
            print(fmt.format(name, m, n, k, f"{t_c:.3f}", f"{row['cutlass_tflops']:.0f}", f"{t_t:.3f}",
                             f"{row['torch_tflops']:.0f}", f"{row['ratio']:.2f}", f"{diff:.3g}", row["kernel"]))
        if a.with_dequant:
            from rayfp4.formats import nvfp4

            qx, qw = nvfp4.quantize(x), nvfp4.quantize(w, tile=(16, 16))
            t_e = time_ms(lambda: binding.gemm_nvfp4_emulated(qx, qw), max(5, a.reps // 3), warmup=2)
            t_t = time_ms(lambda: torch.mm(x, w.t()), a.reps)
            rows.append({"gemm": "Fprop NVFP4 emulation incl. eager dequantize", "M": tokens, "N": d_out, "K": d_in,
                         "cutlass_ms": t_e, "torch_ms": t_t, "ratio": t_t / t_e})
            print(f"  Fprop NVFP4 emulation incl. eager dequantize: {t_e:.3f} ms (torch.mm bf16 {t_t:.3f} ms)")
        del x, w, dy
        torch.cuda.empty_cache()
    if a.json:
        a.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
