"""The product end to end: the CLI, Ray Train workers, checkpoints and resume, MLflow tracking.

All training tests share the session's Ray instance and shorten ``configs/tiny.yaml`` with
``--set``; each costs tens of seconds on 2 cores (worker-group start dominates).
"""

from __future__ import annotations

import json
import math
import re
import socket
from pathlib import Path

import pytest

from rayfp4.run import main
from rayfp4.tracking import read_metrics
from conftest import mlflow_uri

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["train.steps=8", "train.val_every=4", "train.log_every=2", "checkpoint.every=4",
        "data.val_sequences=16", "model.n_layers=2", "optim.warmup_steps=2", "precision.telemetry_every=4"]


def sets(*items):
    out = []
    for i in items:
        out += ["--set", i]
    return out


def run_cli(tmp_path, *extra, name="t"):
    args = [TINY, *sets(*FAST, f"output_dir={tmp_path / 'runs'}", f"tracking.uri={mlflow_uri(tmp_path)}",
                        f"name={name}", *extra)]
    return main(args)


@pytest.mark.slow
def test_default_config_end_to_end_with_mlflow(ray_session, tmp_path, capsys):
    assert run_cli(tmp_path) == 0
    out = capsys.readouterr().out
    # The driver ends with the variants' table: baseline first, the gap of NVFP4 against it.
    assert "final val loss" in out and "(baseline)" in out
    table = out[out.index("variant  status"):]
    assert "fp32     FINISHED" in table and "nvfp4    FINISHED" in table and "%" in table

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    exp = client.get_experiment_by_name("rayfp4")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parent) == 1 and len(children) == 2
    assert parent[0].info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent[0].info.run_id}
    by_name = {c.data.tags["rayfp4.variant"]: c for c in children}
    nv, fp = by_name["nvfp4"], by_name["fp32"]
    # Names say what ran: variant, run, model size, steps (the default name starts with the config's stem).
    assert re.fullmatch(r"nvfp4 · t · tiny · [\d.]+[KM] params · 8 steps", nv.info.run_name), nv.info.run_name
    assert re.fullmatch(r"t · tiny · [\d.]+[KM] params · 8 steps", parent[0].info.run_name), parent[0].info.run_name
    assert nv.data.tags["rayfp4.format"] == "nvfp4" and fp.data.tags["rayfp4.format"] == "bf16"
    assert nv.data.tags["rayfp4.dtype"] == "fp32" and nv.data.tags["rayfp4.backend"] == "reference"
    assert nv.data.tags["rayfp4.device"] == "2 x cpu" and nv.data.tags["rayfp4.name"] == "t"
    assert nv.data.tags["rayfp4.config"] == TINY
    # A child's params are its own: the variant and the experiment's baseline, not the parent's name.
    assert nv.data.params["variant"] == "nvfp4" and nv.data.params["baseline"] == "fp32"
    assert "name" not in nv.data.params
    assert nv.data.params["precision.format"] == "nvfp4" and fp.data.params["precision.format"] == "bf16"
    assert nv.data.params["model.n_layers"] == "2" and nv.data.params["train.steps"] == "8"
    assert nv.data.params["perf.peak_tflops"] == "none" and "no published" in nv.data.params["perf.peak"]
    for metric in ("train/loss", "val/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s",
                   "perf/data_wait_s", "train/skipped_steps", "val/final_loss", "val/best_loss", "val/gap_vs_baseline_pct"):
        assert metric in nv.data.metrics, metric
    # Final/best loss and the gap to the baseline are the child's own metrics (0 for the baseline).
    m = read_metrics(tmp_path / "runs" / "t" / "nvfp4" / "metrics.jsonl")
    assert nv.data.metrics["val/final_loss"] == pytest.approx(m[8]["val_loss"])
    assert fp.data.metrics["val/gap_vs_baseline_pct"] == 0.0
    assert not any(k.startswith(("nvfp4.", "fp32.")) for k in parent[0].data.metrics)
    # Quantization telemetry at its interval, per layer and operand, only for the NVFP4 run.
    quant = [k for k in nv.data.metrics if k.startswith("quant/")]
    # 2 blocks with the last kept in BF16: 4 quantized linears x 6 operands x 3 statistics.
    assert "quant/layers.0.attn.qkv/fprop.x/saturated" in quant and len(quant) == 4 * 6 * 3
    assert not any(k.startswith("quant/layers.1") for k in quant)
    assert not any(k.startswith("quant/") for k in fp.data.metrics)
    assert nv.data.params["precision.summary.quantized_layers"] == "4"
    assert nv.data.params["precision.summary.bf16_layer_names"].startswith("layers.1.attn.qkv")
    assert nv.data.params["precision.summary.fusions"] == "off"  # train.fusions: auto, eager steps on the CPU
    hist = client.get_metric_history(nv.info.run_id, "train/loss")
    assert sorted(m.step for m in hist) == [2, 4, 6, 8]
    val = client.get_metric_history(nv.info.run_id, "val/loss")
    assert [m.step for m in sorted(val, key=lambda m: m.step)] == [4, 8]
    arts = {a.path for a in client.list_artifacts(nv.info.run_id)}
    assert {"config.yaml", "loss_curve.png"} <= arts
    # The shards are the run's input; the final checkpoint its logged model (a pointer, not weights).
    (ds,) = client.get_run(nv.info.run_id).inputs.dataset_inputs
    assert json.loads(ds.dataset.profile)["train_tokens"] > 0 and ds.dataset.source.endswith('manifest.json"}')
    (model,) = client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{nv.info.run_id}'")
    assert model.params["step"] == "8" and model.status == "READY"
    model_files = {a.path for a in client.list_logged_model_artifacts(model.model_id)}
    assert model_files == {"state.json", "config.yaml", "checkpoint.json"}
    parent_arts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"comparison.md", "comparison.json", "loss_curves.png"} <= parent_arts
    note = parent[0].data.tags["mlflow.note.content"]
    assert "| variant | status | steps |" in note and "vs fp32" in note
    # Checkpoints load with weights_only=True and hold the whole training state.
    import torch

    ckpts = sorted((tmp_path / "runs" / "t" / "nvfp4").glob("checkpoint_*/state.pt"))
    assert [p.parent.name for p in ckpts] == ["checkpoint_00000004", "checkpoint_00000008"]
    state = torch.load(ckpts[-1], weights_only=True)
    assert state["step"] == 8 and {"model", "optimizer", "stream", "rng"} <= set(state)


