"""Timing, profiling and setup shared by the bench scripts.

:func:`time_ms`: the median of CUDA-event timings of a callable. :func:`breakdown` (bench/step.py
and bench/linear.py ``--profile``): where GPU time goes -- run a callable under torch.profiler and
sum the device time of its kernels into the categories below (first matching pattern wins).
Profile only after every timing of the process: once the profiler has attached (CUPTI), later
kernel launches in the same process are slower (measured: +50-80 ms per step of bench/step.py).
"""

from __future__ import annotations

import datetime
import re
import statistics

import torch


def header() -> str:
    """The line each bench output starts with: date, device and the versions that matter."""
    import triton

    return f"# {datetime.date.today()} {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}"


def in_gemm_mode(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``module`` with every Triton-backed quantized linear applying alpha by ``mode`` (see
    ``rayfp4.kernels.triton_nvfp4.GEMM_MODES``): a backend instance per layer, no global switch."""
    from rayfp4.kernels.triton_nvfp4 import TritonBackend
    from rayfp4.precision import QuantizedLinear

    for m in module.modules():
        if isinstance(m, QuantizedLinear) and m.backend.name == "triton":
            m.backend = TritonBackend(gemm_mode=mode)
    return module


def time_ms(fn, reps: int, warmup: int = 5) -> float:
    """Median of ``reps`` CUDA-event timings of ``fn()`` (ms), after ``warmup`` untimed calls."""
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

def median_ms(fn, warmup: int = 50, rep: int = 200) -> float:
    """Median time of ``fn()`` in ms by ``triton.testing.do_bench`` (``warmup`` and ``rep``: ms of
    calls before and during the measurement): the kernel benchmarks' timer."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_ms(nbytes: int, warmup: int = 50, rep: int = 200) -> float:
    """:func:`median_ms` of a device-to-device copy moving ``nbytes`` in total (half read, half
    written): the bandwidth a memory-bound kernel is compared with."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src), warmup, rep)


CATEGORIES = [
    ("dequantize", r"dequant_rows_kernel"),
    ("quantize rows (x, dy, W)", r"quant_rows_kernel"),
    ("quantize columns (x^T, dy^T, RHT)", r"quant_groups_kernel"),
    ("amax", r"amax"),
    ("alpha scale+cast", r"scale_cast_kernel"),
    ("GEMM", r"gemm|cutlass|xmma|nvjet|sm90_|sm80_|cublas|ampere_|gemv"),
    ("attention", r"flash|fmha|attention|sdpa|efficient"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("softmax / loss", r"softmax|nll|cross_entropy|log_softmax"),
]


def _device_time_us(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def breakdown(fn, steps: int = 2, top_other: int = 6) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """ms per call of ``fn`` in each category (plus "other"), and the largest "other" kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    cats = {name: 0.0 for name, _ in CATEGORIES}
    cats["other (elementwise, norms, casts, copies)"] = 0.0
    other: dict[str, float] = {}
    for evt in prof.key_averages():
        us = _device_time_us(evt)
        if us <= 0:
            continue
        key = evt.key.lower()
        for name, pat in CATEGORIES:
            if re.search(pat, key):
                cats[name] += us / 1e3 / steps
                break
        else:
            cats["other (elementwise, norms, casts, copies)"] += us / 1e3 / steps
            other[evt.key] = other.get(evt.key, 0.0) + us / 1e3 / steps
    top = sorted(other.items(), key=lambda kv: -kv[1])[:top_other]
    return cats, top


def print_table(results: dict[str, tuple[dict[str, float], list]], title: str) -> None:
    """One column per variant: ms per call by category, and the sum."""
    names = list(results)
    cats = list(next(iter(results.values()))[0])
    print(f"# {title}: device time by kernel category (torch.profiler, ms per call)")
    print(f"{'category':42s}" + "".join(f" {n:>16s}" for n in names))
    for c in cats:
        print(f"{c:42s}" + "".join(f" {results[n][0][c]:16.2f}" for n in names))
    print(f"{'sum of kernel time':42s}" + "".join(f" {sum(results[n][0].values()):16.2f}" for n in names))
    for n in names:
        top = results[n][1]
        if top:
            print(f"# largest 'other' kernels, {n}: " + "; ".join(f"{k[:60]} {v:.2f}" for k, v in top))
