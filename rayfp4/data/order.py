"""The order of a run's data, as arithmetic: which sequence each rank reads at each step.

Nothing here depends on Ray, on the number of workers that happen to be running, or on what was
read before; that is what makes an interrupted run resume at exactly the next sequence.

Epoch order
    A permutation of the split's global sequence ids that is a pure function of ``(seed, epoch)``.
    It is two-level so that it never materializes per-sequence state for the whole corpus and so
    that reading stays sequential: the chunks (``rows_per_group`` consecutive ids, one parquet row
    group each) are permuted, and the ids inside each chunk are permuted. Random keys come straight
    from PCG64's raw output (``SeedSequence([seed, epoch, ...])``) and are arg-sorted; we avoid
    ``Generator.permutation`` because NumPy does not promise its output across versions, while the
    bit generator's stream is fixed.

Steps and lanes
    With ``N`` sequences and a global batch of ``B`` sequences, an epoch has ``S = N // B`` steps.
    The first ``S * B`` positions of the epoch order are cut into ``B`` *lanes* of ``S`` consecutive
    positions; at step ``s`` lane ``j`` delivers position ``j * S + s``. The remaining ``N - S*B``
    positions are not used in that epoch (they are different sequences every epoch, since the
    order changes). Rank ``r`` of ``W`` owns lanes ``r*m ... r*m + m - 1`` with ``m = B / W``: every
    rank gets exactly ``m`` sequences at every step, and the ids of global step ``g`` in lane order
    do not depend on ``W`` at all. A rank reads its lanes sequentially, a row group at a time, so no
    row group is read by two ranks.

Stream state
    :class:`StreamState` is the position (epoch, next step) plus what the arithmetic depends on
    (seed, global batch size, split size). It is plain data (``to_dict``) for checkpoints, loadable
    with ``torch.load(weights_only=True)``; resuming with a different seed, batch size or split
    size is refused, since it would silently repeat or skip sequences.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from rayfp4.data.errors import DataError

SPLITS = ("train", "val")

_CHUNK_KEYS = 0
_ROW_KEYS = 1


class StreamConfig(BaseModel):
    """How a run reads its shards: the stream's part of the run config's ``data`` section (which
    extends this class), so the two cannot disagree. Everything else follows from it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    global_batch_size: int = Field(32, gt=0, description="sequences per optimizer step, all ranks together")
    seed: int = Field(0, ge=0, description="seed of the data order")
    seq_len: int | None = Field(None, gt=0, description="tokens per sequence fed to the model; "
                                "default and maximum: the shards' seq_len")
    window_steps: int | None = Field(None, gt=0, description="steps read by one Ray Data task; "
                                     "default: the shards' rows_per_group")
    prefetch_batches: int = Field(2, ge=0, description="batches each rank's pipeline reads ahead")
    read_num_cpus: float = Field(0.25, gt=0, description="CPUs reserved by each Ray Data read task "
                                 "(fractional, so reads schedule beside the training workers)")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of ``range(n)`` determined by ``key`` (stable across NumPy versions)."""
    bits = np.random.PCG64(np.random.SeedSequence([int(k) for k in key]))
    return np.argsort(bits.random_raw(n), kind="stable")


class EpochOrder:
    """The permutation of ``num_sequences`` ids for ``(seed, epoch)``, evaluated lazily by position."""

    def __init__(self, num_sequences: int, chunk_size: int, seed: int, epoch: int):
        self.num_sequences = num_sequences
        self.chunk_size = chunk_size
        self.seed = seed
        self.epoch = epoch
        n_chunks = -(-num_sequences // chunk_size)
        self.chunk_order = _permutation(n_chunks, seed, epoch, _CHUNK_KEYS)
        sizes = np.full(n_chunks, chunk_size, dtype=np.int64)
        sizes[-1] = num_sequences - (n_chunks - 1) * chunk_size
        self.ends = np.cumsum(sizes[self.chunk_order])
        self.starts = self.ends - sizes[self.chunk_order]
        self._sizes = sizes

    @functools.lru_cache(maxsize=64)
    def _within(self, chunk: int) -> np.ndarray:
        return _permutation(int(self._sizes[chunk]), self.seed, self.epoch, _ROW_KEYS, chunk)

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """Global sequence ids at ``positions`` of this epoch's order."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.num_sequences):
            raise IndexError("position outside the epoch")
        slot = np.searchsorted(self.ends, positions, side="right")
        chunk = self.chunk_order[slot]
        offset = positions - self.starts[slot]
        out = np.empty_like(positions)
        for c in np.unique(chunk):
            where = chunk == c
            out[where] = c * self.chunk_size + self._within(int(c))[offset[where]]
        return out

    def all_ids(self) -> np.ndarray:
        return self.ids_at(np.arange(self.num_sequences))


