"""The per-worker training loop: build, restore, then per step fetch a batch, forward, backward,
optimizer step, log, and validate / checkpoint at their cadence.

Runs inside each Ray Train worker (``train_loop_per_worker``). The Ray touch points are marked:
the context (rank, device), the checkpoint handed over by Ray Train on a restart, and
``ray.train.report`` with a new checkpoint. Test-only behaviour enters through hooks
(:mod:`rayfp4.train.hooks`), never through branches here.
"""

from __future__ import annotations

import contextlib
import errno
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ConfigError, RunConfig, fingerprint_changes
from ..model import build_model
from ..precision import (GradNoiseProbe, OscillationTracker, apply_precision_policy, collect_telemetry,
                         set_producer_fusions)
from .checkpoint import file_digests, read_info, save_state
from .errors import CheckpointError, NonFiniteTrainingError, RunMismatchError, StorageError
from .hooks import build_hooks
from .metrics import RankZeroLog, Throughput, system_metrics
from .schedule import lr_at
from .stop import StopRequest
from .storage import CheckpointStorage, open_checkpoint

#: Where ranks write a checkpoint before Ray Train copies it into the run's storage: inside the run
#: directory (not /tmp), so that a process killed mid-write leaves nothing elsewhere; the driver
#: empties it before and after each attempt.
STAGING_DIR = ".staging"

#: OS errors a restart cannot fix: the run's storage is full or read-only.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


# -- the worker's entry point ----------------------------------------------------------------

