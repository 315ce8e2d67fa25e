"""``python -m rayfp4.study``: a variant x seed matrix of runs, several at once, and its table.

The runner is tested with stand-in run commands (small Python processes that join the study's Ray
cluster and write a metrics file where a run would), so the orchestration (concurrency, statuses,
the MLflow parent, skipping finished runs, Ctrl-C) is exercised in seconds; a real study of
``rayfp4.run`` processes is configs/study/tiny-seeds.yaml (minutes, not in CI).
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rayfp4 import study as st
from rayfp4.config import ConfigError, load_config
from conftest import mlflow_uri

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"


def write_study(tmp_path: Path, **over) -> Path:
    data = {
        "name": "s", "base": str(TINY), "seeds": [0, 1], "concurrent": 2, "baseline": "fp32",
        "set": {"output_dir": str(tmp_path / "out"), "tracking.enabled": False},
        "variants": [{"name": "fp32", "set": {"precision.format": "bf16", "precision.bf16_last_blocks": 0}},
                     {"name": "nvfp4"}],
    }
    data.update(over)
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("over,match", [
    ({"bogus": 1}, r"bogus: unknown key"),
    ({"seeds": []}, r"seeds"),
    ({"seeds": [1, 1]}, r"seeds: .*distinct"),
    ({"baseline": "mxfp4"}, r"baseline: 'mxfp4' is not one of the variants"),
    ({"variants": [{"name": "a"}, {"name": "a"}]}, r"names must be unique"),
    ({"set": {"train.seed": 3}}, r"set: train.seed is the study's to choose"),
    ({"base": "nope.yaml"}, r"base: no such run config"),
    ({"name": "a/b"}, r"name"),
    ({"variants": [{"name": "a"}, {"name": "b", "seeds": []}]}, r"variants.1.seeds"),
    ({"variants": [{"name": "a", "seeds": [0]}, {"name": "b"}], "baseline": None}, r"baseline 'a' trains every seed"),
])
def test_bad_studies_name_the_field(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        st.load_study(write_study(tmp_path, **over))


def test_cli_exits_2_before_anything_starts(tmp_path, capsys):
    assert st.main([str(write_study(tmp_path, bogus=1))]) == 2
    assert "bogus: unknown key" in capsys.readouterr().err
    # A run config that does not validate names the run and the key.
    bad = write_study(tmp_path, baseline=None, variants=[{"name": "wide", "set": {"model.d_model": -1}}])
    assert st.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "run s-wide-s0:" in err and "model.d_model" in err
    # --only names a run the study does not have: the error lists the study's runs
    assert st.main([str(write_study(tmp_path)), "--only", "s-fp32-s0,s-fp8-s0"]) == 2
    err = capsys.readouterr().err
    assert "--only: s-fp8-s0 not in the study's runs: s-fp32-s0, s-nvfp4-s0" in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_each_run_is_the_base_config_with_one_variant_and_its_seed(tmp_path):
    study, base = st.load_study(write_study(tmp_path, set={"train.steps": 7, "tracking.enabled": False}))
    runs = st.expand(study)
    assert [(r.variant, r.seed, r.name) for r in runs] == [
        ("fp32", 0, "s-fp32-s0"), ("nvfp4", 0, "s-nvfp4-s0"), ("fp32", 1, "s-fp32-s1"), ("nvfp4", 1, "s-nvfp4-s1")]
    cfg = load_config(base, runs[2].overrides)
    assert (cfg.name, cfg.train.seed, cfg.train.steps, cfg.baseline) == ("s-fp32-s1", 1, 7, None)
    (label, vcfg), = cfg.variant_configs()
    assert label == "fp32" and vcfg.precision.format == "bf16" and vcfg.train.seed == 1


def test_a_variant_limited_to_some_seeds_trains_only_those_and_misses_nothing(tmp_path):
    study, _ = st.load_study(write_study(tmp_path, seeds=[0, 1], variants=[
        {"name": "fp32", "set": {"precision.format": "bf16"}}, {"name": "nvfp4"}, {"name": "late", "seeds": [0, 5]}]))
    runs = st.expand(study)
    assert [r.name for r in runs] == ["s-fp32-s0", "s-nvfp4-s0", "s-late-s0", "s-fp32-s1", "s-nvfp4-s1"]
    for r in runs:
        r.status = "FINISHED"
    results = {r.name: (3.0 + 0.01 * i, 100.0) for i, r in enumerate(runs)}
    fp32, nv, late = st.summarize(study, runs, results)
    assert late.seeds == [0] and late.missing == [] and nv.seeds == [0, 1]
    table, _ = st.seed_table(study, runs, results)
    assert "| late | 0 | FINISHED |" in table and "| late | 1 |" not in table


def test_table_pairs_each_seed_with_its_own_baseline(tmp_path):
    study, _ = st.load_study(write_study(tmp_path, seeds=[0, 1, 2]))
    runs = st.expand(study)
    loss = {"s-fp32-s0": 3.0, "s-fp32-s1": 3.2, "s-fp32-s2": 3.1, "s-nvfp4-s0": 3.03, "s-nvfp4-s1": 3.2}
    for r in runs:
        r.status = "FINISHED" if r.name in loss else "FAILED"
    results = {n: (v, 1000.0 + i) for i, (n, v) in enumerate(loss.items())}
    fp32, nv = st.summarize(study, runs, results)
    assert fp32.seeds == [0, 1, 2] and nv.seeds == [0, 1] and nv.missing == ["s2: FAILED"]
    assert nv.gaps_pct == pytest.approx([1.0, 0.0])  # each against the fp32 run of the same seed
    table, rows = st.study_table(study, [fp32, nv])
    row = rows[1]
    assert row["gap_pct_mean"] == pytest.approx(0.5) and row["gap_pct_std"] == pytest.approx(math.sqrt(0.5))
    assert row["final_val_loss_mean"] == pytest.approx(3.115)
    assert "| nvfp4 | 2 | 3.1150 ± 0.1202 | +0.50 ± 0.71 |" in table
    assert "| fp32 | 3 | 3.1000 ± 0.1000 | (baseline) |" in table and "s2: FAILED" in table
    # runs trained side by side: their speed is labelled as such, not as the method's own
    assert "| tokens/s (mean, 2 runs at once) |" in table
    alone = study.model_copy(update={"concurrent": 1})
    assert "| tokens/s (mean) |" in st.study_table(alone, [fp32, nv])[0]
    shared = study.model_copy(update={"concurrent": 3})
    assert "| tokens/s (mean, 3 runs at once) |" in st.study_table(shared, [fp32, nv])[0]
    assert "| tokens/s (3 runs at once) |" in st.seed_table(shared, runs, results)[0]


def test_throughput_is_the_median_of_the_second_half():
    recs = {s: {"tokens_per_s": v} for s, v in enumerate([1.0, 2.0, 100.0, 101.0, 99.0], 1)}
    assert st.run_throughput(recs) == 100.0
    assert st.run_throughput({}) is None


def _sleeper(seconds: float, rc: int = 0, stamp: Path | None = None) -> list[str]:
    code = f"import sys, time; t = time.time(); time.sleep({seconds!r})"
    if stamp is not None:
        code += f"; open({str(stamp)!r}, 'a').write(str(t) + ' ' + str(time.time()) + '\\n')"
    return [sys.executable, "-c", code + f"; sys.exit({rc})"]


def test_at_most_concurrent_runs_at_once_and_statuses_follow_exit_codes(tmp_path):
    runs = [st.StudyRun("v", i, f"r{i}", []) for i in range(5)]
    stamp = tmp_path / "times"
    rcs = {"r0": 0, "r1": 0, "r2": 1, "r3": 0, "r4": 130}
    st.execute(runs, 2, lambda r: _sleeper(0.6, rcs[r.name], stamp), tmp_path / "logs", {}, poll_s=0.05)
    assert [r.status for r in runs] == ["FINISHED", "FINISHED", "FAILED", "FINISHED", "KILLED"]
    assert [r.exit_code for r in runs] == [0, 0, 1, 0, 130]
    spans = [tuple(map(float, line.split())) for line in stamp.read_text().splitlines()]
    most = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert most == 2  # two at a time, never three
    assert all(Path(r.log).is_file() for r in runs)


def test_start_until_lets_the_running_runs_finish_and_starts_no_more(tmp_path):
    # --start-until: a machine's time is running out; a run started now would be cut short and
    # lose its steps, so none starts, and those already training end normally.
    runs = [st.StudyRun("v", i, f"r{i}", []) for i in range(4)]
    t0 = time.monotonic()
    st.execute(runs, 2, lambda r: _sleeper(1.0), tmp_path / "logs", {}, poll_s=0.05, start_until=t0 + 0.5)
    assert [r.status for r in runs] == ["FINISHED", "FINISHED", "PENDING", "PENDING"]
    assert not (tmp_path / "logs" / "r2.log").exists()
    # already passed: nothing starts at all
    fresh = [st.StudyRun("v", 0, "q0", [])]
    st.execute(fresh, 2, lambda r: _sleeper(0.1), tmp_path / "logs", {}, poll_s=0.05, start_until=t0)
    assert fresh[0].status == "PENDING"


def test_start_until_must_be_seconds(tmp_path, capsys):
    path = write_study(tmp_path)
    with pytest.raises(SystemExit) as e:
        st.main([str(path), "--start-until", "-5"])
    assert e.value.code == 2 and "--start-until" in capsys.readouterr().err


def test_interrupt_stops_the_running_runs(tmp_path):
    runs = [st.StudyRun("v", i, f"r{i}", []) for i in range(3)]
    started = []

    def on_change():
        started.append(sum(r.status == "RUNNING" for r in runs))
        if started[-1] == 2:
            raise KeyboardInterrupt  # as Ctrl-C arrives while two runs train

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        st.execute(runs, 2, lambda r: _sleeper(60), tmp_path / "logs", {}, on_change=on_change, poll_s=0.05)
    assert time.monotonic() - t0 < 30  # they got SIGINT instead of sleeping a minute
    assert [r.status for r in runs] == ["KILLED", "KILLED", "PENDING"]


FAKE_RUN = textwrap.dedent("""
    # Stands in for `python -m rayfp4.run`: joins the study's Ray cluster, records the MLflow parent
    # it was given, and writes the metrics file a run of this name would write.
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, os.environ["RAYFP4_REPO"])
    from rayfp4.config import load_config
    cfg = load_config(sys.argv[1], sys.argv[2:])
    import ray
    ray.init(logging_level="ERROR", configure_logging=False)
    assert ray.cluster_resources().get("CPU"), "joined no cluster"
    (label, v), = cfg.variant_configs()
    d = Path(cfg.output_dir) / cfg.name / label
    d.mkdir(parents=True, exist_ok=True)
    loss = 3.0 + 0.01 * cfg.train.seed + (0.03 if label == "nvfp4" else 0.0)
    with open(d / "metrics.jsonl", "w") as f:
        for step in (1, 2):
            f.write(json.dumps({"step": step, "train_loss": loss, "val_loss": loss, "tokens_per_s": 500.0}) + "\\n")
    Path(cfg.output_dir, cfg.name + ".env").write_text(os.environ.get("RAYFP4_MLFLOW_PARENT_RUN_ID", ""))
    sys.exit(int(os.environ.get("FAKE_RC_" + cfg.name.replace("-", "_"), "0")))
