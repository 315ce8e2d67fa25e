"""Token shards: the on-disk format between tokenizing and training, its writer and its validator.

A shard directory holds

* ``manifest.json`` (:class:`ShardManifest`): the tokenizer, the sequence length, and for each split
  (``train``, ``val``) the list of parquet files with their sequence and token counts, byte sizes
  and SHA-256 checksums;
* ``{split}-NNNNN.parquet``: one row per sequence, columns ``tokens`` (a list of exactly
  ``seq_len + 1`` ids; the extra token is the last target, so rows never overlap) and
  ``packed_index`` (the row's position in the packed token stream, so the text can be rebuilt);
* the tokenizer (``tokenizer.json``, or ``byte_tokenizer.json`` for raw bytes).

Sequences of a split are numbered ``0..N-1`` in file order: these *global sequence ids* are what the
stream shuffles, assigns to ranks and records in the ledger. Shards are written in row groups of
``rows_per_group`` rows and every shard but a split's last holds a whole number of row groups, so
chunk ``c`` (ids ``c*rows_per_group ...``) is exactly one row group: the stream's unit of reading.

Packing: each document is followed by the end-of-text token and the documents are concatenated in
input order; the stream is cut into rows of ``seq_len + 1`` tokens. The tail (fewer than
``seq_len + 1`` tokens after the last full row) is dropped and its size recorded in the manifest.
Rows are dealt to the validation split evenly through the stream (row ``i`` is held out when
``floor((i+1)*f) > floor(i*f)`` for fraction ``f``), so validation text comes from the whole corpus
and the assignment needs no look-ahead.

Writing never damages an existing directory: everything goes to a hidden temporary sibling that is
renamed into place only when complete. Opening (:func:`open_shards`) checks every file against the
manifest (existence, size, checksum, parquet schema, row counts) and raises :class:`DataError`
naming the file, so a corrupt shard is reported before training instead of as an Arrow trace in a
worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rayfp4.data.errors import DataError
from rayfp4.data.tokenizer import Tokenizer, load_saved_tokenizer, token_dtype
from rayfp4.fileio import sha256_file

if TYPE_CHECKING:
    from rayfp4.console import ProgressLine

MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "rayfp4.token_shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


class ShardFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    first_id: int = Field(ge=0, description="global sequence id of the shard's first row")
    num_sequences: int = Field(gt=0)
    num_tokens: int = Field(gt=0)
    size_bytes: int = Field(gt=0)
    sha256: str


class TokenizerEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["byte", "bpe", "hf"]
    file: str
    vocab_size: int = Field(gt=0)
    eot_id: int = Field(ge=0)
    eot_token: str


class ShardManifest(BaseModel):
    """What a shard directory holds; written by :class:`ShardWriter`, checked by :func:`open_shards`."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["rayfp4.token_shards"] = FORMAT_NAME
    version: Literal[1] = FORMAT_VERSION
    seq_len: int = Field(gt=0, description="model context; every row holds seq_len + 1 tokens")
    token_dtype: Literal["uint16", "int32"]
    rows_per_group: int = Field(gt=0)
    tokenizer: TokenizerEntry
    splits: dict[Literal["train", "val"], list[ShardFile]]
    num_documents: int = Field(ge=0)
    total_tokens: int = Field(ge=0, description="tokens in the packed stream, end-of-text included")
    dropped_tail_tokens: int = Field(ge=0)
    val_fraction: float = Field(ge=0, lt=1)
    source: str = ""
    created_unix: float = 0.0

    def num_sequences(self, split: str = "train") -> int:
        return sum(s.num_sequences for s in self.splits.get(split, []))

    def identity(self) -> str:
        """A digest of what the shards hold (tokenizer, sequence length, every file's checksum), not
        of where they are or when they were written: a run's record of which data it trained on."""
        what = {"seq_len": self.seq_len, "tokenizer": self.tokenizer.model_dump(exclude={"file"}),
                "splits": {k: [(f.num_sequences, f.sha256) for f in v] for k, v in sorted(self.splits.items())}}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def arrow_schema(self) -> pa.Schema:
        return shard_schema(np.dtype(self.token_dtype))


def shard_schema(dtype: np.dtype) -> pa.Schema:
    return pa.schema([
        pa.field("tokens", pa.list_(pa.from_numpy_dtype(dtype)), nullable=False),
        pa.field("packed_index", pa.int64(), nullable=False),
    ])


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def prepare_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty ``out_dir`` unless ``overwrite``; checked before any work is done."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: output path exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"{out_dir}: output directory is not empty (pass --overwrite to replace it)")
    return out_dir


