"""bench.multigpu_check: the comparison of a run on N GPUs with the same run on one."""

from __future__ import annotations

import json

from bench import multigpu_check
from rayfp4.data.ledger import SampleLedger


def _run(folder, world: int, ids_per_step: dict[int, list[int]], losses: dict[int, float], val=None):
    folder.mkdir(parents=True)
    ledgers = [SampleLedger(folder / "ledger", r, world, 0) for r in range(world)]
    for step, ids in ids_per_step.items():
        share = len(ids) // world
        for r, led in enumerate(ledgers):  # rank r consumes its slice of the global batch
            led.record(step, 0, step, ids[r * share:(r + 1) * share])
    for led in ledgers:
        led.close()
    with open(folder / "metrics.jsonl", "w") as f:
        for step, loss in losses.items():
            rec = {"step": step, "train_loss": loss}
            if val and step in val:
                rec["val_loss"] = val[step]
            f.write(json.dumps(rec) + "\n")


def test_ledgers_and_loss_curves_are_compared_step_for_step(tmp_path, capsys):
    ids = {1: [0, 1, 2, 3], 2: [4, 5, 6, 7], 3: [8, 9, 10, 11]}
    _run(tmp_path / "one", 1, ids, {1: 4.0, 2: 3.0, 3: 2.0}, val={3: 2.5})
    _run(tmp_path / "two", 2, ids, {1: 4.0, 2: 3.0003, 3: 2.0}, val={3: 2.5001})
    _run(tmp_path / "bad", 2, {**ids, 3: [8, 9, 11, 10]}, {1: 4.0, 2: 3.0, 3: 2.2})
    out = tmp_path / "r.json"
    rc = multigpu_check.main([str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "bad"), "--json", str(out)])
    assert rc == 1  # one ledger differs
    two, bad = json.loads(out.read_text())
    assert two["ledger_equal"] and two["loss_steps_compared"] == 3
    assert abs(two["max_rel_loss_diff"] - 1e-4) < 1e-9 and two["max_rel_loss_diff_step"] == 2
    assert two["final_val"] == [3, 2.5001] and two["reference_final_val"] == [3, 2.5]
    assert not bad["ledger_equal"] and bad["first_ledger_difference"] == 3
    assert "differs from step 3" in capsys.readouterr().out
    assert multigpu_check.main([str(tmp_path / "one"), str(tmp_path / "two")]) == 0


def test_a_folder_without_a_run_is_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert multigpu_check.main([str(tmp_path / "empty"), str(tmp_path / "empty")]) == 2
    assert "ledger" in capsys.readouterr().err
