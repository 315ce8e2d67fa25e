"""bench.results_plots: the recipe lab's tables and figures from the per-run validation curves."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from bench import results_plots

ROOT = Path(__file__).resolve().parents[1]


def _csv(path: Path, rows: list[tuple]) -> Path:
    lines = ["variant,seed,trained,tokens_per_s_3_at_once,val_loss_step100,val_loss_step200,val_loss_step300"]
    lines += [",".join(str(x) for x in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _study(path: Path) -> Path:
    path.write_text(f"name: t\nbase: {ROOT / 'configs' / 'tiny.yaml'}\nseeds: [0, 1]\nbaseline: bf16\n"
                    "variants:\n  - {name: bf16}\n  - {name: fp4}\n")
    return path


def test_gaps_are_to_the_baseline_of_the_same_seed_and_the_transition_is_interpolated(tmp_path, capsys):
    f = _csv(tmp_path / "v.csv", [("bf16", 0, "x", 100, 2.0, 1.0, 0.80), ("bf16", 1, "x", 100, 2.0, 1.4, 0.90),
                                   ("fp4", 0, "x", 50, 2.0, 1.1, 0.84), ("fp4", 1, "x", 70, 2.0, 1.3, 0.90)])
    study = _study(tmp_path / "s.yaml")
    assert results_plots.main(["--study", str(study), "--csv", str(f), "--out", str(tmp_path), "--level", "1.2"]) == 0
    out = capsys.readouterr().out
    gaps = [100 * (0.84 / 0.80 - 1), 0.0]
    assert f"| fp4 | 2 | 0.8700 ± {statistics.stdev([0.84, 0.90]):.4f} | " \
           f"+{statistics.mean(gaps):.2f} ± {statistics.stdev(gaps):.2f} | 60 | - |" in out
    assert "| fp4 | 0 | FINISHED | 0.8400 | +5.00 | 50 |" in out and "| fp4 | 1 | FINISHED | 0.9000 | +0.00 | 70 |" in out
    assert f"fp4 {100 * (0.87 / 0.85 - 1):+.2f}%" in out  # the gap of the means
    assert "| bf16 | 0 | 180 | 0.8000 |" in out      # 2.0 -> 1.0 between steps 100 and 200: 1.2 at 180
    assert "| bf16 | 1 | 240 | 0.9000 |" in out      # 1.4 -> 0.9 between 200 and 300: 1.2 at 240
    assert "| fp4 | 0 | +0.00 | +10.00 | +5.00 |" in out  # the gap at each validation step
    for fig in ("curves", "transition", "gap"):  # named after the study
        assert (tmp_path / f"t-{fig}.png").stat().st_size > 0


def test_a_run_stopped_early_is_listed_as_killed_with_its_partial_gaps(tmp_path, capsys):
    f = _csv(tmp_path / "v.csv", [("bf16", 0, "x", 100, 2.0, 1.0, 0.80), ("fp4", 0, "x", 50, 2.0, 1.1, "")])
    study = _study(tmp_path / "s.yaml")
    assert results_plots.main(["--study", str(study), "--csv", str(f), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| fp4 | 0 | KILLED | - |" in out           # not a final loss, not in the means
    assert "t-fp4-s0: stopped before the end; last validation at step 200: 1.1000" in out
    assert "| fp4 | 0 | +0.00 | +10.00 | - |" in out
    assert (tmp_path / "t-gap.png").stat().st_size > 0


def test_a_run_known_only_by_its_final_loss_counts_in_the_means_but_draws_no_curve(tmp_path, capsys):
    f = _csv(tmp_path / "v.csv", [("bf16", 0, "x", 100, 2.0, 1.0, 0.80), ("fp4", 0, "x", 50, 2.0, 1.1, 0.84),
                                   ("bf16", 1, "x", 100, "", "", 0.90), ("fp4", 1, "x", 70, "", "", 0.90)])
    study = _study(tmp_path / "s.yaml")
    assert results_plots.main(["--study", str(study), "--csv", str(f), "--out", str(tmp_path), "--level", "1.2"]) == 0
    out = capsys.readouterr().out
    assert f"| fp4 | 2 | 0.8700 ± {statistics.stdev([0.84, 0.90]):.4f} |" in out  # both seeds' finals
    assert "| fp4 | 1 | FINISHED | 0.9000 | +0.00 |" in out
    assert "| fp4 | 1 | - | 0.9000 (curve not kept) |" in out   # no transition without a curve
    assert "| fp4 | 0 | +0.00 | +10.00 | +5.00 |" in out and "| fp4 | 1 |  " not in out
    assert all(not line.startswith("| fp4 | 1 | +") for line in out.splitlines())  # no gaps per step
    assert (tmp_path / "t-curves.png").stat().st_size > 0


def test_a_gap_inside_a_curve_is_refused(tmp_path):
    f = _csv(tmp_path / "v.csv", [("bf16", 0, "x", 100, 2.0, "", 0.8)])
    with pytest.raises(SystemExit, match="line 2"):
        results_plots.main(["--study", str(_study(tmp_path / "s.yaml")), "--csv", str(f), "--no-plots"])


def test_the_committed_study_reproduces_the_results_table(capsys):
    assert results_plots.main(["--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "| bf16 | 3 | 0.8588 ± 0.0219 | (baseline) |" in out
    assert "| nvfp4 | 3 | 0.8727 ± 0.0127 | +1.66 ± 2.96 |" in out
    assert [f"| nvfp4 | {s} | FINISHED | {v} |" in out for s, v in ((0, "0.8873 | +3.07"), (1, "0.8666 | +3.66"),
                                                                    (2, "0.8642 | -1.74"))] == [True] * 3
    assert "| nvfp4-auto | 3 | 0.8745 ± 0.0246 | +1.92 ± 5.40 |" in out  # every variant has its three seeds
    assert "PENDING" not in out
    assert "correlation of the transition step with the final validation loss: 0.93 over 27 runs" in out


def test_the_committed_long_horizon_reproduces_its_table(capsys):
    study, csv = ROOT / "configs" / "study" / "recipe-long.yaml", ROOT / "docs" / "results" / "recipe-long-val.csv"
    assert results_plots.main(["--study", str(study), "--csv", str(csv), "--level", "0.8", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "| nvfp4 | 3 | 0.6214 ± 0.0040 | +3.60 ± 0.63 |" in out
    assert "| nvfp4-4over6-fwd | 3 | 0.6181 ± 0.0028 | +3.06 ± 0.25 |" in out
    assert "| nvfp4-4over6-fwd-msedens | 0 | KILLED | - |" in out  # seed 0 stopped at step 1,520


def test_a_run_not_trained_is_listed_as_pending(tmp_path, capsys):
    f = _csv(tmp_path / "v.csv", [("bf16", 0, "x", 100, 2.0, 1.0, 0.80), ("bf16", 1, "x", 100, 2.0, 1.4, 0.90),
                                   ("fp4", 0, "x", 50, 2.0, 1.1, 0.84)])
    assert results_plots.main(["--study", str(_study(tmp_path / "s.yaml")), "--csv", str(f), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "| fp4 | 1 | PENDING | - |" in out
    assert "| fp4 | 1 | 0.8400 | +5.00 | 50 | s1: PENDING |" in out  # the means over the seed it has


def test_a_damaged_file_names_its_line(tmp_path):
    f = _csv(tmp_path / "v.csv", [("bf16", 0, "x", 100, 2.0, 1.0, 0.8), ("fp4", "zero", "x", 1, 2, 1, 1)])
    with pytest.raises(SystemExit, match="line 3"):
        results_plots.main(["--study", str(_study(tmp_path / "s.yaml")), "--csv", str(f), "--no-plots"])


def test_a_variant_the_study_does_not_have_is_named(tmp_path):
    f = _csv(tmp_path / "v.csv", [("bf16", 0, "x", 100, 2.0, 1.0, 0.8), ("fp8", 0, "x", 1, 2, 1, 1)])
    with pytest.raises(SystemExit, match="fp8"):
        results_plots.main(["--study", str(_study(tmp_path / "s.yaml")), "--csv", str(f), "--no-plots"])
