"""Weak scaling of rayfp4's training step over the GPUs of one host: tokens/s, step time, scaling
efficiency and FSDP2's all-gather bytes, for BF16 and NVFP4, DDP and FSDP2.

    python -m bench.scaling [--sizes 350m,1b] [--formats bf16,nvfp4] [--strategies ddp,fsdp2]
                            [--gpus 1,2,4] [--micro-batch 4] [--steps 10] [--warmup 3]
                            [--config configs/gpu-125m.yaml] [--set KEY=VALUE ...]
                            [--device cuda|cpu] [--json OUT.json]

Each (size, format, strategy, N) starts N processes (NCCL on GPUs, gloo with ``--device cpu``),
and each builds a run's model the way a run's worker does: the config (``--config``, with the
size's model shape and ``--set`` overrides), the precision policy, and the data-parallel wrapping
of ``rayfp4.train.loop.data_parallel`` (torch DDP, or FSDP2 per block with NVFP4 weights gathered
in 4 bits). Every rank trains on its own ``--micro-batch`` random sequences (weak scaling: the
per-GPU batch is fixed, so N GPUs train N times the tokens of one), FP32 master weights, AdamW,
BF16 autocast, gradient clipping as configured. After ``--warmup`` steps it times ``--steps``
steps (wall clock between barriers, each step ending in a device sync) and reports:

- tokens/s of all ranks together and the median step time;
- efficiency = tokens/s(N) / (N x tokens/s(1)), against the 1-GPU run of the same size, format
  and strategy (one process trains the whole model: no DDP or FSDP2 communication);
- all-gather bytes per step received by rank 0 (FSDP2's parameter gathers; DDP has none), so
  that NVFP4's 4-bit gather can be compared with FP32 (``--set precision.fp4_weight_gather=false``).

The data pipeline is not in the timing (random tokens): this measures what the GPUs and their
links sustain; a run's ``perf/data_wait_s`` says whether its data keeps up. Sizes: ``350m`` is
bench.step's 337M model (24 layers, d_model 1024, vocab 32768, 2048 tokens); ``1b`` has d_model
2048 (1.3B parameters); ``tiny`` is a 4-layer model for trying the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

SIZES = {
    "tiny": {"vocab_size": 256, "seq_len": 64, "n_layers": 4, "d_model": 64, "n_heads": 4, "n_kv_heads": 4,
             "d_ff": 128},
    "350m": {"vocab_size": 32768, "seq_len": 2048, "n_layers": 24, "d_model": 1024, "n_heads": 16,
             "n_kv_heads": 16, "d_ff": 2816},
    "1b": {"vocab_size": 32768, "seq_len": 2048, "n_layers": 24, "d_model": 2048, "n_heads": 16,
           "n_kv_heads": 16, "d_ff": 5504},
}


def overrides_for(size: str, fmt: str, strategy: str, world: int, extra: list[str]) -> list[str]:
    """The config overrides of one measurement (KEY=VALUE strings, as ``--set`` takes them)."""
    out = [f"model.{k}={v}" for k, v in SIZES[size].items()]
    seq = SIZES[size]["seq_len"]  # the (unused) data section must agree with the model's length
    out += [f"data.seq_len={seq}", f"data.corpus_seq_len={seq}"]
    out += [f"precision.format={fmt}", f"scaling.strategy={strategy}", f"scaling.num_workers={world}",
            "variants=[]"]
    if fmt == "bf16":
        out.append("precision.bf16_last_blocks=0")
    return out + list(extra)


def _worker(rank: int, world: int, store: str, spec: dict, out) -> None:
    import torch.distributed as dist

    from rayfp4.config import load_config
    from rayfp4.model import build_model
    from rayfp4.precision import apply_precision_policy
    from rayfp4.precision.fsdp import AllGatherBytes
    from rayfp4.train.loop import data_parallel

    cuda = spec["device"] == "cuda"
    if not cuda:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(dev)
        cfg = load_config(spec["config"], spec["overrides"])
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model).to(dev)
        params = sum(p.numel() for p in model.parameters())
        summary = apply_precision_policy(model, cfg.precision, seed=cfg.train.seed, rank=rank,
                                         total_steps=spec["warmup"] + spec["steps"])
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = data_parallel(model, cfg, world, summary,
                              ddp=lambda m: DDP(m, device_ids=[rank] if cuda else None) if world > 1 else m)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        g = torch.Generator().manual_seed(1000 + rank)  # each rank its own batch
        tokens = torch.randint(0, cfg.model.vocab_size, (spec["micro_batch"], cfg.model.seq_len + 1),
                               generator=g).to(dev)
        inp, tgt = tokens[:, :-1], tokens[:, 1:]
        clip = cfg.optim.grad_clip
        sync = torch.cuda.synchronize if cuda else (lambda: None)

        def step(i: int) -> None:
            summary.runtime.set_step(i)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model(inp, tgt)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()

        with AllGatherBytes() as gathered:
            for i in range(spec["warmup"]):
                step(i)
            gathered.take()
            times = []
            dist.barrier()
            t0 = time.perf_counter()
            for i in range(spec["steps"]):
                s0 = time.perf_counter()
                step(spec["warmup"] + i)
                times.append(time.perf_counter() - s0)
            dist.barrier()
            wall = time.perf_counter() - t0
            per_step = gathered.take() / spec["steps"]
        if rank == 0:
            out["result"] = {
                "tokens_per_s": world * spec["micro_batch"] * cfg.model.seq_len * spec["steps"] / wall,
                "step_time_s": statistics.median(times), "gather_bytes_per_step": per_step,
                "params": params, "weight_gather": getattr(summary, "weight_gather", None),
                "peak_bytes": torch.cuda.max_memory_allocated(dev) if cuda else None}
    finally:
        dist.destroy_process_group()


def measure(size: str, fmt: str, strategy: str, world: int, a) -> dict:
    """One measurement in ``world`` fresh processes; its result (rank 0's)."""
    import torch.multiprocessing as mp

    spec = {"config": a.config, "overrides": overrides_for(size, fmt, strategy, world, a.overrides),
            "device": a.device, "micro_batch": a.micro_batch, "steps": a.steps, "warmup": a.warmup,
            "strategy": strategy}
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), spec, out), nprocs=world,
                           start_method="spawn")
        return dict(out["result"])


