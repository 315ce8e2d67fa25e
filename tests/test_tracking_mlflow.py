"""What MLflow shows of a run, without Ray: MFU peaks, metric keys, replayed steps, the comparison
as a table, datasets, logged models, system metrics, and run-level precision settings."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from rayfp4.config import load_config
from rayfp4.tracking import Tracker
from rayfp4.tracking.compare import VariantResult, comparison_columns, comparison_markdown
from rayfp4.train.metrics import RankZeroLog, Throughput, device_peaks

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


# -- the peak MFU is measured against ----------------------------------------------------------

@pytest.mark.parametrize("name,fmt,bf16,fp4", [
    ("NVIDIA B200", "nvfp4", 2250, 9000),
    ("NVIDIA B200", "bf16", 2250, None),             # a BF16 run has no FP4 peak
    ("NVIDIA GB200", "nvfp4", 2500, 10000),          # not B200's figures, though "B200" is in the name
    ("NVIDIA GB300", "mxfp4", 2500, 15000),
    ("NVIDIA B300 SXM6 AC", "nvfp4", 2250, None),    # FP4 left out: published figures disagree
    ("NVIDIA H200", "nvfp4", 989, None),             # Hopper: no FP4 tensor cores, NVFP4 is emulated
    ("NVIDIA H100 80GB HBM3", "bf16", 989, None),
    ("NVIDIA H100 PCIe", "bf16", 756, None),
    ("NVIDIA H100 NVL", "bf16", None, None),         # left out rather than guessed
    ("NVIDIA A100-SXM4-80GB", "nvfp4", 312, None),
    ("NVIDIA GeForce RTX 4090", "bf16", None, None),
    (None, "nvfp4", None, None),                     # CPU
])
def test_peak_selection_by_device_name(name, fmt, bf16, fp4):
    base, four = device_peaks(name, fmt)
    assert (base.tflops if base else None) == bf16
    assert (four.tflops if four else None) == fp4
    if base:
        assert base.name.startswith(f"{name}: dense BF16") and "datasheet" in base.name
    if four:
        assert "dense FP4" in four.name


def test_throughput_reports_which_peak_and_both_mfus(monkeypatch):
    import torch

    import rayfp4.train.metrics as metrics

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GB200")
    t = Throughput(tokens_per_step=1000, flops_per_token=1e9, device=torch.device("cuda", 0), world=2, fmt="nvfp4")
    monkeypatch.setattr(metrics.torch.cuda, "synchronize", lambda device=None: None)
    p = t.params()
    assert p["perf.device"] == "2 x NVIDIA GB200" and p["perf.peak_tflops"] == "2500"
    assert p["perf.peak_tflops_fp4"] == "10000" and "FP4" in p["perf.peak_fp4"]
    t.start_step()
    out = t.end_step()
    assert out["mfu_fp4"] == pytest.approx(out["mfu"] * 2500 / 10000)
    achieved = 1e9 * 1000 / out["step_time_s"] / 2
    assert out["mfu"] == pytest.approx(achieved / 2500e12)

    # the time between a step's end and the next batch's arrival: waiting for data, apart from
    # the step time that tokens/s is measured on; a mean per step since the last report
    assert t.take_data_wait() is None  # the first step of an attempt has no previous one
    for pause in (0.02, 0.06):
        t.waiting_for_data()
        time.sleep(pause)
        t.start_step()
        last = t.end_step()
    wait = t.take_data_wait()
    assert 0.04 <= wait < 0.04 + 0.05 and t.take_data_wait() is None
    assert last["step_time_s"] < 0.02  # the wait is not in the step time

    cpu = Throughput(1000, 1e9, torch.device("cpu"), 2, "nvfp4")
    assert cpu.params()["perf.peak_tflops"] == "none" and "perf.peak_fp4" not in cpu.params()
    cpu.start_step()
    assert "mfu" not in cpu.end_step()


# -- rank 0's metrics: grouped keys, replayed steps ---------------------------------------------

class FakeTracker:
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, run_id, metrics, step):
        self.logged.append((step, metrics))


def test_replayed_steps_are_not_logged_twice_and_keys_are_grouped(tmp_path):
    first = FakeTracker()
    log = RankZeroLog(0, tmp_path, first, "run", None)
    for step in range(1, 7):
        log.write(step, {"train_loss": 1.0 / step, "tokens_per_s": 10.0, "quant/layers.0.x": 0.5}, {})
    assert first.logged[0][1] == {"train/loss": 1.0, "perf/tokens_per_s": 10.0, "quant/layers.0.x": 0.5}
    # A restart from the step-4 checkpoint replays 5 and 6: metrics.jsonl gets them again (its
    # reader keeps the last record), MLflow does not.
    again = FakeTracker()
    log = RankZeroLog(0, tmp_path, again, "run", None)
    for step in range(5, 9):
        log.write(step, {"train_loss": 2.0 / step, "val_loss": 3.0}, {})
    assert [s for s, _ in again.logged] == [7, 8] and again.logged[0][1] == {"train/loss": 2.0 / 7, "val/loss": 3.0}
    raw = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert raw == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]
    assert RankZeroLog(1, tmp_path, again, "run", None).logged_through == 0  # only rank 0 reads it


# -- the comparison as a table ----------------------------------------------------------------

RESULTS = [VariantResult("fp32", "FINISHED", 120, 4.0, 3.9), VariantResult("nvfp4", "FINISHED", 120, 4.1, 4.05),
           VariantResult("mxfp4", "FAILED", 30)]


def test_comparison_as_markdown_pipe_table_and_columns():
    md = comparison_markdown(RESULTS, "fp32").splitlines()
    assert md[0] == "| variant | status | steps | final val loss | best val loss | gap vs fp32 |"
    assert md[1] == "|---|---|---|---|---|---|"
    assert md[2:] == ["| fp32 | FINISHED | 120 | 4.0000 | 3.9000 | (baseline) |",
                      "| nvfp4 | FINISHED | 120 | 4.1000 | 4.0500 | +2.50% |",
                      "| mxfp4 | FAILED | 30 | - | - | - |"]
    cols = comparison_columns(RESULTS, "fp32")
    assert cols["variant"] == ["fp32", "nvfp4", "mxfp4"] and cols["final_val_loss"] == [4.0, 4.1, None]
    assert cols["gap_vs_fp32_pct"][0] == 0.0 and cols["gap_vs_fp32_pct"][1] == pytest.approx(2.5)
    assert cols["gap_vs_fp32_pct"][2] is None


# -- a run-level precision setting leaves the BF16 baseline alone --------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_run_level_late_switch_applies_to_4bit_variants_only(config):
    from rayfp4.train.launch import check_model_and_policy

    cfg = load_config(config, ["precision.late_switch.at_fraction=0.8", "precision.rht_wgrad=false"])
    variants = dict(cfg.variant_configs())
    assert any(v.precision.format == "bf16" for v in variants.values()), "a shipped config compares with a baseline"
    for label, v in variants.items():
        if v.precision.format == "bf16":
            assert v.precision.late_switch is None and not v.precision.rht_wgrad
        else:
            assert v.precision.late_switch.at_fraction == 0.8 and v.precision.rht_wgrad is False
        check_model_and_policy(v, label)  # what --check and the workers apply (meta device)


def test_a_bf16_variant_that_sets_a_late_switch_itself_is_still_refused():
    from rayfp4.config import ConfigError

    with pytest.raises(ConfigError, match="variant b: precision: late_switch to BF16 makes no sense"):
        load_config(ROOT / "configs" / "tiny.yaml",
                    ["variants=[{name: b, set: {precision.format: bf16, precision.late_switch.at_step: 3}}]",
                     "baseline=b"])


def test_cli_late_switch_on_every_shipped_config(capsys, monkeypatch):
    """``--set precision.late_switch...`` on a shipped config no longer exits 2 (config stage only:
    preflight's shard preparation is left to the end-to-end tests)."""
    import rayfp4.train.launch as launch
    from rayfp4.run import main

    monkeypatch.setattr(launch, "prepare_shards", lambda cfg: None)
    for config in CONFIGS:
        assert main([str(config), "--set", "precision.late_switch.at_fraction=0.9", "--check"]) == 0, \
            capsys.readouterr().err
    capsys.readouterr()


# -- the tracker against a real (SQLite) MLflow store ----------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    base = tmp_path_factory.mktemp("mlflow")
    return Tracker(f"sqlite:///{base}/mlruns.db", "t"), base


def test_dataset_table_note_and_logged_model(store, tmp_path):
    from mlflow.tracking import MlflowClient

    tracker, base = store
    run = tracker.start_run("r")
    tracker.log_dataset(run, "shards", "0123456789abcdef", "/data/manifest.json", {"train_tokens": 5})
    tracker.log_dataset(run, "shards", "0123456789abcdef", "/data/manifest.json", {"train_tokens": 5})
    tracker.log_table(run, {"variant": ["a", "b"], "gap": [0.0, 1.5]}, "comparison.json")
    tracker.set_note(run, "**a** vs b")
    (tmp_path / "state.json").write_text("{}")
    model_id = tracker.log_model(run, "m", tmp_path, step=8, params={"step": "8"}, model_type="rayfp4-checkpoint")
    tracker.log_params(run, {"perf.device": "2 x cpu"})
    tracker.log_params(run, {"perf.device": "1 x cpu", "other": "x"})  # a resumed attempt: first value kept
    assert tracker.enabled

    c = MlflowClient(tracker.uri)
    r = c.get_run(run)
    (ds,) = r.inputs.dataset_inputs  # logged twice, recorded once
    assert json.loads(ds.dataset.profile) == {"train_tokens": 5} and ds.tags[0].value == "training"
    assert r.data.tags["mlflow.note.content"] == "**a** vs b"
    assert r.data.params == {"perf.device": "2 x cpu", "other": "x"}
    assert "comparison.json" in {a.path for a in c.list_artifacts(run)}
    m = c.get_logged_model(model_id)
    assert m.source_run_id == run and m.status == "READY" and m.params == {"step": "8"}
    assert {a.path for a in c.list_logged_model_artifacts(model_id)} == {"state.json"}
    assert [o.model_id for o in r.outputs.model_outputs] == [model_id]


def test_system_metrics_sample_into_the_run_and_leave_no_thread(store):
    from mlflow.tracking import MlflowClient

    pytest.importorskip("psutil")
    tracker, _ = store
    run = tracker.start_run("sys")
    sampler = tracker.system_metrics(run, every_s=0.2)
    assert sampler is not None, tracker.system_metrics_off
    deadline = time.monotonic() + 30
    keys = set()
    while time.monotonic() < deadline and "system/cpu_utilization_percentage" not in keys:
        time.sleep(0.5)
        sampler.monitor.mlflow_logger.flush()
        keys = set(MlflowClient(tracker.uri).get_run(run).data.metrics)
    sampler.stop()
    assert "system/cpu_utilization_percentage" in keys and "system/system_memory_usage_megabytes" in keys
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]
    assert tracker.system_metrics(run, every_s=0) is None  # off


