"""The per-rank Ray Data stream with exact resume.

Usage inside a Ray Train worker (or any process connected to Ray)::

    shards = open_shards(path)                       # validated before any step
    stream = TokenStream(shards, StreamConfig(global_batch_size=32, seed=1),
                         rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                         ledger_dir=run_dir / "ledger")
    state = StreamState.from_dict(ckpt["stream"]) if ckpt else None
    for batch in stream.batches(state):              # runs across epochs until you stop
        loss = model(batch.tokens[:, :-1], batch.tokens[:, 1:])
        ...
        checkpoint["stream"] = batch.next_state.to_dict()

Why one Ray Data pipeline per rank instead of ``streaming_split``: Ray's split hands blocks to
whichever consumer asks first, so the rank that gets a sequence is not reproducible; after a worker
failure the controller restarts the dataset from row 0 and may swap the rank-to-split assignment
(Ray issues #37633, #48224, #58658; docs/operations.md). With our own arithmetic (``rayfp4.data.order``)
each rank knows exactly which ids it owns at every step, for any number of workers, so it builds a
dataset over just those: one Ray Data read task per *window* of ``window_steps`` steps reads this
rank's lanes for those steps (whole parquet row groups, each read by one rank only) and emits them
step-major. Ray Data runs the read tasks in parallel on the cluster, streams their output with
backpressure and prefetches ahead of the consumer; ``preserve_order`` keeps windows in order and the
consumer checks every batch's step and lane tags, so a reordering could never pass silently.
Resuming is just starting the first window at the saved step. Each epoch is a new dataset.

Every rank gets ``global_batch_size / world_size`` sequences at every step and every rank has the
same number of steps per epoch (the epoch's last ``N mod global_batch_size`` sequences in its order
are skipped that epoch), so DDP never waits on a short rank.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rayfp4.data.errors import DataError
from rayfp4.data.ledger import SampleLedger
from rayfp4.data.order import (StreamConfig, StreamState, batch_ids, check_split, epoch_order,
                               micro_batch_size, rank_lanes)
from rayfp4.data.shards import ShardSet, open_shards

if TYPE_CHECKING:
    import torch


@dataclass
class StreamBatch:
    """One rank's share of one global step."""

    tokens: torch.Tensor        # [micro_batch, seq_len + 1] int64
    ids: np.ndarray             # [micro_batch] global sequence ids, lane order
    epoch: int
    step: int                   # within the epoch
    global_step: int
    next_state: StreamState     # save this in the checkpoint taken after this step


def quiet_ray_data() -> None:
    """Switch off Ray Data's progress bars in this process (they flood captured output)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


_REMOTE_DATA_ERROR = re.compile(r"(?:^|\n)\S*DataError: (.+)")


def find_data_error(exc: BaseException) -> DataError | None:
    """The :class:`DataError` behind an exception that Ray raised for a failed task, if any.

    Ray Data re-raises a UDF's exception as ``RayTaskError(UserCodeException)`` whose ``__cause__``
    chain does not survive pickling; the remote traceback text does, so the DataError's one-line
    message is recovered from it when it is not in the chain.
    """
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError):
            return e
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    match = _REMOTE_DATA_ERROR.search(str(exc))
    return DataError(match.group(1).strip()) if match else None


def _read_window(batch: dict, *, shards: ShardSet, split: str, seq_len: int, chunk_size: int,
                 seed: int, global_batch_size: int, lanes: np.ndarray) -> dict:
    """Ray Data task: this rank's rows for steps ``[start, stop)`` of ``epoch``, step-major."""
    epoch, start, stop = int(batch["epoch"][0]), int(batch["start"][0]), int(batch["stop"][0])
    order = epoch_order(shards.num_sequences(split), chunk_size, seed, epoch)
    steps = np.arange(start, stop, dtype=np.int64)
    ids = batch_ids(order, global_batch_size, steps, lanes)          # [steps, lanes]
    tokens = shards.read_sequences(ids.reshape(-1), split)[:, : seq_len + 1]
    return {
        "tokens": tokens,
        "id": ids.reshape(-1),
        "step": np.repeat(steps, len(lanes)),
        "lane": np.tile(lanes, len(steps)),
    }


