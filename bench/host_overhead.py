"""Host (CPU) time of one NVFP4Linear forward+backward, and where it goes.

    python -m bench.host_overhead [--tokens 512] [--features 1024] [--calls 200]

On a shape so small that the GPU finishes every kernel before the next is launched, the time of
a forward+backward is the host's: Python, argument checks, tensor allocation and kernel
launches. Compared with nn.Linear in BF16 on the same shape, timed in the same process. In a
training step of a model whose layers are small for the GPU (bench/step.py) this time is paid
per linear layer and leaves the GPU idle. Prints the top functions of a cProfile of the calls.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from bench.common import header
from rayfp4.precision import NVFP4Linear, PrecisionPolicy


def per_call_us(fn, calls: int) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def pieces(layer, x, dy, calls: int) -> None:
    """Host time of each piece of the layer's forward+backward, called alone."""
    from rayfp4.formats.quantized import gemm_alpha
    from rayfp4.kernels import triton_nvfp4 as T
    from rayfp4.precision.linear import _QuantizedLinearFn

    be, rt = layer.backend, layer.runtime
    xd, w = x.detach(), layer.weight.detach()
    xq = be.quantize_nvfp4(xd, (1, 16), "nearest", False, None)
    wq = be.quantize_nvfp4(w, (16, 16), "nearest", False, None)
    a_bf, b_bf = T.dequantize_unscaled(xq), T.dequantize_unscaled(wq)
    am = T.tensor_amax(xd)
    g = rt.generator(0, "dgrad", x.device)
    k = T._kernel_module()
    acc = torch.empty(x.shape[0], w.shape[0], device=x.device)
    out = torch.empty_like(acc, dtype=torch.bfloat16)

    def fwd_only():
        with torch.no_grad():
            _QuantizedLinearFn.apply(xd, layer.weight, None, layer, True)

    cases = [
        ("torch.empty (1 tensor)", lambda: torch.empty(16, 16, device=x.device)),
        ("torch.zeros (1 tensor)", lambda: torch.zeros(2, dtype=torch.int32, device=x.device)),
        ("tensor_amax (zeros + kernel)", lambda: T.tensor_amax(xd)),
        ("amax kernel launch alone", lambda: k.amax_kernel[(1, 1)](xd, am.view(torch.int32), 1, 16, xd.stride(0), 1,
                                                                   BM=32, BK=256, num_warps=4)),
        ("amaxes (x + RHT x^T)", lambda: be.amaxes(xd.t(), True)),
        ("quantize rows (amax given)", lambda: be.quantize_nvfp4(xd, (1, 16), "nearest", False, None, am[0])),
        ("quantize rows SR (amax given)", lambda: be.quantize_nvfp4(xd, (1, 16), "stochastic", False, g, am[0])),
        ("quantize W 16x16 (own amax)", lambda: be.quantize_nvfp4(w, (16, 16), "nearest", False, None)),
        ("quantize cols RHT (amax given)", lambda: be.quantize_nvfp4(xd.t(), (1, 16), "nearest", True, None, am[0])),
        ("gemm_alpha (3 tiny torch ops)", lambda: gemm_alpha(xq, wq)),
        ("torch.mm BF16 -> BF16", lambda: torch.mm(a_bf, b_bf.t())),
        ("torch.mm BF16 -> FP32 (out_dtype)", lambda: torch.mm(a_bf, b_bf.t(), out_dtype=torch.float32)),
        ("scale_cast kernel launch", lambda: k.scale_cast_kernel[(T._cdiv(acc.numel(), 4096),)](
            acc, out, xq.amax, wq.amax, T.decode_inv(xq), T.decode_inv(wq), acc.numel(), BLOCK=4096, num_warps=8)),
        ("backend.gemm (bf16 out)", lambda: be.gemm(xq, wq, torch.bfloat16)),
        ("backend.gemm (fp32 out)", lambda: be.gemm(xq, wq, torch.float32)),
        ("runtime.generator", lambda: rt.generator(0, "dgrad", x.device)),
        ("quantize rows SR (fresh generator)", lambda: be.quantize_nvfp4(
            xd, (1, 16), "stochastic", False, rt.generator(0, "dgrad", x.device), am[0])),
        ("layer forward (no grad)", fwd_only),
    ]
    try:  # the CUTLASS binding's own steps, where it is built
        from cutlass_kernels import binding

        if binding.available(x.device):
            al = T.alpha(xq, wq)
            key = binding.kernel_for(a_bf, b_bf)[0]
            kern = binding.load(key)
            m_, n_, k_ = a_bf.shape[0], b_bf.shape[0], a_bf.shape[1]
            cases += [
                ("cutlass: binding.available", lambda: binding.available(x.device)),
                ("cutlass: kernel_for + load", lambda: binding.load(binding.kernel_for(a_bf, b_bf)[0])),
                ("cutlass: workspace", lambda: kern.workspace(m_, n_, k_, x.device)),
                ("cutlass: triton alpha", lambda: T.alpha(xq, wq)),
                ("cutlass: gemm_bf16_alpha", lambda: binding.gemm_bf16_alpha(a_bf, b_bf, al)),
                ("cutlass: backend.gemm (bf16 out)", lambda: layer_c.backend.gemm(xq, wq, torch.bfloat16)),
            ]
            layer_c = NVFP4Linear(w.shape[1], w.shape[0], bias=False, policy=PrecisionPolicy(backend="cutlass"),
                                  device=x.device)
    except ImportError:
        pass
    print(f"# host time of the pieces, called alone ({calls} calls each)")
    print(f"{'piece':36s} {'us/call':>9s}")
    for name, fn in cases:
        print(f"{name:36s} {per_call_us(fn, calls):9.1f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    t, f = a.tokens, a.features
    print(header())
    x = torch.randn(t, f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(t, f, device="cuda", dtype=torch.bfloat16)

    def fwd_bwd(layer):
        def fn():
            x.grad = None
            layer.weight.grad = None
            layer(x).backward(dy)
        return fn

    base = torch.nn.Linear(f, f, bias=False, device="cuda", dtype=torch.bfloat16)
    t_bf16 = per_call_us(fwd_bwd(base), a.calls)
    print(f"# shape (T, out, in) = ({t}, {f}, {f}); host time per forward+backward, {a.calls} calls")
    print(f"{'variant':24s} {'us/call':>9s} {'x bf16':>7s}")
    print(f"{'bf16 nn.Linear':24s} {t_bf16:9.1f} {1.0:7.2f}")
    layers = {}
    for backend in ("triton", "cutlass"):
        try:
            layer = NVFP4Linear(f, f, bias=False, policy=PrecisionPolicy(backend=backend), device="cuda")
        except Exception as e:  # noqa: BLE001 - a backend missing on this machine is reported, not fatal
            print(f"{'nvfp4[' + backend + ']':24s} unavailable: {e}")
            continue
        layers[backend] = layer
        us = per_call_us(fwd_bwd(layer), a.calls)
        print(f"{'nvfp4[' + backend + ']':24s} {us:9.1f} {us / t_bf16:7.2f}")
    if "triton" in layers:  # the SR keys from the runtime's device seed table instead of generators
        layer = NVFP4Linear(f, f, bias=False, policy=PrecisionPolicy(backend="triton"), device="cuda")
        layer.runtime.enable_device_seeds("cuda")
        us = per_call_us(fwd_bwd(layer), a.calls)
        print(f"{'nvfp4[triton, dev seeds]':24s} {us:9.1f} {us / t_bf16:7.2f}")
    pieces(layers.get("triton") or next(iter(layers.values())), x, dy, a.calls)
    for layer in layers.values():
        fn = fwd_bwd(layer)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(a.calls):
            fn()
        torch.cuda.synchronize()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(a.top)
        print(f"# cProfile of {a.calls} forward+backward calls, backend {layer.backend.name}, by own time")
        print("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:6000])


if __name__ == "__main__":
    main()
