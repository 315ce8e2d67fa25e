"""Shared fixtures: one Ray instance for the whole session, and small token shard directories.

``ray_session`` starts Ray once (2 CPUs, dashboard off, bound to 127.0.0.1, Ray Data progress bars
off) and is reused by every test that needs Ray, including later training tests: starting Ray costs
~10 s on the 2-core CI machine. Tests that need no Ray do not request it.
"""

from __future__ import annotations

import os
import random

import pytest

# Before anything imports Ray: make every Ray port listen on 127.0.0.1 (FIELD_NOTES).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray workers import the test-only training hooks (tests/fault_hooks.py) by module name; workers
# inherit this environment from the Ray instance the session starts.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session")
def ray_session():
    """A Ray instance shared by the whole test session (started on first use)."""
    import logging

    import ray
    from ray.data import DataContext

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False, configure_logging=False)
        started = True
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    yield ray
    if started:
        ray.shutdown()


WORDS = ("when shall we three meet again in thunder lightning or rain the hurlyburly done battle "
         "lost and won fair is foul foul is fair hover through fog filthy air — ça va 日本").split()


def synthetic_documents(n_docs: int, seed: int = 0, max_words: int = 120) -> list[str]:
    """Deterministic small documents with some non-ASCII text, of varied lengths."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, max_words))]
        docs.append(f"doc {i}: " + " ".join(words) + ("\n" if i % 3 else ""))
    return docs


def write_byte_shards(out_dir, docs, *, seq_len=16, rows_per_group=8, shard_sequences=64,
                      val_fraction=0.0):
    """Build a shard directory in-process (no Ray) with the byte tokenizer."""
    from rayfp4.data.shards import ShardWriter
    from rayfp4.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    with ShardWriter(out_dir, seq_len=seq_len, tokenizer=tok, val_fraction=val_fraction,
                     rows_per_group=rows_per_group, shard_sequences=shard_sequences,
                     source="synthetic") as writer:
        for ids in tok.encode_batch(docs):
            writer.add_document(ids)
        return writer.finish()


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory):
    """~400 train sequences of 16 tokens in several shards; chunk size 8, last chunk partial."""
    out = tmp_path_factory.mktemp("shards") / "small"
    manifest = write_byte_shards(out, synthetic_documents(24, seed=1), val_fraction=0.05)
    assert manifest.num_sequences("train") % 8 != 0  # the partial last chunk is exercised
    return out