def efficiency(results: list[dict]) -> None:
    """Adds ``efficiency`` to each result: its tokens/s over N times the 1-GPU result's of the
    same size, format and strategy (None without one)."""
    one = {(r["size"], r["format"], r["strategy"]): r["tokens_per_s"] for r in results if r["gpus"] == 1}
    for r in results:
        base = one.get((r["size"], r["format"], r["strategy"]))
        r["efficiency"] = r["tokens_per_s"] / (r["gpus"] * base) if base else None


def table(results: list[dict]) -> str:
    rows = ["| size | format | strategy | GPUs | tokens/s | step time | efficiency | all-gather B/step (rank 0) "
            "| weight gather |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        eff = f"{r['efficiency']:.1%}" if r.get("efficiency") is not None else "-"
        rows.append(f"| {r['size']} ({r['params'] / 1e6:,.1f}M) | {r['format']} | {r['strategy']} | {r['gpus']} "
                    f"| {r['tokens_per_s']:,.0f} | {r['step_time_s'] * 1e3:.1f} ms | {eff} "
                    f"| {r['gather_bytes_per_step']:,.0f} | {r['weight_gather'] or '-'} |")
    return "\n".join(rows)


def _list(text: str, allowed=None, kind=str) -> list:
    items = [kind(x) for x in text.split(",") if x]
    bad = [x for x in items if allowed is not None and x not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(map(str, allowed))}"
                                         if allowed else f"{text!r}: expected a comma-separated list")
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=lambda t: _list(t, SIZES), default=["350m", "1b"])
    p.add_argument("--formats", type=lambda t: _list(t, ("bf16", "nvfp4", "mxfp4")), default=["bf16", "nvfp4"])
    p.add_argument("--strategies", type=lambda t: _list(t, ("ddp", "fsdp2")), default=["ddp", "fsdp2"])
    p.add_argument("--gpus", type=lambda t: _list(t, kind=int), default=[1, 2, 4],
                   help="process counts (GPUs with --device cuda)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per GPU and step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--config", default="configs/gpu-125m.yaml", help="the run config the sizes override")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    if a.device == "cuda":
        have = torch.cuda.device_count()
        if max(a.gpus) > have:
            print(f"error: --gpus asks for {max(a.gpus)} GPUs; this machine has {have}", file=sys.stderr)
            return 2
    if any(n < 1 for n in a.gpus) or a.steps < 1 or a.micro_batch < 1 or a.warmup < 0:
        print("error: --gpus, --steps and --micro-batch must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    from rayfp4.config import ConfigError, load_config

    try:  # every configuration is checked before any process starts
        for size in a.sizes:
            for fmt in a.formats:
                for strategy in a.strategies:
                    load_config(a.config, overrides_for(size, fmt, strategy, max(a.gpus), a.overrides))
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = []
    total = len(a.sizes) * len(a.formats) * len(a.strategies) * len(a.gpus)
    print(f"# bench.scaling {time.strftime('%Y-%m-%d %H:%M')} device {a.device} "
          f"({torch.cuda.get_device_name() if a.device == 'cuda' else 'cpu'}), torch {torch.__version__}, "
          f"micro-batch {a.micro_batch}/GPU, {a.steps} timed steps after {a.warmup}", flush=True)
    for size in a.sizes:
        for fmt in a.formats:
            for strategy in a.strategies:
                for n in sorted(a.gpus):
                    t0 = time.perf_counter()
                    r = measure(size, fmt, strategy, n, a)
                    r.update(size=size, format=fmt, strategy=strategy, gpus=n)
                    results.append(r)
                    print(f"[{len(results)}/{total}] {size} {fmt} {strategy} x{n}: {r['tokens_per_s']:,.0f} tokens/s, "
                          f"step {r['step_time_s'] * 1e3:.1f} ms, all-gather {r['gather_bytes_per_step']:,.0f} B/step "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    efficiency(results)
    print(table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
