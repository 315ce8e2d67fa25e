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


def test_gaps_are_to_the_baseline_of_the_same_seed_and_the_transition_is_interpolated(tmp_path, capsys):
    f = _csv(tmp_path / "v.csv", [("bf16", 0, "x", 100, 2.0, 1.0, 0.80), ("bf16", 1, "x", 100, 2.0, 1.4, 0.90),
                                   ("fp4", 0, "x", 50, 2.0, 1.1, 0.84), ("fp4", 1, "x", 70, 2.0, 1.3, 0.90)])
    assert results_plots.main(["--csv", str(f), "--out", str(tmp_path), "--level", "1.2"]) == 0
    out = capsys.readouterr().out
    gaps = [100 * (0.84 / 0.80 - 1), 0.0]
    assert f"| fp4 | 2 | 0.8700 ± {statistics.stdev([0.84, 0.90]):.4f} | +5.00 / +0.00 | " \
           f"+{statistics.mean(gaps):.2f} ± {statistics.stdev(gaps):.2f} |" in out
    assert "| bf16 | 0 | 180 | 0.8000 |" in out      # 2.0 -> 1.0 between steps 100 and 200: 1.2 at 180
    assert "| bf16 | 1 | 240 | 0.9000 |" in out      # 1.4 -> 0.9 between 200 and 300: 1.2 at 240
    assert (tmp_path / "recipe-25m-curves.png").stat().st_size > 0
    assert (tmp_path / "recipe-25m-transition.png").stat().st_size > 0


def test_the_committed_study_reproduces_the_results_table(capsys):
    assert results_plots.main(["--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "| bf16 | 3 | 0.8588 ± 0.0219 | (baseline) |" in out
    assert "| nvfp4 | 3 | 0.8727 ± 0.0127 | +3.07 / +3.66 / -1.74 | +1.66 ± 2.96 |" in out
    assert "correlation of the transition step with the final validation loss: 0.93 over 23 runs" in out


def test_a_damaged_file_names_its_line(tmp_path):
    f = _csv(tmp_path / "v.csv", [("bf16", 0, "x", 100, 2.0, 1.0, 0.8), ("fp4", "zero", "x", 1, 2, 1, 1)])
    with pytest.raises(SystemExit, match="line 3"):
        results_plots.main(["--csv", str(f), "--no-plots"])
