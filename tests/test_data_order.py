"""The data order arithmetic: pure, a permutation, independent of the number of workers."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch

from rayfp4.data import DataError, EpochOrder, StreamConfig, StreamState, global_step_ids
from rayfp4.data.order import batch_ids, epoch_order, rank_lanes, steps_per_epoch


def test_epoch_order_is_a_pure_permutation_that_changes_per_epoch():
    n, chunk = 1003, 64
    a = EpochOrder(n, chunk, seed=7, epoch=0).all_ids()
    assert np.array_equal(np.sort(a), np.arange(n))
    assert np.array_equal(a, EpochOrder(n, chunk, seed=7, epoch=0).all_ids())
    assert not np.array_equal(a, EpochOrder(n, chunk, seed=7, epoch=1).all_ids())
    assert not np.array_equal(a, EpochOrder(n, chunk, seed=8, epoch=0).all_ids())
    # Evaluating positions piecemeal gives the same answer as all at once.
    pos = np.array([1002, 0, 500, 64, 63])
    assert np.array_equal(EpochOrder(n, chunk, 7, 0).ids_at(pos), a[pos])


def test_epoch_order_keeps_chunks_contiguous_for_sequential_reads():
    order = EpochOrder(100, 10, seed=1, epoch=3).all_ids()
    chunks = order // 10
    # Each chunk's ids occupy one contiguous run of positions.
    runs = [chunks[0]] + [c for prev, c in zip(chunks, chunks[1:]) if c != prev]
    assert sorted(runs) == list(range(10))


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_rank_shares_concatenate_to_the_same_global_batch_for_any_world_size(world_size):
    n, chunk, gbs, seed = 203, 16, 8, 5
    order = epoch_order(n, chunk, seed, 0)
    s = steps_per_epoch(n, gbs)
    steps = np.arange(s)
    per_rank = [batch_ids(order, gbs, steps, rank_lanes(r, world_size, gbs)) for r in range(world_size)]
    together = np.concatenate(per_rank, axis=1)
    expected = np.stack([global_step_ids(n, chunk, seed, gbs, g) for g in range(s)])
    assert np.array_equal(together, expected)
    # One epoch uses steps*gbs distinct sequences; the N mod gbs left over are skipped.
    assert len(np.unique(together)) == s * gbs == n - n % gbs


def test_micro_batch_must_divide_global_batch():
    with pytest.raises(DataError, match="not divisible"):
        rank_lanes(0, 3, 8)


def test_stream_state_is_plain_checkpoint_data_and_refuses_a_changed_setup():
    cfg = StreamConfig(global_batch_size=8, seed=3)
    state = dataclasses.replace(StreamState.start(cfg, 203), epoch=2, step=11)
    buf = io.BytesIO()
    torch.save({"stream": state.to_dict()}, buf)
    buf.seek(0)
    loaded = StreamState.from_dict(torch.load(buf, weights_only=True)["stream"])
    assert loaded == state and loaded.global_step == 2 * 25 + 11
    loaded.check_compatible(cfg, 203, "ckpt")
    with pytest.raises(DataError, match="global_batch_size=8 but this run has global_batch_size=16"):
        loaded.check_compatible(StreamConfig(global_batch_size=16, seed=3), 203, "ckpt")
    with pytest.raises(DataError, match="num_sequences"):
        loaded.check_compatible(cfg, 204, "ckpt")
    with pytest.raises(DataError, match="lacks field"):
        StreamState.from_dict({"epoch": 0})


def test_state_advances_across_the_epoch_boundary():
    state = dataclasses.replace(StreamState.start(StreamConfig(global_batch_size=10), 35), step=2)
    assert state.steps_per_epoch == 3
    after = state.advanced()
    assert (after.epoch, after.step, after.global_step) == (1, 0, 3)


def test_validation_ids_are_spread_over_the_whole_split():
    from rayfp4.data.order import validation_ids

    ids = validation_ids(4055, 256)
    assert len(ids) == 256 and len(np.unique(ids)) == 256
    assert ids[0] == 0 and ids[-1] >= 4055 - 4055 // 256 - 1 and ids.max() < 4055
    gaps = np.diff(ids)
    assert gaps.min() >= 4055 // 256 and gaps.max() <= 4055 // 256 + 1  # even spacing
    assert np.array_equal(validation_ids(100, 256), np.arange(100))  # a small split: all of it
    assert np.array_equal(validation_ids(7, 7), np.arange(7))
    assert validation_ids(10, 0).size == 0


def test_a_run_evaluates_held_out_rows_from_every_part_of_the_corpus(tmp_path):
    """The tokenizer writes files in the order it finds them; the evaluated rows must not all come
    from the first ones (one package of a corpus of many)."""
    from conftest import synthetic_documents, write_byte_shards
    from rayfp4.config import RunConfig
    from rayfp4.data import open_shards
    from rayfp4.data.order import validation_ids
    from rayfp4.train.loop import TrainData

    write_byte_shards(tmp_path / "s", synthetic_documents(60, seed=3), val_fraction=0.1,
                      shard_sequences=16)
    shards = open_shards(tmp_path / "s")
    rows, packed = shards.read_split("val")
    assert len(shards.manifest.splits["val"]) >= 3 and len(rows) > 12
    cfg = RunConfig.model_validate({"data": {"shards": str(tmp_path / "s"), "val_sequences": 6,
                                             "global_batch_size": 4, "ledger": False}})
    data = TrainData(cfg, str(tmp_path / "s"), rank=0, world=1, run_dir=tmp_path / "run")
    ids = validation_ids(len(rows), 6)
    assert np.array_equal(data.val_tokens.numpy(), rows[ids].astype("int64"))
    # rows from the first and the last of the validation shards, in the order they were written
    assert packed[ids].max() > packed[len(rows) * 3 // 4] and ids[0] == 0


def test_an_epoch_order_is_built_once_per_process_and_validation_ids_are_fresh_arrays():
    """Every read task of an epoch asks for its order: it is cached, not rebuilt per window. The
    validation ids are not cached: each caller gets its own array to keep or change."""
    from rayfp4.data.order import epoch_order, validation_ids

    assert epoch_order(1000, 8, 3, 0) is epoch_order(1000, 8, 3, 0)
    assert epoch_order(1000, 8, 3, 1) is not epoch_order(1000, 8, 3, 0)
    assert validation_ids(100, 10) is not validation_ids(100, 10)
