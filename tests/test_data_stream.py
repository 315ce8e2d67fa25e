"""The Ray Data stream: exact resume across interruptions and worker counts, and inside Ray Train."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch

from rayfp4.data import (DataError, StreamConfig, StreamState, global_step_ids, open_shards,
                         read_ledger)
from rayfp4.data.stream import TokenStream

CONFIG = StreamConfig(global_batch_size=8, seed=11, window_steps=16)


def run_attempt(shards, world_size, state, n_steps, ledger_dir, checkpoint_after):
    """Drive ``world_size`` rank iterators in lockstep for ``n_steps`` steps, as DDP ranks would.

    Returns the checkpoint (``torch.save`` bytes of the stream state) taken after global step
    ``checkpoint_after``; the steps consumed after it are lost with the simulated crash.
    """
    streams = [TokenStream(shards, CONFIG, rank=r, world_size=world_size, ledger_dir=ledger_dir)
               for r in range(world_size)]
    iterators = [s.batches(state, max_steps=n_steps) for s in streams]
    rows, _ = shards.read_split("train")
    checkpoint = None
    for per_rank in zip(*iterators):
        g = per_rank[0].global_step
        assert {b.global_step for b in per_rank} == {g}
        assert len({b.tokens.shape for b in per_rank}) == 1  # every rank the same micro-batch
        for b in per_rank:
            assert b.tokens.dtype == torch.int64
            assert np.array_equal(b.tokens.numpy(), rows[b.ids].astype(np.int64))
        if g == checkpoint_after:
            buf = io.BytesIO()
            torch.save({"stream": per_rank[0].next_state.to_dict()}, buf)
            checkpoint = buf.getvalue()
    for it in iterators:
        it.close()
    return checkpoint


def load_state(checkpoint: bytes) -> StreamState:
    return StreamState.from_dict(torch.load(io.BytesIO(checkpoint), weights_only=True)["stream"])


@pytest.mark.slow
def test_interrupted_run_with_changing_workers_sees_exactly_the_uninterrupted_data(
        ray_session, small_shards, tmp_path):
    shards = open_shards(small_shards)
    n = shards.num_sequences("train")
    total = 80
    s_per_epoch = n // CONFIG.global_batch_size
    assert s_per_epoch < total  # the run crosses an epoch boundary

    run_attempt(shards, 2, None, total, tmp_path / "straight", checkpoint_after=-1)

    resumed = tmp_path / "resumed"
    ckpt = run_attempt(shards, 2, None, 30, resumed, checkpoint_after=24)       # crash at 30
    ckpt = run_attempt(shards, 1, load_state(ckpt), 45, resumed, checkpoint_after=64)  # 25..69
    run_attempt(shards, 4, load_state(ckpt), total - 65, resumed, checkpoint_after=-1)  # 65..79

    straight, interrupted = read_ledger(tmp_path / "straight"), read_ledger(resumed)
    assert sorted(straight.steps) == list(range(total))
    # In order per global step ...
    assert interrupted.ordered() == straight.ordered()
    # ... and as multisets per epoch.
    assert interrupted.ids_by_epoch() == straight.ids_by_epoch()
    # And it is the data the arithmetic defines: no repeats within an epoch, full epochs complete.
    for g, ids in straight.steps.items():
        assert ids == list(global_step_ids(n, shards.rows_per_group, CONFIG.seed, 8, g))
    epoch0 = straight.ids_by_epoch()[0]
    assert max(epoch0.values()) == 1 and len(epoch0) == s_per_epoch * 8


def test_ledger_overlay_drops_steps_replayed_after_a_crash(tmp_path):
    from rayfp4.data import SampleLedger

    first = SampleLedger(tmp_path, rank=0, world_size=1, start_global_step=0)
    for g in range(5):
        first.record(g, 0, g, [g])
    first.close()
    second = SampleLedger(tmp_path, rank=0, world_size=1, start_global_step=3)
    for g in range(3, 6):
        second.record(g, 0, g, [100 + g])
    second.close()
    view = read_ledger(tmp_path)
    assert view.ordered() == [(0, [0]), (1, [1]), (2, [2]), (3, [103]), (4, [104]), (5, [105])]
    assert view.ids_by_epoch() == {0: Counter([0, 1, 2, 103, 104, 105])}


def test_shorter_sequences_are_cropped_and_longer_ones_refused(ray_session, small_shards):
    shards = open_shards(small_shards)
    stream = TokenStream(shards, StreamConfig(global_batch_size=4, seq_len=8, window_steps=4))
    batch = next(stream.batches())
    assert batch.tokens.shape == (4, 9)
    rows, _ = shards.read_split("train")
    assert np.array_equal(batch.tokens.numpy(), rows[batch.ids, :9])
    with pytest.raises(DataError, match="sequence length 32 is larger than the shards hold"):
        TokenStream(shards, StreamConfig(global_batch_size=4, seq_len=32))


def test_validation_split_streams_too(ray_session, small_shards):
    shards = open_shards(small_shards)
    rows, _ = shards.read_split("val")
    stream = TokenStream(shards, StreamConfig(global_batch_size=4, window_steps=8), split="val")
    batches = list(stream.batches(max_steps=stream.steps_per_epoch))
    ids = np.concatenate([b.ids for b in batches])
    assert len(set(ids.tolist())) == len(ids) == stream.steps_per_epoch * 4 == len(rows) // 4 * 4
    assert all(np.array_equal(b.tokens.numpy(), rows[b.ids]) for b in batches)


def test_shard_damaged_after_opening_gives_a_data_error_naming_it(ray_session, small_shards, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(small_shards, damaged)
    shards = open_shards(damaged)  # valid when opened ...
    victim = damaged / shards.manifest.splits["train"][0].file
    data = bytearray(victim.read_bytes())
    data[4:200] = bytes(196)  # ... then its first pages are overwritten
    victim.write_bytes(bytes(data))
    stream = TokenStream(shards, StreamConfig(global_batch_size=8, window_steps=64))
    with pytest.raises(DataError, match=r"train-00000\.parquet: cannot read row group"):
        for _ in stream.batches(max_steps=60):
            pass


def test_stream_configuration_errors(small_shards):
    shards = open_shards(small_shards)
    with pytest.raises(DataError, match="global batch size 100000 is larger than"):
        TokenStream(shards, StreamConfig(global_batch_size=100_000))
    with pytest.raises(DataError, match="not divisible by the number of workers 3"):
        TokenStream(shards, StreamConfig(global_batch_size=8), rank=0, world_size=3)
    stream = TokenStream(shards, StreamConfig(global_batch_size=8, seed=1))
    saved = StreamState.start(StreamConfig(global_batch_size=8, seed=2), stream.num_sequences)
    with pytest.raises(DataError, match="seed=2 but this run has seed=1"):
        next(stream.batches(saved))


@pytest.mark.slow
def test_stream_inside_ray_train_workers(ray_session, small_shards, tmp_path):
    """Two Train V2 workers read their shares, stay in lockstep through gloo, cross an epoch."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    shards = open_shards(small_shards)
    n = shards.num_sequences("train")
    cfg = StreamConfig(global_batch_size=8, seed=5, window_steps=8)
    s_per_epoch = n // 8
    start = StreamState(epoch=0, step=s_per_epoch - 6, seed=5, global_batch_size=8,
                        num_sequences=n, split="train")

    def train_loop(config):
        import torch.distributed as dist
        from ray import train

        from rayfp4.data import StreamState
        from rayfp4.data.stream import TokenStream

        ctx = train.get_context()
        stream = TokenStream(config["path"], config["stream"], rank=ctx.get_world_rank(),
                             world_size=ctx.get_world_size(), ledger_dir=config["ledger"])
        for batch in stream.batches(StreamState.from_dict(config["state"]), max_steps=config["steps"]):
            seen = torch.tensor([batch.tokens.shape[0], batch.global_step])
            dist.all_reduce(seen)
            assert seen.tolist() == [8, 2 * batch.global_step]

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"path": str(small_shards), "stream": cfg, "ledger": str(tmp_path / "ledger"),
                           "state": start.to_dict(), "steps": 12},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="stream-in-train"))
    trainer.fit()
    view = read_ledger(tmp_path / "ledger")
    g0 = start.global_step
    assert sorted(view.steps) == list(range(g0, g0 + 12))
    assert {view.epochs[g] for g in view.steps} == {0, 1}
    for g, ids in view.steps.items():
        assert ids == list(global_step_ids(n, shards.rows_per_group, 5, 8, g))


