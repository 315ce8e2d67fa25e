"""Our Ray ``TorchTrainer``: a rendezvous that stays on loopback, no retries that cannot help,
elastic groups sized from the cluster as it is, and signals that end a run as KILLED.

Four things Ray Train 2.60 does by default that a training framework should not:

- **The rendezvous listens on every interface.** Ray's process-group setup lets rank 0's
  ``torch.distributed`` TCPStore bind ``*:port``, unauthenticated, even when Ray itself is bound to
  127.0.0.1. :class:`RendezvousConfig` replaces that setup: rank 0 binds the listening socket itself
  and hands it to ``TCPStore`` (``master_listen_fd``). When every worker runs on one node, the socket
  and the gloo/NCCL transports use 127.0.0.1; on several nodes they use rank 0's node address (never
  the wildcard), which the other nodes must be able to reach.
- **Every worker error is retried** from the last checkpoint ``max_failures`` times, including
  errors that will happen again (a policy that does not fit the model, a diverged run, a full
  disk). :class:`NoRetryForFatalErrors` raises at once for exceptions that carry
  ``retry_cannot_help = True`` (see :mod:`rayfp4.train.errors`).
- **An elastic group that lost a node may ask for its old size again** (from a cluster view up to
  20 s old) and wait a minute for a placement that cannot happen; :class:`FreshElasticScalingPolicy`
  sizes it from the cluster as Ray knows it now.
- **Ctrl-C is Ray's**: its SIGINT handler aborts the controller at once, losing the steps since the
  last checkpoint, and the process exits 1. Here SIGINT and SIGTERM first ask the workers to save a
  checkpoint of their current step and return (:mod:`rayfp4.train.stop`, within ``stop_grace_s``;
  a second signal, or the end of the grace period, aborts the controller as Ray does), and ``fit``
  raises :class:`Interrupted`, so the driver marks its MLflow runs KILLED and exits 130 (SIGINT) or
  143 (SIGTERM).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import ray
from ray.train.torch import TorchConfig, TorchTrainer

from .stop import request_stop

try:  # Ray Train V2 (the default in Ray 2.60) internals we extend; kept in one place.
    from ray.train.torch.config import _TorchBackend, _set_torch_distributed_env_vars
    from ray.train.v2._internal.execution.failure_handling import FailurePolicy
    from ray.train.v2._internal.execution.failure_handling.default import DefaultFailurePolicy
    from ray.train.v2._internal.execution.scaling_policy import AUTOSCALING_REQUESTS_GET_TIMEOUT_S, ElasticScalingPolicy
    from ray.train.v2.api.exceptions import WorkerGroupError
except ImportError as e:  # pragma: no cover - another Ray version
    raise ImportError(f"rayfp4 needs Ray Train V2 as in ray 2.60 ({e})") from None


class Interrupted(BaseException):
    """The driver received SIGINT or SIGTERM; the run ends KILLED."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# -- rendezvous ------------------------------------------------------------------------------

_LISTENER: socket.socket | None = None  # rank 0's pre-bound store socket (lives in that worker)


def _node_ip() -> str:
    return ray.util.get_node_ip_address()


def _bind_store_socket(host: str) -> int:
    """In rank 0's process: bind and listen on ``host``, keep the socket; return its port."""
    global _LISTENER
    if _LISTENER is not None:
        _LISTENER.close()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    s.listen(1024)
    _LISTENER = s
    return s.getsockname()[1]


