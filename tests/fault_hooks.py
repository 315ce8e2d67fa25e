"""Training-loop hooks the fault-injection tests install through ``debug.hooks``.

They run inside Ray Train workers, which import this module by name: conftest (and the tests that
start a driver in a subprocess) put this directory on ``PYTHONPATH`` before Ray starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rayfp4.train.hooks import TrainHook


def marker(run_dir: Path, where: str, step: int) -> Path:
    return Path(run_dir) / f".paused-{where}-{step}"


class PauseOnce(TrainHook):
    """On ``rank``, at the start of ``step`` (``where="step"``) or with the step's checkpoint staged
    but not yet handed to Ray Train (``where="checkpoint"``): write this process's pid to a marker
    file in the run directory and sleep, so that a test can kill this worker (or the driver) exactly
    there. Once per run: a replay after the kill finds the marker and goes on."""

    def __init__(self, where: str, step: int, rank: int = 0, seconds: float = 300.0):
        assert where in ("step", "checkpoint"), where
        self.where, self.step, self.pause_rank, self.seconds = where, step, rank, seconds

    def _pause(self, step: int, where: str, staged: Path | None = None) -> None:
        if where != self.where or step != self.step or self.rank != self.pause_rank:
            return
        m = marker(self.run_dir, where, step)
        if m.exists():
            return
        tmp = m.with_name(m.name + ".tmp")
        tmp.write_text(f"{os.getpid()}\n{staged or ''}\n")
        os.replace(tmp, m)
        time.sleep(self.seconds)

    def on_step_start(self, step: int) -> None:
        self._pause(step, "step")

    def on_checkpoint_staged(self, step: int, directory: Path) -> None:
        self._pause(step, "checkpoint", directory)


class PauseOnceOnNode(PauseOnce):
    """:class:`PauseOnce` on whichever rank runs on a given node of a test cluster: the node whose
    ``ray start`` had ``RAYFP4_TEST_NODE=<node>`` in its environment (its workers inherit it)."""

    def __init__(self, where: str, step: int, node: str, seconds: float = 300.0):
        super().__init__(where, step, rank=-1, seconds=seconds)
        self.node = node

    def _pause(self, step: int, where: str, staged: Path | None = None) -> None:
        if os.environ.get("RAYFP4_TEST_NODE") == self.node:
            self.pause_rank = self.rank
            super()._pause(step, where, staged)