def train_loop_per_worker(loop_config: dict) -> None:
    """One rank's training; OS errors of full or read-only storage become :class:`StorageError`
    (not retried), naming what was being written."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with storage_errors_are_fatal("writing the run's files", loop_config["run_dir"]), \
            system_metrics(rank, loop_config):
        _train(loop_config)


def _train(loop_config: dict) -> None:
    import ray.train  # Ray touch point: who and where this worker is

    cfg = RunConfig.model_validate(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    check_shared_paths(run_dir, loop_config["shards"])
    storage = (CheckpointStorage.from_dict(loop_config["checkpoint_storage"]) if loop_config.get("checkpoint_storage")
               else CheckpointStorage.for_run(None, run_dir))

    model, opt, summary = build(cfg, rank, world, device)
    log = _rank_zero_log(cfg, rank, run_dir, loop_config, summary)
    forward = compiled_forward(model, cfg.compile_mode(), summary.runtime, device, world, log.notice,
                               fallback=cfg.train.compile == "auto")
    if summary.fusions.startswith("on"):
        log.notice(f"train.fusions: {summary.fusions} compute the RMSNorm or SwiGLU before them in their amax pass")
    progress = restore(model, opt, cfg, loop_config["fingerprint"], log.notice, run_dir, storage, rank)
    oscillation = None
    if cfg.precision.oscillation_reset is not None:
        oscillation = OscillationTracker(_unwrap(model), cfg.precision.oscillation_reset, cfg.train.steps)
        oscillation.load_state_dict(progress.oscillation)  # a window open at the checkpoint goes on
    probe = None
    if GradNoiseProbe.wanted(cfg.precision):
        probe = GradNoiseProbe(cfg.precision, summary.runtime, cfg.train.steps)
        probe.load_state_dict(progress.late_switch)  # an automatic switch that fired stays; a count goes on
    record_workers(run_dir, rank, world, progress.step, log.notice)
    data = TrainData(cfg, loop_config["shards"], rank, world, run_dir)
    hooks = build_hooks(cfg.debug, rank, run_dir)
    checkpointer = Checkpointer(run_dir, rank, loop_config["fingerprint"], hooks)
    stop = StopRequest(run_dir, rank, world, device)
    autocast = _autocast(cfg, device, graphed=forward is not model)
    timer = Throughput(cfg.data.global_batch_size * data.seq_len,
                       cfg.model.model_copy(update={"seq_len": data.seq_len}).flops_per_token(), device, world,
                       cfg.precision.format)
    log.describe(timer.params(), {"rayfp4.backend": summary.backend, "rayfp4.device": timer.params()["perf.device"]})
    validate_due = Cadence(cfg.train.val_every)
    checkpoint_due = Cadence(cfg.checkpoint.every)
    total = cfg.train.steps

    for batch in data.stream.batches(progress.stream, max_steps=max(total - progress.step, 0)):
        step = progress.step
        timer.start_step()
        hooks.on_step_start(step)
        summary.runtime.set_step(step)  # the late BF16 switch and this step's SR streams
        lr = lr_at(step, total, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule,
                   cfg.optim.min_lr_ratio, cfg.optim.decay_fraction)
        for group in opt.param_groups:
            group["lr"] = lr
        probed = {}
        if probe is not None and probe.due(step):  # before the step: it measures the weights the step sees
            first = batch.tokens[: data.micro].to(device)
            probed, switched = probe.measure(step, model, lambda: micro_batch_loss(model, first, autocast))
            if switched:
                log.notice(switched)

        loss, grad_norm = train_step(model, opt, batch.tokens.to(device), data, cfg, autocast,
                                     lambda x: hooks.on_loss(step, x), summary.runtime.set_micro_batch, forward)
        progress.count(loss, grad_norm, cfg.train.max_nonfinite_in_a_row)
        step = progress.step
        last = step >= total
        reset = oscillation.after_update(step) if oscillation is not None else {}

        metrics = {"train_loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped_steps": progress.skipped,
                   **timer.end_step()}
        if validate_due(step, last):
            metrics["val_loss"] = evaluate(model, data, rank, world, device, autocast)
        tele = {**collect_telemetry(_unwrap(model)), **reset, **probed}
        metrics.update({f"quant/{k}": v for k, v in tele.items()})
        if step % cfg.train.log_every == 0 or "val_loss" in metrics or tele or last:
            wait = timer.take_data_wait()
            if wait is not None:
                metrics["data_wait_s"] = wait
            log.write(step, metrics, {"step": step, "total_steps": total, "train_loss": loss,
                                      "val_loss": metrics.get("val_loss"), "tokens_per_s": metrics["tokens_per_s"],
                                      "skipped_steps": progress.skipped, "eta_s": timer.eta_s(total - step)})
        saved = checkpoint_due(step, last)
        stopping = not last and stop.due()  # the driver got SIGINT/SIGTERM (rayfp4.train.stop)
        if saved or stopping:
            progress.stream = batch.next_state.to_dict()
            progress.oscillation = oscillation.state_dict() if oscillation is not None else None
            progress.late_switch = probe.state_dict() if probe is not None else None
            checkpointer.save(model, opt, progress, {"step": step, "train_loss": loss,
                                                     "val_loss": metrics.get("val_loss")})
        if stopping:
            log.notice(f"stopped after step {step} ({stop.reason}): checkpoint_{step:08d} saved; "
                       f"running the same command again resumes there")
            return
        timer.waiting_for_data()


# -- build and restore -------------------------------------------------------------------------

def build(cfg: RunConfig, rank: int, world: int, device: torch.device):
    """The model with its precision policy applied, wrapped for data parallelism, and AdamW."""
    import ray.train

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)  # on its device first: the policy picks kernels for it
    summary = apply_precision_policy(model, cfg.precision, seed=cfg.train.seed, rank=rank,
                                     total_steps=cfg.train.steps)
    summary.fusions = set_producer_fusions(model, cfg.fusions_on())
    model = data_parallel(model, cfg, world, summary,
                          ddp=lambda m: ray.train.torch.prepare_model(m, move_to_device=False))
    opt = torch.optim.AdamW(_param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=cfg.optim.betas, eps=cfg.optim.eps)
    return model, opt, summary


def data_parallel(model, cfg: RunConfig, world: int, summary, ddp):
    """``model`` (on its device, policy applied) made data-parallel as ``cfg.scaling`` says: FSDP2
    per block and at the root when ``strategy`` is fsdp2 on more than one rank, with NVFP4 weights
    gathered in 4 bits unless ``precision.fp4_weight_gather`` is false (``summary.weight_gather``
    says which); else ``ddp(model)`` (Ray Train's prepare_model in a run, torch's DDP in
    bench.scaling)."""
    if cfg.scaling.strategy == "fsdp2" and world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if cfg.precision.format == "nvfp4" and cfg.precision.fp4_weight_gather is not False:
            from ..precision.fsdp import enable_fp4_weight_gather

            summary.weight_gather = enable_fp4_weight_gather(model, world).describe()
        else:
            summary.weight_gather = ("fp32 (precision.fp4_weight_gather: false)" if cfg.precision.fp4_weight_gather
                                     is False else f"fp32 (the 4-bit gather is for nvfp4, not {cfg.precision.format})")
        mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if cfg.scaling.fsdp_param_dtype == "bf16" else MixedPrecisionPolicy()
        for block in model.layers:
            fully_shard(block, mp_policy=mixed)
        fully_shard(model, mp_policy=mixed)
        return model
    return ddp(model)


@dataclass
class Progress:
    """Where training is, besides the weights and optimizer: saved in and restored from checkpoints."""

    step: int = 0
    skipped: int = 0  # steps whose loss or gradient was not finite (not applied)
    in_a_row: int = 0
    stream: dict | None = None  # the data stream's position (rayfp4.data.StreamState)
    oscillation: dict | None = None  # an open oscillation-reset window (precision.oscillation.OscillationTracker)
    late_switch: dict | None = None  # the automatic late switch (precision.noise_probe.GradNoiseProbe)

    def count(self, loss: float, grad_norm: float, max_in_a_row: int) -> None:
        """One step done; stop when too many in a row were not finite (a restart would not help)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
        else:
            self.skipped += 1
            self.in_a_row += 1
        if self.in_a_row >= max_in_a_row:
            raise NonFiniteTrainingError(
                f"{self.in_a_row} consecutive steps (up to step {self.step + 1}) had a non-finite loss or gradient "
                f"(last loss {loss}, grad norm {grad_norm}); stopping. Lower optim.lr, keep more "
                f"layers in BF16 (precision.bf16_last_blocks), or raise train.max_nonfinite_in_a_row.")
        self.step += 1

    def to_state(self) -> dict:
        out = {"step": self.step, "skipped_steps": self.skipped, "nonfinite_in_a_row": self.in_a_row,
               "stream": self.stream}
        if self.oscillation is not None:
            out["oscillation_reset"] = self.oscillation
        if self.late_switch is not None:
            out["late_switch_auto"] = self.late_switch
        return out

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        return cls(state["step"], state["skipped_steps"], state["nonfinite_in_a_row"], state["stream"],
                   state.get("oscillation_reset"), state.get("late_switch_auto"))


