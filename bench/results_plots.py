"""The recipe lab's 25M study over all its seeds, from the per-run validation curves kept in the repo.

    python -m bench.results_plots [--csv docs/results/recipe-25m-val.csv] [--out docs/results]

The study's runs were trained in two sessions on machines that did not keep them (RESULTS.md), so
``rayfp4.study --report`` cannot rebuild the three-seed table from run directories; the CSV holds
what RESULTS.md needs from each run: its validation loss every 100 steps and its tokens/s. This
prints the tables of RESULTS.md (final validation loss and gap to BF16 of the same seed, mean and
standard deviation over seeds; each run's *transition step*, where its validation loss first falls
below ``--level``, and how strongly that step predicts the final loss) and writes two figures:
``recipe-25m-curves.png`` (every run's validation curve) and ``recipe-25m-transition.png`` (final
loss against transition step).
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

VAL_PREFIX = "val_loss_step"


def load(path: str | Path) -> tuple[list[int], dict[tuple[str, int], dict]]:
    """(steps, {(variant, seed): {"val": [losses], "tokens_per_s": float}}) in the file's order."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        steps = [int(c[len(VAL_PREFIX):]) for c in reader.fieldnames or [] if c.startswith(VAL_PREFIX)]
        if not steps:
            raise SystemExit(f"error: {path}: no {VAL_PREFIX}N columns")
        runs = {}
        for i, row in enumerate(reader, start=2):
            try:
                runs[(row["variant"], int(row["seed"]))] = {
                    "val": [float(row[f"{VAL_PREFIX}{s}"]) for s in steps],
                    "tokens_per_s": float(row["tokens_per_s_3_at_once"])}
            except (KeyError, TypeError, ValueError) as e:
                raise SystemExit(f"error: {path}, line {i}: {e}") from None
    return steps, runs


def crossing(steps: list[int], losses: list[float], level: float) -> float | None:
    """The step where the loss first falls below ``level``, linearly interpolated between points."""
    for i in range(1, len(losses)):
        if losses[i] <= level < losses[i - 1]:
            return steps[i - 1] + (steps[i] - steps[i - 1]) * (losses[i - 1] - level) / (losses[i - 1] - losses[i])
    return None


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def tables(steps, runs, baseline: str, level: float) -> str:
    variants = list(dict.fromkeys(v for v, _ in runs))
    base = {s: r["val"][-1] for (v, s), r in runs.items() if v == baseline}
    if not base:
        raise SystemExit(f"error: no run of the baseline variant {baseline!r}")
    base_mean = statistics.mean(base.values())
    out = [f"| variant | seeds | final val loss (mean ± std) | gap vs {baseline} of the same seed, % (per seed) "
           f"| gap, mean ± std | gap of the means | tokens/s (3 runs at once, mean) |", "|---|---|---|---|---|---|---|"]
    for v in variants:
        seeds = sorted(s for w, s in runs if w == v)
        finals = [runs[(v, s)]["val"][-1] for s in seeds]
        m, sd = _mean_std(finals)
        tps = statistics.mean(runs[(v, s)]["tokens_per_s"] for s in seeds)
        if v == baseline:
            out.append(f"| {v} | {len(seeds)} | {m:.4f} ± {sd:.4f} | (baseline) | | | {tps / 1e3:.0f}k |")
            continue
        gaps = [100 * (runs[(v, s)]["val"][-1] / base[s] - 1) for s in seeds if s in base]
        gm, gs = _mean_std(gaps) if gaps else (float("nan"), float("nan"))
        out.append(f"| {v} | {len(seeds)} | {m:.4f} ± {sd:.4f} | {' / '.join(f'{g:+.2f}' for g in gaps)} "
                   f"| {gm:+.2f} ± {gs:.2f} | {100 * (m / base_mean - 1):+.2f} | {tps / 1e3:.0f}k |")
    out += ["", f"| variant | seed | transition step (val loss < {level}) | final val loss |", "|---|---|---|---|"]
    xs, ys = [], []
    for (v, s), r in runs.items():
        x = crossing(steps, r["val"], level)
        out.append(f"| {v} | {s} | {'-' if x is None else f'{x:.0f}'} | {r['val'][-1]:.4f} |")
        if x is not None:
            xs.append(x)
            ys.append(r["val"][-1])
    if len(xs) > 2:
        out += ["", f"correlation of the transition step with the final validation loss: "
                    f"{statistics.correlation(xs, ys):.2f} over {len(xs)} runs"]
    return "\n".join(out)


def plots(steps, runs, level: float, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(v for v, _ in runs))
    colors = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for (v, s), r in runs.items():
        for ax in axes:
            ax.plot(steps, r["val"], styles[s % len(styles)], color=colors[v], marker=".",
                    label=f"{v} s{s}" if ax is axes[0] else None)
    axes[0].axhline(level, color="grey", lw=0.8)
    axes[0].set_title("every run's validation loss (line style: seed)")
    axes[1].set_xlim(steps[len(steps) // 2 - 1] - 20, steps[-1] + 20)
    tail = [x for r in runs.values() for x in r["val"][len(steps) // 2 - 1:]]
    axes[1].set_ylim(min(tail) - 0.01, max(tail) + 0.01)
    axes[1].set_title("second half, zoomed")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    curves = out / "recipe-25m-curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    for (v, s), r in runs.items():
        x = crossing(steps, r["val"], level)
        if x is not None:
            ax.scatter(x, r["val"][-1], color=colors[v], marker="os^D"[s % 4],
                       label=v if s == min(t for w, t in runs if w == v) else None)
    ax.set_xlabel(f"transition step: validation loss first below {level}")
    ax.set_ylabel(f"final validation loss (step {steps[-1]})")
    ax.set_title("final loss against the step of the transition (marker: seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    scatter = out / "recipe-25m-transition.png"
    fig.savefig(scatter, dpi=110)
    plt.close(fig)
    return [curves, scatter]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", default="docs/results/recipe-25m-val.csv")
    p.add_argument("--out", default="docs/results", help="where the figures go")
    p.add_argument("--baseline", default="bf16")
    p.add_argument("--level", type=float, default=1.2, help="the validation loss that marks the transition")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    steps, runs = load(a.csv)
    print(tables(steps, runs, a.baseline, a.level))
    if not a.no_plots:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        for f in plots(steps, runs, a.level, Path(a.out)):
            print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
