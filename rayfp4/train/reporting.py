"""What the driver records in MLflow beside the metrics, so that a run reads well in MLflow's UI.

- run names that say what ran (``nvfp4 · tiny-20261201-120000 · 1.3M params · 120 steps``) and
  tags to filter on (format, activation dtype, config file, the code's git commit);
- the token shards as the run's input dataset (manifest, tokenizer, sequence and token counts);
- each run's final and best validation loss and its gap to the baseline as metrics of the run
  itself (sortable columns of the runs table), the comparison as a table on the parent, and a
  short summary as each run's description;
- the final checkpoint as the run's logged model: its ``state.json`` (step, size, SHA-256,
  fingerprint), the config and a pointer to the checkpoint folder, not the weights, which stay
  where Ray Train put them (a 110M-parameter checkpoint with its optimizer state is ~1.3 GB).

Everything goes through :class:`rayfp4.tracking.Tracker`, so none of it can stop a run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..config import RunConfig
from ..fileio import write_atomic
from ..tracking import Tracker
from ..tracking.compare import VariantResult, comparison_columns, comparison_markdown, comparison_summary, gap_pct
from .checkpoint import INFO_FILE, read_info, step_of
from .errors import CheckpointError

#: The file in a variant's folder holding its MLflow run id (written by launch._mlflow_run).
RUN_ID_FILE = "mlflow_run_id"


def model_size(n_params: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n_params >= div:
            return f"{n_params / div:.3g}{unit}"
    return str(n_params)


def run_title(cfg: RunConfig, label: str = "") -> str:
    """``[variant · ]name[ · config] · size · steps``; the config file's stem is left out when the
    name already starts with it (the default name is the stem and the start time)."""
    stem = Path(cfg.source).stem if cfg.source else None
    parts = [label] if label else []
    parts.append(cfg.name or "run")
    if stem and not (cfg.name or "").startswith(stem):
        parts.append(stem)
    parts += [f"{model_size(cfg.model.num_params())} params", f"{cfg.train.steps} steps"]
    return " · ".join(parts)


def git_commit() -> str | None:
    """The commit of the checkout rayfp4 is imported from; None when it is not a git checkout (an
    installed wheel) or git is missing. Read-only: ``git rev-parse``."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "--quiet", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