def restore(model, opt, cfg: RunConfig, fingerprint: dict, notice, run_dir: Path,
            storage: CheckpointStorage | None = None, rank: int = 0) -> Progress:
    """Load the checkpoint Ray Train hands over after a restart (or the newest older one that loads),
    refusing one written with other settings; a fresh :class:`Progress` when there is none.

    When Ray Train hands over none but the run's checkpoint storage (the run directory unless
    ``checkpoint.storage`` says otherwise) holds checkpoints, the driver died between a checkpoint's
    upload and Ray Train's record of it (its snapshot is written a moment later): the newest of them
    that loads is used, so that the steps before the kill are not trained again. Checkpoints on a
    remote filesystem are downloaded into this rank's corner of the staging area while they load.
    """
    import ray.train  # Ray touch point: the checkpoint of the previous attempt

    storage = storage or CheckpointStorage.for_run(None, run_dir)
    scratch = run_dir / STAGING_DIR / f"restore-rank{rank:05d}"
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        found = storage.checkpoints()
        if not found:
            return Progress()
        where = "the run directory" if storage.location == str(run_dir) else storage.location
        with contextlib.ExitStack() as stack:
            try:
                state, used = stack.enter_context(open_checkpoint(storage, found[-1], scratch, notice))
            except CheckpointError as e:
                notice(f"Ray Train recorded no checkpoint and none in {where} loads ({e}); starting at step 0")
                return Progress()
            notice(f"Ray Train recorded no checkpoint (its driver died before writing the record); "
                   f"resuming from {used.name}, found in {where}")
            return _apply(model, opt, cfg, fingerprint, state, used)
    with open_checkpoint(storage, Path(ckpt.path).name, scratch, notice) as (state, used):
        return _apply(model, opt, cfg, fingerprint, state, used)


