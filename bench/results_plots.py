"""A recipe-lab study over all its seeds, from the per-run validation curves kept in the repo.

    python -m bench.results_plots [--study configs/study/recipe-25m.yaml]
                                  [--csv docs/results/recipe-25m-val.csv] [--out docs/results]
    python -m bench.results_plots --study configs/study/recipe-long.yaml \\
                                  --csv docs/results/recipe-long-val.csv --level 0.8

The studies' runs were trained in sessions on machines that did not keep them (RESULTS.md), so
``rayfp4.study --report`` cannot rebuild their tables from run directories; the CSV holds what
RESULTS.md needs from each run: its validation loss at each validation step and its tokens/s (the
``tokens_per_s...`` column). A run stopped early leaves its last cells empty: it is listed as
KILLED, not counted in the means, and its curve and gaps go as far as it got. A run whose curve was
lost with its machine but whose final validation loss was read before (the session's log) has only
its last cell: it counts in the tables of final losses and is left out of the curves, the gaps at
each step and the transitions. This prints the
study's own tables (``rayfp4.study``: per variant, final validation loss and gap to the baseline of
the same seed, mean and standard deviation over seeds; per run), each variant's gap of the means,
every run's gap to the baseline of its seed at each validation step, and each run's *transition
step*, where its validation loss first falls below ``--level``, with how strongly that step
predicts the final loss; and writes three figures named after the study: ``NAME-curves.png``
(every run's validation curve), ``NAME-transition.png`` (final loss against transition step) and
``NAME-gap.png`` (gap to the baseline at each validation step).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
from pathlib import Path

VAL_PREFIX = "val_loss_step"


def load(path: str | Path) -> tuple[list[int], dict[tuple[str, int], dict]]:
    """(steps, {(variant, seed): {"val": [losses], "tokens_per_s": float, "finished": bool,
    "curve": bool}}) in the file's order. A run stopped early has empty cells after its last
    validation: its ``val`` is shorter than ``steps``. A row with only the last cell is a finished
    run without its curve (``curve`` False, ``val`` its final loss alone)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        steps = [int(c[len(VAL_PREFIX):]) for c in fields if c.startswith(VAL_PREFIX)]
        if not steps:
            raise SystemExit(f"error: {path}: no {VAL_PREFIX}N columns")
        speed = next((c for c in fields if c.startswith("tokens_per_s")), None)
        if speed is None:
            raise SystemExit(f"error: {path}: no tokens_per_s column")
        runs = {}
        for i, row in enumerate(reader, start=2):
            try:
                cells = [row[f"{VAL_PREFIX}{s}"].strip() for s in steps]
                n = len(cells) - len(list(itertools.takewhile(lambda c: not c, reversed(cells))))
                final_only = len(cells) > 1 and n == len(cells) and not any(cells[:-1])
                if not final_only and (not n or not all(cells[:n])):
                    raise ValueError("validation losses must be a run's first steps, without gaps, "
                                     "or its final step alone")
                runs[(row["variant"], int(row["seed"]))] = {
                    "val": [float(c) for c in (cells[-1:] if final_only else cells[:n])],
                    "tokens_per_s": float(row[speed]), "finished": n == len(steps), "curve": not final_only}
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise SystemExit(f"error: {path}, line {i}: {e}") from None
    return steps, runs


def crossing(steps: list[int], losses: list[float], level: float) -> float | None:
    """The step where the loss first falls below ``level``, linearly interpolated between points."""
    for i in range(1, len(losses)):
        if losses[i] <= level < losses[i - 1]:
            return steps[i - 1] + (steps[i] - steps[i - 1]) * (losses[i - 1] - level) / (losses[i - 1] - losses[i])
    return None


def gap_curve(runs, baseline: str, variant: str, seed: int) -> list[float] | None:
    """The run's gap to the baseline of its seed at each validation step both reached, in percent."""
    base, run = runs.get((baseline, seed)), runs.get((variant, seed))
    if base is None or run is None or not (base["curve"] and run["curve"]):
        return None
    return [100 * (a / b - 1) for a, b in zip(runs[(variant, seed)]["val"], base["val"])]


