"""The recipe lab's 25M study over all its seeds, from the per-run validation curves kept in the repo.

    python -m bench.results_plots [--study configs/study/recipe-25m.yaml]
                                  [--csv docs/results/recipe-25m-val.csv] [--out docs/results]

The study's runs were trained in two sessions on machines that did not keep them (RESULTS.md), so
``rayfp4.study --report`` cannot rebuild the three-seed table from run directories; the CSV holds
what RESULTS.md needs from each run: its validation loss every 100 steps and its tokens/s. This
prints the study's own tables (``rayfp4.study``: per variant, final validation loss and gap to
the baseline of the same seed, mean and standard deviation over seeds; per run), each variant's
gap of the means, and each run's *transition step*, where its validation loss first falls below
``--level``, with how strongly that step predicts the final loss; and writes two figures:
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


def tables(study_path: str | Path, steps, runs, level: float) -> str:
    from rayfp4.study import expand, load_study, seed_table, study_table, summarize

    study, _ = load_study(study_path)
    matrix = expand(study)
    for r in matrix:
        if (r.variant, r.seed) in runs:
            r.status = "FINISHED"
    unknown = sorted({v for v, _ in runs} - {r.variant for r in matrix})
    if unknown:
        raise SystemExit(f"error: variants not in {study_path}: {', '.join(unknown)}")
    results = {r.name: (runs[(r.variant, r.seed)]["val"][-1], runs[(r.variant, r.seed)]["tokens_per_s"])
               for r in matrix if r.status == "FINISHED"}
    summaries = summarize(study, matrix, results)
    out = [study_table(study, summaries)[0], "", seed_table(study, matrix, results)[0], ""]
    base = next(s for s in summaries if s.name == study.baseline_name)
    if base.final_val:
        b = statistics.fmean(base.final_val)
        out.append(f"gap of the means (each variant's mean final loss against {base.name}'s): " + ", ".join(
            f"{s.name} {100 * (statistics.fmean(s.final_val) / b - 1):+.2f}%"
            for s in summaries if s.final_val and s is not base))
    out += ["", f"| variant | seed | transition step (val loss < {level}) | final val loss |", "|---|---|---|---|"]
    xs, ys = [], []
    for (v, seed), r in runs.items():
        x = crossing(steps, r["val"], level)
        out.append(f"| {v} | {seed} | {'-' if x is None else f'{x:.0f}'} | {r['val'][-1]:.4f} |")
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
    p.add_argument("--study", default="configs/study/recipe-25m.yaml", help="the study the runs belong to")
    p.add_argument("--csv", default="docs/results/recipe-25m-val.csv")
    p.add_argument("--out", default="docs/results", help="where the figures go")
    p.add_argument("--level", type=float, default=1.2, help="the validation loss that marks the transition")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    steps, runs = load(a.csv)
    print(tables(a.study, steps, runs, a.level))
    if not a.no_plots:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        for f in plots(steps, runs, a.level, Path(a.out)):
            print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
