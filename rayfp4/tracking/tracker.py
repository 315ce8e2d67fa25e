"""A fail-safe MLflow client: tracking problems are reported once and never stop a run."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("rayfp4.tracking")

# A tracking server that is down must not stall training in HTTP retries (mlflow's default is
# several retries with exponential backoff, minutes in total).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def resolve_tracking_uri(uri: str, base: Path | None = None) -> str:
    """Make a relative SQLite/file URI absolute, so Ray workers (other cwd) write the same store."""
    base = base or Path.cwd()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((base / uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:
        return str((base / uri).resolve())
    return uri


def _reachable(uri: str, timeout: float = 3.0) -> str | None:
    """None when an http(s) server answers a TCP connect (other schemes: None), else why not."""
    u = urlparse(uri)
    if u.scheme not in ("http", "https"):
        return None
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname, port), timeout=timeout):
            return None
    except OSError as e:
        return f"cannot connect to {u.hostname}:{port} ({e.strerror or e})"


HOST_TAG, PID_TAG, PID_START_TAG = "rayfp4.driver_host", "rayfp4.driver_pid", "rayfp4.driver_started"


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (Linux): [0] state, [19] start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def owner_tags() -> dict[str, str]:
    """Which driver process owns a run: so a later start can tell a run whose driver died. The
    kernel's start time of the process tells a reused pid from the original."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    stat = _proc_stat(os.getpid())
    if stat is not None:
        tags[PID_START_TAG] = stat[19]
    return tags


def process_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    stat = _proc_stat(pid)
    if stat is None:
        return True
    return stat[0] != "Z" and (started is None or stat[19] == started)


