"""Driver side: one Ray ``TorchTrainer`` per variant, its MLflow run, and the comparison.

``run_experiment(cfg)`` is what ``python -m rayfp4.run`` calls after validating the config:
it prepares the data (tokenizing the embedded corpus on first use), makes sure Ray runs, then
trains each variant in turn as a child MLflow run under one parent, and finally prints and logs
the table of final/best validation loss with the gap to the baseline.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import ConfigError, RunConfig, flatten
from ..tracking import Tracker, comparison_table, plot_loss_curves, resolve_tracking_uri
from ..tracking.compare import VariantResult, result_from_metrics

log = logging.getLogger("rayfp4")
SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass
class ExperimentResult:
    name: str
    results: list[VariantResult]
    table: str
    parent_run_id: str | None


def say(msg: str) -> None:
    print(f"[rayfp4] {msg}", flush=True)


def prepare_shards(cfg: RunConfig) -> Path:
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
    return path


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


def _check_resume(cfg: RunConfig, run_dir: Path) -> bool:
    exists = (run_dir / SNAPSHOT).exists()
    if exists and cfg.resume == "never":
        raise ConfigError(f"resume: run {run_dir} already exists and resume is 'never'; choose a new name "
                          f"(--set name=...) or resume: auto")
    if not exists and cfg.resume == "must":
        raise ConfigError(f"resume: 'must' but {run_dir} holds no run to resume")
    return exists


def train_variant(cfg: RunConfig, label: str, run_dir: Path, shards: Path, tracker: Tracker,
                  parent_run_id: str | None) -> VariantResult:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .loop import train_loop_per_worker
    from .progress import ProgressBoard, ProgressPrinter

    resuming = _check_resume(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    id_file = run_dir / "mlflow_run_id"
    run_id = id_file.read_text().strip() if resuming and id_file.exists() else None
    if run_id is None:
        run_id = tracker.start_run(label or cfg.name, parent_run_id=parent_run_id,
                                   tags={"rayfp4.run_dir": str(run_dir), "rayfp4.variant": label})
        if run_id:
            id_file.write_text(run_id)
            tracker.log_params(run_id, flatten(cfg.model_dump(mode="json", exclude={"variants"})))
            tracker.log_artifact(run_id, run_dir / "config.yaml")
    else:
        tracker.set_tag(run_id, "rayfp4.resumed", "true")
    say(f"{'resuming' if resuming else 'starting'} {label or cfg.name}: {cfg.precision.format}, "
        f"{cfg.model.num_params() / 1e6:.1f}M params, {cfg.train.steps} steps, "
        f"{cfg.scaling.num_workers} worker(s) on {'GPU' if cfg.scaling.use_gpu else 'CPU'} -> {run_dir}")

    board = ProgressBoard.remote()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run_dir": str(run_dir),
                           "shards": str(shards), "mlflow_run_id": run_id, "board": board},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.scaling.use_gpu else {})}),
        run_config=RayRunConfig(name=run_dir.name, storage_path=str(run_dir.parent),
                                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
                                failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures)),
    )
    status, error = "FAILED", None
    try:
        with ProgressPrinter(board, label):
            result = trainer.fit()
        if result.error is not None:
            error = _describe(result.error)
        else:
            status = "FINISHED"
    except KeyboardInterrupt:
        status, error = "KILLED", "interrupted"
        raise
    except Exception as e:  # the trainer itself crashed: the run still ends, as FAILED
        error = _describe(e)
    finally:
        res = result_from_metrics(label or cfg.name, status, run_dir / "metrics.jsonl", error)
        png = plot_loss_curves([res], run_dir / "loss_curve.png", title=f"{cfg.name} {label}".strip())
        if png is not None:
            tracker.log_artifact(run_id, png)
        tracker.end_run(run_id, status)
        ray.kill(board)
    if error:
        say(f"{label or cfg.name} failed: {error}")
    return res


def _describe(exc: BaseException) -> str:
    """The innermost user-facing message of a (possibly wrapped) training error."""
    text = str(exc)
    for marker in ("NonFiniteTrainingError: ", "DataError: ", "PolicyError: ", "InjectedFailure: "):
        if marker in text:
            return marker[:-2] + ": " + text.split(marker)[-1].strip().splitlines()[0]
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def run_experiment(cfg: RunConfig) -> ExperimentResult:
    out_dir = Path(cfg.output_dir).expanduser().resolve()
    variants = cfg.variant_configs()
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": tracking_uri})})
    tracker = Tracker(tracking_uri, cfg.tracking.experiment, enabled=cfg.tracking.enabled)
    shards = prepare_shards(cfg)
    for _, v in variants[1:]:
        if v.data.shards != cfg.data.shards or v.data.corpus_tokenizer != cfg.data.corpus_tokenizer:
            raise ConfigError("variants: all variants must read the same data (data.shards / data.corpus_*)")
    ensure_ray(cfg)

    multi = len(variants) > 1
    root = out_dir / cfg.name
    parent_id = None
    if multi:
        id_file = root / "mlflow_parent_run_id"
        if id_file.exists() and cfg.resume != "never":
            parent_id = id_file.read_text().strip()
        else:
            parent_id = tracker.start_run(cfg.name, tags={"rayfp4.run_dir": str(root)})
            if parent_id:
                root.mkdir(parents=True, exist_ok=True)
                id_file.write_text(parent_id)
                tracker.log_params(parent_id, {"variants": ",".join(n for n, _ in variants),
                                               "baseline": cfg.baseline or variants[0][0]})
    results = []
    try:
        for label, vcfg in variants:
            vcfg = vcfg.model_copy(update={"tracking": cfg.tracking, "name": cfg.name})
            run_dir = root / (label or "train")
            results.append(train_variant(vcfg, label, run_dir, shards, tracker, parent_id))
    except BaseException:
        tracker.end_run(parent_id, "KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
        raise
    baseline = cfg.baseline or variants[0][0]
    table = comparison_table(results, baseline if multi else None)
    if multi:
        root.mkdir(parents=True, exist_ok=True)
        (root / "comparison.md").write_text(table + "\n")
        png = plot_loss_curves(results, root / "loss_curves.png", title=f"{cfg.name}: variants")
        tracker.log_artifact(parent_id, root / "comparison.md")
        if png is not None:
            tracker.log_artifact(parent_id, png)
        base = next((r for r in results if r.name == baseline), None)
        for r in results:
            metrics = {f"{r.name}.final_val_loss": r.final_val_loss, f"{r.name}.best_val_loss": r.best_val_loss}
            if base and base.final_val_loss and r.final_val_loss is not None and r is not base:
                metrics[f"{r.name}.gap_vs_{baseline}_pct"] = 100 * (r.final_val_loss - base.final_val_loss) / base.final_val_loss
            tracker.log_metrics(parent_id, metrics, step=max(r.steps, 0))
        tracker.end_run(parent_id, "FINISHED" if all(r.status == "FINISHED" for r in results) else "FAILED")
    return ExperimentResult(cfg.name, results, table, parent_id)


def format_exception_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()
