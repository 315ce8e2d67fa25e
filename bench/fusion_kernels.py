"""The producer fusions' kernels against the unfused work they replace, and a sweep of their launch settings.

    python -m bench.fusion_kernels [--tokens 16384] [--d-model 1024] [--d-ff 2752] [--json best.json]

``swiglu_amax`` (h = silu(gate) * up with the down projection's amax pass), ``swiglu_backward_amax``
(gate_up's gradient from h's with the gate_up projection's dY amax pass) and ``rmsnorm_amax``
(an RMSNorm's products with the next projection's amax pass) at the 337M step's shapes (16,384
tokens; gate and up the two halves of the gate_up output, x the FP32 residual). For each launch
candidate (BM features x G blocks of 16 tokens, warps): its median time, whether its output and
amaxes are bit for bit the unfused ones (a candidate that is not is never chosen), and the ratio to
a copy of the same bytes. "unfused" is what the layer runs without the fusion: torch's ops, the
padding to whole blocks of tokens and the amax pass. ``--json``: the fastest exact candidate of
each kernel, in ``rayfp4.kernels.triton_nvfp4.LAUNCH``'s form (bench.step ``--launch`` takes it).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from bench.common import copy_ms, header, median_ms
from rayfp4.kernels import triton_nvfp4 as T
from rayfp4.model import RMSNorm

CANDIDATES = [dict(BM=bm, G=g, num_warps=w) for bm, g, w in itertools.product((32, 64, 128), (1, 2, 4, 8), (2, 4, 8))
              if bm * g * 16 <= 16384]


def ms(fn) -> float:
    return median_ms(fn, warmup=25, rep=100)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def sweep(name: str, fused, unfused, nbytes: int) -> dict:
    """Times ``unfused()`` and ``fused()`` under each launch candidate; prints the table and
    returns the fastest exact candidate (the current setting if none is exact)."""
    want_y, want_amax = unfused()
    base, copy = ms(unfused), copy_ms(nbytes, 25, 100)
    current = dict(T.LAUNCH[name])
    print(f"\n{name}: {nbytes / 1e6:.0f} MB moved by the fused kernel; copy of those bytes {copy:.3f} ms; "
          f"unfused {base:.3f} ms; current launch {current}")
    print(f"{'BM':>4} {'G':>3} {'warps':>5} {'ms':>8} {'x copy':>7} {'x unfused':>9}  exact")
    best, best_ms = current, None
    for cand in CANDIDATES:
        T.LAUNCH[name] = cand
        try:
            y, amax = fused()
            exact = same(y, want_y) and torch.equal(amax, want_amax)
            t = ms(fused)
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile (registers) is skipped
            print(f"{cand['BM']:>4} {cand['G']:>3} {cand['num_warps']:>5}  failed: {type(e).__name__}")
            continue
        print(f"{cand['BM']:>4} {cand['G']:>3} {cand['num_warps']:>5} {t:8.3f} {copy / t:7.2f} {base / t:9.2f}  {exact}")
        if exact and (best_ms is None or t < best_ms):
            best, best_ms = cand, t
    T.LAUNCH[name] = current
    print(f"fastest exact: {best} ({best_ms:.3f} ms; current {ms(fused):.3f} ms; unfused {base:.3f} ms)")
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--d-ff", type=int, default=2752)
    p.add_argument("--json", help="write the fastest exact launch settings here")
    p.add_argument("--kernels", default="swiglu,swiglu_backward,rmsnorm",
                   help="comma-separated: which of swiglu, swiglu_backward, rmsnorm to sweep")
    a = p.parse_args()
    print(header())
    t, d, f = a.tokens, a.d_model, a.d_ff
    tp = t + (-t % 16)

    gate, up = (torch.randn(t, 2 * f, device="cuda") * 3).to(torch.bfloat16).chunk(2, dim=-1)

    def swiglu_unfused():
        h = F.pad(F.silu(gate) * up, (0, 0, 0, tp - t))
        return h, T.tensor_amax(h.t(), rht=True)

    kernels = a.kernels.split(",")
    best = {}
    if "swiglu" in kernels:
        best["swiglu"] = sweep("swiglu", lambda: T.swiglu_amax(gate, up, rht=True), swiglu_unfused, 3 * t * f * 2)

    dh = torch.randn(t, f, device="cuda").to(torch.bfloat16)

    def swiglu_backward_unfused():
        # What autograd runs for gate_up's gradient (the fused layer's backward before this
        # kernel: silu's and the product's backward, the split's concatenation), then the
        # gate_up projection's padding and dY amax pass.
        dgu = F.pad(torch.cat([torch.ops.aten.silu_backward(dh * up, gate), dh * F.silu(gate)], dim=1),
                    (0, 0, 0, tp - t))
        return dgu, T.tensor_amax(dgu.t(), rht=True)

    if "swiglu_backward" in kernels:
        best["swiglu_backward"] = sweep("swiglu_backward", lambda: T.swiglu_backward_amax(gate, up, dh, rht=True),
                                        swiglu_backward_unfused, 5 * t * f * 2)

    x = torch.randn(t, d, device="cuda") * 4
    norm = RMSNorm(d, 1e-5).to("cuda")
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(d, device="cuda"))

    @torch.no_grad()
    def norm_unfused():
        y = F.pad(norm(x).to(torch.bfloat16), (0, 0, 0, tp - t))
        return y, T.tensor_amax(y.t(), rht=True)

    # torch's rstd reduction is part of both (the fused layer computes it before the kernel)
    if "rmsnorm" in kernels:
        best["rmsnorm"] = sweep("rmsnorm", lambda: T.rmsnorm_amax(x, norm.rstd(x).reshape(-1), norm.weight, rht=True),
                                norm_unfused, t * d * (4 + 2))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(best, fh)
        print(f"\nwrote {a.json}: {best}")


if __name__ == "__main__":
    main()
