"""Shard writing, validation and the embedded corpus (no Ray needed)."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import synthetic_documents, write_byte_shards
from rayfp4.data import DataError, open_shards
from rayfp4.data.corpus import shakespeare_shards, strip_markdown
from rayfp4.data.shards import MANIFEST_FILE, ShardWriter
from rayfp4.fileio import sha256_file
from rayfp4.data.tokenizer import ByteTokenizer, build_tokenizer, load_tokenizer_file


def packed_stream(shards) -> np.ndarray:
    """All rows of both splits in packing order, flattened: the token stream that was written."""
    rows, index = zip(*(shards.read_split(s) for s in ("train", "val")))
    rows, index = np.concatenate(rows), np.concatenate(index)
    assert np.array_equal(np.sort(index), np.arange(len(index)))
    return rows[np.argsort(index)].reshape(-1)


def test_byte_shards_decode_to_the_input_documents(tmp_path):
    docs = synthetic_documents(30, seed=2)
    manifest = write_byte_shards(tmp_path / "s", docs, seq_len=24, val_fraction=0.1)
    shards = open_shards(tmp_path / "s")
    assert shards.manifest == manifest
    decoded = shards.tokenizer().decode_documents(packed_stream(shards))
    # Every document but the last (cut by the dropped tail) comes back exactly.
    assert decoded[:-1] == docs[: len(decoded) - 1]
    assert docs[len(decoded) - 1].encode().startswith(decoded[-1].encode())
    total = sum(len(d.encode()) + 1 for d in docs)
    assert manifest.total_tokens == total
    assert manifest.dropped_tail_tokens == total % 25
    n = total // 25
    assert manifest.num_sequences("val") == int(np.floor(n * 0.1))
    assert manifest.num_sequences("train") + manifest.num_sequences("val") == n


def test_bpe_round_trip(tmp_path):
    docs = synthetic_documents(40, seed=3)
    tok = build_tokenizer("bpe:300", training_texts=iter(docs))
    assert tok.vocab_size <= 300 and tok.decode(tok.encode_batch([docs[5]])[0]) == docs[5]
    with ShardWriter(tmp_path / "b", seq_len=32, tokenizer=tok, rows_per_group=4,
                     shard_sequences=16) as writer:
        for ids in tok.encode_batch(docs):
            writer.add_document(ids)
        writer.finish()
    shards = open_shards(tmp_path / "b")
    assert shards.manifest.tokenizer.kind == "bpe" and (tmp_path / "b" / "tokenizer.json").is_file()
    decoded = shards.tokenizer().decode_documents(packed_stream(shards))
    assert decoded[:-1] == docs[: len(decoded) - 1]


def test_read_sequences_by_id_matches_the_split(small_shards):
    shards = open_shards(small_shards)
    rows, _ = shards.read_split("train")
    ids = np.array([478, 0, 7, 8, 64, 63, 300, 300])
    assert np.array_equal(shards.read_sequences(ids), rows[ids])


def test_refuses_non_empty_output_and_keeps_it_on_failure(tmp_path):
    out = tmp_path / "out"
    write_byte_shards(out, synthetic_documents(5))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(DataError, match="not empty"):
        write_byte_shards(out, synthetic_documents(5))
    tok = ByteTokenizer()
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(out, seq_len=16, tokenizer=tok, overwrite=True, rows_per_group=8,
                         shard_sequences=8) as writer:
            writer.add_document(tok.encode_batch(["x" * 500])[0])
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind
    open_shards(out)


# ----------------------------------------------------------------------------- bad input

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_manifest(d: Path, edit) -> None:
    data = json.loads((d / MANIFEST_FILE).read_text())
    edit(data)
    (d / MANIFEST_FILE).write_text(json.dumps(data))


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(DataError, match="nowhere: shard directory does not exist"):
        open_shards(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest.json: missing"):
        open_shards(tmp_path / "empty")


def test_corrupt_shard_is_named_by_checksum(small_shards, tmp_path):
    d = _copy(small_shards, tmp_path / "c")
    victim = d / "train-00002.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-00002\.parquet: SHA-256 checksum does not match"):
        open_shards(d)


def test_corrupt_shard_read_without_checksum_is_a_data_error_not_an_arrow_trace(small_shards, tmp_path):
    d = _copy(small_shards, tmp_path / "c")
    victim = d / "train-00001.parquet"
    data = bytearray(victim.read_bytes())
    data[4:200] = bytes(196)  # wipe the first pages, keep the footer
    victim.write_bytes(bytes(data))
    shards = open_shards(d, verify_checksums=False)
    with pytest.raises(DataError, match=r"train-00001\.parquet: cannot read row group"):
        shards.read_sequences(np.array([64]))


def test_truncated_and_missing_shards(small_shards, tmp_path):
    d = _copy(small_shards, tmp_path / "t")
    (d / "train-00003.parquet").write_bytes((d / "train-00003.parquet").read_bytes()[:-10])
    with pytest.raises(DataError, match=r"train-00003\.parquet: size .* does not match"):
        open_shards(d)
    (d / "train-00003.parquet").unlink()
    with pytest.raises(DataError, match=r"train-00003\.parquet: shard listed in manifest.json does not exist"):
        open_shards(d)


def test_schema_mismatch_is_reported(small_shards, tmp_path):
    d = _copy(small_shards, tmp_path / "s")
    victim = d / "train-00000.parquet"
    table = pq.read_table(victim)
    wrong = pa.table({"tokens": pa.array(table.column("tokens").to_pylist(), pa.list_(pa.int64())),
                      "packed_index": table.column("packed_index")})
    pq.write_table(wrong, victim, row_group_size=8)

    def fix_checksum(m):
        entry = m["splits"]["train"][0]
        entry["size_bytes"], entry["sha256"] = victim.stat().st_size, sha256_file(victim)
    _rewrite_manifest(d, fix_checksum)
    with pytest.raises(DataError, match=r"train-00000\.parquet: schema .* does not match"):
        open_shards(d)


def test_invalid_manifest_names_the_field(small_shards, tmp_path):
    d = _copy(small_shards, tmp_path / "m")
    _rewrite_manifest(d, lambda m: m.update(seq_len="long"))
    with pytest.raises(DataError, match="invalid manifest at seq_len"):
        open_shards(d)


def test_tokenizer_file_that_does_not_parse(small_shards, tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(DataError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_tokenizer_file(bad)
    with pytest.raises(DataError, match="tokenizer file does not exist"):
        build_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(DataError, match="bpe:VOCAB"):
        build_tokenizer("bpe:many")
    # ... and inside a shard directory.
    d = _copy(small_shards, tmp_path / "k")
    _rewrite_manifest(d, lambda m: m["tokenizer"].update(kind="hf", file="tokenizer.json"))
    shutil.copy(bad, d / "tokenizer.json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        open_shards(d)


def test_empty_corpus_and_corpus_shorter_than_a_sequence(tmp_path):
    with pytest.raises(DataError, match="corpus is empty"):
        write_byte_shards(tmp_path / "e", [])
    with pytest.raises(DataError, match="sequence length 16 needs 17 tokens .* only 6 tokens"):
        write_byte_shards(tmp_path / "s", ["hello"])
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- embedded corpus

def test_strip_markdown():
    md = ("# Play\n\n## ACT I\n\n_Enter HAMLET_\n\n**HAMLET**  \nTo be, or not to be:  \n"
          "__\\[Aside]_  \nan escaped \\_underscore\\_ and \\--dash\n")
    assert strip_markdown(md) == ("Play\n\nACT I\n\nEnter HAMLET\n\nHAMLET\nTo be, or not to be:\n"
                                  "[Aside]\nan escaped _underscore_ and --dash\n")


def _build_corpus(root: str) -> str:
    return str(shakespeare_shards(tokenizer="byte", seq_len=1024, root=Path(root), progress=False))


def test_embedded_corpus_is_built_once_under_a_lock_and_reused(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:  # two processes race for the first build
        paths = pool.map(_build_corpus, [str(tmp_path)] * 2)
    assert paths[0] == paths[1]
    shard_dir = Path(paths[0])
    created = json.loads((shard_dir / MANIFEST_FILE).read_text())["created_unix"]
    assert _build_corpus(str(tmp_path)) == paths[0]  # reused, not rebuilt
    assert json.loads((shard_dir / MANIFEST_FILE).read_text())["created_unix"] == created
    assert sorted(p.name for p in shard_dir.parent.iterdir() if not p.name.endswith(".lock")) == [shard_dir.name]
    shards = open_shards(shard_dir)
    assert shards.manifest.num_documents == 38
    text = shards.tokenizer().decode(shards.read_sequences(np.arange(4)).reshape(-1))
    assert "ACT I" in text and "**" not in text
