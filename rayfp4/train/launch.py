"""Driver side: checks before Ray starts, one Ray Train run per variant, its MLflow run, the comparison.

``run_experiment(cfg)`` is what ``python -m rayfp4.run`` calls after validating the config:

1. :func:`preflight` catches what can be known before Ray starts (one line, exit 2): an output
   directory that cannot be written, a policy that does not fit the model (built on the meta
   device), a backend the machine cannot run, a hook that does not import, bad shards;
2. it locks the run's directory (one driver per run), marks MLflow runs whose driver died as KILLED;
3. it trains each variant in turn as a child MLflow run under one parent; a run directory that
   already holds a run is continued only by the same settings (:meth:`RunConfig.fingerprint`);
4. it prints and logs the table of final/best validation loss with the gap to the baseline.

Every run ends with the status it really had: FINISHED, FAILED (with the error that ended it) or
KILLED (SIGINT/SIGTERM here, or found orphaned by a later start).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import ConfigError, RunConfig, fingerprint_changes, flatten
from ..fileio import write_atomic
from ..tracking import Tracker, comparison_table, plot_loss_curves, resolve_tracking_uri
from ..tracking.compare import VariantResult, result_from_metrics
from . import reporting
from .storage import SNAPSHOT, CheckpointStorage, resolve_storage

log = logging.getLogger("rayfp4")
FINGERPRINT = "fingerprint.json"
LOCK = ".lock"


@dataclass
class ExperimentResult:
    name: str
    results: list[VariantResult]
    table: str
    parent_run_id: str | None


def say(msg: str) -> None:
    print(f"[rayfp4] {msg}", flush=True)


@dataclass
class PreparedData:
    path: Path
    identity: str  # what the shards hold (ShardManifest.identity), part of each run's fingerprint


def prepare_shards(cfg: RunConfig) -> PreparedData:
    """The validated shard directory (tokenizing the embedded corpus on first use)."""
    from ..data import open_shards
    from ..data.corpus import shakespeare_shards

    if cfg.data.shards is None:
        say(f"data: embedded Shakespeare corpus ({cfg.data.corpus_tokenizer}, seq_len {cfg.data.corpus_seq_len})")
        path = shakespeare_shards(cfg.data.corpus_tokenizer, cfg.data.corpus_seq_len)
    else:
        path = Path(cfg.data.shards).expanduser().resolve()
    shards = open_shards(path)  # raises DataError naming the file before any worker starts
    vocab = shards.tokenizer().vocab_size
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({vocab}) of {path}")
    seq = cfg.data.seq_len or shards.seq_len
    if seq > cfg.model.seq_len:
        raise ConfigError(f"model.seq_len={cfg.model.seq_len} is smaller than the data's sequence length {seq}")
    return PreparedData(path, shards.manifest.identity())


def check_output_dir(output_dir: str, create: bool, what: str = "output_dir") -> Path:
    """``output_dir`` resolved, after proving it can be written (a probe file, since permission bits
    say nothing for root or a read-only mount); without ``create`` nothing is left behind. ``what``
    names the setting in messages."""
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{what}: {out} exists and is not a directory")
    out = out.resolve()
    probe_in = out
    while not probe_in.exists():
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise ConfigError(f"{what}: {probe_in} (a parent of {out}) is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=probe_in, prefix=".rayfp4-write-probe-"):
            pass
        if create:
            out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{what}: cannot write to {probe_in} ({e.strerror or e})") from None
    return out


def check_checkpoint_storage(storage: str | None) -> None:
    """``checkpoint.storage``: a directory (or ``file://`` URI) must be writable here; another URI
    must name a filesystem pyarrow can open (which also checks that its library and, for some,
    credentials are present). Whether every node reaches it, Ray Train checks when training starts."""
    if storage is None:
        return
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(resolve_storage(storage))
    except Exception as e:  # pyarrow: ArrowInvalid (bad URI), ArrowNotImplementedError (no such scheme), OSError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"checkpoint.storage: cannot open {storage!r}: {first}") from None
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        check_output_dir(path, create=False, what="checkpoint.storage")


def check_model_and_policy(cfg: RunConfig, label: str = "") -> None:
    """Build the model on the meta device and apply the policy: a glob that matches nothing, a layer
    that is not a multiple of the block, a backend this machine cannot run fail here, in a second."""
    import torch

    from ..model import build_model
    from ..precision import PolicyError, apply_precision_policy

    if cfg.scaling.use_gpu and not torch.cuda.is_available():
        device = "meta"  # a GPU cluster driven from a CPU machine: the workers check the backend
    else:
        device = "cuda" if cfg.scaling.use_gpu else "cpu"
    with torch.device("meta"):
        model = build_model(cfg.model)
    try:
        apply_precision_policy(model, cfg.precision, seed=cfg.train.seed, total_steps=cfg.train.steps, device=device)
    except PolicyError as e:
        raise PolicyError(f"variant {label}: {e}" if label else str(e)) from None


def check_hooks(cfg: RunConfig) -> None:
    from .hooks import load_hook

    for i, h in enumerate(cfg.debug.hooks):
        try:
            load_hook(h.path, h.args)
        except Exception as e:
            raise ConfigError(f"debug.hooks[{i}]: {h.path}: {type(e).__name__}: {e}") from None


def preflight(cfg: RunConfig, create: bool = False) -> tuple[Path, PreparedData]:
    """Everything that can be checked before Ray starts; raises ConfigError/PolicyError/DataError."""
    out = check_output_dir(cfg.output_dir, create)
    variants = cfg.variant_configs()
    for label, vcfg in variants:
        check_model_and_policy(vcfg, label if len(variants) > 1 else "")
    for storage in dict.fromkeys(v.checkpoint.storage for _, v in variants):
        check_checkpoint_storage(storage)
    for _, v in variants[1:]:
        if v.data.shards != cfg.data.shards or v.data.corpus_tokenizer != cfg.data.corpus_tokenizer \
                or v.data.corpus_seq_len != cfg.data.corpus_seq_len:
            raise ConfigError("variants: all variants must read the same data (data.shards / data.corpus_*)")
    check_hooks(cfg)
    return out, prepare_shards(cfg)


def ensure_ray(cfg: RunConfig) -> None:
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Inside `ray job submit` (or with RAY_ADDRESS) this joins that cluster; else starts one.
        # Workers' own logs (Ray Train's checkpoint chatter, Ray Data's execution summaries) stay
        # in Ray's log files unless RAYFP4_VERBOSE=1: the driver prints progress and errors itself.
        verbose = os.environ.get("RAYFP4_VERBOSE", "") not in ("", "0")
        ray.init(logging_level="INFO" if verbose else "ERROR", log_to_driver=verbose, configure_logging=False)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def start_shared_ray() -> tuple[str, bool]:
    """A Ray cluster other processes can join (``rayfp4.study``'s runs): (its address, whether this
    process started it). Joining needs the address and what ``ray.init`` puts in ``os.environ``
    (the token-auth mode), so pass the environment read after this call."""
    import ray

    if ray.is_initialized():  # a caller already running Ray in this process
        return ray.get_runtime_context().gcs_address, False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    verbose = os.environ.get("RAYFP4_VERBOSE", "") not in ("", "0")
    ctx = ray.init(logging_level="INFO" if verbose else "ERROR", log_to_driver=verbose, configure_logging=False)
    return ctx.address_info["gcs_address"], True


def stop_shared_ray() -> None:
    import ray

    ray.shutdown()


def _inside(out_dir: Path, path: Path) -> Path:
    """``path`` resolved (links followed), refused unless it stays inside ``out_dir``."""
    real = path.resolve()
    if not real.is_relative_to(out_dir):
        raise ConfigError(f"name: {path} resolves to {real}, outside output_dir {out_dir}; a run may only "
                          f"write inside output_dir")
    return real


def _check_resume(cfg: RunConfig, run_dir: Path, fingerprint: dict[str, str]) -> tuple[bool, list[str]]:
    """(resuming?, the accepted changes) for ``run_dir``; ConfigError when the directory holds a run
    with other settings (naming each difference), or the ``resume`` mode forbids what is there."""
    # A run was started there if Ray Train recorded a checkpoint, or if the settings were written
    # (they are, before anything else): a driver killed before Ray Train wrote its record still
    # left a run, and its MLflow run, to continue.
    storage = CheckpointStorage.for_run(cfg.checkpoint.storage, run_dir)
    try:
        recorded = storage.exists(SNAPSHOT)
    except Exception as e:  # a remote store that does not answer, or refuses the credentials
        raise ConfigError(f"checkpoint.storage: cannot read {storage.location} "
                          f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    exists = recorded or (run_dir / FINGERPRINT).exists()
    _check_same_storage(cfg, run_dir, exists)
    if exists and cfg.resume == "never":
        raise ConfigError(f"resume: run {run_dir} already exists and resume is 'never'; choose a new name "
                          f"(--set name=...) or resume: auto")
    if not exists and cfg.resume == "must":
        raise ConfigError(f"resume: 'must' but {run_dir} holds no run to resume")
    old = None
    if (run_dir / FINGERPRINT).exists():
        try:
            old = json.loads((run_dir / FINGERPRINT).read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"resume: {run_dir / FINGERPRINT} is unreadable ({type(e).__name__}); the run's "
                              f"settings cannot be compared, choose a new name (--set name=...)") from None
    elif (run_dir / "config.yaml").exists():  # a run written before fingerprints: its config says
        try:
            old = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text())).fingerprint()
            fingerprint = {k: v for k, v in fingerprint.items() if k != "data.identity"}
        except Exception:
            old = None
    if old is None:
        if exists:
            raise ConfigError(f"resume: {run_dir} holds checkpoints but no record of the settings that wrote "
                              f"them ({FINGERPRINT}); choose a new name (--set name=...)")
        return exists, []
    refused = fingerprint_changes(old, fingerprint, cfg.resume_changes)
    if refused:
        raise ConfigError(f"resume: {run_dir} holds a run with other settings: {'; '.join(refused)}. Choose a new "
                          f"name (--set name=...), or continue it with the changes by listing them: "
                          f"--set 'resume_changes=[{', '.join(sorted({c.split(':')[0] for c in refused}))}]'")
    return exists, fingerprint_changes(old, fingerprint)


def _check_same_storage(cfg: RunConfig, run_dir: Path, exists: bool) -> None:
    """A run continues only with the checkpoint storage it was started with: elsewhere Ray Train
    would find no checkpoint and train again from step 0 beside the earlier steps' metrics."""
    if not exists or not (run_dir / "config.yaml").is_file():
        return
    try:
        old = (yaml.safe_load((run_dir / "config.yaml").read_text()).get("checkpoint") or {}).get("storage")
    except Exception:  # unreadable: the fingerprint check says what it can
        return
    if resolve_storage(old) != resolve_storage(cfg.checkpoint.storage):
        def show(s):
            return "the run directory (unset)" if s is None else repr(s)

        raise ConfigError(f"checkpoint.storage: run {run_dir} keeps its checkpoints in {show(old)}, not "
                          f"{show(cfg.checkpoint.storage)}; set it back to continue the run, or choose a new name "
                          f"(--set name=...)")


def clear_staging(run_dir: Path) -> None:
    """Remove checkpoint files a killed worker left half-written (see loop.STAGING_DIR)."""
    from .loop import STAGING_DIR

    shutil.rmtree(run_dir / STAGING_DIR, ignore_errors=True)


def train_variant(cfg: RunConfig, label: str, run_dir: Path, data: PreparedData, tracker: Tracker,
                  parent_run_id: str | None, resume: tuple[bool, list[str]]) -> VariantResult:
    """Train one variant with Ray Train; its MLflow run ends FINISHED, FAILED or KILLED as it did."""
    from .trainer import Interrupted

    name = label or cfg.name
    fingerprint = cfg.fingerprint(data.identity)
    resuming, changes = resume
    run_dir.mkdir(parents=True, exist_ok=True)
    clear_staging(run_dir)
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    write_atomic(run_dir / FINGERPRINT, json.dumps({"fingerprint": fingerprint}, indent=1, sort_keys=True))
    run_id = _mlflow_run(cfg, label, run_dir, tracker, parent_run_id, resuming)
    reporting.log_dataset(tracker, run_id, data.path)
    status, error = "FAILED", None
    try:
        if changes:
            say(f"{name}: continuing with changed settings (resume_changes): {'; '.join(changes)}")
            tracker.set_tag(run_id, "rayfp4.resume_changes", "; ".join(changes)[:5000])
        say(f"{'resuming' if resuming else 'starting'} {name}: {cfg.precision.format}, "
            f"{cfg.model.num_params() / 1e6:.1f}M params, {cfg.train.steps} steps, "
            f"{cfg.scaling.workers_text} worker(s) on {'GPU' if cfg.scaling.use_gpu else 'CPU'} -> {run_dir}")
        status, error = _fit(cfg, label, run_dir, data, run_id, fingerprint)
    except (Interrupted, KeyboardInterrupt) as e:
        status, error = "KILLED", f"interrupted ({e})" if isinstance(e, Interrupted) else "interrupted"
        raise
    except Exception as e:  # the driver's own machinery failed: the run still ends, as FAILED
        error = f"{type(e).__name__}: {e}"
    finally:
        clear_staging(run_dir)
        res = result_from_metrics(name, status, run_dir / "metrics.jsonl", error)
        try:
            png = plot_loss_curves([res], run_dir / "loss_curve.png", title=f"{cfg.name} {label}".strip())
            if png is not None:
                tracker.log_artifact(run_id, png)
        except Exception as e:  # a full disk must not hide the error that ended the run
            say(f"{name}: could not write the loss curve: {type(e).__name__}: {e}")
        if error and status == "FAILED":
            tracker.set_tag(run_id, "rayfp4.error", error[:5000])
        try:
            reporting.log_final_losses(tracker, run_id, res)
            if status == "FINISHED":
                from .loop import STAGING_DIR

                reporting.log_final_checkpoint(tracker, run_id, cfg, label, run_dir, run_dir / STAGING_DIR)
        except Exception as e:  # a full disk must not hide the error that ended the run
            say(f"{name}: could not record the final checkpoint in MLflow: {type(e).__name__}: {e}")
        tracker.end_run(run_id, status)
    if error:
        say(f"{name} failed: {error}")
    return res


def _mlflow_run(cfg: RunConfig, label: str, run_dir: Path, tracker: Tracker, parent_run_id: str | None,
                resuming: bool) -> str | None:
    """The variant's MLflow run: the one it had when resuming (RUNNING again), else a new one."""
    id_file = run_dir / "mlflow_run_id"
    run_id = id_file.read_text().strip() if resuming and id_file.exists() else None
    if run_id is not None:
        tracker.reopen_run(run_id)
        tracker.set_tags(run_id, reporting.run_tags(cfg, label))  # the code that continues it
        return run_id
    run_id = tracker.start_run(reporting.run_title(cfg, label), parent_run_id=parent_run_id,
                               tags={"rayfp4.run_dir": str(run_dir), **reporting.run_tags(cfg, label)})
    if run_id:
        write_atomic(id_file, run_id)
        # A variant's run: its own name and the experiment's baseline (its config's name is the
        # parent's, the folder above it; the variant itself has no baseline field).
        params = flatten(cfg.model_dump(mode="json", exclude={"variants", "baseline"} | ({"name"} if label else set())))
        if label:
            params = {"variant": label, "baseline": cfg.baseline or "", **params}
        tracker.log_params(run_id, params)
        tracker.log_artifact(run_id, run_dir / "config.yaml")
    return run_id


def _fit(cfg: RunConfig, label: str, run_dir: Path, data: PreparedData, run_id: str | None,
         fingerprint: dict) -> tuple[str, str | None]:
    """Run Ray Train; (status, error) of the training itself."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .loop import train_loop_per_worker
    from .progress import ProgressBoard, ProgressPrinter
    from .stop import clear_stop
    from .trainer import RendezvousConfig, Trainer

    # On the driver's node, like Ray Train's controller: a board on a node that dies would take the
    # progress line (and rank 0's notices) with it.
    board = ProgressBoard.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)).remote()
    s = cfg.scaling
    if cpu_starvation := data_starved_by(s, ray.cluster_resources().get("CPU", 0)):
        say(f"{label}: warning: {cpu_starvation}")
    # Checkpoints: <storage_path>/<name>/checkpoint_*; by default storage_path is <output_dir>/<run>
    # and name the variant's folder, i.e. the run directory (rayfp4.train.storage).
    storage = CheckpointStorage.for_run(cfg.checkpoint.storage, run_dir)
    trainer = Trainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run_dir": str(run_dir),
                           "shards": str(data.path), "mlflow_run_id": run_id, "board": board,
                           "fingerprint": fingerprint, "checkpoint_storage": storage.to_dict()},
        torch_config=RendezvousConfig(backend=cfg.dist_backend, rendezvous=s.rendezvous),
        scaling_config=ScalingConfig(
            # [min, max]: Ray Train's elastic policy (re)starts the group with as many as fit
            num_workers=(s.min_workers, s.max_workers) if s.elastic else s.max_workers,
            elastic_resize_monitor_interval_s=s.elastic_resize_interval_s,
            use_gpu=s.use_gpu,
            resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {}),
                                  **s.resources_per_worker}),
        run_config=RayRunConfig(name=storage.name, storage_path=storage.storage_path,
                                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
                                failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures)),
    )
    # SIGINT/SIGTERM: the workers save a checkpoint of their step and return (rayfp4.train.stop)
    trainer.stop_dir, trainer.stop_grace_s = run_dir, cfg.checkpoint.stop_grace_s
    clear_stop(run_dir)
    try:
        with ProgressPrinter(board, label):
            result = trainer.fit()
        if result.error is not None:
            return "FAILED", describe(result.error)
        return "FINISHED", None
    except ray.train.TrainingFailedError as e:  # the workers' errors, after any retries
        return "FAILED", describe(e)
    finally:
        clear_stop(run_dir)
        try:
            ray.kill(board)
        except Exception:
            pass


def data_starved_by(scaling, cluster_cpus: float) -> str | None:
    """Why the data stream may never get a batch: Ray Data's read tasks need CPUs besides the
    workers', and a group that reserves every CPU of the cluster leaves them none (training then
    waits without a step). None when some CPU is left."""
    workers = scaling.max_workers
    taken = workers * scaling.cpus_per_worker
    if cluster_cpus and taken >= cluster_cpus:
        return (f"the {workers} worker(s) reserve {taken:g} of the cluster's {cluster_cpus:g} CPUs "
                f"(scaling.cpus_per_worker={scaling.cpus_per_worker:g}), which leaves none for Ray Data's "
                f"read tasks: training may wait for its first batch forever. Lower scaling.cpus_per_worker "
                f"(fractions such as 0.5 are fine).")
    return None


def describe(exc: BaseException) -> str:
    """The user-facing message of a training error: the workers' own exceptions, first line each."""
    from .trainer import worker_exceptions

    lines = []
    for e in worker_exceptions(exc):
        text = str(e).strip()
        first = next((l for l in text.splitlines() if l.strip()), "")
        line = f"{type(e).__name__}: {first}"
        if line not in lines:
            lines.append(line)
    return "; ".join(lines)


