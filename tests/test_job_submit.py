"""``ray job submit`` against a head on 127.0.0.1, exactly as the README shows.

Starts its own head (``ray start --head --block`` in a new process group with its own temp dir,
the venv's python first on PATH so the job's entrypoint finds the installed packages), submits
``python -m rayfp4.run configs/tiny.yaml`` from the repository as the working dir, and stops
only that head afterwards (never ``ray stop``, which would also kill the test session's Ray).
"""

from __future__ import annotations

import os
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
from conftest import mlflow_uri

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_head(tmp: Path, env: dict, attempt: int) -> tuple[subprocess.Popen, str, Path]:
    gcs, dash, agent, agent_grpc, env_agent, metrics, client = (_free_port() for _ in range(7))
    log = tmp / f"head{attempt}.log"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=2", "--disable-usage-stats",
         # Its own agent/metrics ports: the test session's Ray (ray_session) may hold the defaults,
         # and a head whose dashboard agent cannot bind answers "No available agent" forever.
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
         f"--ray-client-server-port={client}",
         f"--temp-dir={tmp}"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    return head, f"http://127.0.0.1:{dash}", log


def _stop_head(head: subprocess.Popen) -> None:
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=20)
    except ProcessLookupError:  # it had already exited (and its group with it)
        pass
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()


@pytest.fixture
def ray_head():
    """A head of its own; started again (fresh ports) when it exits while starting: the ports were
    free when picked, but another process (the session's Ray workers) may take one before the head
    binds it. Its output is in the failure message when it never comes up."""
    tmp = Path(tempfile.mkdtemp(prefix="rayfp4-head-"))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    head = None
    try:
        for attempt in range(3):
            head, address, log = _start_head(tmp, env, attempt)
            deadline = time.monotonic() + 120
            while head.poll() is None:
                try:
                    urllib.request.urlopen(f"{address}/api/version", timeout=2)
                    break
                except urllib.error.HTTPError:
                    break  # the dashboard answers (it may ask for the auth token): it is up
                except Exception:
                    if time.monotonic() > deadline:
                        pytest.fail(f"the Ray head did not come up in 120 s:\n{log.read_text()[-3000:]}")
                    time.sleep(1)
            if head.poll() is None:
                break
            _stop_head(head)
            subprocess.run(["pkill", "-KILL", "-f", str(tmp)], check=False)
        else:
            pytest.fail(f"the Ray head exited while starting, 3 times; the last one said:\n{log.read_text()[-3000:]}")
        # The HTTP server answers before the job manager is ready: wait until listing jobs works.
        env = {**env, "RAY_AUTH_MODE": "token"}  # `ray start` wrote ~/.ray/auth_token (Ray 2.60)
        while subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                             capture_output=True, timeout=60).returncode != 0:
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray head's job manager did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield address, env
    finally:
        if head is not None:
            _stop_head(head)
        subprocess.run(["pkill", "-KILL", "-f", str(tmp)], check=False)


def submit(cmd, env, attempts: int = 10):
    """``ray job submit``, retried while the head's job agent is still starting (it answers
    "No available agent to submit job" for a while after the dashboard is up)."""
    for _ in range(attempts):
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr:
            return r
        time.sleep(5)
    return r


@pytest.mark.slow
# CI submits both jobs through tests/test_multinode.py's two-node cluster; this head of its own
# (a second Ray instance, ~110 s) is the full suite's.
@pytest.mark.extended
def test_ray_job_submit_runs_the_default_config(ray_head, tmp_path):
    address, env = ray_head
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "-m", "rayfp4.run", "configs/tiny.yaml",
           "--set", "train.steps=4", "--set", "variants=[]", "--set", "model.n_layers=2",
           "--set", "train.val_every=2", "--set", f"output_dir={tmp_path / 'runs'}",
           "--set", f"tracking.uri={mlflow_uri(tmp_path)}", "--set", "name=submitted"]
    r = submit(cmd, env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "succeeded" in out and "submitted: done" in out and "step 4/4" in out
    assert (tmp_path / "runs" / "submitted" / "train" / "checkpoint_00000004" / "state.pt").is_file()

    # The tokenizing pipeline is a job entrypoint too.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "to be or not to be " * 40)
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "-m", "pipelines.tokenize", str(corpus), "--out", str(tmp_path / "shards"),
           "--tokenizer", "byte", "--seq-len", "32", "--val-fraction", "0.1"]
    r = submit(cmd, env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    from rayfp4.data import open_shards

    shards = open_shards(tmp_path / "shards")
    assert shards.num_sequences("train") > 0 and shards.num_sequences("val") > 0
