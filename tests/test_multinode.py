"""Several nodes: checkpoint storage outside the run directory, elastic worker counts, and a real
two-node Ray cluster on this machine that loses a node mid-run and gets it back.

The cluster test starts its own head and a second node (``ray start --block``, each in its own
process group with its own temp dir, ports and a custom resource that allows one training worker
per node), submits the default job with ``ray job submit`` and kills only the second node's
processes (never ``ray stop``, which would also stop the test session's Ray and other people's).
The two nodes listen on 127.0.0.2 and 127.0.0.3: Ray treats 127.0.0.1 as "this machine" and
rewrites it to the external address when nodes join (and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
which keeps a single node on 127.0.0.1, refuses a second node altogether).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rayfp4.config import ConfigError, load_config
from rayfp4.run import main
from rayfp4.train.storage import SNAPSHOT, CheckpointStorage, join, open_checkpoint
from conftest import mlflow_uri

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
BIN = Path(sys.executable).parent


# -- config --------------------------------------------------------------------------------------

def _error(*sets: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(TINY, list(sets))
    return str(e.value)


def test_num_workers_is_a_count_or_an_elastic_range():
    cfg = load_config(TINY, ["scaling.num_workers=[1, 2]"])
    assert cfg.scaling.num_workers == (1, 2) and cfg.scaling.elastic and list(cfg.scaling.world_sizes()) == [1, 2]
    assert cfg.model_dump(mode="json")["scaling"]["num_workers"] == [1, 2]  # written to config.yaml as a list
    assert cfg.grad_accum_for(1) == 1 and cfg.grad_accum_for(2) == 1
    assert not load_config(TINY, ["scaling.num_workers=[2, 2]"]).scaling.elastic
    assert "[min, max] = [2, 1]: min is larger than max" in _error("scaling.num_workers=[2, 1]")
    assert "expected a number of workers or [min, max], got [1, 2, 4]" in _error("scaling.num_workers=[1, 2, 4]")
    assert "a run needs at least 1 worker" in _error("scaling.num_workers=[0, 2]")
    # every count in the range must split the global batch (16) evenly
    assert ("data.global_batch_size=16 is not divisible by scaling.num_workers=3 (scaling.num_workers=[2, 4] "
            "may run with any number in between)") in _error("scaling.num_workers=[2, 4]")
    load_config(TINY, ["scaling.num_workers=1", "data.micro_batch_size=16"])
    assert "data.micro_batch_size=16 does not divide each worker's share of the batch (8)" in _error(
        "scaling.num_workers=[1, 2]", "data.micro_batch_size=16")


def test_workers_that_reserve_every_cpu_get_a_warning_naming_the_field():
    # Ray Data's read tasks need CPUs too: a group that reserves all of them never gets a batch.
    from rayfp4.train.launch import data_starved_by

    two = load_config(TINY, ["scaling.num_workers=2", "scaling.cpus_per_worker=1"]).scaling
    assert "reserve 2 of the cluster's 2 CPUs (scaling.cpus_per_worker=1)" in data_starved_by(two, 2.0)
    assert data_starved_by(two, 4.0) is None
    half = load_config(TINY, ["scaling.num_workers=2", "scaling.cpus_per_worker=0.5"]).scaling
    assert data_starved_by(half, 2.0) is None
    elastic = load_config(TINY, ["scaling.num_workers=[1, 2]", "scaling.cpus_per_worker=1"]).scaling
    assert data_starved_by(elastic, 2.0) is not None  # it grows to 2 workers when they fit


def test_custom_resources_per_worker():
    cfg = load_config(TINY, ["scaling.resources_per_worker={trainer_slot: 1}"])
    assert cfg.scaling.resources_per_worker == {"trainer_slot": 1.0}
    assert "CPU has its own setting, scaling.cpus_per_worker" in _error("scaling.resources_per_worker={CPU: 1}")
    assert "Input should be greater than 0" in _error("scaling.resources_per_worker={slot: 0}")


@pytest.mark.parametrize("value,message", [
    ("''", "must not be empty"),
    ("s3:/bucket/x", "'s3:/bucket/x' looks like a URI but lacks '//'"),
    ("file://relative/x", "a file URI needs an absolute path, file:///..."),
])
def test_checkpoint_storage_must_be_a_path_or_a_uri(value, message):
    assert message in _error(f"checkpoint.storage={value}")


def test_checkpoint_storage_location_per_run(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "exp" / "nvfp4"
    default = CheckpointStorage.for_run(None, run_dir)  # today's layout: the run directory itself
    assert (default.storage_path, default.name, default.location) == (str(run_dir.parent), "nvfp4", str(run_dir))
    monkeypatch.chdir(tmp_path)
    rel = CheckpointStorage.for_run("ckpts", run_dir)  # made absolute on the driver
    assert (rel.storage_path, rel.name) == (str(tmp_path / "ckpts" / "exp"), "nvfp4")
    s3 = CheckpointStorage.for_run("s3://bucket/prefix/?region=eu-west-1", run_dir)  # passed through
    assert (s3.storage_path, s3.location) == ("s3://bucket/prefix/exp?region=eu-west-1",
                                              "s3://bucket/prefix/exp/nvfp4?region=eu-west-1")
    assert join("file:///a/b", "c") == "file:///a/b/c"
    assert CheckpointStorage.from_dict(s3.to_dict()) == s3


def test_bad_checkpoint_storage_is_one_line_before_ray(tmp_path, capsys, monkeypatch):
    import rayfp4.train.launch as launch

    monkeypatch.setattr(launch, "ensure_ray", lambda cfg: pytest.fail("Ray must not start"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for storage, message in [("nosuch://bucket/x", "checkpoint.storage: cannot open 'nosuch://bucket/x'"),
                             (str(a_file), f"checkpoint.storage: {a_file} exists and is not a directory"),
                             (f"file://{a_file}", f"checkpoint.storage: {a_file} exists and is not a directory")]:
        rc = main([TINY, "--set", f"checkpoint.storage={storage}", "--set", f"output_dir={tmp_path / 'runs'}",
                   "--set", "tracking.enabled=false", "--check"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


# -- reading checkpoints back from storage -----------------------------------------------------------

def _checkpoint(directory: Path, step: int) -> Path:
    import torch

    from rayfp4.train.checkpoint import save_state

    directory.mkdir(parents=True)
    save_state(directory, {"step": step, "weights": torch.full((4,), float(step))}, {"model.d_model": "128"})
    return directory


def test_checkpoints_on_a_remote_filesystem_are_listed_downloaded_and_fall_back(tmp_path):
    """A filesystem that is not the local one (a pyarrow SubTreeFileSystem stands in for S3): the
    newest checkpoint is damaged, so the older one is downloaded into the scratch folder, loaded,
    and removed afterwards."""
    import pyarrow.fs

    remote = tmp_path / "bucket"
    root = remote / "prefix" / "exp" / "train"
    older = _checkpoint(root / "checkpoint_00000004", 4)
    (older / "shards").mkdir()  # a sharded (FSDP2) checkpoint has a subfolder
    (older / "shards" / "part").write_text("x")
    newest = _checkpoint(root / "checkpoint_00000008", 8)
    (newest / "state.pt").write_bytes(b"not a checkpoint")
    (root / SNAPSHOT).write_text("{}")
    storage = CheckpointStorage("prefix/exp", "train", pyarrow.fs.SubTreeFileSystem(str(remote), pyarrow.fs.LocalFileSystem()))
    assert not storage.is_local and storage.exists(SNAPSHOT) and not storage.exists("nothing")
    assert storage.checkpoints() == ["checkpoint_00000004", "checkpoint_00000008"]
    scratch = tmp_path / "run" / ".staging" / "restore-rank00000"
    warnings = []
    with open_checkpoint(storage, "checkpoint_00000008", scratch, warnings.append) as (state, used):
        assert state["step"] == 4 and used == scratch / "checkpoint_00000004" and (used / "state.pt").is_file()
        assert (used / "shards" / "part").read_text() == "x"
    assert not any(scratch.iterdir())  # the downloads are gone
    assert len(warnings) == 1 and warnings[0].startswith("checkpoint checkpoint_00000008 does not load: ")
    # Locally nothing is copied: the checkpoint folder itself is read.
    local = CheckpointStorage(str(remote / "prefix" / "exp"), "train")
    assert local.is_local
    with local.local_dir("checkpoint_00000004", scratch) as d:
        assert d == root / "checkpoint_00000004"
    assert CheckpointStorage(str(tmp_path / "nothing-here"), "train").checkpoints() == []


def test_a_run_continues_only_with_its_checkpoint_storage(tmp_path):
    import yaml

    from rayfp4.train.launch import FINGERPRINT, _check_resume

    cfg = load_config(TINY, ["variants=[]", f"checkpoint.storage={tmp_path / 'store'}", "name=r"])
    run_dir = tmp_path / "runs" / "r" / "train"
    fp = cfg.fingerprint("data")
    assert _check_resume(cfg, run_dir, fp) == (False, [])
    # Ray Train's record lies in the storage, not in the run directory
    (tmp_path / "store" / "r" / "train").mkdir(parents=True)
    (tmp_path / "store" / "r" / "train" / SNAPSHOT).write_text("{}")
    with pytest.raises(ConfigError, match="holds checkpoints but no record of the settings"):
        _check_resume(cfg, run_dir, fp)
    run_dir.mkdir(parents=True)
    (run_dir / FINGERPRINT).write_text(json.dumps({"fingerprint": fp}))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert _check_resume(cfg, run_dir, fp) == (True, [])
    moved = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"storage": None})})
    with pytest.raises(ConfigError, match=rf"checkpoint.storage: run {run_dir} keeps its checkpoints in "
                                          rf"'{tmp_path / 'store'}', not the run directory \(unset\)"):
        _check_resume(moved, run_dir, fp)


# -- a two-node cluster ------------------------------------------------------------------------------

HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"
SLOT = "rayfp4_test_slot"  # one per node: at most one training worker on each


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RayNode:
    """One ``ray start --block`` in a process group of its own, with its own temp dir and ports."""

    def __init__(self, name: str, root: Path):
        self.name, self.root = name, root
        self.proc: subprocess.Popen | None = None
        self.log, self.temp = root / f"{name}.log", root / name
        self.dashboard = None

    def start(self, head_address: str | None, num_cpus: int) -> None:
        ports = {k: _free_port() for k in ("agent", "agent_grpc", "env_agent", "metrics")}
        ip = HEAD_IP if head_address is None else NODE_IP
        cmd = [str(BIN / "ray"), "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={num_cpus}",
               f"--resources={json.dumps({SLOT: 1})}", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={ports['agent']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
               f"--runtime-env-agent-port={ports['env_agent']}", f"--metrics-export-port={ports['metrics']}",
               f"--temp-dir={self.temp}"]
        if head_address is None:
            self.gcs, dash = _free_port(), _free_port()
            cmd += ["--head", f"--port={self.gcs}", f"--dashboard-port={dash}", f"--dashboard-host={HEAD_IP}",
                    f"--ray-client-server-port={_free_port()}"]
            self.dashboard = f"http://{HEAD_IP}:{dash}"
        else:
            cmd += [f"--address={head_address}"]
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # "0" refuses a second node
               "RAY_AUTH_MODE": "token",  # `ray start --head` wrote ~/.ray/auth_token; the node needs it
               "GLOO_SOCKET_IFNAME": "lo",  # the README's advice for nodes whose shared interface is not the default
               "RAY_health_check_period_ms": "1000",  # the head notices a dead node in seconds, not ~30 s
               # A group sized from a view that still had the lost node waits this long for its
               # placement before Ray Train sizes it again (README, "Known delays"); Ray's default is 60.
               "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
               "RAYFP4_TEST_NODE": self.name}  # fault_hooks.PauseOnceOnNode picks a rank by it
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log.open("a"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_started(self, timeout: float = 180) -> bool:
        """True once the node says it started; False if it exited first (a port taken meanwhile)."""
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                pytest.fail(f"Ray node {self.name} did not start in {timeout} s:\n{self.tail()}")
            time.sleep(1)
        return True

    def kill(self) -> None:
        """SIGKILL to the node's whole process group (raylet, agents, its workers): a crash."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        subprocess.run(["pkill", "-KILL", "-f", str(self.temp)], check=False)  # anything that left the group

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else "(no log)"


