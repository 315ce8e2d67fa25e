"""What is caught before Ray starts (one line, exit 2, in about a second), and the pieces of the
fault handling that need no training run: manifests that point elsewhere, the failure policy,
checkpoint verification and fallback, orphaned MLflow runs."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rayfp4.run import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def sets(*items):
    out = []
    for i in items:
        out += ["--set", i]
    return out


@pytest.fixture
def no_ray(monkeypatch):
    import rayfp4.train.launch as launch

    monkeypatch.setattr(launch, "ensure_ray", lambda cfg: pytest.fail("Ray must not start"))


@pytest.mark.parametrize("extra,message", [
    (["precision.bf16_modules=['*.nope']"], "precision.bf16_modules: '*.nope' matches no linear layer"),
    (["model.d_ff=392"], "variant nvfp4: precision.format: layer layers.0.mlp.down has in_features=392, not a multiple"),
    (["precision.backend=triton"], "precision.backend: backend 'triton' cannot run on cpu"),
    (["precision.bf16_last_blocks=9"], "precision.bf16_last_blocks: 9 is more than the model's 4 transformer blocks"),
    (["debug.hooks=[{path: 'no_such_module:Hook'}]"], "debug.hooks[0]: no_such_module:Hook: ModuleNotFoundError"),
])
def test_policy_and_model_errors_before_ray(extra, message, tmp_path, capsys, no_ray):
    t0 = time.monotonic()
    rc = main([TINY, *sets(f"output_dir={tmp_path}", "tracking.enabled=false", *extra)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert time.monotonic() - t0 < 30  # no Ray start, no retries (97 s before)


def test_variant_policy_error_names_the_variant(tmp_path, capsys, no_ray):
    rc = main([TINY, *sets(f"output_dir={tmp_path}",
                           "variants=[{name: a}, {name: b, set: {precision.backend: cutlass}}]", "baseline=a"), "--check"])
    assert rc == 2
    assert "variant b: precision.backend: backend 'cutlass' cannot run on cpu" in capsys.readouterr().err


def test_bad_config_files(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    comment = tmp_path / "comment.yaml"
    comment.write_text("# nothing\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"model:\n  n_layers: \xff\xfe2\n")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    for path, message in [(empty, f"{empty}: the config file is empty"),
                          (comment, f"{comment}: the config file is empty"),
                          (tmp_path, f"{tmp_path}: is a directory, not a config file"),
                          (binary, f"{binary}: not a UTF-8 text file (byte 19 is 0xff)"),
                          (listy, f"{listy}: expected a mapping of config fields, got list")]:
        assert main([str(path), "--check"]) == 2, path
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_one_cli_subprocess_smoke(tmp_path):
    """The real entry point: exit code and one line on stderr (the other cases run in-process)."""
    r = subprocess.run([sys.executable, "-m", "rayfp4.run", TINY, "--set", "name=..", "--check"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {TINY}: name: '..' must not start with '.' (it names a folder under output_dir)"]


# -- manifests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("tokenizer", "../secret.json"), ("tokenizer", "/etc/passwd"),
                                         ("shard", "../../elsewhere.parquet")])
def test_manifest_cannot_name_files_outside_its_directory(small_shards, tmp_path, field, value):
    import shutil

    from rayfp4.data import open_shards
    from rayfp4.data.errors import DataError

    d = tmp_path / "shards"
    shutil.copytree(small_shards, d)
    m = json.loads((d / "manifest.json").read_text())
    if field == "tokenizer":
        m["tokenizer"]["file"] = value
        where = "tokenizer.file"
    else:
        m["splits"]["train"][0]["file"] = value
        where = "splits.train[0].file"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=re.escape(f"{where} {value!r} points outside the shard directory")):
        open_shards(d)


# -- the failure policy ----------------------------------------------------------------------------

def test_deterministic_worker_errors_are_not_retried():
    from ray.train import FailureConfig
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from rayfp4.data.errors import DataError
    from rayfp4.precision import PolicyError
    from rayfp4.train.errors import InjectedFailure, NonFiniteTrainingError, StorageError
    from rayfp4.train.trainer import NoRetryForFatalErrors

    def decide(*excs):
        policy = NoRetryForFatalErrors(FailureConfig(max_failures=2))
        err = WorkerGroupError("x", {i: UserExceptionWithTraceback(e, "tb") for i, e in enumerate(excs)})
        return policy.make_decision(err)

    for fatal in (NonFiniteTrainingError("nan"), PolicyError("p"), DataError("d"), StorageError("full")):
        assert decide(RuntimeError("other rank"), fatal) == FailureDecision.RAISE, fatal
    assert decide(InjectedFailure("x")) == FailureDecision.RETRY
    assert decide(RuntimeError("a crash")) == FailureDecision.RETRY


# -- checkpoints -------------------------------------------------------------------------------------

def _ckpt(run: Path, step: int, fp=None) -> Path:
    from rayfp4.train.checkpoint import save_state

    d = run / f"checkpoint_{step:08d}"
    d.mkdir(parents=True)
    save_state(d, {"step": step, "model": {"w": torch.full((4,), float(step))}}, fp or {"optim.lr": "0.1"})
    return d


def test_checkpoint_verification_and_fallback(tmp_path):
    from rayfp4.train.checkpoint import load_latest, load_state, read_info
    from rayfp4.train.errors import CheckpointError

    c4, c8, c12 = (_ckpt(tmp_path, s) for s in (4, 8, 12))
    assert read_info(c8)["fingerprint"] == {"optim.lr": "0.1"} and read_info(c8)["step"] == 8
    state, used = load_latest(c12)
    assert used == c12 and state["step"] == 12
    # damaged: one flipped byte, truncated, missing
    data = bytearray((c12 / "state.pt").read_bytes())
    data[len(data) // 2] ^= 1
    (c12 / "state.pt").write_bytes(bytes(data))
    (c8 / "state.pt").write_bytes((c8 / "state.pt").read_bytes()[:100])
    warnings = []
    state, used = load_latest(c12, warnings.append)
    assert used == c4 and state["step"] == 4 and torch.equal(state["model"]["w"], torch.full((4,), 4.0))
    assert "checkpoint_00000012 does not load" in warnings[0] and "SHA-256 does not match" in warnings[0]
    assert "checkpoint_00000008 does not load" in warnings[1] and "100 bytes, state.json says" in warnings[1]
    # Ray's latest is 8: a newer folder (12, never registered) is not a fallback
    with pytest.raises(CheckpointError, match="checkpoint_00000008/state.pt: 100 bytes"):
        load_state(c8)
    (c4 / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint of the run loads: .*checkpoint_00000012.*"
                                              "checkpoint_00000008.*checkpoint_00000004/state.pt: cannot load"):
        load_latest(c12)


def test_checkpoint_written_whole_or_not_at_all_on_a_full_disk(tmp_path, monkeypatch):
    import errno

    from rayfp4.train import checkpoint

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(OSError) as e:
        checkpoint.save_state(tmp_path, {"step": 1})
    assert e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # no partial state.pt, no temporary file


# -- MLflow orphans ------------------------------------------------------------------------------

def test_runs_whose_driver_died_are_marked_killed(tmp_path):
    from mlflow.tracking import MlflowClient

    from rayfp4.tracking import Tracker
    from rayfp4.tracking.tracker import PID_TAG

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    t = Tracker(uri)
    mine = t.start_run("alive")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = t.start_run("orphan")
    t.set_tag(orphan, PID_TAG, str(dead.pid))
    reused = t.start_run("reused-pid")  # this very pid, but "started" at another time: not ours
    t.set_tag(reused, "rayfp4.driver_started", "1")
    finished = t.start_run("finished")
    t.set_tag(finished, PID_TAG, str(dead.pid))
    t.end_run(finished, "FINISHED")
    other_host = t.start_run("elsewhere")
    t.set_tag(other_host, "rayfp4.driver_host", "another-machine")
    t.set_tag(other_host, PID_TAG, str(dead.pid))

    assert sorted(Tracker(uri).mark_orphans()) == ["orphan", "reused-pid"]
    c = MlflowClient(tracking_uri=uri)
    status = {n: c.get_run(r).info.status for n, r in
              [("alive", mine), ("orphan", orphan), ("reused-pid", reused), ("finished", finished),
               ("elsewhere", other_host)]}
    assert status == {"alive": "RUNNING", "orphan": "KILLED", "reused-pid": "KILLED", "finished": "FINISHED",
                      "elsewhere": "RUNNING"}
    assert f"driver pid {dead.pid}" in c.get_run(orphan).data.tags["rayfp4.orphaned"]
    t.reopen_run(orphan)  # resuming an orphan makes it this process's, RUNNING again
    assert c.get_run(orphan).info.status == "RUNNING"
    assert c.get_run(orphan).data.tags[PID_TAG] == str(os.getpid())


def test_workers_sharing_a_gpu_use_gloo():
    from rayfp4.config import ConfigError, load_config

    cfg = lambda *o: load_config(TINY, ["scaling.use_gpu=true", *o])  # noqa: E731
    assert cfg().dist_backend == "nccl"
    assert cfg("scaling.gpus_per_worker=0.5").dist_backend == "gloo"  # NCCL refuses two ranks on one GPU
    assert load_config(TINY).dist_backend == "gloo"
    with pytest.raises(ConfigError, match="NCCL refuses two ranks on one GPU"):
        cfg("scaling.gpus_per_worker=0.5", "scaling.dist_backend=nccl")
    with pytest.raises(ConfigError, match="dist_backend=nccl needs scaling.use_gpu=true"):
        load_config(TINY, ["scaling.dist_backend=nccl"])