""")


def test_a_study_end_to_end_with_stand_in_runs(tmp_path, monkeypatch, capsys, ray_session):
    fake = tmp_path / "fake_run.py"
    fake.write_text(FAKE_RUN)
    monkeypatch.setenv("RAYFP4_REPO", str(REPO))
    monkeypatch.setenv("FAKE_RC_s_nvfp4_s1", "1")  # one run fails
    out = tmp_path / "out"
    path = write_study(tmp_path, set={"output_dir": str(out), "tracking.uri": mlflow_uri(tmp_path)})
    _, base = st.load_study(path)
    cmd = lambda r: [sys.executable, str(fake), str(base), *r.overrides]
    # --only: the named run alone; the others stay to be trained
    assert st.main([str(path), "--only", "s-fp32-s1"], command=cmd) == 0
    text = capsys.readouterr().out
    assert "1 run(s) to train (--only: 1 of 4)" in text and "started s-fp32-s1 (1/1)" in text
    state = json.loads((out / "s" / "study.json").read_text())
    assert [r["status"] for r in state["runs"]] == ["PENDING", "PENDING", "FINISHED", "PENDING"]
    assert "3 other run(s) of the study are not: s-fp32-s0, s-nvfp4-s0, s-nvfp4-s1" in text
    import mlflow

    parent = (out / "s" / "mlflow_study_run_id").read_text().strip()
    assert mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").get_run(parent).info.status == "KILLED"
    assert st.main([str(path)], command=cmd) == 1  # one run failed
    text = capsys.readouterr().out
    assert "| nvfp4 | 1 | 3.0300 | +1.00 |" in text and "s1: FAILED" in text
    assert "| fp32 | 2 | 3.0050 ± 0.0071 | (baseline) |" in text
    state = json.loads((out / "s" / "study.json").read_text())
    assert [r["status"] for r in state["runs"]] == ["FINISHED", "FINISHED", "FINISHED", "FAILED"]
    assert (out / "s" / "study.md").read_text().count("|") > 10
    # Every run nested under the study's MLflow run.
    parent = (out / "s" / "mlflow_study_run_id").read_text().strip()
    assert parent and all((out / f"{n}.env").read_text() == parent
                          for n in ("s-fp32-s0", "s-nvfp4-s0", "s-fp32-s1", "s-nvfp4-s1"))
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").get_run(parent)
    assert run.info.status == "FAILED" and "| nvfp4 |" in run.data.tags["mlflow.note.content"]
    # The plots next to study.md and as the study run's artifacts, with it.
    logged = {a.path for a in mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").list_artifacts(parent)}
    assert {"study.md", "val_loss.png", "gap.png", "train_loss.png"} <= logged
    assert (out / "s" / "gap.png").read_bytes().startswith(PNG_HEADER)
    # With no time left to start a run (--start-until 0): nothing trains, the study says what is
    # left, and its MLflow run ends KILLED (stopped, not failed).
    assert st.main([str(path), "--start-until", "0"], command=cmd) == 1
    text = capsys.readouterr().out
    assert "1 run(s) not started (s-nvfp4-s1)" in text and "1 run(s) left to train" in text
    assert mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").get_run(parent).info.status == "KILLED"
    # Again, with the failure fixed: only the failed run trains; the others are not re-run.
    monkeypatch.delenv("FAKE_RC_s_nvfp4_s1")
    (out / "s-fp32-s0.env").unlink()
    assert st.main([str(path)], command=cmd) == 0
    text = capsys.readouterr().out
    assert "3 run(s) finished earlier" in text and "started s-nvfp4-s1 (1/1)" in text
    assert not (out / "s-fp32-s0.env").exists()
    assert "| nvfp4 | 2 | 3.0350 ± 0.0071 | +1.00 ± 0.00 |" in text
    assert mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").get_run(parent).info.status == "FINISHED"


PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def _write_run(out: Path, name: str, variant: str, loss: float, steps: int) -> None:
    """The metrics file a run of a study leaves on disk: val loss every other step, ending at ``loss``."""
    d = out / name / variant
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            rec = {"step": step, "train_loss": loss + 0.1 * (4 - step), "tokens_per_s": 500.0}
            if step % 2 == 0:
                rec["val_loss"] = loss + 0.05 * (4 - step)
            f.write(json.dumps(rec) + "\n")


def test_report_rebuilds_tables_and_plots_from_runs_on_disk(tmp_path, monkeypatch, capsys):
    # Runs copied back from another machine into `copied/`; the study's own output_dir has nothing.
    import rayfp4.train.launch as launch

    def no_training(*a, **k):
        raise AssertionError("--report must not prepare data, start Ray or train")

    monkeypatch.setattr(launch, "start_shared_ray", no_training)
    monkeypatch.setattr(launch, "preflight", no_training)
    path = write_study(tmp_path, set={"output_dir": str(tmp_path / "out"), "tracking.enabled": False,
                                      "train.steps": 4})
    copied = tmp_path / "copied"
    _write_run(copied, "s-fp32-s0", "fp32", 3.0, 4)
    _write_run(copied, "s-nvfp4-s0", "nvfp4", 3.03, 4)
    _write_run(copied, "s-fp32-s1", "fp32", 3.01, 4)
    _write_run(copied, "s-nvfp4-s1", "nvfp4", 3.2, 2)  # stopped half-way
    assert st.main([str(path), "--report", "--out", str(copied)]) == 1  # not every run finished
    assert "| nvfp4 | 1 | 3.0300 | +1.00 | 500 | s1: UNFINISHED (step 2 of 4) |" in capsys.readouterr().out
    root = copied / "s"
    md = (root / "study.md").read_text()
    # The per-run table: each seed's loss and its gap to the same seed's baseline.
    assert "| fp32 | 1 | FINISHED | 3.0100 | (baseline) | 500 |" in md
    assert "| nvfp4 | 0 | FINISHED | 3.0300 | +1.00 | 500 |" in md
    assert "| nvfp4 | 1 | UNFINISHED (step 2 of 4) | - | - | - |" in md
    for name in ("val_loss.png", "gap.png", "train_loss.png"):
        data = (root / name).read_bytes()
        assert data.startswith(PNG_HEADER) and len(data) > 5000, name
        assert f"]({name})" in md
    rows = json.loads((root / "study.results.json").read_text())["per_run"]
    assert [(r["run"], r["gap_pct"]) for r in rows][:2] == [("s-fp32-s0", None), ("s-fp32-s1", None)]
    assert not (root / "study.json").exists()  # the runner's state is not the report's to write
    assert not (tmp_path / "out").exists()
    # A run that is not on disk at all is listed, not a crash; every run finished: exit 0.
    import shutil

    shutil.rmtree(copied / "s-nvfp4-s1")
    assert st.main([str(path), "--report", "--out", str(copied)]) == 1
    assert "s1: MISSING (not on disk)" in capsys.readouterr().out
    _write_run(copied, "s-nvfp4-s1", "nvfp4", 3.01, 4)
    assert st.main([str(path), "--report", "--out", str(copied)]) == 0


def test_report_without_runs_on_disk_exits_2_naming_the_directory(tmp_path, capsys):
    path = write_study(tmp_path)
    (tmp_path / "empty").mkdir()
    assert st.main([str(path), "--report", "--out", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert f"no runs of study s on disk in {tmp_path / 'empty'}" in err and "s-fp32-s0" in err
    assert st.main([str(path), "--report"]) == 2  # the study's own output_dir: nothing there either
    assert f"on disk in {tmp_path / 'out'}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # --out only says where to look for a report
        st.main([str(path), "--out", str(tmp_path)])
    assert e.value.code == 2
