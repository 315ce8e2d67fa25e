"""The per-worker training loop: fetch batch, forward, backward, step, log, checkpoint.

Runs inside each Ray Train worker (``train_loop_per_worker``). Ray, MLflow and checkpoint plumbing
sit in small helpers beside the loop, so the loop itself reads like the algorithm.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import RunConfig, fingerprint_changes
from ..model import build_model
from ..precision import apply_precision_policy, collect_telemetry
from .checkpoint import load_latest, read_info, save_state
from .errors import NonFiniteTrainingError, RunMismatchError, StorageError
from .hooks import build_hooks
from .schedule import lr_at


# Dense BF16 tensor-core peak (TFLOP/s) by device name, for the MFU estimate.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "B200": 2250.0, "GB200": 2500.0, "L40S": 362.0}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _all_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
        t = t / world
    return t


@torch.no_grad()
def evaluate(model, val_tokens: torch.Tensor | None, rank: int, world: int, micro: int, seq_len: int,
             device, autocast) -> float | None:
    """Mean loss over the held-out sequences, split across ranks (each sequence counted once)."""
    if val_tokens is None or len(val_tokens) == 0:
        return None
    model.eval()
    mine = val_tokens[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for chunk in mine.split(micro):
        chunk = chunk[:, : seq_len + 1].to(device)
        with autocast():
            loss = _unwrap(model)(chunk[:, :-1], chunk[:, 1:])
        total[0] += loss.double() * len(chunk)
        total[1] += len(chunk)
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


class RankZeroLog:
    """Metrics of rank 0: a JSON-lines file in the run dir, MLflow, and the driver's progress board."""

    def __init__(self, rank: int, run_dir: Path, tracker, run_id, board):
        self.active = rank == 0
        self.path = run_dir / "metrics.jsonl"
        self.tracker, self.run_id, self.board = tracker, run_id, board

    def write(self, step: int, metrics: dict, progress: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tracker is not None:
            self.tracker.log_metrics(self.run_id, metrics, step)
        if self.board is not None:
            self.board.post.remote(progress)


#: OS errors a restart cannot fix: the run's storage is full or read-only.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def _storage_error(exc: BaseException) -> OSError | None:
    """The full-disk / read-only OSError in an exception's chain (Ray wraps some), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def train_loop_per_worker(loop_config: dict) -> None:
    """One rank's training; OS errors of full or read-only storage become :class:`StorageError`
    (not retried), naming what was being written."""
    try:
        _train(loop_config)
    except StorageError:
        raise
    except Exception as e:
        err = _storage_error(e)
        if err is None:
            raise
        raise StorageError(f"writing the run's files: {err.strerror or err} "
                           f"({err.filename or loop_config['run_dir']})") from e


def _train(loop_config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    from ..data import StreamConfig, TokenStream, open_shards
    from ..tracking import Tracker

    cfg = RunConfig.model_validate(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    use_bf16 = cfg.train.dtype == "bf16"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731

    # -- model, precision policy, optimizer ---------------------------------------------------
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)  # on its device first: the policy picks kernels for it
    summary = apply_precision_policy(model, cfg.precision, seed=cfg.train.seed, rank=rank,
                                     total_steps=cfg.train.steps)
    if cfg.scaling.strategy == "fsdp2" and world > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    else:
        model = ray.train.torch.prepare_model(model, move_to_device=False)
    opt = torch.optim.AdamW(_param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=cfg.optim.betas, eps=cfg.optim.eps)

    board = loop_config.get("board")
    fingerprint = loop_config["fingerprint"]

    # -- resume -------------------------------------------------------------------------------
    step, skipped, in_a_row, stream_state = 0, 0, 0, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        def warn(msg):
            if rank == 0 and board is not None:
                board.notice.remote(msg)
        with ckpt.as_directory() as d:
            state, used = load_latest(d, warn)
            changes = fingerprint_changes(read_info(used).get("fingerprint") or fingerprint, fingerprint,
                                          cfg.resume_changes)
        if changes:
            raise RunMismatchError(f"checkpoint {used.name} was written by a run with other settings: "
                                   f"{'; '.join(changes)} (list intended changes in resume_changes)")
        _set_full_state(model, opt, state)
        step, skipped, in_a_row = state["step"], state["skipped_steps"], state["nonfinite_in_a_row"]
        stream_state = state["stream"]
        torch.set_rng_state(state["rng"]["torch"])

    # -- data -----------------------------------------------------------------------------------
    shards = open_shards(loop_config["shards"], verify_checksums=False)  # the driver verified them
    seq_len = cfg.data.seq_len or shards.seq_len
    stream = TokenStream(shards, StreamConfig(global_batch_size=cfg.data.global_batch_size, seed=cfg.data.seed,
                                              seq_len=seq_len, window_steps=cfg.data.window_steps,
                                              read_num_cpus=cfg.data.read_num_cpus),
                         rank=rank, world_size=world, ledger_dir=run_dir / "ledger" if cfg.data.ledger else None)
    val_tokens = None
    if cfg.data.val_sequences and shards.num_sequences("val"):
        val_tokens = torch.from_numpy(shards.read_split("val")[0][: cfg.data.val_sequences].astype("int64"))
    accum = cfg.grad_accum
    micro = cfg.data.micro_batch_size or cfg.data.global_batch_size // world

    tracker = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, quiet=False)
    log = RankZeroLog(rank, run_dir, tracker, loop_config.get("mlflow_run_id"), board)
    hooks = build_hooks(cfg.debug, rank, run_dir)
    if tracker is not None:  # which layers run in 4 bits, as the policy resolved on this model
        tracker.log_params(loop_config["mlflow_run_id"], summary.to_params())
    tokens_per_step = cfg.data.global_batch_size * seq_len
    flops_per_token = cfg.model.model_copy(update={"seq_len": seq_len}).flops_per_token()
    peak = peak_flops(device)
    total = cfg.train.steps
    started, steps_timed = time.perf_counter(), 0

    # -- the loop -------------------------------------------------------------------------------
    for batch in stream.batches(stream_state, max_steps=max(total - step, 0)):
        t0 = time.perf_counter()
        hooks.on_step_start(step)
        summary.runtime.set_step(step)
        lr = lr_at(step, total, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule,
                   cfg.optim.min_lr_ratio, cfg.optim.decay_fraction)
        for group in opt.param_groups:
            group["lr"] = lr

        tokens = batch.tokens.to(device)
        loss_sum = torch.zeros((), device=device)
        for i, chunk in enumerate(tokens.split(micro)):
            last = i == accum - 1
            no_sync = model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with no_sync, autocast():
                loss = hooks.on_loss(step, model(chunk[:, :-1], chunk[:, 1:]))
            (loss / accum).backward()
            loss_sum += loss.detach().float()
        train_loss = _all_mean(loss_sum / accum, world).item()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        if math.isfinite(train_loss) and math.isfinite(grad_norm):
            opt.step()
            in_a_row = 0
        else:
            skipped += 1
            in_a_row += 1
        opt.zero_grad(set_to_none=True)
        if in_a_row >= cfg.train.max_nonfinite_in_a_row:
            raise NonFiniteTrainingError(
                f"{in_a_row} consecutive steps (up to step {step + 1}) had a non-finite loss or gradient "
                f"(last loss {train_loss}, grad norm {grad_norm}); stopping. Lower optim.lr, keep more "
                f"layers in BF16 (precision.bf16_last_blocks), or raise train.max_nonfinite_in_a_row.")
        step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        steps_timed += 1

        last_step = step >= total
        metrics = {"train_loss": train_loss, "lr": lr, "grad_norm": grad_norm, "skipped_steps": skipped,
                   "tokens_per_s": tokens_per_step / dt, "step_time_s": dt}
        if peak:
            metrics["mfu"] = flops_per_token * tokens_per_step / dt / (peak * world)
        if (cfg.train.val_every and step % cfg.train.val_every == 0) or last_step:
            metrics["val_loss"] = evaluate(model, val_tokens, rank, world, micro, seq_len, device, autocast)
        tele = collect_telemetry(_unwrap(model))
        if tele:
            metrics.update({f"quant/{k}": v for k, v in tele.items()})
        if step % cfg.train.log_every == 0 or "val_loss" in metrics or tele or last_step:
            elapsed = time.perf_counter() - started
            progress = {"step": step, "total_steps": total, "train_loss": train_loss,
                        "val_loss": metrics.get("val_loss"), "tokens_per_s": metrics["tokens_per_s"],
                        "skipped_steps": skipped, "eta_s": elapsed / steps_timed * (total - step)}
            log.write(step, metrics, progress)

        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or last_step:
            state = {"step": step, "skipped_steps": skipped, "nonfinite_in_a_row": in_a_row,
                     "stream": batch.next_state.to_dict(), "rng": {"torch": torch.get_rng_state()}}
            _report_with_checkpoint(model, opt, state, rank, {"step": step, "train_loss": train_loss,
                                                              "val_loss": metrics.get("val_loss")},
                                    run_dir, fingerprint, hooks, Checkpoint)


def _full_state_dicts(model, opt) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if dist.is_available() and dist.is_initialized():
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, opt, options=opts)
    return _unwrap(model).state_dict(), opt.state_dict()


def _set_full_state(model, opt, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if dist.is_available() and dist.is_initialized():
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    else:
        _unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])


#: Where ranks write a checkpoint before Ray Train copies it into the run's storage: inside the run
#: directory (not /tmp), so that a process killed mid-write leaves nothing elsewhere; the driver
#: empties it before and after each attempt.
STAGING_DIR = ".staging"


def _report_with_checkpoint(model, opt, state: dict, rank: int, metrics: dict, run_dir: Path, fingerprint: dict,
                            hooks, Checkpoint) -> None:
    import ray.train

    model_sd, opt_sd = _full_state_dicts(model, opt)  # collective for FSDP: every rank calls it
    staging = run_dir / STAGING_DIR
    staging.mkdir(parents=True, exist_ok=True)
    step = state["step"]
    with tempfile.TemporaryDirectory(prefix=f"checkpoint_{step:08d}-rank{rank}-", dir=staging) as d:
        checkpoint = None
        try:
            if rank == 0:
                save_state(d, {"model": model_sd, "optimizer": opt_sd, **state}, fingerprint)
                checkpoint = Checkpoint.from_directory(d)
            hooks.on_checkpoint_staged(step, Path(d))
            ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint,
                             checkpoint_dir_name=f"checkpoint_{step:08d}")
        except Exception as e:
            err = _storage_error(e)
            if err is None:
                raise
            raise StorageError(f"writing the step-{step} checkpoint: {err.strerror or err} "
                               f"({err.filename or run_dir})") from e