class RunLock:
    """One driver per run: an exclusive ``flock`` on ``<run>/.lock`` (released when the process dies)."""

    def __init__(self, root: Path):
        self.path = root / LOCK
        self.fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise ConfigError(f"name: run {self.path.parent} is in use by another rayfp4 driver ({owner}); "
                              f"wait for it or choose another name (--set name=...)") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the lock


def run_experiment(cfg: RunConfig, out_dir: Path | None = None, data: PreparedData | None = None) -> ExperimentResult:
    if out_dir is None or data is None:
        out_dir, data = preflight(cfg, create=True)
    variants = cfg.variant_configs()
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": tracking_uri})})
    multi = len(variants) > 1
    root = _inside(out_dir, out_dir / cfg.name)
    run_dirs = {label: _inside(out_dir, root / (label or "train")) for label, _ in variants}
    with RunLock(root):
        # Each variant's directory either is new or holds a run with the same settings: checked for
        # all of them before anything is written or Ray starts.
        resume = {label: _check_resume(vcfg, run_dirs[label], vcfg.fingerprint(data.identity))
                  for label, vcfg in variants}
        tracker = Tracker(tracking_uri, cfg.tracking.experiment, enabled=cfg.tracking.enabled)
        orphans = tracker.mark_orphans()
        if orphans:
            say(f"MLflow: marked {len(orphans)} run(s) KILLED whose driver had died: {', '.join(orphans)}")
        ensure_ray(cfg)
        return _run_variants(cfg, variants, root, run_dirs, resume, data, tracker, multi)