class Tracker:
    def __init__(self, uri: str, experiment: str = "rayfp4", enabled: bool = True, quiet: bool = False):
        self.uri = uri
        self.experiment = experiment
        self.enabled = enabled
        self.quiet = quiet
        self._client = None
        self._experiment_id = None
        if enabled:
            why = _reachable(uri)
            if why:
                self._disable(why)

    def _disable(self, why: str) -> None:
        if self.enabled and not self.quiet:
            print(f"[rayfp4] MLflow tracking at {self.uri} is unavailable: {why}. "
                  f"Training continues without tracking.", file=sys.stderr, flush=True)
        self.enabled = False

    def _call(self, what: str, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            if self._client is None:
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(tracking_uri=self.uri)
            return fn(self._client, *args, **kwargs)
        except Exception as e:  # tracking must never take training down
            self._disable(f"{what} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None

    def experiment_id(self) -> str | None:
        if self._experiment_id is None:
            def get(c):
                exp = c.get_experiment_by_name(self.experiment)
                return exp.experiment_id if exp is not None else c.create_experiment(self.experiment)
            self._experiment_id = self._call("creating the experiment", get)
        return self._experiment_id

    def start_run(self, name: str, parent_run_id: str | None = None, tags: dict | None = None) -> str | None:
        exp = self.experiment_id()
        if exp is None:
            return None
        t = {**(tags or {}), **owner_tags()}
        if parent_run_id:
            t["mlflow.parentRunId"] = parent_run_id
        run = self._call("starting a run", lambda c: c.create_run(exp, run_name=name, tags=t))
        return run.info.run_id if run is not None else None

    def log_params(self, run_id: str | None, params: dict) -> None:
        if run_id is None:
            return
        from mlflow.entities import Param

        # MLflow params cannot change once logged; a resumed run (perhaps on other hardware or
        # another backend) keeps the values of its first attempt instead of failing the call.
        run = self._call("reading params", lambda c: c.get_run(run_id))
        logged = run.data.params if run is not None else {}
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged]
        for i in range(0, len(items), 100):
            self._call("logging params", lambda c, b=items[i:i + 100]: c.log_batch(run_id, params=b))

    def log_metrics(self, run_id: str | None, metrics: dict, step: int) -> None:
        if run_id is None or not metrics:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and v == v]  # drop None and NaN
        self._call("logging metrics", lambda c: c.log_batch(run_id, metrics=items))

    def log_artifact(self, run_id: str | None, path: str | Path, artifact_path: str | None = None) -> None:
        if run_id is not None:
            self._call("logging an artifact", lambda c: c.log_artifact(run_id, str(path), artifact_path))

    def set_tag(self, run_id: str | None, key: str, value: str) -> None:
        if run_id is not None:
            self._call("setting a tag", lambda c: c.set_tag(run_id, key, value))

    def set_tags(self, run_id: str | None, tags: dict[str, str]) -> None:
        if run_id is not None and tags:
            from mlflow.entities import RunTag

            items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
            self._call("setting tags", lambda c: c.log_batch(run_id, tags=items))

    def set_note(self, run_id: str | None, markdown: str) -> None:
        """The run's description in the UI (its overview page renders it as Markdown)."""
        self.set_tag(run_id, "mlflow.note.content", markdown)

    def log_table(self, run_id: str | None, columns: dict[str, list], artifact_file: str) -> None:
        """A table artifact (``artifact_file`` ending in .json) the UI shows as a table."""
        if run_id is not None:
            self._call("logging a table", lambda c: c.log_table(run_id, data=columns, artifact_file=artifact_file))

    def log_dataset(self, run_id: str | None, name: str, digest: str, source: str, profile: dict,
                    context: str = "training") -> None:
        """A run input (the UI's "Datasets used"): what was read, its digest, and counts in ``profile``."""
        if run_id is None:
            return
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}),
                     profile=json.dumps(profile))
        inp = DatasetInput(ds, [InputTag("mlflow.data.context", context)])
        self._call("logging the dataset", lambda c: c.log_inputs(run_id, datasets=[inp]))

    def log_model(self, run_id: str | None, name: str, local_dir: str | Path, step: int,
                  params: dict[str, str], model_type: str) -> str | None:
        """An MLflow logged model of ``run_id`` (the UI's "Logged models") whose artifacts are the files
        of ``local_dir``, recorded as the run's output at ``step``; its model id."""
        exp = self.experiment_id()
        if run_id is None or exp is None:
            return None

        def log(c):
            from mlflow.entities import LoggedModelOutput, LoggedModelStatus

            model = c.create_logged_model(exp, name=name, source_run_id=run_id, params=params,
                                          model_type=model_type)
            try:
                c.log_model_artifacts(model.model_id, str(local_dir))
            except Exception:
                c.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
                raise
            c.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
            c.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
            return model.model_id
        return self._call("logging the model", log)

    def system_metrics(self, run_id: str | None, every_s: float) -> "SystemMetrics | None":
        """Start sampling this machine's CPU, memory, disk, network and (with ``nvidia-ml-py``) GPUs
        into ``run_id``'s ``system/...`` metrics every ``every_s`` seconds; stop() it when done.
        None, with a reason in :attr:`system_metrics_off`, when it cannot run."""
        self.system_metrics_off = None
        if run_id is None or not self.enabled or every_s <= 0:
            return None
        try:  # mlflow's CPU sampler imports psutil at import time
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as e:
            self.system_metrics_off = f"system metrics are off: {e.name or e} is not installed (pip install psutil)"
            return None
        try:
            # resume_logging: a resumed run continues the system/ steps where they stopped
            monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, resume_logging=True,
                                           tracking_uri=self.uri)
            monitor.start()
        except Exception as e:
            self.system_metrics_off = f"system metrics are off: {type(e).__name__}: {e}"
            return None
        return SystemMetrics(monitor)

    def end_run(self, run_id: str | None, status: str) -> None:
        """status: FINISHED, FAILED or KILLED."""
        if run_id is not None:
            self._call("ending the run", lambda c: c.set_terminated(run_id, status))

    def reopen_run(self, run_id: str | None) -> None:
        """A resumed run is RUNNING again, owned by this process."""
        if run_id is None:
            return
        def reopen(c):
            c.update_run(run_id, status="RUNNING")
            for k, v in {**owner_tags(), "rayfp4.resumed": "true"}.items():
                c.set_tag(run_id, k, v)
        self._call("reopening a run", reopen)

    def mark_orphans(self) -> list[str]:
        """End as KILLED every RUNNING run of this store started by a driver on this host that no
        longer runs (killed with SIGKILL, or its machine rebooted); returns their names."""
        def sweep(c):
            host, found = socket.gethostname(), []
            for exp in c.search_experiments():
                runs = c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
                for run in runs:
                    tags = run.data.tags
                    if tags.get(HOST_TAG) != host or HOST_TAG not in tags or not tags.get(PID_TAG, "").isdigit():
                        continue
                    if process_alive(int(tags[PID_TAG]), tags.get(PID_START_TAG)):
                        continue
                    c.set_terminated(run.info.run_id, "KILLED")
                    c.set_tag(run.info.run_id, "rayfp4.orphaned",
                              f"marked KILLED by a later start: driver pid {tags[PID_TAG]} on {host} had gone")
                    found.append(run.info.run_name)
            return found
        return self._call("marking orphaned runs", sweep) or []


class SystemMetrics:
    """A running MLflow system-metrics sampler (a daemon thread), stopped and joined by :meth:`stop`."""

    def __init__(self, monitor):
        self.monitor = monitor

    def stop(self) -> None:
        try:
            self.monitor.finish()  # sets its stop event, joins the thread, flushes what it sampled
        except Exception as e:  # tracking must never take training down
            log.warning("stopping system metrics: %s: %s", type(e).__name__, e)