def _apply(model, opt, cfg: RunConfig, fingerprint: dict, state: dict, used: Path) -> Progress:
    changes = fingerprint_changes(read_info(used).get("fingerprint") or fingerprint, fingerprint,
                                  cfg.resume_changes)
    if changes:
        raise RunMismatchError(f"checkpoint {used.name} was written by a run with other settings: "
                               f"{'; '.join(changes)} (list intended changes in resume_changes)")
    if "model" in state:
        _set_full_state(model, opt, state)
    else:  # sharded: each rank reads the parts it holds now, whatever the world size was
        _load_shards(model, opt, Path(used) / SHARDS_DIR)
    torch.set_rng_state(state["rng"]["torch"])
    return Progress.from_state(state)


def _rank_zero_log(cfg: RunConfig, rank: int, run_dir: Path, loop_config: dict, summary) -> RankZeroLog:
    from ..tracking import Tracker

    run_id, tracker = loop_config.get("mlflow_run_id"), None
    if rank == 0 and run_id:
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, quiet=False)
        tracker.log_params(run_id, summary.to_params())  # which layers run in 4 bits, as resolved here
    return RankZeroLog(rank, run_dir, tracker, run_id, loop_config.get("board"))


def _where_am_i() -> dict:
    import os
    import socket

    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(), "pid": os.getpid()}


def check_shared_paths(run_dir: Path, shards: str) -> None:
    """The run directory and the shards the driver prepared must be visible here: on a multi-node
    cluster a path that exists only on the driver's node would otherwise be created afresh on this
    node (the ledger and checkpoints scattered over local disks) or fail obscurely."""
    missing = []
    if not (run_dir / "config.yaml").is_file():
        missing.append(f"output_dir ({run_dir}: the driver wrote config.yaml there)")
    if not Path(shards).is_dir():
        missing.append(f"data.shards ({shards})")
    if missing:
        me = _where_am_i()
        raise ConfigError(f"not visible on node {me['node_ip']} ({me['hostname']}): {' and '.join(missing)}. "
                          f"On several nodes, output_dir and data.shards (RAYFP4_CACHE for the embedded corpus) "
                          f"must be directories every node mounts at the same path")


#: Where each rank of each attempt ran: one JSON line per attempt (rank 0 writes it).
WORKERS_FILE = "workers.jsonl"


def record_workers(run_dir: Path, rank: int, world: int, start_step: int, notice) -> None:
    """Rank 0 appends where every rank of this attempt runs (Ray node id and address, host, pid) to
    ``workers.jsonl`` in the run directory and tells the driver, which prints it: a group that Ray
    Train restarted on fewer or other nodes shows there."""
    import json
    import time

    me = {"rank": rank, **_where_am_i()}
    everyone = [me]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, me)
    if rank != 0:
        return
    nodes: dict[str, list[int]] = {}
    for w in everyone:
        nodes.setdefault(w["node_id"], []).append(w["rank"])
    with open(run_dir / WORKERS_FILE, "a") as f:
        f.write(json.dumps({"start_step": start_step, "world_size": world, "nodes": len(nodes),
                            "unix_s": time.time(), "workers": everyone}) + "\n")
    ip = {w["node_id"]: w["node_ip"] for w in everyone}
    notice(f"{world} worker(s) on {len(nodes)} node(s) from step {start_step}: " + "; ".join(
        f"{ip[n]} (node {n[:8]}) rank{'s' if len(r) > 1 else ''} {','.join(map(str, r))}" for n, r in nodes.items()))


class TrainData:
    """This rank's training stream (exact resume, see rayfp4.data) and the held-out sequences."""

    def __init__(self, cfg: RunConfig, shards_path: str, rank: int, world: int, run_dir: Path):
        from ..data import TokenStream, open_shards
        from ..data.order import validation_ids

        shards = open_shards(shards_path, verify_checksums=False)  # the driver verified them
        self.seq_len = cfg.data.seq_len or shards.seq_len
        self.stream = TokenStream(shards, cfg.data, rank=rank, world_size=world,
                                  ledger_dir=run_dir / "ledger" if cfg.data.ledger else None)
        self.val_tokens = None
        if cfg.data.val_sequences and shards.num_sequences("val"):
            ids = validation_ids(shards.num_sequences("val"), cfg.data.val_sequences)
            self.val_tokens = torch.from_numpy(shards.read_sequences(ids, "val").astype("int64"))
        self.accum = cfg.grad_accum_for(world)  # an elastic run's worker count changes between attempts
        self.micro = cfg.data.micro_batch_size or cfg.data.global_batch_size // world


