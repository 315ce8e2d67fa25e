"""Errors of a training run, by what a restart can do about them.

Ray Train restarts a failed worker group from the last checkpoint (``checkpoint.max_failures``
times). That helps when a process or node died; it cannot help when the same inputs will fail the
same way again. Exceptions carrying ``retry_cannot_help = True`` (these, and the config, policy and
data errors) end the run at once as FAILED, with their message (``rayfp4.train.trainer``).
"""

from __future__ import annotations


class FatalTrainingError(RuntimeError):
    """A failure that a restart from the last checkpoint would meet again."""

    retry_cannot_help = True


class NonFiniteTrainingError(FatalTrainingError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class CheckpointError(FatalTrainingError):
    """None of a run's checkpoints loads (each one's file and problem are named)."""


class StorageError(FatalTrainingError):
    """The run's storage is full or read-only: writing a checkpoint, metrics or the ledger failed."""


class RunMismatchError(FatalTrainingError):
    """A checkpoint belongs to a run with different settings than the one resuming it."""


class InjectedFailure(RuntimeError):
    """The failure ``debug.fail_at_step`` asked for (to test fault tolerance): retried."""