def _start(node: RayNode, head_address: str | None, num_cpus: int) -> None:
    for _ in range(3):  # ports were free when picked; another process may take one before Ray binds it
        node.start(head_address, num_cpus)
        if node.wait_started():
            return
        node.kill()
    pytest.fail(f"Ray node {node.name} exited while starting, 3 times:\n{node.tail()}")


@pytest.fixture
def two_nodes(tmp_path):
    try:
        with socket.socket() as s:
            s.bind((NODE_IP, 0))
    except OSError:
        pytest.skip(f"{NODE_IP} is not a loopback address here")
    root = Path(tempfile.mkdtemp(prefix="rayfp4-2node-"))  # short: Ray's socket paths live under it
    nodes = {"head": RayNode("head", root)}
    try:
        _start(nodes["head"], None, num_cpus=2)
        head = nodes["head"]
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        env.pop("RAY_ADDRESS", None)
        deadline = time.monotonic() + 120
        while True:  # the job manager answers a while after the node says it started
            try:
                urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=5)
                break
            except urllib.error.HTTPError:
                break
            except Exception:
                if time.monotonic() > deadline:
                    pytest.fail(f"the head's dashboard did not answer:\n{head.tail()}")
                time.sleep(1)
        nodes["b"] = RayNode("b", root)
        _start(nodes["b"], f"{HEAD_IP}:{head.gcs}", num_cpus=1)
        yield nodes, env
    finally:
        for node in reversed(list(nodes.values())):
            node.kill()
        subprocess.run(["pkill", "-KILL", "-f", str(root)], check=False)
        # Kept for a post-mortem: the nodes' output and Ray Train's controller log (its decisions).
        for f in [*root.glob("*.log"), *root.glob("head/session_*/logs/train/*controller*.log")]:
            shutil.copy(f, tmp_path / f"ray-{f.name}")
        shutil.rmtree(root, ignore_errors=True)