class Cadence:
    """``due(step, last)``: every ``every`` steps (0: never) and at the last step."""

    def __init__(self, every: int):
        self.every = every

    def __call__(self, step: int, last: bool) -> bool:
        return last or bool(self.every and step % self.every == 0)


# -- one step, validation ----------------------------------------------------------------------

def train_step(model, opt, tokens: torch.Tensor, data: TrainData, cfg: RunConfig, autocast, on_loss,
               on_micro_batch=lambda i: None, forward=None) -> tuple[float, float]:
    """Forward and backward over the micro-batches (gradients synchronised on the last only), then
    clip and step; a step whose loss or gradient is not finite is not applied. Returns the loss
    averaged over ranks and the gradient norm before clipping. ``forward``: what computes the loss
    (default the model; :func:`compiled_forward`'s under ``train.compile``)."""
    forward = model if forward is None else forward
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    loss_sum = torch.zeros((), device=tokens.device)
    for i, chunk in enumerate(tokens.split(data.micro)):
        on_micro_batch(i)
        with _gradient_sync(model, i == data.accum - 1), autocast():
            loss = on_loss(forward(chunk[:, :-1], chunk[:, 1:]))
        (loss / data.accum).backward()
        loss_sum += loss.detach().float()
    train_loss = _all_mean(loss_sum / data.accum, world).item()
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    if math.isfinite(train_loss) and math.isfinite(grad_norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return train_loss, grad_norm


def compiled_forward(model, mode: str, runtime=None, device=None, world: int = 1, notice=lambda msg: None,
                     fallback: bool = False):
    """What a training step runs the (wrapped) model through: the model itself, or with
    ``train.compile`` its ``torch.compile`` (a new graph only where Python state it reads changes,
    e.g. once at a late BF16 switch), or for ``graph`` a :class:`rayfp4.train.graphs.GraphedLoss`
    replaying each micro-batch's forward and backward from CUDA graphs (``runtime``: the model's
    precision runtime, whose device seeds it enables). Checkpoints, validation and the probes use
    the model itself, so its parameters and state dict are unchanged. ``fallback`` (train.compile:
    auto): where graphs cannot run after all (what the config cannot know: the backend a GPU
    resolves to, a capture that fails), say why and run eagerly instead of stopping."""
    if mode == "none":
        return model
    if mode == "graph":
        from .graphs import GraphedLoss

        try:
            if world > 1:
                raise ConfigError(f"train.compile: graph runs one worker for now; this run has {world}")
            return GraphedLoss(_unwrap(model), runtime, device, notice, fallback=fallback)
        except ConfigError as e:
            if not fallback:
                raise
            notice(f"train.compile: auto: eager steps ({e})")
            return model
    return torch.compile(model, backend=mode)


def micro_batch_loss(model, chunk: torch.Tensor, autocast) -> torch.Tensor:
    """The loss of one micro-batch of token sequences (inputs and next-token targets), as a
    training step computes it (the gradient-noise probe's passes)."""
    with autocast():
        return model(chunk[:, :-1], chunk[:, 1:])


@torch.no_grad()
def evaluate(model, data: TrainData, rank: int, world: int, device, autocast) -> float | None:
    """Mean loss over the held-out sequences, split across ranks (each sequence counted once)."""
    if data.val_tokens is None or len(data.val_tokens) == 0:
        return None
    model.eval()
    mine = data.val_tokens[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for chunk in mine.split(data.micro):
        chunk = chunk[:, : data.seq_len + 1].to(device)
        with autocast():
            loss = _unwrap(model)(chunk[:, :-1], chunk[:, 1:])
        total[0] += loss.double() * len(chunk)
        total[1] += len(chunk)
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


# -- checkpoints ------------------------------------------------------------------------------

class Checkpointer:
    """Writes the whole training state into the run's staging folder and hands it to Ray Train,
    which copies it into the run's storage and registers it when complete."""

    def __init__(self, run_dir: Path, rank: int, fingerprint: dict, hooks):
        self.run_dir, self.rank, self.fingerprint, self.hooks = run_dir, rank, fingerprint, hooks

    def save(self, model, opt, progress: Progress, metrics: dict) -> None:
        import ray.train  # Ray touch point: report metrics with a new checkpoint
        from ray.train import Checkpoint

        step = progress.step
        staging = self.run_dir / STAGING_DIR
        staging.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"checkpoint_{step:08d}-rank{self.rank}-", dir=staging) as d:
            checkpoint = None
            with storage_errors_are_fatal(f"writing the step-{step} checkpoint", self.run_dir):
                state = {**progress.to_state(), "rng": {"torch": torch.get_rng_state()}}
                files = None
                if _sharded(model):
                    # Each rank writes its own shards (torch.distributed.checkpoint); Ray Train
                    # uploads every rank's folder into the one checkpoint folder. Nothing is
                    # gathered on rank 0, and any number of workers can load it back.
                    import torch.distributed.checkpoint as dcp

                    model_sd, opt_sd = _sharded_state_dicts(model, opt)
                    dcp.save({"model": model_sd, "optimizer": opt_sd}, checkpoint_id=str(Path(d) / SHARDS_DIR))
                    parts = [None] * dist.get_world_size()
                    dist.all_gather_object(parts, file_digests(d, SHARDS_DIR))
                    files = {k: v for part in parts for k, v in part.items()}
                else:
                    model_sd, opt_sd = _full_state_dicts(model, opt)
                    state.update(model=model_sd, optimizer=opt_sd)
                if self.rank == 0:
                    save_state(d, state, self.fingerprint, files)
                if self.rank == 0 or files is not None:
                    checkpoint = Checkpoint.from_directory(d)
                self.hooks.on_checkpoint_staged(step, Path(d))
                ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint,
                                 checkpoint_dir_name=f"checkpoint_{step:08d}")