def tables(study_path: str | Path, steps, runs, level: float) -> str:
    from rayfp4.study import expand, load_study, seed_table, study_table, summarize

    study, _ = load_study(study_path)
    matrix = expand(study)
    for r in matrix:
        if (r.variant, r.seed) in runs:
            r.status = "FINISHED" if runs[(r.variant, r.seed)]["finished"] else "KILLED"
    unknown = sorted({v for v, _ in runs} - {r.variant for r in matrix})
    if unknown:
        raise SystemExit(f"error: variants not in {study_path}: {', '.join(unknown)}")
    results = {r.name: (runs[(r.variant, r.seed)]["val"][-1], runs[(r.variant, r.seed)]["tokens_per_s"])
                for r in matrix if r.status == "FINISHED"}
    stopped = {r.name: runs[(r.variant, r.seed)] for r in matrix if r.status == "KILLED"}
    summaries = summarize(study, matrix, results)
    out = [study_table(study, summaries)[0], "", seed_table(study, matrix, results)[0], ""]
    base = next(s for s in summaries if s.name == study.baseline_name)
    if base.final_val:
        b = statistics.fmean(base.final_val)
        out.append(f"gap of the means (each variant's mean final loss against {base.name}'s): " + ", ".join(
            f"{s.name} {100 * (statistics.fmean(s.final_val) / b - 1):+.2f}%"
            for s in summaries if s.final_val and s is not base))
    for name, r in stopped.items():
        out.append(f"{name}: stopped before the end; last validation at step {steps[len(r['val']) - 1]}: "
                   f"{r['val'][-1]:.4f}")
    out += ["", f"gap to {study.baseline_name} of the same seed at each validation step, %:", "",
            "| variant | seed | " + " | ".join(str(s) for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for (v, seed), r in runs.items():
        gaps = gap_curve(runs, study.baseline_name, v, seed)
        if v != study.baseline_name and gaps is not None:
            out.append(f"| {v} | {seed} | " + " | ".join(f"{g:+.2f}" for g in gaps)
                       + " |" + " - |" * (len(steps) - len(gaps)))
    out += ["", f"| variant | seed | transition step (val loss < {level}) | final val loss |", "|---|---|---|---|"]
    xs, ys = [], []
    for (v, seed), r in runs.items():
        x = crossing(steps, r["val"], level) if r["curve"] else None
        last = f"{r['val'][-1]:.4f}" + ("" if r["finished"] else f" (step {steps[len(r['val']) - 1]}, stopped)")
        out.append(f"| {v} | {seed} | {'-' if x is None else f'{x:.0f}'} | {last}"
                   + ("" if r["curve"] else " (curve not kept)") + " |")
        if x is not None and r["finished"]:
            xs.append(x)
            ys.append(r["val"][-1])
    if len(xs) >= 6:  # fewer runs say nothing about a correlation
        out += ["", f"correlation of the transition step with the final validation loss: "
                    f"{statistics.correlation(xs, ys):.2f} over {len(xs)} runs"]
    return "\n".join(out)


def plots(steps, runs, level: float, out: Path, name: str, baseline: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(v for v, _ in runs))
    colors = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for (v, s), r in runs.items():
        if not r["curve"]:
            continue
        for ax in axes:
            ax.plot(steps[:len(r["val"])], r["val"], styles[s % len(styles)], color=colors[v], marker=".",
                    label=f"{v} s{s}" if ax is axes[0] else None)
    axes[0].axhline(level, color="grey", lw=0.8)
    axes[0].set_title("every run's validation loss (line style: seed)")
    axes[1].set_xlim(steps[len(steps) // 2 - 1] - 20, steps[-1] + 20)
    tail = [x for r in runs.values() if r["curve"] for x in r["val"][len(steps) // 2 - 1:]] or [0.0]
    axes[1].set_ylim(min(tail) - 0.01, max(tail) + 0.01)
    axes[1].set_title("second half, zoomed")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    curves = out / f"{name}-curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    for (v, s), r in runs.items():
        x = crossing(steps, r["val"], level) if r["curve"] else None
        if x is not None and r["finished"]:
            ax.scatter(x, r["val"][-1], color=colors[v], marker="os^D"[s % 4],
                       label=v if s == min(t for w, t in runs if w == v) else None)
    ax.set_xlabel(f"transition step: validation loss first below {level}")
    ax.set_ylabel(f"final validation loss (step {steps[-1]})")
    ax.set_title("final loss against the step of the transition (marker: seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    scatter = out / f"{name}-transition.png"
    fig.savefig(scatter, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 5))
    for (v, s), r in runs.items():
        gaps = gap_curve(runs, baseline, v, s)
        if v != baseline and gaps is not None:
            ax.plot(steps[:len(gaps)], gaps, styles[s % len(styles)], color=colors[v], marker=".", label=f"{v} s{s}")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"validation loss gap to {baseline} of the same seed (%)")
    ax.set_title("gap to the baseline at each validation step (line style: seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    gap = out / f"{name}-gap.png"
    fig.savefig(gap, dpi=110)
    plt.close(fig)
    return [curves, scatter, gap]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="configs/study/recipe-25m.yaml", help="the study the runs belong to")
    p.add_argument("--csv", default="docs/results/recipe-25m-val.csv")
    p.add_argument("--out", default="docs/results", help="where the figures go")
    p.add_argument("--level", type=float, default=1.2, help="the validation loss that marks the transition")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    from rayfp4.study import load_study

    steps, runs = load(a.csv)
    print(tables(a.study, steps, runs, a.level))
    if not a.no_plots:
        study, _ = load_study(a.study)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        for f in plots(steps, runs, a.level, Path(a.out), study.name, study.baseline_name):
            print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