class ShardWriter:
    """Packs tokenized documents into fixed-length rows and writes shards plus the manifest.

    Feed documents in order with :meth:`add_document`, then call :meth:`finish`, which renames the
    completed temporary directory onto ``out_dir``. Use as a context manager so that a failure
    removes the temporary directory and leaves ``out_dir`` as it was.
    """

    def __init__(self, out_dir: str | Path, *, seq_len: int, tokenizer: Tokenizer,
                 val_fraction: float = 0.0, rows_per_group: int = 256,
                 shard_sequences: int = 8192, overwrite: bool = False, source: str = "",
                 progress: "ProgressLine | None" = None):
        if seq_len < 1:
            raise DataError(f"sequence length must be positive, got {seq_len}")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"validation fraction must be in [0, 1), got {val_fraction}")
        if rows_per_group < 1 or shard_sequences < rows_per_group or shard_sequences % rows_per_group:
            raise DataError(f"shard size {shard_sequences} must be a positive multiple of the row "
                            f"group size {rows_per_group}")
        self.out_dir = prepare_output_dir(out_dir, overwrite)
        self.seq_len = seq_len
        self.row_len = seq_len + 1
        self.tokenizer = tokenizer
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.val_fraction = val_fraction
        self.rows_per_group = rows_per_group
        self.shard_sequences = shard_sequences
        self.source = source
        self.progress = progress
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp_dir.mkdir(parents=True)
        self._pending_tokens: list[np.ndarray] = []
        self._pending_count = 0
        self._rows: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in SPLITS}
        self._row_counts = {s: 0 for s in SPLITS}
        self._shards: dict[str, list[ShardFile]] = {s: [] for s in SPLITS}
        self._next_id = {s: 0 for s in SPLITS}
        self._packed_rows = 0
        self.num_documents = 0
        self.total_tokens = 0

    # context manager: clean the temporary directory on failure
    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def add_document(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.tokenizer.vocab_size):
            raise DataError(f"token id out of range for a vocabulary of {self.tokenizer.vocab_size}")
        doc = np.empty(ids.size + 1, dtype=self.dtype)
        doc[:-1] = ids
        doc[-1] = self.tokenizer.eot_id
        self._pending_tokens.append(doc)
        self._pending_count += doc.size
        self.num_documents += 1
        self.total_tokens += doc.size
        if self._pending_count >= self.row_len * self.rows_per_group:
            self._cut_rows()

    def _cut_rows(self) -> None:
        stream = np.concatenate(self._pending_tokens) if self._pending_tokens else np.empty(0, self.dtype)
        n_rows = stream.size // self.row_len
        rows = stream[: n_rows * self.row_len].reshape(n_rows, self.row_len)
        rest = stream[n_rows * self.row_len:]
        self._pending_tokens = [rest] if rest.size else []
        self._pending_count = rest.size
        packed = np.arange(self._packed_rows, self._packed_rows + n_rows, dtype=np.int64)
        self._packed_rows += n_rows
        f = self.val_fraction
        is_val = np.floor((packed + 1) * f) > np.floor(packed * f)
        for split, mask in (("train", ~is_val), ("val", is_val)):
            if mask.any():
                self._rows[split].append((rows[mask], packed[mask]))
                self._row_counts[split] += int(mask.sum())
                while self._row_counts[split] >= self.shard_sequences:
                    self._write_shard(split, self.shard_sequences)
        if self.progress:
            self.progress.update(tokens=self.total_tokens, docs=self.num_documents,
                                 rows=self._packed_rows)

    def _take_rows(self, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.concatenate([r for r, _ in self._rows[split]])
        packed = np.concatenate([p for _, p in self._rows[split]])
        self._rows[split] = [(tokens[n:], packed[n:])] if tokens.shape[0] > n else []
        self._row_counts[split] -= n
        return tokens[:n], packed[:n]

    def _write_shard(self, split: str, n: int) -> None:
        tokens, packed = self._take_rows(split, n)
        name = f"{split}-{len(self._shards[split]):05d}.parquet"
        path = self.tmp_dir / name
        flat = pa.array(tokens.reshape(-1), type=pa.from_numpy_dtype(self.dtype))
        offsets = pa.array(np.arange(0, (n + 1) * self.row_len, self.row_len, dtype=np.int32))
        table = pa.Table.from_arrays(
            [pa.ListArray.from_arrays(offsets, flat), pa.array(packed, type=pa.int64())],
            schema=shard_schema(self.dtype))
        pq.write_table(table, path, row_group_size=self.rows_per_group, compression="zstd")
        self._shards[split].append(ShardFile(
            file=name, first_id=self._next_id[split], num_sequences=n,
            num_tokens=n * self.row_len, size_bytes=path.stat().st_size, sha256=sha256_file(path)))
        self._next_id[split] += n

    def finish(self) -> ShardManifest:
        """Write the remaining rows, the tokenizer and the manifest; move everything into place."""
        self._cut_rows()
        dropped = self._pending_count
        if self.total_tokens == 0 or self.num_documents == 0:
            raise DataError(f"{self.source or 'input'}: the corpus is empty (no text to tokenize)")
        if self._packed_rows == 0:
            raise DataError(
                f"{self.source or 'input'}: sequence length {self.seq_len} needs {self.row_len} tokens "
                f"per sequence but the whole corpus has only {self.total_tokens} tokens")
        if self._row_counts["train"] == 0 and not self._shards["train"]:
            raise DataError(f"{self.source or 'input'}: no training sequences left after the "
                            f"validation split; lower the validation fraction")
        for split in SPLITS:
            if self._row_counts[split]:
                self._write_shard(split, self._row_counts[split])
        tok_file = self.tokenizer.save(self.tmp_dir)
        manifest = ShardManifest(
            seq_len=self.seq_len, token_dtype=self.dtype.name, rows_per_group=self.rows_per_group,
            tokenizer=TokenizerEntry(file=tok_file, **self.tokenizer.describe()),
            splits={s: self._shards[s] for s in SPLITS}, num_documents=self.num_documents,
            total_tokens=self.total_tokens, dropped_tail_tokens=dropped,
            val_fraction=self.val_fraction, source=self.source, created_unix=time.time())
        (self.tmp_dir / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        self._commit()
        if self.progress:
            self.progress.done(f"wrote {manifest.num_sequences('train')} train + "
                               f"{manifest.num_sequences('val')} val sequences to {self.out_dir}")
        return manifest

    def _commit(self) -> None:
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out_dir, old)
        os.rename(self.tmp_dir, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Reading and validation
# --------------------------------------------------------------------------------------------

class ShardSet:
    """A validated shard directory: its manifest plus row-group reads by global sequence id.

    Picklable (only the path and the manifest travel), so Ray tasks can read from it.
    """

    def __init__(self, path: Path, manifest: ShardManifest):
        self.path = Path(path)
        self.manifest = manifest
        self._files: dict[str, pq.ParquetFile] = {}

    def __getstate__(self):
        return {"path": str(self.path), "manifest": self.manifest.model_dump()}

    def __setstate__(self, state):
        self.__init__(Path(state["path"]), ShardManifest.model_validate(state["manifest"]))

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def rows_per_group(self) -> int:
        return self.manifest.rows_per_group

    def num_sequences(self, split: str = "train") -> int:
        return self.manifest.num_sequences(split)

    def tokenizer(self) -> Tokenizer:
        return load_saved_tokenizer(self.path, self.manifest.tokenizer.model_dump())

    def _locate_chunk(self, split: str, chunk: int) -> tuple[ShardFile, int]:
        first = chunk * self.rows_per_group
        for shard in self.manifest.splits.get(split, []):
            if shard.first_id <= first < shard.first_id + shard.num_sequences:
                return shard, (first - shard.first_id) // self.rows_per_group
        raise IndexError(f"chunk {chunk} is outside split {split!r}")

    def read_chunk(self, split: str, chunk: int) -> np.ndarray:
        """Rows ``chunk*rows_per_group ...`` of ``split`` as ``[n, seq_len + 1]`` (storage dtype)."""
        shard, group = self._locate_chunk(split, chunk)
        path = self.path / shard.file
        try:
            pf = self._files.get(shard.file)
            if pf is None:
                pf = self._files[shard.file] = pq.ParquetFile(path)
            table = pf.read_row_group(group, columns=["tokens"])
            values = table.column("tokens").combine_chunks().flatten().to_numpy()
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: cannot read row group {group} ({type(exc).__name__}: {exc}); "
                            f"the shard is damaged, re-run the tokenizer") from None
        return values.reshape(-1, self.seq_len + 1)

    def read_sequences(self, ids: np.ndarray, split: str = "train") -> np.ndarray:
        """Rows with global ids ``ids`` (any order, repeats allowed) as ``[len(ids), seq_len + 1]``."""
        ids = np.asarray(ids, dtype=np.int64)
        n = self.num_sequences(split)
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise IndexError(f"sequence id out of range [0, {n}) for split {split!r}")
        out = np.empty((ids.size, self.seq_len + 1), dtype=np.dtype(self.manifest.token_dtype))
        chunks = ids // self.rows_per_group
        for chunk in np.unique(chunks):
            where = np.flatnonzero(chunks == chunk)
            rows = self.read_chunk(split, int(chunk))
            out[where] = rows[ids[where] - chunk * self.rows_per_group]
        return out

    def read_split(self, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Every row of ``split`` in id order, with its packed index (for audits and round trips)."""
        tokens, packed = [], []
        for shard in self.manifest.splits.get(split, []):
            table = pq.read_table(self.path / shard.file)
            tokens.append(table.column("tokens").combine_chunks().flatten().to_numpy()
                          .reshape(-1, self.seq_len + 1))
            packed.append(table.column("packed_index").to_numpy())
        if not tokens:
            return np.empty((0, self.seq_len + 1), np.int64), np.empty(0, np.int64)
        return np.concatenate(tokens), np.concatenate(packed)


def _inside(directory: Path, name: str, manifest_path: Path, field: str) -> None:
    target = (directory / name).resolve()
    if Path(name).is_absolute() or not target.is_relative_to(directory.resolve()):
        raise DataError(f"{manifest_path}: {field} {name!r} points outside the shard directory {directory}; "
                        f"a manifest may only name files inside its own directory")


def open_shards(path: str | Path, verify_checksums: bool = True) -> ShardSet:
    """Open a shard directory, checking every file against the manifest.

    Checks: the directory and manifest exist and parse; each shard exists with the recorded size and
    SHA-256 (skipped with ``verify_checksums=False``: it reads every byte); its parquet footer
    parses and its schema, row count, row-group layout and ids match the manifest; the tokenizer
    file is present and loads. Any mismatch raises :class:`DataError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: shard directory does not exist")
    if not path.is_dir():
        raise DataError(f"{path}: not a directory (expected a shard directory with {MANIFEST_FILE})")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: missing; {path} is not a token shard directory "
                        f"(create one with python -m pipelines.tokenize)")
    try:
        manifest = ShardManifest.model_validate_json(manifest_path.read_text())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DataError(f"{manifest_path}: invalid manifest at {where or 'top level'}: "
                        f"{first['msg']}") from None
    # Every file the manifest names must be a file inside this directory: a manifest must not make
    # training read (or a tokenizer load) something elsewhere on the machine.
    _inside(path, manifest.tokenizer.file, manifest_path, "tokenizer.file")
    for split, shards in manifest.splits.items():
        for i, shard in enumerate(shards):
            _inside(path, shard.file, manifest_path, f"splits.{split}[{i}].file")
    expected_schema = manifest.arrow_schema()
    row_len = manifest.seq_len + 1
    for split, shards in manifest.splits.items():
        next_id = 0
        for i, shard in enumerate(shards):
            fpath = path / shard.file
            if not fpath.is_file():
                raise DataError(f"{fpath}: shard listed in {MANIFEST_FILE} does not exist")
            if shard.first_id != next_id:
                raise DataError(f"{manifest_path}: {shard.file} starts at sequence {shard.first_id}, "
                                f"expected {next_id}")
            next_id += shard.num_sequences
            size = fpath.stat().st_size
            if size != shard.size_bytes:
                raise DataError(f"{fpath}: size {size} bytes does not match the manifest "
                                f"({shard.size_bytes}); the shard is truncated or was replaced")
            if verify_checksums and sha256_file(fpath) != shard.sha256:
                raise DataError(f"{fpath}: SHA-256 checksum does not match the manifest; "
                                f"the shard is corrupt or was modified")
            try:
                meta = pq.ParquetFile(fpath).metadata
                schema = meta.schema.to_arrow_schema()
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"{fpath}: not a readable parquet file ({exc})") from None
            if not schema.remove_metadata().equals(expected_schema):
                raise DataError(f"{fpath}: schema {schema.remove_metadata().to_string(show_schema_metadata=False)!r}"
                                f" does not match the manifest's {expected_schema.to_string()!r}")
            if meta.num_rows != shard.num_sequences:
                raise DataError(f"{fpath}: holds {meta.num_rows} sequences, the manifest says "
                                f"{shard.num_sequences}")
            if shard.num_tokens != shard.num_sequences * row_len:
                raise DataError(f"{manifest_path}: {shard.file} token count {shard.num_tokens} is not "
                                f"{shard.num_sequences} sequences x {row_len} tokens")
            groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            last = i == len(shards) - 1
            if any(g != manifest.rows_per_group for g in groups[:-1]) or \
                    groups[-1] > manifest.rows_per_group or \
                    (not last and groups[-1] != manifest.rows_per_group):
                raise DataError(f"{fpath}: row groups {groups[:4]}... are not whole groups of "
                                f"{manifest.rows_per_group} rows as the manifest requires")
    if manifest.num_sequences("train") == 0:
        raise DataError(f"{manifest_path}: the train split holds no sequences")
    shard_set = ShardSet(path, manifest)
    tok_path = path / manifest.tokenizer.file
    if not tok_path.is_file():
        raise DataError(f"{tok_path}: tokenizer file listed in {MANIFEST_FILE} does not exist")
    shard_set.tokenizer()  # raises DataError if it does not parse
    return shard_set