def _init_process_group(backend: str, world_rank: int, world_size: int, host: str, port: int, loopback: bool,
                        timeout_s: int) -> None:
    import torch.distributed as dist

    global _LISTENER
    if loopback:
        # gloo and NCCL open their own listening sockets for the data connections; on one node
        # they belong on the loopback interface too (unless the user chose an interface).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, str(port)
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout,
                              master_listen_fd=_LISTENER.fileno(), wait_for_workers=False)
    else:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _RendezvousBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "RendezvousConfig"):
        backend = backend_config.backend or ("nccl" if worker_group.get_resources_per_worker().get("GPU", 0) else "gloo")
        ips = worker_group.execute(_node_ip)
        one_node = len(set(ips)) == 1
        if backend_config.rendezvous == "loopback" and not one_node:
            raise RuntimeError(f"scaling.rendezvous=loopback, but the workers run on {len(set(ips))} nodes "
                               f"({', '.join(sorted(set(ips)))}); use auto or node")
        loopback = one_node and backend_config.rendezvous != "node"
        host = "127.0.0.1" if loopback else ips[0]
        port = worker_group.execute_single(0, _bind_store_socket, host)
        worker_group.execute(_set_torch_distributed_env_vars)
        world = len(worker_group)
        ray.get([worker_group.execute_single_async(i, _init_process_group, backend=backend, world_rank=i,
                                                   world_size=world, host=host, port=port, loopback=loopback,
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(world)])


@dataclass
class RendezvousConfig(TorchConfig):
    """``TorchConfig`` whose process group binds to loopback on one node (see the module doc).

    rendezvous: ``auto`` (loopback when all workers share a node, else rank 0's node address),
    ``loopback`` (refuse to run across nodes) or ``node`` (always rank 0's node address).
    """

    rendezvous: str = "auto"

    @property
    def backend_cls(self):
        return _RendezvousBackend


# -- failures ----------------------------------------------------------------------------------

def worker_exceptions(error: BaseException) -> list[BaseException]:
    """The user exceptions inside a Ray Train worker-group error (the error itself otherwise)."""
    if getattr(error, "controller_failure", None) is not None:
        return [error.controller_failure]
    failures = getattr(error, "worker_failures", None)
    if not failures:
        return [error]
    return [getattr(f, "_base_exc", f) for _, f in sorted(failures.items())]


class NoRetryForFatalErrors(FailurePolicy):
    """Ray's default policy, except that errors a retry cannot fix end the run at once."""

    def __init__(self, failure_config):
        super().__init__(failure_config)
        self._default = DefaultFailurePolicy(failure_config)

    def make_decision(self, training_failed_error):
        from ray.train.v2._internal.execution.failure_handling import FailureDecision

        if isinstance(training_failed_error, WorkerGroupError) and any(
                getattr(e, "retry_cannot_help", False) for e in worker_exceptions(training_failed_error)):
            return FailureDecision.RAISE
        return self._default.make_decision(training_failed_error)


# -- elastic groups ----------------------------------------------------------------------------

class FreshElasticScalingPolicy(ElasticScalingPolicy):
    """Ray's elastic policy (``num_workers=(min, max)``), counting the workers the cluster holds
    *now* whenever it sizes a group.

    Ray 2.60's policy reads the coordinator's reservations, which the coordinator recomputes every
    20 s. Right after a node is lost it may therefore restart the group at the old size, wait out
    the placement timeout (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, 60 s) for workers that cannot
    be placed, and only then shrink (seen with a node killed mid-run). Asking with ``recompute=True``
    (the coordinator's own option for callers that place workers from the answer) costs one refresh
    per decision: every second while the group is down, once per
    ``scaling.elastic_resize_interval_s`` while it runs. It cannot help when a worker's error
    arrives before Ray has declared the node dead: a fresh view still holds the node then.
    """

    def _get_reserved_resources(self):
        from ray.train.v2._internal.util import time_monotonic

        if time_monotonic() - self._latest_reserved_resources_query_time < self.GET_RESERVED_RESOURCES_INTERVAL_S:
            return self._latest_reserved_resources
        try:
            reserved = ray.get(self._autoscaling_coordinator.get_reserved_resources.remote(
                self._requester_id, recompute=True), timeout=AUTOSCALING_REQUESTS_GET_TIMEOUT_S)
        except Exception:
            return super()._get_reserved_resources()  # Ray's cached view, with its own warning
        self._latest_reserved_resources_query_time = time_monotonic()
        self._latest_reserved_resources = reserved
        return reserved


# -- the trainer -------------------------------------------------------------------------------

class Trainer(TorchTrainer):
    """``TorchTrainer`` with :class:`NoRetryForFatalErrors`, :class:`FreshElasticScalingPolicy` for
    elastic groups, and SIGINT/SIGTERM as :class:`Interrupted`."""

    _signal: int | None = None
    _grace_timer: threading.Timer | None = None
    #: Set by the launcher: the run directory the workers watch for a stop request, and how long
    #: they get to save a checkpoint and return before the controller is aborted (0: abort at once).
    stop_dir: Path | None = None
    stop_grace_s: float = 0.0

    def _initialize_and_run_controller(self, **kwargs):
        kwargs["failure_policy"] = NoRetryForFatalErrors(self.run_config.failure_config)
        if self.scaling_config.elasticity_enabled:
            kwargs["scaling_policy"] = FreshElasticScalingPolicy(self.scaling_config)
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return super()._initialize_and_run_controller(**kwargs)
        except ray.exceptions.RayActorError:
            if self._signal is None:
                raise
        finally:
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            if threading.current_thread() is threading.main_thread():
                for s, h in previous.items():
                    signal.signal(s, h)
            if self._signal is not None:
                raise Interrupted(self._signal)

    def _register_sigint_handler(self, controller):
        def abort():
            controller.abort.remote()  # the controller stops the workers and exits

        def handler(signum, frame):
            if self._signal is not None:  # a second signal: do not wait for the checkpoint
                abort()
                return
            self._signal = signum
            if self.stop_dir is None or self.stop_grace_s <= 0:
                abort()
                return
            try:
                request_stop(self.stop_dir, signum)
            except OSError:  # cannot ask: stop them now, as without a grace period
                abort()
                return
            self._grace_timer = threading.Timer(self.stop_grace_s, abort)
            self._grace_timer.daemon = True
            self._grace_timer.start()

        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, handler)
