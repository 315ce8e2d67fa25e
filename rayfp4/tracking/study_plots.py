"""The plots of a study (``python -m rayfp4.study``): validation loss, training loss and the final
gap to the baseline, each variant's seeds pooled.

Input is each variant's per-seed curves as read from the runs' ``metrics.jsonl``; output is three
PNGs (matplotlib's Agg backend: no display needed). Differences between methods are often a
fraction of a percent, invisible on a full loss curve that starts near ln(vocab), so the loss
plots have a second panel: the last half of the steps with its own y scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .compare import save_png

#: The study's plot files, in the order study.md shows them.
PLOT_FILES = ("val_loss.png", "gap.png", "train_loss.png")


@dataclass
class VariantCurves:
    """One variant of a study: its finished seeds' curves (seed -> [(step, value)]) and gaps."""

    name: str
    color: str
    val: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    train: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    gaps_pct: list[float] = field(default_factory=list)   # vs the same seed's baseline


def pooled(curves: dict[int, list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) over seeds at the steps every seed logged a finite value: the seeds
    of one variant log at the same steps, and a step that one of them lacks would make the mean
    jump as seeds come and go."""
    per_seed = [{s: v for s, v in c if v is not None and math.isfinite(v)} for c in curves.values()]
    per_seed = [d for d in per_seed if d]
    if not per_seed:
        return [], [], [], []
    steps = sorted(set.intersection(*(set(d) for d in per_seed)))
    vals = [[d[s] for d in per_seed] for s in steps]
    return steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def smooth(values: list[float], window: int) -> list[float]:
    """Centered moving average over ``window`` points (narrower at the ends, so no lag and no
    padding)."""
    if window <= 1:
        return list(values)
    half = window // 2
    out = []
    for i in range(len(values)):
        part = values[max(0, i - half): i + half + 1]
        out.append(sum(part) / len(part))
    return out


def smoothing_window(n_points: int) -> int:
    """Points per moving average of the training loss: about 1/20 of the logged points, odd."""
    w = max(1, n_points // 20)
    return w if w % 2 else w + 1


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _step_label(tokens_per_step: int | None) -> str:
    return f"training step ({tokens_per_step:,} tokens each)" if tokens_per_step else "training step"


def _late_ylim(series: list[tuple[list[int], list[float], list[float]]], x0: float) -> tuple[float, float] | None:
    """y range of the lows and highs of every series at steps >= x0, with a 10% margin."""
    lo = [v for steps, low, _ in series for s, v in zip(steps, low) if s >= x0]
    hi = [v for steps, _, high in series for s, v in zip(steps, high) if s >= x0]
    if not lo:
        return None
    a, b = min(lo), max(hi)
    pad = (b - a) * 0.1 or abs(b) * 0.01 or 0.01
    return a - pad, b + pad


def _loss_figure(variants: list[VariantCurves], what: str, title: str, ylabel: str, tokens_per_step: int | None,
                 band: bool, window: int = 1):
    """Full curves on the left, the last half of the steps zoomed on the right (when that half
    holds at least two logged points and the first half some); None when no variant has a curve."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    series = []  # (variant, steps, mean, low, high)
    for v in variants:
        steps, mean, low, high = pooled(getattr(v, what))
        if steps:
            if window > 1:
                mean, low, high = smooth(mean, window), smooth(low, window), smooth(high, window)
            series.append((v, steps, mean, low, high))
    if not series:
        return None
    last = max(s[1][-1] for s in series)
    x0 = last / 2
    # A zoom that drops no point would only repeat the full panel.
    zoom = (any(sum(x >= x0 for x in steps) >= 2 for _, steps, _, _, _ in series)
            and any(x < x0 for _, steps, _, _, _ in series for x in steps))
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(13 if zoom else 8, 5), squeeze=False)
    axes = axes[0]
    for ax in axes:
        for v, steps, mean, low, high in series:
            n = len(getattr(v, what))
            marker = "o" if len(steps) <= 40 else None
            ax.plot(steps, mean, color=v.color, marker=marker, markersize=3.5, linewidth=1.8,
                    label=f"{v.name} ({n} seed{'s' if n != 1 else ''})")
            if band and n > 1:
                ax.fill_between(steps, low, high, color=v.color, alpha=0.18, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(_step_label(tokens_per_step))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_title("all steps")
    axes[0].legend(loc="upper right", fontsize=9)
    if zoom:
        axes[1].set_xlim(x0 - (last - x0) * 0.03, last + (last - x0) * 0.03)
        ylim = _late_ylim([(steps, low if band else mean, high if band else mean)
                           for _, steps, mean, low, high in series], x0)
        if ylim:
            axes[1].set_ylim(*ylim)
        axes[1].set_title(f"last 50% of steps ({x0:,.0f}-{last:,.0f}), zoomed")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return fig


def plot_val_loss(variants: list[VariantCurves], path: Path, study: str, tokens_per_step: int | None) -> Path | None:
    fig = _loss_figure(variants, "val", f"Study {study}: validation loss, mean over seeds (band: min to max)",
                       "validation loss (nats/token)", tokens_per_step, band=True)
    return save_png(fig, path) if fig is not None else None


def plot_train_loss(variants: list[VariantCurves], path: Path, study: str, tokens_per_step: int | None) -> Path | None:
    points = max((len(c) for v in variants for c in v.train.values()), default=0)
    window = smoothing_window(points)
    how = f"moving average over {window} logged steps" if window > 1 else "as logged"
    fig = _loss_figure(variants, "train", f"Study {study}: training loss, mean over seeds ({how})",
                       "training loss (nats/token)", tokens_per_step, band=False, window=window)
    return save_png(fig, path) if fig is not None else None


def plot_gap(variants: list[VariantCurves], baseline: str, path: Path, study: str) -> Path | None:
    """Horizontal bars (long variant names stay readable), best at the top, with the std over
    seeds as error bars and each seed as a dot; None when no variant has a gap."""
    plt = _pyplot()
    rows = [v for v in variants if v.name != baseline and v.gaps_pct]
    if not rows:
        return None
    mean = {v.name: sum(v.gaps_pct) / len(v.gaps_pct) for v in rows}
    rows.sort(key=lambda v: mean[v.name], reverse=True)  # barh draws bottom-up: best ends on top
    std = [_std(v.gaps_pct) for v in rows]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(rows)))
    y = list(range(len(rows)))
    ax.barh(y, [mean[v.name] for v in rows], xerr=[s or 0.0 for s in std], color=[v.color for v in rows],
            alpha=0.75, height=0.6, capsize=4, error_kw={"linewidth": 1.2})
    for i, v in enumerate(rows):
        ax.scatter(v.gaps_pct, [i] * len(v.gaps_pct), color="black", s=12, zorder=3)
    ax.axvline(0, color="black", linewidth=1)
    ax.set_yticks(y, [v.name for v in rows])
    ax.set_xlabel(f"final validation loss gap vs {baseline} (%, each seed vs the same seed's {baseline})")
    lo = min(min(v.gaps_pct) for v in rows)
    hi = max(max(v.gaps_pct) for v in rows)
    lo = min(lo, min(mean[v.name] - (s or 0) for v, s in zip(rows, std)), 0.0)
    hi = max(hi, max(mean[v.name] + (s or 0) for v, s in zip(rows, std)), 0.0)
    span = (hi - lo) or 1.0
    ax.set_xlim(lo - 0.35 * span, hi + 0.35 * span)  # room for the labels on either side
    for i, (v, s) in enumerate(zip(rows, std)):
        m = mean[v.name]
        text = f"{m:+.2f}" + (f" ± {s:.2f}" if s is not None else "") + f" % (n={len(v.gaps_pct)})"
        edge = max(m + (s or 0), max(v.gaps_pct)) if m >= 0 else min(m - (s or 0), min(v.gaps_pct))
        ax.annotate(text, (edge, i), xytext=(6 if m >= 0 else -6, 0), textcoords="offset points",
                    ha="left" if m >= 0 else "right", va="center", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Study {study}: final validation loss vs {baseline}\n"
                 f"bar: mean over seeds, error bar: std, dots: each seed; lower is better", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def _std(xs: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def plot_study(variants: list[VariantCurves], baseline: str, out_dir: Path, study: str,
               tokens_per_step: int | None = None) -> list[Path]:
    """Write the three plots into ``out_dir``; a plot without data is not written, and an old one
    of that name is removed (it would show runs the study no longer has)."""
    made = []
    for name, fn in zip(PLOT_FILES, (
            lambda p: plot_val_loss(variants, p, study, tokens_per_step),
            lambda p: plot_gap(variants, baseline, p, study),
            lambda p: plot_train_loss(variants, p, study, tokens_per_step))):
        path = Path(out_dir) / name
        if fn(path) is not None:
            made.append(path)
        else:
            path.unlink(missing_ok=True)
    return made