def validation_ids(num_sequences: int, count: int) -> np.ndarray:
    """The ids of the ``count`` held-out sequences a run evaluates: evenly spaced over the whole
    split (all of it when it has no more than ``count``), so that the sample is spread over
    every part of the corpus and not drawn from the files that happened to be tokenized first."""
    if count >= num_sequences:
        return np.arange(num_sequences, dtype=np.int64)
    return (np.arange(count, dtype=np.int64) * num_sequences) // count


@functools.lru_cache(maxsize=4)
def epoch_order(num_sequences: int, chunk_size: int, seed: int, epoch: int) -> EpochOrder:
    return EpochOrder(num_sequences, chunk_size, seed, epoch)


def steps_per_epoch(num_sequences: int, global_batch_size: int) -> int:
    return num_sequences // global_batch_size


def micro_batch_size(global_batch_size: int, world_size: int) -> int:
    if world_size < 1 or global_batch_size % world_size:
        raise DataError(f"global batch size {global_batch_size} is not divisible by the number of "
                        f"workers {world_size}; every rank must get the same number of sequences")
    return global_batch_size // world_size


def rank_lanes(rank: int, world_size: int, global_batch_size: int) -> np.ndarray:
    """The lanes (positions within a global batch) that ``rank`` owns."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    m = micro_batch_size(global_batch_size, world_size)
    return np.arange(rank * m, (rank + 1) * m, dtype=np.int64)


def batch_ids(order: EpochOrder, global_batch_size: int, steps: np.ndarray,
              lanes: np.ndarray) -> np.ndarray:
    """Ids delivered at ``steps`` (within the epoch) to ``lanes``: shape ``[len(steps), len(lanes)]``."""
    s_per_epoch = steps_per_epoch(order.num_sequences, global_batch_size)
    steps = np.asarray(steps, dtype=np.int64)
    positions = np.asarray(lanes, dtype=np.int64)[None, :] * s_per_epoch + steps[:, None]
    return order.ids_at(positions.reshape(-1)).reshape(positions.shape)


def global_step_ids(num_sequences: int, chunk_size: int, seed: int, global_batch_size: int,
                    global_step: int) -> np.ndarray:
    """All ids of ``global_step`` in lane order: what every correct run, of any width, sees then."""
    s_per_epoch = steps_per_epoch(num_sequences, global_batch_size)
    epoch, step = divmod(global_step, s_per_epoch)
    order = epoch_order(num_sequences, chunk_size, seed, epoch)
    return batch_ids(order, global_batch_size, np.array([step]), np.arange(global_batch_size))[0]


@dataclass(frozen=True)
class StreamState:
    """Where a run is in its data: the next step to read, and what that position means.

    ``epoch``/``step`` point at the next batch (``step`` counts within the epoch). The other fields
    pin the arithmetic so that a resume under a different configuration is refused.
    """

    epoch: int
    step: int
    seed: int
    global_batch_size: int
    num_sequences: int
    split: str = "train"

    @classmethod
    def start(cls, config: StreamConfig, num_sequences: int, split: str = "train") -> "StreamState":
        return cls(epoch=0, step=0, seed=config.seed, global_batch_size=config.global_batch_size,
                   num_sequences=num_sequences, split=check_split(split))

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.num_sequences, self.global_batch_size)

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step

    def advanced(self) -> "StreamState":
        """The state after consuming the batch this state points at."""
        if self.step + 1 >= self.steps_per_epoch:
            return dataclasses.replace(self, epoch=self.epoch + 1, step=0)
        return dataclasses.replace(self, step=self.step + 1)

    def to_dict(self) -> dict:
        """Plain ints and str, safe for ``torch.load(weights_only=True)`` and JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StreamState":
        try:
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
        except KeyError as exc:
            raise DataError(f"stream state in checkpoint lacks field {exc.args[0]!r}") from None

    def check_compatible(self, config: StreamConfig, num_sequences: int, where: str, split: str = "train") -> None:
        """Refuse to resume when the arithmetic the state was made with has changed."""
        expected = {"seed": config.seed, "global_batch_size": config.global_batch_size,
                    "num_sequences": num_sequences, "split": split}
        for name, value in expected.items():
            saved = getattr(self, name)
            if saved != value:
                raise DataError(
                    f"{where}: the checkpoint's stream state has {name}={saved!r} but this run has "
                    f"{name}={value!r}; resuming would repeat or skip sequences")
        if not 0 <= self.step < self.steps_per_epoch or self.epoch < 0:
            raise DataError(f"{where}: stream state {self} points outside an epoch of "
                            f"{self.steps_per_epoch} steps")
