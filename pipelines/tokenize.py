"""Tokenize raw text into token shards with Ray Data.

    python -m pipelines.tokenize INPUT... --out DIR [--tokenizer bpe:8192|byte|PATH/tokenizer.json]
                                 [--seq-len 256] [--val-fraction 0.01] [--text-field text]
    python -m pipelines.tokenize --out DIR          # the embedded Shakespeare corpus
    ray job submit --working-dir . -- python -m pipelines.tokenize data/*.jsonl --out /shared/shards

Inputs are files, directories (searched recursively) or globs of ``.txt`` (one document per file),
``.jsonl`` (one document per line, text in ``--text-field``) and ``.parquet`` (one document per row
of the ``--text-field`` column). ``--plain-suffix .py`` (repeatable) reads files with that suffix
like ``.txt`` (e.g. a tree of source code); ``--exclude PATTERN`` (repeatable) leaves out the files
of a directory input whose path below it, or any folder on that path, matches the glob (e.g.
``--exclude site-packages --exclude 'test*'``); ``--skip-undecodable`` leaves out plain-text files that
are not UTF-8 (listed on the driver before Ray starts) instead of failing. Files are taken in sorted
order, documents in file order.

How the work is split: Ray Data reads the files in parallel (one read task per file) and tokenizes
batches of documents in parallel; a ``bpe:`` tokenizer is first trained on the streamed documents.
Packing is sequential by nature (each row continues where the previous document ended), so the
driver consumes the tokenized documents in order (``preserve_order``) and feeds them to
:class:`rayfp4.data.ShardWriter`, which packs rows of ``seq_len + 1`` tokens, deals rows to the
validation split and writes parquet shards plus the manifest; the last partial row is dropped (see
``rayfp4.data.shards``). The output appears only when complete (a temporary sibling directory is
renamed), and a non-empty output directory is refused without ``--overwrite``.

Bad input (a missing path, no text, a missing text field, a tokenizer file that does not parse, a
sequence length longer than the corpus) is checked on the driver where it is cheap and reported as
one line with exit status 2.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayfp4.data.errors import DataError
from rayfp4.data.stream import find_data_error, quiet_ray_data
from rayfp4.console import ProgressLine
from rayfp4.data.shards import ShardManifest, ShardWriter, prepare_output_dir
from rayfp4.data.tokenizer import Tokenizer, build_tokenizer, parse_tokenizer_spec

TEXT_SUFFIXES = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
EMBEDDED = "embedded:shakespeare"


# ------------------------------------------------------------------------------------------
# Finding and checking inputs (driver side, cheap)
# ------------------------------------------------------------------------------------------

def _plain_suffixes(plain_suffixes) -> dict[str, str]:
    out = dict(TEXT_SUFFIXES)
    for suf in plain_suffixes:
        if not suf.startswith(".") or len(suf) < 2 or "/" in suf:
            raise DataError(f"--plain-suffix {suf!r}: expected a file suffix such as .py")
        if suf in (".jsonl", ".parquet"):
            raise DataError(f"--plain-suffix {suf}: {suf} files are read as records, not plain text")
        out[suf] = "txt"
    return out


def _excluded(rel: Path, patterns) -> bool:
    """Whether the path ``rel`` (relative to a directory input) or one of its folders matches a glob."""
    parts = rel.parts
    candidates = [rel.as_posix()] + ["/".join(parts[:i]) for i in range(1, len(parts))] + list(parts)
    return any(fnmatch.fnmatchcase(c, pat) for pat in patterns for c in candidates)


def resolve_inputs(inputs: list[str], plain_suffixes: tuple[str, ...] | list[str] = (),
                   exclude: tuple[str, ...] | list[str] = ()) -> list[tuple[str, str]]:
    """``[(path, kind)]`` for every input file, sorted within each argument; errors name the path.
    ``plain_suffixes``: more suffixes read as one plain-text document per file, like ``.txt``.
    ``exclude``: globs; a file of a directory input is left out when its path below the directory,
    or a folder on that path, matches one (``site-packages``, ``test*``, ``*/data/*.txt``)."""
    suffixes = _plain_suffixes(plain_suffixes)
    for pat in exclude:
        if not pat or pat.startswith("/"):
            raise DataError(f"--exclude {pat!r}: expected a glob relative to the input directory, such as site-packages")
    kinds = ", ".join(sorted(suffixes))
    found: list[tuple[str, str]] = []
    for arg in inputs:
        if any(ch in arg for ch in "*?["):
            paths = sorted(glob.glob(arg, recursive=True))
            if not paths:
                raise DataError(f"{arg}: no file matches this pattern")
        elif os.path.isdir(arg):
            paths = sorted(str(p) for p in Path(arg).rglob("*") if p.suffix in suffixes and p.is_file()
                           and not _excluded(p.relative_to(arg), exclude))
            if not paths:
                raise DataError(f"{arg}: directory holds no {kinds} files"
                                + (f" outside --exclude {' '.join(exclude)}" if exclude else ""))
        elif os.path.exists(arg):
            paths = [arg]
        else:
            raise DataError(f"{arg}: input path does not exist")
        for p in paths:
            kind = suffixes.get(Path(p).suffix)
            if kind is None:
                if arg == p:
                    raise DataError(f"{p}: unsupported input type (expected {kinds}; --plain-suffix "
                                    "adds plain-text suffixes)")
                continue
            found.append((p, kind))
    if not found:
        raise DataError(f"{' '.join(inputs)}: no {kinds} input files")
    return found


def drop_undecodable(files: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[str]]:
    """(the files whose plain text is UTF-8, the plain-text files that are not)."""
    keep, dropped = [], []
    for path, kind in files:
        if kind == "txt":
            try:
                Path(path).read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                dropped.append(path)
                continue
        keep.append((path, kind))
    return keep, dropped


def check_text_field(files: list[tuple[str, str]], text_field: str) -> None:
    """Fail early when a jsonl/parquet file has no ``text_field`` (first record / schema only)."""
    for path, kind in files:
        if kind == "parquet":
            try:
                names = pq.read_schema(path).names
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"{path}: not a readable parquet file ({exc})") from None
            if text_field not in names:
                raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); "
                                f"choose one with --text-field")
        elif kind == "jsonl":
            with open(path, encoding="utf-8", errors="replace") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        record = _parse_json_line(path, lineno, line)
                        if text_field not in record:
                            raise DataError(f"{path}:{lineno}: no field {text_field!r} (fields: "
                                            f"{', '.join(record)}); choose one with --text-field")
                        break


def _parse_json_line(path: str, lineno: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object per line")
    return record


# ------------------------------------------------------------------------------------------
# Ray Data stages (run in tasks)
# ------------------------------------------------------------------------------------------

def read_documents(row: dict, text_field: str) -> list[dict]:
    """One input file -> its documents, tagged with (file_index, doc_index) for ordering."""
    path, kind, file_index = row["path"], row["kind"], int(row["file_index"])
    texts: list[str] = []
    if kind == "txt":
        try:
            texts = [Path(path).read_text(encoding="utf-8")]
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    elif kind == "jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = _parse_json_line(path, lineno, line)
                if text_field not in record:
                    raise DataError(f"{path}:{lineno}: no field {text_field!r}")
                value = record[text_field]
                if not isinstance(value, str):
                    raise DataError(f"{path}:{lineno}: field {text_field!r} is "
                                    f"{type(value).__name__}, not text")
                texts.append(value)
    else:
        try:
            column = pq.read_table(path, columns=[text_field]).column(text_field)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: cannot read column {text_field!r} ({exc})") from None
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise DataError(f"{path}: column {text_field!r} has type {column.type}, not text")
        texts = [t for t in column.to_pylist() if t is not None]
    return [{"file_index": file_index, "doc_index": i, "text": t} for i, t in enumerate(texts) if t]


def _token_table(file_index, doc_index, ids: list[np.ndarray]) -> pa.Table:
    """Documents' token ids as one Arrow table, without a Python object per token."""
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([a.size for a in ids], out=offsets[1:])
    flat = np.concatenate(ids).astype(np.int32, copy=False) if ids else np.empty(0, np.int32)
    return pa.table({
        "file_index": pa.array(file_index, type=pa.int64()),
        "doc_index": pa.array(doc_index, type=pa.int64()),
        "tokens": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat)),
    })


def tokenize_documents(batch: pa.Table, tokenizer: Tokenizer) -> pa.Table:
    ids = tokenizer.encode_batch(batch.column("text").to_pylist())
    return _token_table(batch.column("file_index"), batch.column("doc_index"), ids)


def read_and_tokenize(batch: pa.Table, text_field: str, tokenizer: Tokenizer) -> pa.Table:
    """A block of input files -> their documents' token ids, in file and document order: reading
    and tokenizing in one task, so that the text never travels through Ray's object store."""
    docs = [d for row in batch.to_pylist() for d in read_documents(row, text_field)]
    ids = tokenizer.encode_batch([d["text"] for d in docs])
    return _token_table([d["file_index"] for d in docs], [d["doc_index"] for d in docs], ids)


# ------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------

#: About this many bytes of input files per read-and-tokenize task: one task per small file
#: spends its time in Ray's per-task and per-row overhead, not in reading and tokenizing.
TASK_BYTES = 8 << 20


def _file_blocks(files: list[tuple[str, str]]) -> int:
    """How many blocks (tasks) to read ``files`` in: about TASK_BYTES each, at least two per
    CPU of the cluster where there are enough files, never more than one per file."""
    import ray

    total = sum(os.path.getsize(p) for p, _ in files)
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    return max(1, min(len(files), max(-(-total // TASK_BYTES), 2 * cpus)))


def _files_dataset(files: list[tuple[str, str]]):
    import ray.data

    quiet_ray_data()
    items = [{"path": p, "kind": k, "file_index": i} for i, (p, k) in enumerate(files)]
    ds = ray.data.from_items(items, override_num_blocks=_file_blocks(files))
    ds.context.execution_options.preserve_order = True
    return ds


def _documents_dataset(files: list[tuple[str, str]], text_field: str):
    return _files_dataset(files).flat_map(read_documents, fn_kwargs={"text_field": text_field})


def _embedded_dataset():
    import ray.data

    from rayfp4.data.corpus import shakespeare_documents
    quiet_ray_data()
    docs = [{"file_index": i, "doc_index": 0, "text": t} for i, t in enumerate(shakespeare_documents())]
    ds = ray.data.from_items(docs, override_num_blocks=min(len(docs), 8))
    ds.context.execution_options.preserve_order = True
    return ds


def _ensure_ray(address: str | None) -> None:
    # A local Ray started here listens on 127.0.0.1 only.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")


def _iter_texts(ds) -> Iterator[str]:
    for batch in ds.iter_batches(batch_size=64, batch_format="pyarrow"):
        yield from batch.column("text").to_pylist()


def tokenize_corpus(inputs: list[str], out_dir: str | Path, *, tokenizer: str = "bpe:8192",
                    seq_len: int = 256, val_fraction: float = 0.01, text_field: str = "text",
                    rows_per_group: int = 256, shard_sequences: int = 8192,
                    eot_token: str | None = None, overwrite: bool = False,
                    progress: bool = True, ray_address: str | None = None,
                    plain_suffixes: tuple[str, ...] | list[str] = (),
                    skip_undecodable: bool = False, exclude: tuple[str, ...] | list[str] = ()) -> ShardManifest:
    """Tokenize ``inputs`` (empty: the embedded corpus) into a shard directory.

    Inputs are checked before Ray is touched; Ray is started (or joined at ``ray_address`` /
    ``RAY_ADDRESS``) only if this process is not connected yet.
    """
    if seq_len < 1:
        raise DataError(f"sequence length must be positive, got {seq_len}")
    out_dir = prepare_output_dir(out_dir, overwrite)
    kind, _ = parse_tokenizer_spec(tokenizer)
    if kind == "file":  # a tokenizer file that does not parse fails before any reading
        build_tokenizer(tokenizer, eot_token=eot_token)
    files = resolve_inputs(inputs, plain_suffixes, exclude) if inputs else []
    if skip_undecodable and files:
        files, dropped = drop_undecodable(files)
        if dropped:
            shown = ", ".join(dropped[:3]) + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else "")
            print(f"tokenize: skipping {len(dropped)} file(s) that are not UTF-8: {shown}", file=sys.stderr)
        if not files:
            raise DataError(f"{' '.join(inputs)}: no input file is UTF-8 text")
    check_text_field(files, text_field)
    _ensure_ray(ray_address)
    try:
        return _run_job(files, inputs, out_dir, tokenizer=tokenizer, kind=kind, seq_len=seq_len,
                        val_fraction=val_fraction, text_field=text_field,
                        rows_per_group=rows_per_group, shard_sequences=shard_sequences,
                        eot_token=eot_token, overwrite=overwrite, progress=progress)
    except Exception as exc:  # a DataError raised in a Ray task arrives wrapped; unwrap it
        err = find_data_error(exc)
        if err is None or err is exc:
            raise
        raise err from None


def _run_job(files, inputs, out_dir, *, tokenizer, kind, seq_len, val_fraction, text_field,
             rows_per_group, shard_sequences, eot_token, overwrite, progress) -> ShardManifest:
    if inputs:
        docs = _documents_dataset(files, text_field)
        source = ", ".join(inputs)
    else:
        docs = _embedded_dataset()
        source = EMBEDDED
    line = ProgressLine("tokenize") if progress else None
    if kind == "bpe":
        if line:
            line.note(f"training {tokenizer} on {source}")
        tok = build_tokenizer(tokenizer, training_texts=_iter_texts(docs))
    else:
        tok = build_tokenizer(tokenizer, eot_token=eot_token)
    if inputs:  # each task reads a block of files and tokenizes them
        tokenized = _files_dataset(files).map_batches(
            read_and_tokenize, batch_size=None, batch_format="pyarrow",
            fn_kwargs={"text_field": text_field, "tokenizer": tok})
    else:
        tokenized = docs.map_batches(tokenize_documents, batch_size=64, batch_format="pyarrow",
                                     fn_kwargs={"tokenizer": tok})
    tokenized.context.execution_options.preserve_order = True
    last = (-1, -1)
    with ShardWriter(out_dir, seq_len=seq_len, tokenizer=tok, val_fraction=val_fraction,
                     rows_per_group=rows_per_group, shard_sequences=shard_sequences,
                     overwrite=overwrite, source=source, progress=line) as writer:
        for batch in tokenized.iter_batches(batch_size=None, batch_format="pyarrow"):
            file_index = batch.column("file_index").to_numpy()
            doc_index = batch.column("doc_index").to_numpy()
            tokens = batch.column("tokens").combine_chunks()
            flat = tokens.values.to_numpy(zero_copy_only=False)
            offsets = tokens.offsets.to_numpy()
            for i in range(batch.num_rows):
                here = (int(file_index[i]), int(doc_index[i]))
                assert here > last, f"documents out of order: {here} after {last}"
                last = here
                writer.add_document(flat[offsets[i]:offsets[i + 1]])
        return writer.finish()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.tokenize",
                                description="Tokenize raw text into rayfp4 token shards (Ray Data).")
    p.add_argument("inputs", nargs="*", help=".txt/.jsonl/.parquet files, directories or globs; "
                   "none: the embedded Shakespeare corpus")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--tokenizer", default="bpe:8192",
                   help="bpe:VOCAB (trained on the input), byte, or a tokenizer.json path")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of sequences held out")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column with the text")
    p.add_argument("--eot-token", default=None, help="end-of-text token of a tokenizer.json")
    p.add_argument("--rows-per-group", type=int, default=256, help="parquet row group size")
    p.add_argument("--shard-sequences", type=int, default=8192, help="sequences per shard file")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--plain-suffix", dest="plain_suffixes", action="append", default=[], metavar=".SUFFIX",
                   help="also read files with this suffix as one plain-text document each (e.g. .py); repeatable")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="leave out the files of a directory input whose relative path or a folder on it matches "
                        "this glob (repeatable), e.g. site-packages")
    p.add_argument("--skip-undecodable", action="store_true",
                   help="leave out plain-text files that are not UTF-8 instead of failing")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Ray Data's per-dataset INFO lines would drown the progress line.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        manifest = tokenize_corpus(
            args.inputs, args.out, tokenizer=args.tokenizer, seq_len=args.seq_len,
            val_fraction=args.val_fraction, text_field=args.text_field,
            rows_per_group=args.rows_per_group, shard_sequences=args.shard_sequences,
            eot_token=args.eot_token, overwrite=args.overwrite, progress=not args.quiet,
            ray_address=args.address, plain_suffixes=args.plain_suffixes,
            skip_undecodable=args.skip_undecodable, exclude=args.exclude)
    except DataError as err:  # user errors: one line, no traceback
        print(f"tokenize: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {manifest.num_sequences('train')} train and {manifest.num_sequences('val')} "
          f"val sequences of {manifest.seq_len} tokens ({manifest.total_tokens:,} tokens, "
          f"{manifest.tokenizer.kind} tokenizer, vocab {manifest.tokenizer.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
