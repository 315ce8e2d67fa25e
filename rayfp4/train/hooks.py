"""Hooks: named points in the training loop where a test or a tool may act, without branches in
the loop itself.

The loop calls, on every rank, ``on_step_start(step)`` before a step's first micro-batch,
``on_loss(step, loss)`` for each micro-batch's loss (the value returned is what is backpropagated),
and ``on_checkpoint_staged(step, directory)`` after a checkpoint's files are written and before
they are handed to Ray Train. ``debug.fail_at_step`` and ``debug.nan_at_steps`` are hooks defined
here; ``debug.hooks`` adds others by import path (``package.module:Class``, with ``args``), which
is how the fault-injection tests pause a worker inside a checkpoint to kill it there.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .errors import InjectedFailure


class TrainHook:
    """Base class: every method is a no-op. ``rank`` and ``run_dir`` are set before the loop starts."""

    rank: int = 0
    run_dir: Path = Path(".")

    def on_step_start(self, step: int) -> None:
        pass

    def on_loss(self, step: int, loss):
        return loss

    def on_checkpoint_staged(self, step: int, directory: Path) -> None:
        pass


class FailAtStep(TrainHook):
    """Raise once per run at a step on rank 0 (a marker file in the run dir makes it once), to test
    that a worker failure resumes from the last checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_step_start(self, step: int) -> None:
        if step != self.step or self.rank != 0:
            return
        marker = self.run_dir / f".injected-failure-{step}"
        if marker.exists():
            return
        marker.touch()
        raise InjectedFailure(f"debug.fail_at_step={step}: injected worker failure")


class NanAtSteps(TrainHook):
    """Poison the loss at the given steps, to test that non-finite steps are skipped and counted."""

    def __init__(self, steps: list[int]):
        self.steps = set(steps)

    def on_loss(self, step: int, loss):
        return loss * float("nan") if step in self.steps else loss


class Hooks(TrainHook):
    """Several hooks called in order."""

    def __init__(self, hooks: list[TrainHook], rank: int, run_dir: Path):
        self.hooks = hooks
        for h in hooks:
            h.rank, h.run_dir = rank, Path(run_dir)

    def on_step_start(self, step):
        for h in self.hooks:
            h.on_step_start(step)

    def on_loss(self, step, loss):
        for h in self.hooks:
            loss = h.on_loss(step, loss)
        return loss

    def on_checkpoint_staged(self, step, directory):
        for h in self.hooks:
            h.on_checkpoint_staged(step, directory)


def load_hook(path: str, args: dict) -> TrainHook:
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"debug.hooks: {path!r} is not 'package.module:Class'")
    cls = getattr(importlib.import_module(module), attr)
    return cls(**args)


def build_hooks(debug, rank: int, run_dir: Path) -> Hooks:
    """The hooks a run's ``debug`` section asks for."""
    hooks: list[TrainHook] = []
    if debug.fail_at_step is not None:
        hooks.append(FailAtStep(debug.fail_at_step))
    if debug.nan_at_steps:
        hooks.append(NanAtSteps(debug.nan_at_steps))
    hooks += [load_hook(h.path, h.args) for h in debug.hooks]
    return Hooks(hooks, rank, run_dir)
