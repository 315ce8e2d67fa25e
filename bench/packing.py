"""How many small training runs to pack onto one GPU: one run's training step in a loop, timed over
a wall-clock window shared by every copy started together.

    python -m bench.packing [--config configs/gpu-25m.yaml] [--set KEY=VALUE ...]
                            --start-at UNIX_TIME [--seconds 30] [--warmup 5]

Builds the config's model with its precision policy (as a run's worker does: FP32 master weights,
AdamW, bf16 autocast, gradient clipping at the config's value) on random tokens of the config's
batch shape, warms up, waits until ``--start-at``, then counts the steps finished in the next
``--seconds`` and prints one line: ``packing: <label> <tokens/s>``. Started N times at once (see
``bench/run_h200.sh packing``), the sum of the N lines is the GPU's aggregate throughput with N
runs sharing it, which is what the recipe-lab study's ``concurrent`` setting trades against.
"""

from __future__ import annotations

import argparse
import time

import torch

from rayfp4.config import load_config
from rayfp4.model import build_model
from rayfp4.precision import apply_precision_policy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/gpu-25m.yaml")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--start-at", type=float, required=True, help="unix time the timed window opens")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--label", default="")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()

    cfg = load_config(a.config, a.overrides)
    torch.manual_seed(cfg.train.seed)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model = build_model(cfg.model).to(dev)
    if cfg.precision.format != "bf16":
        apply_precision_policy(model, cfg.precision, seed=cfg.train.seed, total_steps=cfg.train.steps)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=dev.type == "cuda")
    batch = cfg.data.global_batch_size
    seq = cfg.model.seq_len
    tokens = torch.randint(0, min(cfg.model.vocab_size, 256), (batch, seq + 1), device=dev)
    inp, tgt = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(inp, tgt)
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup):
        step()
    sync()
    late = time.time() - a.start_at
    while time.time() < a.start_at:
        time.sleep(0.01)
    begin, end = time.time(), a.start_at + a.seconds
    n = 0
    while time.time() < end:
        step()
        n += 1
        if n % 4 == 0:
            sync()
    sync()
    elapsed = time.time() - begin
    note = f"; warm-up ended {late:.1f} s into the window, timed from then" if late > 0 else ""
    print(f"packing: {a.label or cfg.precision.format} {n * batch * seq / max(elapsed, 1e-9):.0f} tokens/s "
          f"({n} steps in {elapsed:.1f} s{note})", flush=True)


if __name__ == "__main__":
    main()
