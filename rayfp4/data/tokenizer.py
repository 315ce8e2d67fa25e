"""Tokenizers for packing text into token shards, and for reading the shards back as text.

Three kinds, chosen by a spec string (the CLI's ``--tokenizer``):

``byte``
    UTF-8 bytes are the tokens (ids 0..255) and id 256 is the end-of-text token. Needs nothing and
    round-trips any text exactly; the baseline for tests and tiny runs.
``bpe:VOCAB``
    A byte-level BPE of ``VOCAB`` tokens trained with the ``tokenizers`` library on the corpus being
    tokenized (``<|endoftext|>`` is its end-of-text token). Byte-level, so it also round-trips exactly.
``PATH`` (a Hugging Face ``tokenizer.json``)
    Loaded from the file; its end-of-text token is found among common names or given explicitly.

Whatever the kind, the tokenizer is saved into the shard directory (``tokenizer.json``, or the small
``byte_tokenizer.json`` marker for ``byte``) so that shards can always be decoded without the
original input or any download. Nothing here touches the network.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from rayfp4.data.errors import DataError

HF_TOKENIZER_FILE = "tokenizer.json"
BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
BPE_EOT_TOKEN = "<|endoftext|>"
# Looked for, in this order, in a user's tokenizer.json when no end-of-text token is named.
COMMON_EOT_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
MIN_BPE_VOCAB = 260  # the 256 byte symbols, the end-of-text token, and a few merges


class Tokenizer:
    """Common interface: encode documents to int arrays, decode ids back to text."""

    kind: str
    vocab_size: int
    eot_id: int
    eot_token: str

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; end-of-text tokens are dropped (use :meth:`decode_documents` to split)."""
        raise NotImplementedError

    def decode_documents(self, ids: np.ndarray) -> list[str]:
        """Split ``ids`` at end-of-text tokens and decode each piece: the documents that were packed."""
        ids = np.asarray(ids)
        cuts = np.flatnonzero(ids == self.eot_id)
        pieces = np.split(ids, cuts)
        # Every piece after the first starts with the end-of-text token that separated it.
        return [self.decode(p[1:] if i else p) for i, p in enumerate(pieces)]

    def save(self, directory: Path) -> str:
        """Write this tokenizer into ``directory``; returns the file name written."""
        raise NotImplementedError

    def to_hf_json(self) -> str:
        """The tokenizer as a Hugging Face ``tokenizer.json`` (same ids, same text), for exports."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Plain data for the shard manifest."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "eot_token": self.eot_token}


class ByteTokenizer(Tokenizer):
    kind = "byte"
    vocab_size = 257
    eot_id = 256
    eot_token = "<|endoftext|>"

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_hf_json(self) -> str:
        # A byte-level BPE with no merges: ByteLevel maps each byte to one printable character
        # (byte_level_chars) and the vocabulary maps that character back to the byte's value.
        from tokenizers import AddedToken, Tokenizer as _Tok, decoders, models, pre_tokenizers

        vocab = {ch: b for b, ch in enumerate(byte_level_chars())}
        tok = _Tok(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(self.eot_token, special=True, normalized=False)])
        return tok.to_str()

    def save(self, directory: Path) -> str:
        (Path(directory) / BYTE_TOKENIZER_FILE).write_text(json.dumps(
            {"kind": "byte", "note": "UTF-8 bytes are ids 0..255; 256 is end-of-text"}) + "\n")
        return BYTE_TOKENIZER_FILE


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (from a tokenizer.json or trained here)."""

    def __init__(self, tokenizer, kind: str, eot_token: str, source: str):
        self._tok = tokenizer
        self.kind = kind
        self.eot_token = eot_token
        eot_id = tokenizer.token_to_id(eot_token)
        if eot_id is None:
            raise DataError(f"{source}: tokenizer has no token {eot_token!r} to use as end-of-text")
        self.eot_id = int(eot_id)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if int(i) != self.eot_id]
        return self._tok.decode(ids, skip_special_tokens=False)

    def save(self, directory: Path) -> str:
        self._tok.save(str(Path(directory) / HF_TOKENIZER_FILE))
        return HF_TOKENIZER_FILE

    def to_hf_json(self) -> str:
        return self._tok.to_str()

    def __getstate__(self):  # ship to Ray tasks as JSON text
        return {"json": self._tok.to_str(), "kind": self.kind, "eot_token": self.eot_token}

    def __setstate__(self, state):
        from tokenizers import Tokenizer as _Tok

        self.__init__(_Tok.from_str(state["json"]), state["kind"], state["eot_token"], "<pickled>")


