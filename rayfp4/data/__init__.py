"""rayfp4.data: token shards, the embedded corpus and the resumable Ray Data stream.

Ray is imported only by :mod:`rayfp4.data.stream`, which is loaded on first use of
``TokenStream``/``StreamBatch`` so that tokenizer and shard tools work without starting Ray.

Main entry points::

    open_shards(path, verify_checksums=True) -> ShardSet
    StreamConfig(global_batch_size=32, seed=0, seq_len=None, ...)   (the run config's data section extends it)
    StreamState.start(config, num_sequences, split="train") / .to_dict() / StreamState.from_dict(d)
    TokenStream(shards, config, rank, world_size, ledger_dir=None, split="train").batches(state) -> StreamBatch...
    read_ledger(ledger_dir) -> LedgerView
    shakespeare_shards(tokenizer="bpe:8192", seq_len=256) -> Path   (the embedded corpus, cached)
"""

from rayfp4.data.errors import DataError
from rayfp4.data.ledger import LedgerView, SampleLedger, read_ledger
from rayfp4.data.order import EpochOrder, StreamConfig, StreamState, global_step_ids
from rayfp4.data.shards import ShardManifest, ShardSet, ShardWriter, open_shards
from rayfp4.data.tokenizer import Tokenizer, build_tokenizer

_LAZY = {"TokenStream": "rayfp4.data.stream", "StreamBatch": "rayfp4.data.stream",
         "shakespeare_shards": "rayfp4.data.corpus", "shakespeare_documents": "rayfp4.data.corpus"}

__all__ = ["DataError", "EpochOrder", "LedgerView", "SampleLedger", "ShardManifest", "ShardSet",
           "ShardWriter", "StreamConfig", "StreamState", "Tokenizer", "build_tokenizer",
           "global_step_ids", "open_shards", "read_ledger", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rayfp4.data' has no attribute {name!r}")
