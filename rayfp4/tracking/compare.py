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
    return _render(_comparison_rows(results, baseline))


def _comparison_rows(results: list[VariantResult], baseline: str | None) -> list[tuple[str, ...]]:
    base = next((r for r in results if r.name == baseline), None)
    rows = [("variant", "status", "steps", "final val loss", "best val loss", f"gap vs {baseline}")]
    if baseline is None:
        rows = [("run", *rows[0][1:-1])]
        for r in results:
            rows.append((r.name, r.status, str(r.steps), _fmt(r.final_val_loss), _fmt(r.best_val_loss)))
        return rows
    for r in results:
        gap = "-"
        if r.name == baseline:
            gap = "(baseline)"
        elif base and base.final_val_loss and r.final_val_loss is not None:
            gap = f"{100 * (r.final_val_loss - base.final_val_loss) / base.final_val_loss:+.2f}%"
        rows.append((r.name, r.status, str(r.steps), _fmt(r.final_val_loss), _fmt(r.best_val_loss), gap))
    return rows


@dataclass
class EvalResult:
    """One variant's checkpoint scored on one data set in one precision (``python -m rayfp4.eval``)."""

    variant: str
    step: int
    dataset: str
    precision: str        # "bf16" or "trained": what gaps compare across variants
    label: str            # how the table shows the precision, e.g. "trained (nvfp4)"
    loss: float           # mean cross-entropy per predicted token, nats
    tokens: int           # predicted tokens
    bytes: int            # UTF-8 bytes of the text those tokens spell

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    @property
    def bits_per_byte(self) -> float | None:
        return self.loss * self.tokens / math.log(2) / self.bytes if self.bytes else None


def eval_table(results: list[EvalResult], baseline: str | None) -> str:
    """Loss, perplexity and bits per byte per data set, variant and precision; with a baseline,
    each loss's relative gap to the baseline's on the same data in the same precision."""
    base = {(r.dataset, r.precision): r for r in results if r.variant == baseline}
    head = ("dataset", "variant", "step", "precision", "tokens", "loss", "perplexity", "bits/byte")
    rows = [head + ((f"gap vs {baseline}",) if baseline else ())]
    for r in results:
        row = (r.dataset, r.variant, str(r.step), r.label, f"{r.tokens:,}", _fmt(r.loss),
               f"{r.perplexity:.2f}", _fmt(r.bits_per_byte))
        if baseline:
            b = base.get((r.dataset, r.precision))
            gap = "-"
            if r.variant == baseline:
                gap = "(baseline)"
            elif b is not None and b.loss:
                gap = f"{100 * (r.loss - b.loss) / b.loss:+.2f}%"
            row += (gap,)
        rows.append(row)
    return _render(rows)


def _render(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def gap_pct(result: VariantResult, base: VariantResult | None) -> float | None:
    """Relative gap of ``result``'s final validation loss to ``base``'s, in percent (0 for the baseline)."""
    if base is None or not base.final_val_loss or result.final_val_loss is None:
        return None
    return 100 * (result.final_val_loss - base.final_val_loss) / base.final_val_loss


def comparison_columns(results: list[VariantResult], baseline: str | None) -> dict[str, list]:
    """The comparison as columns (for ``mlflow.log_table``): numbers stay numbers, missing ones None."""
    base = next((r for r in results if r.name == baseline), None)
    cols: dict[str, list] = {"variant": [], "status": [], "steps": [], "final_val_loss": [], "best_val_loss": []}
    if baseline is not None:
        cols[f"gap_vs_{baseline}_pct"] = []
    for r in results:
        cols["variant"].append(r.name)
        cols["status"].append(r.status)
        cols["steps"].append(r.steps)
        cols["final_val_loss"].append(r.final_val_loss)
        cols["best_val_loss"].append(r.best_val_loss)
        if baseline is not None:
            cols[f"gap_vs_{baseline}_pct"].append(gap_pct(r, base))
    return cols


def comparison_markdown(results: list[VariantResult], baseline: str | None) -> str:
    """The comparison as a Markdown pipe table (what MLflow's UI renders as a table; the terminal's
    fixed-width text would collapse into one paragraph there)."""
    rows = _comparison_rows(results, baseline)
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] * len(rows[0])) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(out)


def comparison_summary(results: list[VariantResult], baseline: str | None) -> str:
    """One Markdown line per variant: its final validation loss and its gap to the baseline."""
    base = next((r for r in results if r.name == baseline), None)
    lines = []
    for r in results:
        if r.final_val_loss is None:
            lines.append(f"- **{r.name}**: {r.status}, no validation loss")
            continue
        text = f"- **{r.name}**: final val loss {r.final_val_loss:.4f} after {r.steps} steps"
        gap = gap_pct(r, base)
        if r is base:
            text += " (the baseline)"
        elif gap is not None:
            text += f", **{gap:+.2f}%** vs {baseline} ({base.final_val_loss:.4f})"
        if r.status != "FINISHED":
            text += f" ({r.status})"
        lines.append(text)
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
    return save_png(fig, Path(path))


def save_png(fig, path: Path) -> Path:
    """Write a matplotlib figure as a PNG whole or not at all (a full disk raises here, and the old
    plot stays), then close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