def _wait_for(path: Path, job: subprocess.Popen, failure, timeout: float = 360) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if job.poll() is not None:
            pytest.fail(failure(f"the job ended ({job.returncode}) before {path.name} appeared"))
        if time.monotonic() > deadline:
            pytest.fail(failure(f"{path.name} did not appear in {timeout} s"))
        time.sleep(0.5)


@pytest.mark.slow
def test_two_node_job_loses_a_node_continues_on_fewer_workers_and_grows_back(two_nodes, tmp_path):
    """``scaling.num_workers: [1, 2]``, one worker per node. At step 3 the second node is killed:
    the run continues from the step-2 checkpoint on one worker; at step 6 the node is started again
    and Ray Train grows the group back to two from the step-6 checkpoint. The sequences seen are
    exactly those of an uninterrupted run (fixed global batch); the checkpoints are in
    ``checkpoint.storage`` (a file:// URI), not in the run directory."""
    from fault_hooks import marker
    from mlflow.tracking import MlflowClient

    from rayfp4.data import open_shards, read_ledger
    from rayfp4.data.corpus import shakespeare_shards
    from rayfp4.data.order import global_step_ids
    from rayfp4.tracking import read_metrics

    nodes, env = two_nodes
    head, second = nodes["head"], nodes["b"]
    run = tmp_path / "runs" / "two" / "train"
    storage = tmp_path / "storage"
    hooks = ("debug.hooks=[{path: 'fault_hooks:PauseOnceOnNode', args: {where: step, step: 3, node: head}}, "
             "{path: 'fault_hooks:PauseOnce', args: {where: step, step: 6, rank: 0}}]")
    sets = ["variants=[]", "model.n_layers=2", "precision.format=bf16", "precision.bf16_last_blocks=0",
            "train.steps=8", "checkpoint.every=2", "train.log_every=1", "train.val_every=4", "data.val_sequences=16",
            "scaling.num_workers=[1, 2]", "scaling.cpus_per_worker=0.25", f"scaling.resources_per_worker={{{SLOT}: 1}}",
            "scaling.rendezvous=node", "scaling.elastic_resize_interval_s=5", f"checkpoint.storage=file://{storage}",
            f"output_dir={tmp_path / 'runs'}", f"tracking.uri={mlflow_uri(tmp_path)}", "name=two", hooks]
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", ".", "--",
           "python", "-m", "rayfp4.run", "configs/tiny.yaml"]
    for s in sets:
        cmd += ["--set", s]
    out = tmp_path / "job.out"

    def failure(what: str) -> str:
        return f"{what}; the job said:\n{out.read_text()[-4000:]}\n--- the head said:\n{head.tail(2000)}"

    job = None
    try:
        for _ in range(10):  # "No available agent to submit job" for a while after the head started
            job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out.open("w"), stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 180
            while job.poll() is None and "submitted successfully" not in out.read_text():
                if time.monotonic() > deadline:
                    pytest.fail(failure("ray job submit did not submit in 180 s"))
                time.sleep(1)
            if job.poll() is None or "No available agent" not in out.read_text():
                break
            time.sleep(5)
        # Step 3 on two nodes: the rank on the head waits there, the other one inside the step.
        _wait_for(marker(run, "step", 3), job, failure)
        second.kill()
        # Ray notices the lost node, and the group continues from the step-2 checkpoint on one worker.
        _wait_for(marker(run, "step", 6), job, failure)
        second.log, second.temp = second.root / "b-again.log", second.root / "b-again"  # a fresh node
        _start(second, f"{HEAD_IP}:{head.gcs}", num_cpus=1)
        try:
            rc = job.wait(timeout=420)
        except subprocess.TimeoutExpired:
            pytest.fail(failure("the job did not finish in 420 s after the node came back"))
    finally:
        if job is not None and job.poll() is None:
            job.kill()
            job.wait()
    text = out.read_text()
    assert rc == 0 and "succeeded" in text, failure(f"ray job submit exited {rc}")
    assert "two: done" in text and "step 8/8" in text, failure("the run did not finish")

    # Where the workers ran: both nodes, then the head alone from step 2, then both again from step 6.
    attempts = [json.loads(line) for line in (run / "workers.jsonl").read_text().splitlines()]
    assert [(a["start_step"], a["world_size"], a["nodes"]) for a in attempts] == [(0, 2, 2), (2, 1, 1), (6, 2, 2)], attempts
    first_ips = {w["node_ip"] for w in attempts[0]["workers"]}
    assert first_ips == {HEAD_IP, NODE_IP} and attempts[1]["workers"][0]["node_ip"] == HEAD_IP
    nodes_of = [{w["node_id"] for w in a["workers"]} for a in attempts]
    assert len(nodes_of[2] - nodes_of[0]) == 1  # the second node came back as a new Ray node
    assert "2 worker(s) on 2 node(s) from step 0" in text and "1 worker(s) on 1 node(s) from step 2" in text \
        and "2 worker(s) on 2 node(s) from step 6" in text, failure("the driver did not print where the workers ran")

    # The checkpoints are in checkpoint.storage (<storage>/<name>/<variant>), none in the run directory.
    ckpts = storage / "two" / "train"
    # checkpoint.keep=2: the newest two are 6 and 8. Once in a CI rehearsal (2026-12-03) the step-2
    # checkpoint, written by both nodes just before one was killed, was also still there while
    # step 4's had been removed: Ray Train's retention across the node loss, not yet explained;
    # tolerated (an extra old checkpoint), every newer one must be exactly these two.
    kept = sorted(p.name for p in ckpts.glob("checkpoint_*") if p.is_dir())
    assert kept[-2:] == ["checkpoint_00000006", "checkpoint_00000008"] and kept[:-2] in ([], ["checkpoint_00000002"]), kept
    assert (ckpts / SNAPSHOT).is_file() and json.loads((ckpts / "checkpoint_00000008" / "state.json").read_text())["step"] == 8
    assert not list(run.glob("checkpoint_*")) and not (run / ".staging").exists()

    # The sequences seen, step by step, are those of an uninterrupted run: with a fixed global batch
    # they do not depend on the number of workers (rayfp4.data.order), and each attempt took over
    # at the step after its checkpoint.
    ledger = run / "ledger"
    assert sorted(p.name for p in ledger.iterdir()) == [
        "attempt-from-000000000-world-2", "attempt-from-000000002-world-1", "attempt-from-000000006-world-2"]
    shards = open_shards(shakespeare_shards("bpe:4096", 128), verify_checksums=False)
    n, chunk = shards.num_sequences("train"), shards.rows_per_group
    uninterrupted = [(g, [int(i) for i in global_step_ids(n, chunk, 0, 16, g)]) for g in range(8)]
    assert read_ledger(ledger).ordered() == uninterrupted

    metrics = read_metrics(run / "metrics.jsonl")
    assert list(metrics) == list(range(1, 9))
    losses = [metrics[s]["train_loss"] for s in metrics]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses  # warmup: the loss falls every step
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    runs = client.search_runs([client.get_experiment_by_name("rayfp4").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]  # one MLflow run, resumed across the restarts

    # The tokenizing pipeline is a job entrypoint too (CI's check of it; tests/test_job_submit.py,
    # in the full suite, submits both to a head of its own).
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "to be or not to be " * 40)
    r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", ".", "--",
                        "python", "-m", "pipelines.tokenize", str(corpus), "--out", str(tmp_path / "shards"),
                        "--tokenizer", "byte", "--seq-len", "32", "--val-fraction", "0.1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    tokenized = open_shards(tmp_path / "shards")
    assert tokenized.num_sequences("train") > 0 and tokenized.num_sequences("val") > 0