#: The folder of a checkpoint holding sharded model and optimizer state (FSDP2 on several workers).
SHARDS_DIR = "shards"


def _sharded(model) -> bool:
    """FSDP2 on several ranks: its state is saved sharded, not gathered on rank 0."""
    return hasattr(model, "set_requires_gradient_sync") and dist.is_initialized() and dist.get_world_size() > 1


def _sharded_state_dicts(model, opt) -> tuple[dict, dict]:
    """This rank's shards of the model and optimizer state, as plain (D)Tensors: a weight that
    FSDP2 gathers in 4 bits is saved as its FP32 shard (the same storage), so that checkpoints
    hold only tensors and load into any layout, with or without the 4-bit gather."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ..precision.fsdp import plain_local

    model_sd, opt_sd = get_state_dict(model, opt)
    return {k: plain_local(v) for k, v in model_sd.items()}, opt_sd


def _load_shards(model, opt, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_sd, opt_sd = _sharded_state_dicts(model, opt)  # this run's layout: the templates DCP fills
    sd = {"model": model_sd, "optimizer": opt_sd}
    dcp.load(sd, checkpoint_id=str(path), no_dist=not (dist.is_initialized() and dist.get_world_size() > 1))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])


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


# -- small helpers -----------------------------------------------------------------------------

def _gradient_sync(model, on: bool):
    """Reduce gradients across ranks only on a step's last micro-batch: DDP through ``no_sync()``,
    FSDP2 through ``set_requires_gradient_sync`` (it would reduce-scatter on every backward)."""
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(on)
        return contextlib.nullcontext()
    if not on and hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def _autocast(cfg: RunConfig, device: torch.device, graphed: bool = False):
    enabled = cfg.train.dtype == "bf16"
    # A captured graph would keep autocast's cached BF16 copies of the weights from capture time
    # (stale after the first update); casting afresh gives the same bits.
    cache = not (graphed and cfg.compile_mode() == "graph")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=cache)


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


@contextlib.contextmanager
def storage_errors_are_fatal(what: str, where):
    """A full or read-only disk (an OSError anywhere in the chain: Ray wraps some) raised inside
    becomes :class:`StorageError` naming ``what`` was being written, so it is not retried."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        err = e
        seen = set()
        while err is not None and id(err) not in seen:
            seen.add(id(err))
            if isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS:
                raise StorageError(f"{what}: {err.strerror or err} ({err.filename or where})") from e
            err = err.__cause__ or err.__context__
        raise
