"""How fast the token stream feeds one consumer: sequences/s and tokens/s, against a plain read.

    python -m bench.data [--shards DIR] [--global-batch 32] [--epochs 2]

Default data: the embedded Shakespeare corpus (bpe:8192, seq_len 256, tokenized into the cache on
first use). The baseline is the same ids read in the same order in this process with no Ray
(``ShardSet.read_sequences``, one row group at a time): the cost of parquet decoding alone. The
Ray Data rows deliver the identical batches through ``TokenStream`` (read tasks, streaming,
prefetch) to one consumer that does nothing but take them; "first batch" is the latency of starting
the stream, "steady" the rate after it. Compare the steady rate with what a training step consumes
(global batch x seq_len tokens per step time): the stream should never be what the GPU waits for.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np

from rayfp4.data import StreamConfig, open_shards
from rayfp4.data.order import batch_ids, epoch_order, rank_lanes


def plain_read(shards, cfg: StreamConfig, epochs: int) -> tuple[float, float, int]:
    """Baseline: the stream's ids read in-process, in order, with no Ray. (first, steady, steps)."""
    n = shards.num_sequences(cfg.split)
    steps = n // cfg.global_batch_size
    lanes = rank_lanes(0, 1, cfg.global_batch_size)
    window = cfg.window_steps or shards.rows_per_group
    start = time.perf_counter()
    first = None
    for epoch in range(epochs):
        order = epoch_order(n, shards.rows_per_group, cfg.seed, epoch)
        for t in range(0, steps, window):
            ids = batch_ids(order, cfg.global_batch_size, np.arange(t, min(t + window, steps)), lanes)
            rows = shards.read_sequences(ids.reshape(-1), cfg.split).astype(np.int64)
            assert rows.shape[0] == ids.size
            if first is None:
                first = time.perf_counter() - start
                steady_start = time.perf_counter()
    return first, time.perf_counter() - steady_start, epochs * steps


def ray_stream(shards, cfg: StreamConfig, epochs: int) -> tuple[float, float, int]:
    from rayfp4.data.stream import TokenStream

    stream = TokenStream(shards, cfg)
    total = epochs * stream.steps_per_epoch
    start = time.perf_counter()
    first, count = None, 0
    for batch in stream.batches(max_steps=total):
        count += 1
        if first is None:
            first = time.perf_counter() - start
            steady_start = time.perf_counter()
    assert count == total and batch.tokens.shape[0] == cfg.global_batch_size
    return first, time.perf_counter() - steady_start, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default=None, help="shard directory (default: embedded corpus)")
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if args.shards is None:
        from rayfp4.data.corpus import shakespeare_shards
        path = shakespeare_shards(tokenizer="bpe:8192", seq_len=256)
    else:
        path = Path(args.shards)
    shards = open_shards(path)
    import ray
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False

    seq_len = shards.seq_len
    variants = [
        ("plain read, no Ray (baseline)", plain_read, dict()),
        ("Ray Data, window 256 steps (default)", ray_stream, dict()),
        ("Ray Data, window 32 steps, prefetch 4", ray_stream, dict(window_steps=32, prefetch_batches=4)),
    ]
    print(f"{path.name}: {shards.num_sequences():,} train sequences of {seq_len}+1 tokens, "
          f"global batch {args.global_batch}, {args.epochs} epochs, one consumer, "
          f"{os.cpu_count()} CPUs")
    print(f"{'variant':40s} {'first batch s':>13s} {'seq/s':>10s} {'tokens/s':>12s} {'vs baseline':>11s}")
    base = None
    for name, fn, extra in variants:
        cfg = StreamConfig(global_batch_size=args.global_batch, seed=0, **extra)
        first, steady_s, steps = fn(shards, cfg, args.epochs)
        seqs = (steps - 1) * args.global_batch / steady_s
        base = base or seqs
        print(f"{name:40s} {first:13.2f} {seqs:10,.0f} {seqs * (seq_len + 1):12,.0f} {seqs / base:10.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
