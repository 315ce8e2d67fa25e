"""Shared fixtures: one Ray instance for the whole session, and small token shard directories.

``ray_session`` starts Ray once (2 CPUs, dashboard off, bound to 127.0.0.1, Ray Data progress bars
off) and is reused by every test that needs Ray, including later training tests: starting Ray costs
~10 s on the 2-core CI machine. Tests that need no Ray do not request it.
"""

from __future__ import annotations

import os
import random

import pytest

# Before anything imports Ray: make every Ray port listen on 127.0.0.1 (docs/operations.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Triton kernels: on a machine without a CUDA GPU they run through Triton's interpreter on CPU
# tensors. Triton reads this when a kernel is decorated, so it is set here, before any test module
# imports triton, and only where no GPU exists (on a GPU machine the kernels compile and the GPU
# tests run; the interpreter tests then skip themselves). RAYFP4_TEST_INTERPRET=1 forces it.
def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if os.environ.get("RAYFP4_TEST_INTERPRET") == "1" or not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Ray workers import the test-only training hooks (tests/fault_hooks.py) by module name; workers
# inherit this environment from the Ray instance the session starts.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p)


# Random inputs are fresh each run (numerics are checked on inputs nobody chose), yet any failure can
# be repeated: the run's seed is printed in the header, RAYFP4_TEST_SEED=N repeats it, and each test
# seeds torch, numpy and random from it and its own name before it starts.
TEST_SEED = int(os.environ.get("RAYFP4_TEST_SEED") or random.SystemRandom().randrange(2**31))


def pytest_report_header(config):
    return f"rayfp4 test seed: {TEST_SEED} (repeat with RAYFP4_TEST_SEED={TEST_SEED})"


@pytest.fixture(autouse=True)
def _seeded(request):
    import zlib

    import numpy as np
    import torch

    seed = (TEST_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield seed


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


# MLflow creates its tables when a run first opens a new sqlite store (~3-5 s on the 2-core CI
# machine, once per training test). Tests that give a run a fresh store take it from here: a copy
# of one empty store made once per session, identical to what MLflow would create.
_MLFLOW_TEMPLATE: list = []


def mlflow_uri(directory) -> str:
    """``sqlite:///<directory>/mlruns.db``, the file copied from the session's empty store if absent."""
    import shutil
    import tempfile
    from pathlib import Path

    db = Path(directory) / "mlruns.db"
    if not db.exists():
        if not _MLFLOW_TEMPLATE:
            from mlflow.tracking import MlflowClient

            template = Path(tempfile.mkdtemp(prefix="rayfp4-mlflow-")) / "mlruns.db"
            MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
            _MLFLOW_TEMPLATE.append(template)
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_MLFLOW_TEMPLATE[0], db)
    return f"sqlite:///{db}"