def run_tags(cfg: RunConfig, label: str = "", variants: list[tuple[str, RunConfig]] | None = None) -> dict[str, str]:
    """Tags of a variant's run (or, with ``variants``, of the parent run over them)."""
    tags = {"rayfp4.name": cfg.name or "", "mlflow.source.type": "LOCAL",
            "mlflow.source.name": f"python -m rayfp4.run {cfg.source or ''}".strip()}
    if cfg.source:
        tags["rayfp4.config"] = cfg.source
    if variants is not None:
        tags["rayfp4.variants"] = ",".join(n for n, _ in variants)
        tags["rayfp4.format"] = ",".join(dict.fromkeys(v.precision.format for _, v in variants))
    else:
        tags.update({"rayfp4.variant": label, "rayfp4.format": cfg.precision.format, "rayfp4.dtype": cfg.train.dtype})
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def log_dataset(tracker: Tracker, run_id: str | None, shards: Path) -> None:
    """The token shards as the run's training input: name, identity digest, manifest path, tokenizer
    and counts (the UI's "Datasets used" and its dataset panel)."""
    if run_id is None:
        return
    from ..data.shards import MANIFEST_FILE, ShardManifest

    try:
        m = ShardManifest.model_validate_json((shards / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return  # the driver validated the shards before training; nothing to describe otherwise
    tok = m.tokenizer
    profile = {"seq_len": m.seq_len, "tokenizer": f"{tok.kind}, vocab {tok.vocab_size} ({shards / tok.file})",
               "documents": m.num_documents, "total_tokens": m.total_tokens}
    for split in m.splits:
        profile[f"{split}_sequences"] = m.num_sequences(split)
        profile[f"{split}_tokens"] = sum(f.num_tokens for f in m.splits[split])
    tracker.log_dataset(run_id, shards.name, m.identity(), str(shards / MANIFEST_FILE), profile)


def log_final_checkpoint(tracker: Tracker, run_id: str | None, cfg: RunConfig, label: str, run_dir: Path,
                         scratch: Path) -> str | None:
    """The newest checkpoint in ``run_dir`` as the run's logged model (state.json, config.yaml and
    checkpoint.json, a pointer to the folder with its SHA-256); its model id, None if there is none."""
    if run_id is None:
        return None
    for ckpt in sorted((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=step_of, reverse=True):
        try:
            info = read_info(ckpt)
        except CheckpointError:
            continue
        if info:
            break
    else:
        return None
    created = not scratch.exists()  # the run's staging area, emptied and removed after training
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        return _log_model_files(tracker, run_id, cfg, label, run_dir, ckpt, info, scratch)
    finally:
        if created:
            shutil.rmtree(scratch, ignore_errors=True)


def _log_model_files(tracker: Tracker, run_id: str, cfg: RunConfig, label: str, run_dir: Path, ckpt: Path,
                     info: dict, scratch: Path) -> str | None:
    step = int(info.get("step") or step_of(ckpt))
    with tempfile.TemporaryDirectory(prefix="mlflow-model-", dir=scratch) as d:
        shutil.copyfile(ckpt / INFO_FILE, Path(d) / INFO_FILE)
        if (run_dir / "config.yaml").exists():
            shutil.copyfile(run_dir / "config.yaml", Path(d) / "config.yaml")
        pointer = {"checkpoint": str(ckpt.resolve()), "step": step, "state_sha256": info.get("sha256"),
                   "state_size_bytes": info.get("size_bytes"), "run_dir": str(run_dir.resolve()),
                   "mlflow_run_id": run_id,
                   "note": "the weights and optimizer state are in the checkpoint folder (state.pt, or shards/ "
                           "for sharded FSDP2 checkpoints); rayfp4.train.checkpoint.load_state(folder) loads "
                           "and verifies them"}
        (Path(d) / "checkpoint.json").write_text(json.dumps(pointer, indent=1) + "\n")
        name = f"{cfg.name}-{label}" if label else cfg.name
        params = {"step": str(step), "format": cfg.precision.format, "dtype": cfg.train.dtype,
                  "params": model_size(cfg.model.num_params())}
        return tracker.log_model(run_id, name, d, step, params, model_type="rayfp4-checkpoint")


def log_final_losses(tracker: Tracker, run_id: str | None, result: VariantResult) -> None:
    """Final and best validation loss as metrics of the run itself (sortable columns in the UI)."""
    tracker.log_metrics(run_id, {"val/final_loss": result.final_val_loss, "val/best_loss": result.best_val_loss},
                        step=max(result.steps, 0))


def read_run_id(run_dir: Path) -> str | None:
    try:
        return (run_dir / RUN_ID_FILE).read_text().strip() or None
    except OSError:
        return None


def log_comparison(tracker: Tracker, parent_id: str | None, results: list[VariantResult], baseline: str,
                   run_dirs: dict[str, Path], cfg: RunConfig, root: Path) -> None:
    """Each variant's gap to the baseline on its own run (``val/gap_vs_baseline_pct``, 0 for the
    baseline) with a one-paragraph description; on the parent, the comparison as a table
    (``comparison.json``, and the Markdown ``comparison.md``) and the summary as its description."""
    base = next((r for r in results if r.name == baseline), None)
    for r in results:
        run_id = read_run_id(run_dirs[r.name])
        gap = gap_pct(r, base)
        if gap is not None:
            tracker.log_metrics(run_id, {"val/gap_vs_baseline_pct": gap}, step=max(r.steps, 0))
        losses = (f"final validation loss {r.final_val_loss:.4f}, best {r.best_val_loss:.4f}"
                  if r.final_val_loss is not None and r.best_val_loss is not None else "no validation loss")
        versus = ("the baseline" if r is base else f"**{gap:+.2f}%** vs {baseline} ({base.final_val_loss:.4f})"
                  if gap is not None else f"no gap to {baseline}")
        tracker.set_note(run_id, f"Variant **{r.name}** of {cfg.name}, {r.status} after {r.steps} steps: "
                                 f"{losses}; {versus}.")
    markdown = comparison_markdown(results, baseline)
    write_atomic(root / "comparison.md", f"# {cfg.name}\n\n{markdown}\n")
    tracker.log_artifact(parent_id, root / "comparison.md")
    tracker.log_table(parent_id, comparison_columns(results, baseline), "comparison.json")
    tracker.set_note(parent_id, f"**{' vs '.join(r.name for r in results)}** ({run_title(cfg)}): final validation "
                                f"loss and its relative gap to **{baseline}**; each variant is a child run below.\n\n"
                                f"{comparison_summary(results, baseline)}\n\n{markdown}\n\n"
                                f"Loss curves: the artifact `loss_curves.png`; the table: `comparison.json`.")