def _run_variants(cfg, variants, root, run_dirs, resume, data, tracker, multi) -> ExperimentResult:
    parent_id = None
    if not multi:
        # A run of a study (rayfp4.study) nests under the study's MLflow run, which the study ends.
        parent_id = os.environ.get("RAYFP4_MLFLOW_PARENT_RUN_ID") or None
    if multi:
        id_file = root / "mlflow_parent_run_id"
        if id_file.exists() and cfg.resume != "never":
            parent_id = id_file.read_text().strip()
            tracker.reopen_run(parent_id)
            tracker.set_tags(parent_id, reporting.run_tags(cfg, variants=variants))
        else:
            parent_id = tracker.start_run(reporting.run_title(cfg), tags={"rayfp4.run_dir": str(root),
                                                                         **reporting.run_tags(cfg, variants=variants)})
            if parent_id:
                write_atomic(id_file, parent_id)
                tracker.log_params(parent_id, {"variants": ",".join(n for n, _ in variants),
                                               "baseline": cfg.baseline or variants[0][0]})
                reporting.log_dataset(tracker, parent_id, data.path)  # every variant reads the same
    results = []
    try:
        for label, vcfg in variants:
            vcfg = vcfg.model_copy(update={"tracking": cfg.tracking, "name": cfg.name,
                                           "baseline": (cfg.baseline or variants[0][0]) if multi else None})
            vcfg._source = cfg.source
            results.append(train_variant(vcfg, label, run_dirs[label], data, tracker, parent_id, resume[label]))
    except BaseException as e:
        from .trainer import Interrupted

        if multi:
            tracker.end_run(parent_id, "KILLED" if isinstance(e, (Interrupted, KeyboardInterrupt)) else "FAILED")
        raise
    baseline = cfg.baseline or variants[0][0]
    table = comparison_table(results, baseline if multi else None)
    if multi:
        try:
            # The comparison: as a table and a description on the parent, each variant's own
            # final/best loss and gap to the baseline on its run (see rayfp4.train.reporting).
            reporting.log_comparison(tracker, parent_id, results, baseline, run_dirs, cfg, root)
            png = plot_loss_curves(results, root / "loss_curves.png", title=f"{cfg.name}: variants")
            if png is not None:
                tracker.log_artifact(parent_id, png)
        except Exception as e:
            say(f"could not write the comparison files: {type(e).__name__}: {e}")
        tracker.end_run(parent_id, "FINISHED" if all(r.status == "FINISHED" for r in results) else "FAILED")
    return ExperimentResult(cfg.name, results, table, parent_id)