def test_final_checkpoint_is_logged_as_a_pointer_and_leaves_no_staging(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from rayfp4.train.reporting import log_final_checkpoint

    tracker, _ = store
    run = tracker.start_run("ckpt")
    run_dir = tmp_path / "t" / "nvfp4"
    for step in (4, 8, 12):
        (run_dir / f"checkpoint_{step:08d}").mkdir(parents=True)
        (run_dir / f"checkpoint_{step:08d}" / "state.json").write_text(json.dumps({"step": step, "sha256": "ab"}))
    (run_dir / "checkpoint_00000012" / "state.json").write_text("{not json")  # damaged: the previous one
    (run_dir / "config.yaml").write_text("name: t\n")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["name=t"])
    model_id = log_final_checkpoint(tracker, run, cfg, "nvfp4", run_dir, run_dir / ".staging")
    assert not (run_dir / ".staging").exists()
    c = MlflowClient(tracker.uri)
    assert {a.path for a in c.list_logged_model_artifacts(model_id)} == {"state.json", "config.yaml", "checkpoint.json"}
    model = c.get_logged_model(model_id)
    pointer = json.loads((Path(model.artifact_location.removeprefix("file://")) / "checkpoint.json").read_text())
    assert pointer["checkpoint"] == str((run_dir / "checkpoint_00000008").resolve()) and pointer["step"] == 8
    assert model.name == "t-nvfp4" and model.params["step"] == "8"