def test_a_run_reads_only_the_windows_it_will_consume(ray_session, small_shards, monkeypatch):
    """Ray Data reads ahead as far as its memory budget allows: a dataset of the whole epoch made a
    short run on a large corpus read (and hold) far more than it trained on."""
    import ray.data

    built = []
    from_items = ray.data.from_items

    def spy(items, **kwargs):
        built.append([(w["epoch"], w["start"], w["stop"]) for w in items])
        return from_items(items, **kwargs)

    monkeypatch.setattr(ray.data, "from_items", spy)
    shards = open_shards(small_shards)
    config = StreamConfig(global_batch_size=8, seed=11, window_steps=4)
    stream = TokenStream(shards, config)
    spe = stream.steps_per_epoch
    assert spe > 12
    got = list(stream.batches(None, max_steps=6))
    assert [b.step for b in got] == list(range(6))
    assert built == [[(0, 0, 4), (0, 4, 6)]]
    # across an epoch boundary: the rest of the first epoch, then only what the second needs
    built.clear()
    start = StreamState(epoch=0, step=spe - 2, seed=11, global_batch_size=8, num_sequences=stream.num_sequences,
                        split="train")
    got = list(stream.batches(start, max_steps=5))
    assert [(b.epoch, b.step) for b in got] == [(0, spe - 2), (0, spe - 1), (1, 0), (1, 1), (1, 2)]
    assert built == [[(0, spe - 2, spe)], [(1, 0, 3)]]
    rows, _ = shards.read_split("train")
    ids = global_step_ids(stream.num_sequences, shards.rows_per_group, 11, 8, spe + 2)
    assert np.array_equal(got[-1].tokens.numpy(), rows[ids].astype(np.int64))
