"""The sample ledger: which global sequence ids each rank consumed at each step.

It is how a user (and the tests) audits what a run saw. Each rank of each attempt appends JSON lines
to its own file, so ranks never contend for a file and no coordination is needed::

    LEDGER_DIR/attempt-from-000000120-world-2/rank-00001.jsonl
        {"header": true, "rank": 1, "world_size": 2, "start_global_step": 120, "started_unix_ns": ...}
        {"global_step": 120, "epoch": 0, "step": 120, "ids": [5121, 77, ...]}

An attempt that crashes after its last checkpoint has logged steps that the resumed attempt reads
again (the model's updates from them were thrown away with the crash). :func:`read_ledger` therefore
overlays attempts in the order they started: an attempt replaces every step from its start step on.
The result is the run's effective history: for each global step, the ids of all ranks in rank
order, which for a correct stream is the same whatever the number of workers was.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rayfp4.data.errors import DataError


class SampleLedger:
    """Appends one line per consumed step for one rank of one attempt."""

    def __init__(self, ledger_dir: str | Path, rank: int, world_size: int, start_global_step: int):
        self.dir = Path(ledger_dir) / f"attempt-from-{start_global_step:09d}-world-{world_size}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"rank-{rank:05d}.jsonl"
        # "w": a second attempt from the same checkpoint with the same width replaces this file.
        self._file = open(self.path, "w", encoding="utf-8")
        self._write({"header": True, "rank": rank, "world_size": world_size,
                     "start_global_step": start_global_step, "started_unix_ns": time.time_ns()})

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def record(self, global_step: int, epoch: int, step: int, ids) -> None:
        self._write({"global_step": int(global_step), "epoch": int(epoch), "step": int(step),
                     "ids": [int(i) for i in ids]})

    def close(self) -> None:
        if not self._file.closed:
            os.fsync(self._file.fileno())
            self._file.close()


@dataclass
class LedgerView:
    """The effective history of a run: global step -> ids (rank order) and its epoch."""

    steps: dict[int, list[int]] = field(default_factory=dict)
    epochs: dict[int, int] = field(default_factory=dict)

    def ids_by_epoch(self) -> dict[int, Counter]:
        """Multiset of ids consumed in each epoch."""
        out: dict[int, Counter] = {}
        for g, ids in self.steps.items():
            out.setdefault(self.epochs[g], Counter()).update(ids)
        return out

    def ordered(self) -> list[tuple[int, list[int]]]:
        return sorted(self.steps.items())


def _read_attempt(attempt_dir: Path) -> tuple[int, int, int, dict[int, tuple[int, dict[int, list[int]]]]]:
    """(started_ns, start_step, world_size, {global_step: (epoch, {rank: ids})})."""
    started, start_step, world = None, None, None
    steps: dict[int, tuple[int, dict[int, list[int]]]] = {}
    for rank_file in sorted(attempt_dir.glob("rank-*.jsonl")):
        with open(rank_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
        if not lines:
            continue
        try:
            header = json.loads(lines[0])
            records = [json.loads(line) for line in lines[1:] if line.strip()]
        except json.JSONDecodeError:
            # A line cut by a crash mid-write: keep the complete lines before it.
            header = json.loads(lines[0])
            records = []
            for line in lines[1:]:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
        started = header["started_unix_ns"] if started is None else min(started, header["started_unix_ns"])
        start_step, world = header["start_global_step"], header["world_size"]
        for rec in records:
            steps.setdefault(rec["global_step"], (rec["epoch"], {}))[1][header["rank"]] = rec["ids"]
    return started, start_step, world, steps


def read_ledger(ledger_dir: str | Path) -> LedgerView:
    """Merge all attempts' files into the run's effective per-step history (see module doc)."""
    ledger_dir = Path(ledger_dir)
    if not ledger_dir.is_dir():
        raise DataError(f"{ledger_dir}: ledger directory does not exist")
    attempts = [_read_attempt(d) for d in sorted(ledger_dir.glob("attempt-from-*")) if d.is_dir()]
    attempts = [a for a in attempts if a[0] is not None]
    view = LedgerView()
    for _, start_step, world, steps in sorted(attempts, key=lambda a: a[0]):
        for g in [g for g in view.steps if g >= start_step]:
            del view.steps[g], view.epochs[g]
        for g, (epoch, by_rank) in steps.items():
            if len(by_rank) != world:  # a step some ranks had not logged when the attempt died
                continue
            view.steps[g] = [i for r in range(world) for i in by_rank[r]]
            view.epochs[g] = epoch
    return view
