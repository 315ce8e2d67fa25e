"""Comparing variants: metrics files, the loss-gap table and overlaid loss curves."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class VariantResult:
    name: str
    status: str                       # FINISHED or FAILED
    steps: int = 0
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None


def read_metrics(path: Path) -> dict[int, dict]:
    """``metrics.jsonl`` of a run: one record per step; a replayed step (after a restart from a
    checkpoint) replaces the record the failed attempt wrote."""
    out: dict[int, dict] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        out[int(rec["step"])] = rec
    return dict(sorted(out.items()))


def result_from_metrics(name: str, status: str, path: Path, error: str | None = None) -> VariantResult:
    recs = read_metrics(path)
    train = [(s, r["train_loss"]) for s, r in recs.items() if r.get("train_loss") is not None]
    val = [(s, r["val_loss"]) for s, r in recs.items() if r.get("val_loss") is not None]
    finite_val = [v for _, v in val if math.isfinite(v)]
    return VariantResult(
        name=name, status=status, steps=max(recs, default=0), train_curve=train, val_curve=val,
        final_val_loss=val[-1][1] if val else None, best_val_loss=min(finite_val) if finite_val else None,
        error=error)


def _fmt(v: float | None) -> str:
    return f"{v:.4f}" if v is not None else "-"


def comparison_table(results: list[VariantResult], baseline: str | None) -> str:
    """Final and best validation loss per variant, with the relative gap to the baseline (if any)."""
    base = next((r for r in results if r.name == baseline), None)
    rows = [("variant", "status", "steps", "final val loss", "best val loss", f"gap vs {baseline}")]
    if baseline is None:
        rows = [("run", *rows[0][1:-1])]
        for r in results:
            rows.append((r.name, r.status, str(r.steps), _fmt(r.final_val_loss), _fmt(r.best_val_loss)))
        return _render(rows)
    for r in results:
        gap = "-"
        if r.name == baseline:
            gap = "(baseline)"
        elif base and base.final_val_loss and r.final_val_loss is not None:
            gap = f"{100 * (r.final_val_loss - base.final_val_loss) / base.final_val_loss:+.2f}%"
        rows.append((r.name, r.status, str(r.steps), _fmt(r.final_val_loss), _fmt(r.best_val_loss), gap))
    return _render(rows)


def _render(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_loss_curves(results: list[VariantResult], path: Path, title: str = "") -> Path | None:
    """Train (thin) and validation (markers) loss of each variant on one plot; PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(results):
        color = f"C{i}"
        if r.train_curve:
            s, v = zip(*r.train_curve)
            ax.plot(s, v, color=color, alpha=0.5, linewidth=1, label=f"{r.name} train")
        if r.val_curve:
            s, v = zip(*r.val_curve)
            ax.plot(s, v, "o-", color=color, linewidth=2, label=f"{r.name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:  # written whole or not at all (a full disk raises here, and the old plot stays)
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
