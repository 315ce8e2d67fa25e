"""pipelines.tokenize: the Ray Data job and its command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import synthetic_documents
from pipelines.tokenize import main, tokenize_corpus
from rayfp4.data import DataError, open_shards

ROOT = Path(__file__).resolve().parents[1]


def write_mixed_corpus(root: Path, docs: list[str]) -> list[str]:
    """The same documents spread over .txt, .jsonl and .parquet files; returns them in read order."""
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text(docs[0], encoding="utf-8")
    with open(root / "b" / "c.jsonl", "w", encoding="utf-8") as f:
        for d in docs[1:6]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
        f.write("\n")  # blank lines are skipped
    pq.write_table(pa.table({"text": docs[6:], "n": list(range(len(docs) - 6))}), root / "b" / "d.parquet")
    (root / "notes.md").write_text("ignored: not a text input type")
    return docs  # sorted paths: a.txt, b/c.jsonl, b/d.parquet


def stream_of(shards) -> np.ndarray:
    rows, index = zip(*(shards.read_split(s) for s in ("train", "val")))
    return np.concatenate(rows)[np.argsort(np.concatenate(index))].reshape(-1)


def test_mixed_inputs_tokenize_to_shards_that_decode_to_the_input(ray_session, tmp_path):
    docs = write_mixed_corpus(tmp_path / "in", synthetic_documents(20, seed=4))
    manifest = tokenize_corpus([str(tmp_path / "in")], tmp_path / "out", tokenizer="byte",
                               seq_len=32, val_fraction=0.1, rows_per_group=4, shard_sequences=16,
                               progress=False)
    shards = open_shards(tmp_path / "out")
    assert len(manifest.splits["train"]) > 1 and manifest.num_sequences("val") > 0
    assert manifest.num_documents == len(docs)
    decoded = shards.tokenizer().decode_documents(stream_of(shards))
    assert decoded[:-1] == docs[: len(decoded) - 1]
    assert docs[len(decoded) - 1].startswith(decoded[-1])


def test_many_files_read_in_blocks_keep_their_order(ray_session, tmp_path, monkeypatch):
    # Files are read and tokenized several to a task (pipelines.tokenize.TASK_BYTES); the shards
    # must still hold the documents in file order, as one task per file gave them.
    import pipelines.tokenize as tk

    docs = synthetic_documents(60, seed=7)
    names = []
    for i, d in enumerate(docs[:50]):  # 50 files over 5 folders, sorted as the reader sorts them
        f = tmp_path / "in" / f"d{i % 5}" / f"f{i:03d}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(d, encoding="utf-8")
        names.append((str(f.relative_to(tmp_path / "in")), d))
    with open(tmp_path / "in" / "z.jsonl", "w", encoding="utf-8") as f:
        for d in docs[50:]:
            f.write(json.dumps({"text": d}) + "\n")
    expected = [d for _, d in sorted(names)] + docs[50:]
    monkeypatch.setattr(tk, "TASK_BYTES", 2000)  # a few files per task
    assert 1 < tk._file_blocks(tk.resolve_inputs([str(tmp_path / "in")])) < 51
    tokenize_corpus([str(tmp_path / "in")], tmp_path / "out", tokenizer="byte", seq_len=64,
                    val_fraction=0.1, rows_per_group=4, shard_sequences=32, progress=False)
    shards = open_shards(tmp_path / "out")
    decoded = shards.tokenizer().decode_documents(stream_of(shards))
    assert decoded[:-1] == expected[: len(decoded) - 1]
    assert expected[len(decoded) - 1].startswith(decoded[-1])


def test_bpe_trained_on_the_input_round_trips(ray_session, tmp_path):
    docs = synthetic_documents(30, seed=5)
    (tmp_path / "in").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "in" / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    manifest = tokenize_corpus([str(tmp_path / "in" / "*.txt")], tmp_path / "out", tokenizer="bpe:320",
                               seq_len=16, val_fraction=0.0, rows_per_group=8, shard_sequences=32,
                               progress=False)
    assert manifest.tokenizer.kind == "bpe" and manifest.tokenizer.vocab_size <= 320
    shards = open_shards(tmp_path / "out")
    decoded = shards.tokenizer().decode_documents(stream_of(shards))
    assert decoded[:-1] == docs[: len(decoded) - 1]
    # The saved tokenizer.json is usable as an input tokenizer for another corpus.
    again = tokenize_corpus([str(tmp_path / "in" / "000.txt")], tmp_path / "out2",
                            tokenizer=str(tmp_path / "out" / "tokenizer.json"), seq_len=4,
                            progress=False)
    assert again.tokenizer.kind == "hf" and again.tokenizer.eot_token == "<|endoftext|>"


def test_errors_raised_inside_ray_tasks_reach_the_caller_as_data_errors(ray_session, tmp_path):
    bad = tmp_path / "late.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataError) as info:
        tokenize_corpus([str(bad)], tmp_path / "out", tokenizer="byte", seq_len=2, progress=False)
    assert str(info.value) == f"{bad}:2: no field 'text'"
    assert not (tmp_path / "out").exists()


def test_empty_corpus_and_too_long_sequences(ray_session, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="corpus is empty"):
        tokenize_corpus([str(tmp_path / "empty.txt")], tmp_path / "o1", tokenizer="byte", progress=False)
    (tmp_path / "short.txt").write_text("a few words")
    with pytest.raises(DataError, match="sequence length 256 needs 257 tokens .* only 12 tokens"):
        tokenize_corpus([str(tmp_path / "short.txt")], tmp_path / "o2", tokenizer="byte",
                        seq_len=256, progress=False)


def test_source_trees_as_plain_text_and_undecodable_files(ray_session, tmp_path, capsys):
    """--plain-suffix .py reads source files like .txt; --skip-undecodable leaves out (and lists)
    files that are not UTF-8, where without it the job stops naming the file."""
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    docs = ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)\n" * 20, "# ça marche\nA = 1\n"]
    for i, d in enumerate(docs):
        (src / "pkg" / f"m{i}.py").write_text(d, encoding="utf-8")
    (src / "pkg" / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))
    (src / "pkg" / "data.bin").write_bytes(b"\x00\x01")  # not an input type: ignored
    with pytest.raises(DataError, match="holds no .jsonl, .parquet, .txt files"):
        tokenize_corpus([str(src)], tmp_path / "o0", tokenizer="byte", progress=False)
    with pytest.raises(DataError, match=r"latin1.py: not UTF-8 text"):
        tokenize_corpus([str(src)], tmp_path / "o1", tokenizer="byte", seq_len=8, progress=False,
                        plain_suffixes=[".py"])
    manifest = tokenize_corpus([str(src)], tmp_path / "o2", tokenizer="byte", seq_len=8, val_fraction=0.0,
                               progress=False, plain_suffixes=[".py"], skip_undecodable=True)
    assert "skipping 1 file(s) that are not UTF-8: " in capsys.readouterr().err
    assert manifest.num_documents == 3
    decoded = open_shards(tmp_path / "o2").tokenizer().decode_documents(stream_of(open_shards(tmp_path / "o2")))
    assert decoded[:2] == docs[:2] and docs[2].startswith(decoded[2])
    with pytest.raises(DataError, match="--plain-suffix 'py': expected a file suffix"):
        tokenize_corpus([str(src)], tmp_path / "o3", tokenizer="byte", progress=False, plain_suffixes=["py"])


def test_exclude_leaves_out_matching_files_and_folders(tmp_path):
    from pipelines.tokenize import resolve_inputs

    root = tmp_path / "lib"
    for rel in ["os.py", "json/decoder.py", "site-packages/numpy/core.py", "test/test_os.py",
                "idlelib/idle_test/t.py", "README.txt"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x = 1\n")

    def names(*exclude):
        return [str(Path(p).relative_to(root)) for p, _ in resolve_inputs([str(root)], [".py"], exclude)]

    assert names() == ["README.txt", "idlelib/idle_test/t.py", "json/decoder.py", "os.py",
                       "site-packages/numpy/core.py", "test/test_os.py"]
    assert names("site-packages", "*test*") == ["README.txt", "json/decoder.py", "os.py"]
    assert names("json/*.py", "*.txt") == ["idlelib/idle_test/t.py", "os.py", "site-packages/numpy/core.py",
                                          "test/test_os.py"]
    with pytest.raises(DataError, match=r"holds no .* files outside --exclude \*"):
        resolve_inputs([str(root)], [".py"], ["*"])
    with pytest.raises(DataError, match="--exclude '/abs': expected a glob relative"):
        resolve_inputs([str(root)], [".py"], ["/abs"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.tokenize", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("make_args, message", [
    (lambda p: [str(p / "missing"), "--out", str(p / "o")], "missing: input path does not exist"),
    (lambda p: [str(p / "*.nothing"), "--out", str(p / "o")], "no file matches this pattern"),
    (lambda p: [str(p / "x.jsonl"), "--out", str(p / "o")], "x.jsonl:1: no field 'text' (fields: body)"),
    (lambda p: [str(p / "x.parquet"), "--out", str(p / "o"), "--text-field", "content"],
     "x.parquet: no column 'content' (columns: text)"),
    (lambda p: [str(p / "x.jsonl"), "--text-field", "body", "--out", str(p / "o"),
                "--tokenizer", str(p / "broken.json")], "broken.json: not a valid tokenizer.json"),
    (lambda p: [str(p / "x.jsonl"), "--text-field", "body", "--out", str(p / "full")],
     "output directory is not empty"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make_args, message):
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "text"}) + "\n")
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "x.parquet")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    assert main(make_args(tmp_path)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenize: error: ") and message in lines[0]
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"


def test_cli_as_a_process_prints_no_traceback(tmp_path):
    result = run_cli(str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"tokenize: error: {tmp_path / 'missing.txt'}: input path does not exist"
    usage = run_cli("--tokenizer", "byte")  # argparse: --out is required
    assert usage.returncode == 2 and "--out" in usage.stderr
