"""``python -m rayfp4.eval PATH``: loss, perplexity and bits per byte of trained checkpoints.

PATH is a run folder (all its variants, or those named with ``--variant``), a variant folder or a
checkpoint folder (:mod:`rayfp4.train.trained`). Each variant's checkpoint is scored on each data
set (``--data``, default ``val``):

- ``val`` / ``train``: that split of the shards the run trained on;
- a shard directory, ``DIR`` or ``DIR:val`` / ``DIR:train`` (default ``val``), whose tokenizer must
  be the run's; rows longer than the run's sequence length are cut to it;
- a text file (one document) or a ``.jsonl`` file (one document per line: a JSON string, or an
  object whose ``--text-key`` field, default ``text``, holds it), tokenized with the run's
  tokenizer and packed as the shards are (each document followed by end-of-text, cut into rows of
  the run's sequence length + 1; a shorter last row is kept).

in two precisions (``--precision``, default both): ``bf16`` (no linear quantized, BF16
activations) and ``trained`` (the variant's precision policy applied as in training, activations
in its ``train.dtype``). NVFP4's tensor scale spans a whole batch, so ``trained`` results depend on
how rows are batched: the default ``--batch-size`` is the training's per-worker micro-batch, as
its validation used. Loss is the mean cross-entropy per predicted token (nats); perplexity its
exponential; bits per byte the summed cross-entropy in bits over the UTF-8 bytes of the predicted
tokens' text. Results go to each variant's MLflow run as ``eval/<data>/<precision>/loss``,
``.../perplexity`` and ``.../bits_per_byte`` at the checkpoint's step, with a tag
``rayfp4.eval.<data>`` describing the data; the table across variants is printed at the end.

Exit codes: 0 done, 2 a path that is not a run, an unknown variant, a checkpoint that does not
load, data that does not exist or does not fit (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayfp4.eval",
                                description="Loss, perplexity and bits per byte of trained checkpoints.")
    p.add_argument("path", help="a run folder (runs/NAME), a variant folder or a checkpoint folder")
    p.add_argument("--variant", action="append", default=[], help="variant of the run to score (repeatable; default all)")
    p.add_argument("--data", action="append", default=[], metavar="SPEC",
                   help="val, train, a shard directory [DIR:split], a text or .jsonl file (repeatable; default val)")
    p.add_argument("--text-key", default="text", help="field of a .jsonl object holding the text (default text)")
    p.add_argument("--precision", choices=("both", "bf16", "trained"), default="both")
    p.add_argument("--max-sequences", type=_positive, help="score at most this many rows of each data set "
                   "(of a shard split: evenly spaced over it, the rows a run with data.val_sequences=N validates on)")
    p.add_argument("--batch-size", type=_positive, help="rows per forward (default: the training's micro-batch)")
    p.add_argument("--baseline", help="variant the others are compared with (default: the one trained in bf16)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--backend", choices=("auto", "reference", "triton", "cutlass"),
                   help="GEMM backend of the trained precision (default: the run's)")
    p.add_argument("--no-log", action="store_true", help="do not log the results to MLflow")
    return p


@dataclass
class EvalSet:
    """Rows of token ids to score, grouped by length (the packed tail of a file may be shorter)."""

    name: str         # metric-safe, e.g. "val" or "notes.jsonl"
    description: str  # for the MLflow tag and the log
    groups: list[np.ndarray]
    bytes: int        # UTF-8 bytes of the targets' text (row[1:] of every row)

    @property
    def sequences(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def tokens(self) -> int:
        return sum(g.shape[0] * (g.shape[1] - 1) for g in self.groups)


def read_documents(path: Path, text_key: str) -> list[str]:
    """The documents of a text file (the whole file) or a .jsonl file (one per line)."""
    from .data import DataError

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if path.suffix.lower() != ".jsonl":
        docs = [text] if text.strip() else []
    else:
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{n}: not a JSON line ({e})") from None
            if isinstance(rec, dict):
                rec = rec.get(text_key)
            if not isinstance(rec, str):
                raise DataError(f"{path}:{n}: expected a JSON string or an object with a string field {text_key!r}")
            docs.append(rec)
    if not docs:
        raise DataError(f"{path}: holds no text to evaluate")
    return docs


def pack(docs: list[str], tokenizer, row_len: int) -> list[np.ndarray]:
    """Documents packed as the shards pack them: each followed by end-of-text, cut into rows of
    ``row_len``; a last row of at least 2 tokens (one prediction) is kept shorter."""
    stream = np.concatenate([np.append(ids, tokenizer.eot_id) for ids in tokenizer.encode_batch(docs)])
    full = len(stream) // row_len
    groups = [stream[: full * row_len].reshape(full, row_len)] if full else []
    if len(stream) - full * row_len >= 2:
        groups.append(stream[full * row_len:][None])
    return groups


def target_bytes(groups: list[np.ndarray], tokenizer) -> int:
    return sum(len(tokenizer.decode(row[1:]).encode("utf-8")) for g in groups for row in g)


def _safe_name(text: str, taken: set[str]) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "data"
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    taken.add(out)
    return out


def parse_spec(spec: str) -> tuple[Path | None, str | None]:
    """``(path, split)`` of a ``--data`` value: ``(None, split)`` for the run's own split; DataError
    when it names nothing that exists."""
    from .data import DataError

    if spec in ("val", "train"):
        return None, spec
    path, _, split = spec.rpartition(":")
    if split not in ("val", "train") or not path:
        path, split = spec, None
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"--data {spec}: no such file or shard directory (or split: val, train)")
    if split is not None and not path.is_dir():
        raise DataError(f"--data {spec}: a split (:{split}) only applies to a shard directory")
    return path, split


def load_sets(specs: list[str], shards, seq_len: int, text_key: str, max_sequences: int | None) -> list[EvalSet]:
    """The data sets ``specs`` name (see the module docstring); DataError for one that does not exist
    or does not fit the run."""
    from .data import DataError, open_shards
    from .data.order import validation_ids

    tokenizer = shards.tokenizer()
    row_len = seq_len + 1
    sets, taken = [], set()
    for spec in specs:
        path, split = parse_spec(spec)
        if path is not None and not path.is_dir():  # text: tokenized and packed here
            groups = pack(read_documents(path, text_key), tokenizer, row_len)
            if not groups:
                raise DataError(f"--data {spec}: too little text (under 2 tokens)")
            if max_sequences is not None:
                groups = _first_rows(groups, max_sequences)
            name, what = path.name, f"{path.resolve()} (tokenized with the run's tokenizer)"
        else:  # token shards: the run's, or others with the same tokenizer
            source = shards
            if path is not None:
                source = open_shards(path)
                if source.tokenizer().to_hf_json() != tokenizer.to_hf_json():
                    raise DataError(f"--data {spec}: its tokenizer is not the run's ({shards.path}); "
                                    f"its token ids would mean other text to the model")
                split = split or "val"
            total = source.num_sequences(split)
            if not total:
                raise DataError(f"--data {spec}: {source.path} has no {split} sequences")
            if max_sequences is None:
                rows = source.read_split(split)[0]
            else:  # spread over the split, as a run picks its validation rows (the same ones)
                rows = source.read_sequences(validation_ids(total, max_sequences), split)
            groups = [rows[:, :row_len].astype(np.int64)]  # rows cut to the run's length
            name = split if path is None else f"{path.resolve().name}.{split}"
            what = f"the run's {split} split ({shards.path})" if path is None else f"{split} split of {path.resolve()}"
        sets.append(EvalSet(_safe_name(name, taken), what, groups, target_bytes(groups, tokenizer)))
    return sets


def _first_rows(groups: list[np.ndarray], n: int) -> list[np.ndarray]:
    out = []
    for g in groups:
        if n <= 0:
            break
        out.append(g[:n])
        n -= len(out[-1])
    return out


def score(model, autocast, groups: list[np.ndarray], batch_size: int, device, progress=None) -> float:
    """Mean cross-entropy (nats) per predicted token over the rows of ``groups``."""
    import torch
    import torch.nn.functional as F

    nll, count, done = 0.0, 0, 0
    with torch.no_grad():
        for g in groups:
            for start in range(0, len(g), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(g[start:start + batch_size])).long().to(device)
                with autocast():
                    logits = model(batch[:, :-1])
                nll += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
                count += batch[:, 1:].numel()
                done += len(batch)
                if progress is not None:
                    progress.update(sequences=done, tokens=count)
    return nll / count


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .train.trained import run_command

    return run_command(lambda: evaluate(args)[1])


def evaluate(args) -> tuple[list, str]:
    """Score, log and tabulate as ``args`` say; returns the results and the table."""
    from .console import ProgressLine
    from .tracking import EvalResult, eval_table
    from .train.trained import (PRECISIONS, RunPathError, in_precision, load_model, locate, pick_device,
                                precision_label, run_shards)

    device = pick_device(args.device)
    variants, checkpoint = locate(args.path, args.variant)
    names = [v.name for v in variants]
    if args.baseline is not None and args.baseline not in names:
        raise RunPathError(f"--baseline {args.baseline}: not among the variants scored ({', '.join(names)})")
    precisions = PRECISIONS if args.precision == "both" else (args.precision,)
    specs = list(dict.fromkeys(args.data or ["val"]))
    for spec in specs:  # before any checkpoint is loaded
        parse_spec(spec)
    # The data first (it needs only the tokenizer), so that bad data is reported before any work.
    data_cache: dict[tuple, list[EvalSet]] = {}
    plan = []
    for v in variants:
        shards = run_shards(v)
        seq_len = v.config.data.seq_len or shards.seq_len
        key = (shards.manifest.identity(), seq_len)
        if key not in data_cache:
            data_cache[key] = load_sets(specs, shards, seq_len, args.text_key, args.max_sequences)
        plan.append((v, data_cache[key]))
    progress = ProgressLine("eval")
    results: list[EvalResult] = []
    for v, sets in plan:
        cfg = v.config
        trained = load_model(v, checkpoint, device, warn=progress.note)
        progress.note(f"{v.name}: {trained.checkpoint.name} (step {trained.step})")
        batch = args.batch_size or cfg.data.micro_batch_size or cfg.data.global_batch_size // cfg.scaling.max_workers
        mine = []
        for precision in precisions:
            model, autocast = in_precision(trained, precision, args.backend)
            label = precision_label(v, precision)
            for s in sets:
                progress.note(f"{v.name}, {label}, {s.name}: {s.sequences:,} sequences, {s.tokens:,} tokens")
                loss = score(model, autocast, s.groups, batch, device, progress)
                mine.append(EvalResult(v.name, trained.step, s.name, precision, label, loss, s.tokens, s.bytes))
        results += mine
        if not args.no_log:
            _log(v, trained.step, mine, sets, progress)
    progress.done(f"scored {len(variants)} variant(s) on {len(specs)} data set(s)")
    baseline = args.baseline
    if baseline is None and len(variants) > 1:
        plain = [v.name for v in variants if not v.config.precision.quantized]
        baseline = plain[0] if len(plain) == 1 else None
    # Rows that compare sit together: by data set, then precision, then variant.
    datasets = list(dict.fromkeys(r.dataset for r in results))
    results.sort(key=lambda r: (datasets.index(r.dataset), precisions.index(r.precision), names.index(r.variant)))
    return results, eval_table(results, baseline if len(variants) > 1 else None)


def _log(variant, step: int, results: list, sets: list[EvalSet], progress) -> None:
    """The variant's results as metrics of its MLflow run at the checkpoint's step."""
    from .tracking import Tracker, resolve_tracking_uri

    cfg = variant.config
    run_id = variant.mlflow_run_id
    if not cfg.tracking.enabled or run_id is None:
        progress.note(f"{variant.name}: not logged (the variant has no MLflow run)")
        return
    tracker = Tracker(resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment)
    metrics = {}
    for r in results:
        metrics[f"eval/{r.dataset}/{r.precision}/loss"] = r.loss
        metrics[f"eval/{r.dataset}/{r.precision}/perplexity"] = r.perplexity
        metrics[f"eval/{r.dataset}/{r.precision}/bits_per_byte"] = r.bits_per_byte
    tracker.log_metrics(run_id, metrics, step=step)
    for s in sets:
        tracker.set_tag(run_id, f"rayfp4.eval.{s.name}", f"{s.description}: {s.sequences} sequences, {s.tokens} tokens")
    if tracker.enabled:
        progress.note(f"{variant.name}: logged to MLflow run {run_id} at step {step}")


if __name__ == "__main__":
    sys.exit(main())