def byte_level_chars() -> list[str]:
    """The printable character that byte-level BPE (GPT-2's scheme, the ``tokenizers`` ByteLevel
    pre-tokenizer) uses for each byte 0..255: the byte itself where that is a visible Latin-1
    character, else the next unused code point from 256 up, in byte order."""
    visible = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    out, spare = [], 256
    for b in range(256):
        if b in visible:
            out.append(chr(b))
        else:
            out.append(chr(spare))
            spare += 1
    return out


def load_tokenizer_file(path: str | Path, eot_token: str | None = None) -> HFTokenizer:
    """Load a Hugging Face ``tokenizer.json``; a clear :class:`DataError` if it is missing or bad."""
    from tokenizers import Tokenizer as _Tok

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file does not exist")
    try:
        tok = _Tok.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception with a serde message
        raise DataError(f"{path}: not a valid tokenizer.json ({exc})") from None
    if eot_token is None:
        vocab = tok.get_vocab(with_added_tokens=True)
        eot_token = next((t for t in COMMON_EOT_TOKENS if t in vocab), None)
        if eot_token is None:
            raise DataError(f"{path}: no end-of-text token found (looked for "
                            f"{', '.join(COMMON_EOT_TOKENS)}); name one with --eot-token")
    return HFTokenizer(tok, kind="hf", eot_token=eot_token, source=str(path))


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``texts`` (an iterator is fine)."""
    from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers, trainers

    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BPE_EOT_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, kind="bpe", eot_token=BPE_EOT_TOKEN, source="trained BPE")


def parse_tokenizer_spec(spec: str) -> tuple[str, int | str | None]:
    """``"byte"`` -> ("byte", None); ``"bpe:8192"`` -> ("bpe", 8192); otherwise ("file", path)."""
    if spec == "byte":
        return "byte", None
    if spec.startswith("bpe:"):
        try:
            vocab = int(spec[4:])
        except ValueError:
            raise DataError(f"tokenizer spec {spec!r}: expected bpe:VOCAB with an integer VOCAB") from None
        if not MIN_BPE_VOCAB <= vocab <= 2**31 - 1:
            raise DataError(f"tokenizer spec {spec!r}: VOCAB must be at least {MIN_BPE_VOCAB}")
        return "bpe", vocab
    return "file", spec


def build_tokenizer(spec: str, training_texts: Iterator[str] | None = None,
                    eot_token: str | None = None) -> Tokenizer:
    """The tokenizer a spec names; ``training_texts`` (an iterable of documents) is used by ``bpe:``."""
    kind, arg = parse_tokenizer_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if training_texts is None:
            raise DataError(f"tokenizer spec {spec!r}: a BPE needs the corpus to train on")
        return train_bpe(training_texts, int(arg))
    return load_tokenizer_file(arg, eot_token)


def load_saved_tokenizer(directory: str | Path, info: dict) -> Tokenizer:
    """The tokenizer saved in a shard directory, as described by the manifest's ``tokenizer`` entry."""
    directory = Path(directory)
    if info["kind"] == "byte":
        return ByteTokenizer()
    tok = load_tokenizer_file(directory / info["file"], info["eot_token"])
    tok.kind = info["kind"]
    return tok


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned storage that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)
