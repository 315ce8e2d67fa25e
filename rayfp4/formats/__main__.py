"""``python -m rayfp4.formats``: a quick report of what 4 bits cost on typical tensors.

Quantizes Gaussian, heavy-tailed and outlier-laden BF16 matrices with each format and prints the
relative RMS error and the signal-to-noise ratio, plus the reference quantizer's throughput on
this machine. It is the formats' smoke job: it needs no data, no Ray and no GPU.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from . import mxfp4, nvfp4


def _inputs(m: int, k: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    gauss = torch.randn(m, k, generator=gen)
    student = torch.distributions.StudentT(3.0).sample((m, k))
    outliers = gauss.clone()
    cols = torch.randint(0, k, (k // 64,), generator=gen)
    outliers[:, cols] *= 50  # a few outlier channels, as in LLM activations
    return {"gaussian": gauss, "student-t(3)": student, "outlier channels": outliers}


def _formats():
    return {
        "nvfp4 1x16": lambda x: nvfp4.quantize(x).dequantize(),
        "nvfp4 16x16": lambda x: nvfp4.quantize(x, tile=(16, 16)).dequantize(),
        "nvfp4 1x16 +RHT": lambda x: nvfp4.quantize(x, rht=True).dequantize(),
        "mxfp4 (ceil)": lambda x: mxfp4.quantize(x).dequantize(),
        "mxfp4 (floor, OCP)": lambda x: mxfp4.quantize(x, scale_rule="floor").dequantize(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rayfp4.formats", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.rows % 32 or args.cols % 32 or args.rows <= 0 or args.cols <= 0:
        print(f"error: --rows and --cols must be positive multiples of 32, got {args.rows}x{args.cols}",
              file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    inputs = {name: x.to(torch.bfloat16) for name, x in _inputs(args.rows, args.cols, gen).items()}
    print(f"rayfp4 formats report: {args.rows}x{args.cols} BF16 inputs, torch {torch.__version__}")
    print("relative RMS error (SNR in dB); the RHT row is measured in the transformed domain")
    names = list(inputs)
    header = f"{'format':<20}" + "".join(f"{n:>22}" for n in names)
    print(header)
    print("-" * len(header))
    from .hadamard import rht

    for fname, fn in _formats().items():
        cells = []
        for n in names:
            x = inputs[n].float()
            ref = rht(inputs[n]).to(torch.bfloat16).float() if "RHT" in fname else x
            err = (fn(inputs[n]) - ref).norm() / ref.norm()
            cells.append(f"{err.item():10.4f} ({-20 * math.log10(err.item()):5.1f} dB)")
        print(f"{fname:<20}" + "".join(f"{c:>22}" for c in cells))

    x = inputs["gaussian"]
    reps = 3
    t0 = time.perf_counter()
    for _ in range(reps):
        nvfp4.quantize(x)
    dt = (time.perf_counter() - t0) / reps
    gbs = (x.numel() * 2 + x.numel() // 2 + x.numel() // 16) / dt / 1e9
    print(f"\nreference nvfp4.quantize on {x.device.type}: {dt * 1e3:.1f} ms per call, {gbs:.2f} GB/s (read+write)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
