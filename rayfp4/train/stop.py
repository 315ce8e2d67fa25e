"""A stop asked for by a signal, carried out at a step boundary with a checkpoint of that step.

When the driver gets SIGINT or SIGTERM while Ray Train runs (:class:`rayfp4.train.trainer.Trainer`),
it writes :data:`STOP_FILE` into the run directory and gives the workers
``checkpoint.stop_grace_s`` seconds. Rank 0 looks for the file after every step; the ranks agree on
it through one small all-reduce, so all of them stop after the same step, save a checkpoint of it
(as at the checkpoint cadence) and return. The driver then ends the run KILLED; running it again
resumes from that step, so a stopped run loses no training. A worker that does not get there in time
(a long validation, a hung collective) is stopped anyway when the grace period ends, and the run
resumes from its last cadence checkpoint, as after any kill. The file lives in the run directory
because every worker already reads and writes there (on several nodes it is shared storage).
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch
import torch.distributed as dist

from ..fileio import write_atomic

#: Written by the driver into the run directory to ask the workers to stop; removed when a run starts.
STOP_FILE = "STOP"


def request_stop(run_dir: str | Path, signum: int) -> None:
    """Ask the workers of the run in ``run_dir`` to stop after their current step (OSError if the
    file cannot be written: the caller then stops them at once)."""
    write_atomic(Path(run_dir) / STOP_FILE, lambda tmp: tmp.write_text(f"{signal.Signals(signum).name}\n"))


def clear_stop(run_dir: str | Path) -> None:
    """Forget an earlier stop request (a new attempt of the run starts)."""
    (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)


class StopRequest:
    """The workers' side: :meth:`due` after each step, the same answer on every rank."""

    def __init__(self, run_dir: Path, rank: int, world: int, device: torch.device):
        self.path, self.rank, self.world, self.device = Path(run_dir) / STOP_FILE, rank, world, device
        self.reason = ""

    def due(self) -> bool:
        asked = self.rank == 0 and self.path.exists()
        if self.world > 1:  # rank 0 decides for everyone: one 4-byte all-reduce a step
            device = torch.device("cpu") if dist.get_backend() == "gloo" else self.device
            flag = torch.tensor([1 if asked else 0], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            asked = bool(flag.item())
        if asked and not self.reason:
            try:
                self.reason = self.path.read_text().strip()
            except OSError:
                self.reason = "a stop request"
        return asked