class TokenStream:
    """Batches of one rank, resumable from a :class:`StreamState`."""

    def __init__(self, shards: ShardSet | str | Path, config: StreamConfig, rank: int = 0,
                 world_size: int = 1, ledger_dir: str | Path | None = None, split: str = "train"):
        self.shards = shards if isinstance(shards, ShardSet) else open_shards(shards)
        self.config = config
        self.split = check_split(split)
        self.rank = rank
        self.world_size = world_size
        self.ledger_dir = ledger_dir
        where = str(self.shards.path)
        self.num_sequences = self.shards.num_sequences(split)
        self.seq_len = config.seq_len or self.shards.seq_len
        if self.seq_len > self.shards.seq_len:
            raise DataError(f"{where}: sequence length {self.seq_len} is larger than the shards hold "
                            f"({self.shards.seq_len} tokens + 1 per sequence); re-tokenize with "
                            f"--seq-len {self.seq_len}")
        if self.num_sequences == 0:
            raise DataError(f"{where}: split {split!r} holds no sequences")
        if config.global_batch_size > self.num_sequences:
            raise DataError(f"{where}: global batch size {config.global_batch_size} is larger than "
                            f"the {self.num_sequences} sequences of split {split!r}")
        self.micro_batch = micro_batch_size(config.global_batch_size, world_size)
        self.lanes = rank_lanes(rank, world_size, config.global_batch_size)
        self.window_steps = config.window_steps or self.shards.rows_per_group

    def initial_state(self) -> StreamState:
        return StreamState.start(self.config, self.num_sequences, self.split)

    @property
    def steps_per_epoch(self) -> int:
        return self.initial_state().steps_per_epoch

    def _epoch_dataset(self, epoch: int, start_step: int, stop_step: int | None = None):
        """Ray Data reads ahead as far as its memory budget lets it, so the dataset holds only the
        windows that will be consumed: a run of 800 steps on a corpus of 12,000 steps an epoch
        reads 800 steps, not the epoch."""
        import ray.data

        quiet_ray_data()
        stop_step = self.steps_per_epoch if stop_step is None else min(stop_step, self.steps_per_epoch)
        windows = [{"epoch": epoch, "start": t, "stop": min(t + self.window_steps, stop_step)}
                   for t in range(start_step, stop_step, self.window_steps)]
        ds = ray.data.from_items(windows, override_num_blocks=len(windows))
        ds = ds.map_batches(
            _read_window, batch_size=1, batch_format="numpy", num_cpus=self.config.read_num_cpus,
            fn_kwargs=dict(shards=self.shards, split=self.split, seq_len=self.seq_len,
                           chunk_size=self.shards.rows_per_group, seed=self.config.seed,
                           global_batch_size=self.config.global_batch_size, lanes=self.lanes))
        ds.context.execution_options.preserve_order = True
        return ds

    def batches(self, state: StreamState | dict | None = None,
                max_steps: int | None = None) -> Iterator[StreamBatch]:
        """Yield this rank's batches from ``state`` on (the start when ``None``), across epochs.

        Stops after ``max_steps`` batches if given, else never: the training loop decides.
        """
        import torch  # here, not at module level: Ray's read workers import this module

        if isinstance(state, dict):
            state = StreamState.from_dict(state)
        state = state or self.initial_state()
        state.check_compatible(self.config, self.num_sequences, str(self.shards.path), self.split)
        ledger = (SampleLedger(self.ledger_dir, self.rank, self.world_size, state.global_step)
                  if self.ledger_dir is not None else None)
        produced = 0
        try:
            while max_steps is None or produced < max_steps:
                ds = self._epoch_dataset(state.epoch, state.step,
                                         None if max_steps is None else state.step + max_steps - produced)
                for rows in self._checked(ds.iter_batches(
                        batch_size=self.micro_batch, batch_format="numpy",
                        prefetch_batches=self.config.prefetch_batches)):
                    if not (np.all(rows["step"] == state.step) and np.array_equal(rows["lane"], self.lanes)):
                        raise RuntimeError(  # an internal invariant, not a user error
                            f"stream out of order at epoch {state.epoch} step {state.step}: got steps "
                            f"{np.unique(rows['step'])} lanes {rows['lane']}")
                    batch = StreamBatch(
                        tokens=torch.from_numpy(rows["tokens"].astype(np.int64)),
                        ids=rows["id"].astype(np.int64), epoch=state.epoch, step=state.step,
                        global_step=state.global_step, next_state=state.advanced())
                    if ledger is not None:
                        ledger.record(batch.global_step, batch.epoch, batch.step, batch.ids)
                    yield batch
                    state = batch.next_state
                    produced += 1
                    if max_steps is not None and produced >= max_steps:
                        return
                if state.step != 0:
                    raise RuntimeError(f"epoch {state.epoch} ended early at step {state.step}")
        finally:
            if ledger is not None:
                ledger.close()

    @staticmethod
    def _checked(batches: Iterator[dict]) -> Iterator[dict]:
        """Re-raise a read task's DataError (e.g. a damaged shard) as itself, not as a Ray trace."""
        try:
            yield from batches
        except Exception as exc:
            err = find_data_error(exc)
            if err is None:
                raise
            raise err from None