def _single(tmp_path, name, *extra):
    return run_cli(tmp_path, "variants=[]", "precision.bf16_last_blocks=0", *extra, name=name)


@pytest.mark.slow
# The full suite only (CI's tests took 27-29 min on 2026-12-03): a worker crash resuming bit for bit
# stays in CI through test_faults.py (worker and driver SIGKILL); this run adds the aot_eager crash
# and MLflow's one record per replayed step.
@pytest.mark.extended
def test_killed_run_resumes_where_it_stopped(ray_session, tmp_path):
    from rayfp4.data import read_ledger

    steps = ["train.steps=10", "checkpoint.every=4", "train.log_every=1", "train.val_every=5"]
    assert _single(tmp_path, "clean", *steps) == 0
    # The crashed run also trains compiled (train.compile: aot_eager, the 4-bit layers as custom ops,
    # DDP over gloo): bit for bit an eager step, so its curve must still equal the eager run's.
    assert _single(tmp_path, "crash", *steps, "debug.fail_at_step=6", "train.compile=aot_eager") == 0
    clean = read_metrics(tmp_path / "runs" / "clean" / "train" / "metrics.jsonl")
    crash = read_metrics(tmp_path / "runs" / "crash" / "train" / "metrics.jsonl")
    # The failure really happened (marker) and the curve continues: same steps, same losses
    # (training is deterministic on CPU: data order, SR streams and optimizer state resume).
    assert (tmp_path / "runs" / "crash" / "train" / ".injected-failure-6").exists()
    assert list(crash) == list(range(1, 11))
    assert [crash[s]["train_loss"] for s in crash] == [clean[s]["train_loss"] for s in clean]
    assert crash[10]["val_loss"] == clean[10]["val_loss"]
    # The raw metrics file shows the replay: steps 5 and 6 were logged twice (before the crash
    # and after resuming from the step-4 checkpoint).
    raw = [json.loads(l)["step"] for l in (tmp_path / "runs" / "crash" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert raw.count(5) == 2 and raw.count(7) == 1
    # MLflow got each step once: the resumed attempt did not log the replayed steps again.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    exp = client.get_experiment_by_name("rayfp4").experiment_id
    (run,) = client.search_runs([exp], "tags.`rayfp4.name` = 'crash'")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(1, 11))
    # The sample ledger: exactly the sequences of the uninterrupted run, step by step.
    a = read_ledger(tmp_path / "runs" / "clean" / "train" / "ledger")
    b = read_ledger(tmp_path / "runs" / "crash" / "train" / "ledger")
    assert b.ordered() == a.ordered() and len(a.ordered()) == 10
    # A compiled run's checkpoint holds the model's own keys (no torch.compile wrapper prefix).
    import torch

    def keys(name):
        state = torch.load(tmp_path / "runs" / name / "train" / "checkpoint_00000008" / "state.pt",
                           map_location="cpu", weights_only=False)
        return sorted(state["model"])
    assert keys("crash") == keys("clean") and "embed.weight" in keys("clean")
    # resume: auto on a finished run continues from its last checkpoint, with more steps when that
    # change is declared (resume_changes); resume: never refuses to touch it.
    assert _single(tmp_path, "clean", *steps, "train.steps=12") == 2
    assert _single(tmp_path, "clean", *steps, "train.steps=12", "resume_changes=[train.steps]") == 0
    assert list(read_metrics(tmp_path / "runs" / "clean" / "train" / "metrics.jsonl"))[-1] == 12
    assert _single(tmp_path, "clean", *steps, "resume=never") == 2


@pytest.mark.slow
# The full suite's: the probe's count across a resume is checked in process
# (tests/test_grad_noise_probe.py), a retry inside the driver by test_faults.py's worker kill.
@pytest.mark.extended
def test_auto_late_switch_fires_on_both_workers_and_survives_a_restart(ray_session, tmp_path, capsys):
    """2 DDP workers, probes every 3 steps, patience 2 and a threshold every ratio is below: the
    probes of steps 3 and 6 switch both passes to BF16 from step 7 on. The run fails after step 6
    and resumes from the step-4 checkpoint, whose count (1 probe below) must carry over for the
    replayed probe of step 6 to switch again (without it the switch would come at step 9). That the
    losses equal a fixed switch's, across resumes too, tests/test_grad_noise_probe.py checks in
    process (a second run here would double this test's time)."""
    steps = ["train.steps=10", "checkpoint.every=4", "train.log_every=1", "train.val_every=5"]
    auto = "precision.late_switch={auto: {threshold: 1.0e9, probe_every: 3, patience: 2}}"
    assert _single(tmp_path, "auto", *steps, auto, "debug.fail_at_step=6") == 0
    out = capsys.readouterr().out
    assert "late switch to BF16 (both passes) from step 7 on" in out and "late_switch.at_step=6" in out
    a = read_metrics(tmp_path / "runs" / "auto" / "train" / "metrics.jsonl")
    assert (tmp_path / "runs" / "auto" / "train" / ".injected-failure-6").exists()
    assert [s for s in a if "quant/grad_noise_ratio" in a[s]] == [3, 6]  # none after the switch
    assert all(0 < a[s]["quant/grad_noise_ratio"] < float("inf") for s in (3, 6))
    assert [s for s in a if "quant/late_switch_step" in a[s]] == [6] and a[6]["quant/late_switch_step"] == 6
    assert list(a) == list(range(1, 11))


@pytest.mark.slow
def test_unreachable_tracking_server_does_not_stop_training(ray_session, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    # Also: gradient accumulation (2 micro-batches of 4 per worker) and a poisoned step that is
    # skipped and counted instead of corrupting the weights.
    rc = main([TINY, *sets(*FAST, "variants=[]", f"output_dir={tmp_path / 'runs'}", "name=offline",
                             f"tracking.uri=http://127.0.0.1:{port}", "train.steps=6", "train.log_every=1",
                             "data.micro_batch_size=4", "debug.nan_at_steps=[2]")])
    assert rc == 0
    err = capsys.readouterr().err
    assert err.count("is unavailable") == 1 and "Training continues without tracking" in err
    m = read_metrics(tmp_path / "runs" / "offline" / "train" / "metrics.jsonl")
    assert list(m)[-1] == 6
    assert [m[s]["skipped_steps"] for s in m] == [0, 0, 1, 1, 1, 1]
    assert math.isnan(m[3]["train_loss"]) and all(math.isfinite(m[s]["train_loss"]) for s in (1, 2, 4, 5, 6))


@pytest.mark.slow
def test_non_finite_steps_in_a_row_stop_the_run_as_failed(ray_session, tmp_path, capsys):
    rc = main([TINY, *sets(*FAST, "variants=[]", f"output_dir={tmp_path / 'runs'}", "name=diverged",
                             f"tracking.uri={mlflow_uri(tmp_path)}", "train.steps=8",
                             "debug.nan_at_steps=[1, 2, 3]", "train.max_nonfinite_in_a_row=3",
                             "checkpoint.every=2", "train.log_every=1", "checkpoint.max_failures=2")])
    assert rc == 1
    out = capsys.readouterr().out
    assert "3 consecutive steps (up to step 4) had a non-finite loss or gradient" in out
    assert re.search(r"diverged\s+FAILED", out)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    runs = client.search_runs([client.get_experiment_by_name("rayfp4").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    # A diverged run would diverge again: it is not retried from the step-2 checkpoint (which would
    # replay step 3 into the metrics).
    raw = [json.loads(l)["step"] for l in (tmp_path / "runs" / "diverged" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert raw == [1, 2, 3]  # step 4 raised before it was logged


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "optim.lr=fast"], "optim.lr: Input should be a valid number"),
        (["--set", "optim.learning_rate=0.1"], "optim.learning_rate: unknown key"),
        (["--set", "precision.late_switch.at_fraction=1.5"], "precision.late_switch: at_fraction must be in (0, 1]"),
        (["--set", "scaling.num_workers=3"], "global_batch_size=16 is not divisible by scaling.num_workers=3"),
        (["--set", "variants=[{name: fp32, set: {precision.format: fp8}}]"], "variant fp32: precision.format: Input should be"),
        (["--set", "baseline=fp8"], "baseline: 'fp8' is not one of the variants ['fp32', 'nvfp4']"),
        (["--set", "data.shards=/nonexistent/shards", "--check"], "/nonexistent/shards"),
        (["--set", "optim"], "expected key.path=value"),
    ],
)
def test_bad_config_prints_the_key_path_and_exits_2(args, message, capsys):
    # In-process (the CLI's error path is main()); tests/test_preflight.py runs one real subprocess.
    assert main([TINY, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3


def test_cli_missing_file_schema_and_check(tmp_path, capsys):
    assert main([str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such config file" in capsys.readouterr().err
    assert main(["--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"model", "precision", "optim", "variants"} <= set(schema["properties"])


@pytest.mark.slow
@pytest.mark.extended  # FSDP2 resume: the N -> M test below; a retry inside the driver: the DDP tests
def test_fsdp2_strategy_trains_and_resumes(ray_session, tmp_path):
    # FSDP2 (fully_shard per block) over gloo on the CPU: full state dicts in the checkpoint, so a
    # failure after the step-3 checkpoint resumes and finishes.
    rc = _single(tmp_path, "fsdp", "scaling.strategy=fsdp2", "train.steps=6", "checkpoint.every=3",
                 "train.log_every=1", "debug.fail_at_step=4")
    assert rc == 0
    run = tmp_path / "runs" / "fsdp" / "train"
    assert (run / ".injected-failure-4").exists()
    assert list(read_metrics(run / "metrics.jsonl")) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_fsdp2_checkpoint_saved_on_n_workers_resumes_on_m(ray_session, tmp_path):
    """2 -> 1 (a sharded checkpoint: each rank wrote its own shards) and 1 -> 2 (a full one loaded
    into FSDP2). In BF16 format the runs compute the same thing whatever the world size: the same
    sequences in the same order (ledger) and losses equal up to the order of the reductions."""
    from rayfp4.data import read_ledger

    base = ["precision.format=bf16", "scaling.strategy=fsdp2", "train.steps=8", "checkpoint.every=4",
            "train.log_every=1", "checkpoint.max_failures=0"]
    for name, first, then in [("two-to-one", 2, 1), ("one-to-two", 1, 2)]:
        assert _single(tmp_path, name, *base, f"scaling.num_workers={first}", "debug.fail_at_step=6") == 1
        ckpt = tmp_path / "runs" / name / "train" / "checkpoint_00000004"
        assert (ckpt / "shards" / ".metadata").exists() == (first == 2)  # sharded only on several ranks
        assert _single(tmp_path, name, *base, f"scaling.num_workers={then}") == 0
    a = read_metrics(tmp_path / "runs" / "two-to-one" / "train" / "metrics.jsonl")
    b = read_metrics(tmp_path / "runs" / "one-to-two" / "train" / "metrics.jsonl")
    assert list(a) == list(b) == list(range(1, 9))
    for s in a:
        assert math.isclose(a[s]["train_loss"], b[s]["train_loss"], rel_tol=1e-4), (s, a[s], b[s])
    la = read_ledger(tmp_path / "runs" / "two-to-one" / "train" / "ledger").ordered()
    lb = read_ledger(tmp_path / "runs" / "one-to-two" / "train" / "ledger").ordered()
    assert la == lb and len(la) == 8

