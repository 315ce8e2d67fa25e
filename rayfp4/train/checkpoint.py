"""Training-state checkpoints: ``state.pt`` (weights_only loadable) and ``state.json`` beside it.

The state is plain tensors and Python data (model and optimizer state dicts, the step, the data
stream position, RNG states, counters), so ``torch.load(weights_only=True)`` reads it: a
checkpoint can never execute code. ``state.json`` records the step, the size and SHA-256 of
``state.pt`` and the run's fingerprint (:meth:`rayfp4.config.RunConfig.fingerprint`), so a damaged
file is named instead of half-loaded, and a checkpoint is never resumed by a run with other
settings. Ray Train copies the directory into the run's storage as a new ``checkpoint_*`` folder
and registers it only when complete, so a crash while writing leaves the previous checkpoint as
the latest good one; :func:`load_latest` falls back to an older one when the latest does not load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..fileio import sha256_file, write_atomic
from .errors import CheckpointError

STATE_FILE = "state.pt"
INFO_FILE = "state.json"
FORMAT_VERSION = 1


def _torch_save(obj, path: Path) -> None:
    # Through a Python file object: a full disk then raises OSError(ENOSPC), which the loop reports
    # as such, instead of the zip writer's opaque "unexpected pos" RuntimeError for a path.
    with open(path, "wb") as f:
        torch.save(obj, f)


def file_digests(directory: str | Path, subdir: str) -> dict[str, list]:
    """``{"subdir/name": [size, sha256]}`` for the files under ``directory/subdir`` (what one rank
    wrote of a sharded checkpoint; rank 0 records every rank's in ``state.json``)."""
    root = Path(directory)
    return {str(p.relative_to(root)): [p.stat().st_size, sha256_file(p)]
            for p in sorted((root / subdir).rglob("*")) if p.is_file()}


def save_state(directory: str | Path, state: dict, fingerprint: dict[str, str] | None = None,
               files: dict[str, list] | None = None) -> Path:
    """``state.pt`` and ``state.json`` in ``directory``; ``files`` are the other files of the
    checkpoint (sharded model and optimizer state) with their sizes and SHA-256, verified on load."""
    d = Path(directory)
    final = d / STATE_FILE
    write_atomic(final, lambda tmp: _torch_save({"format_version": FORMAT_VERSION, **state}, tmp))
    info = {"format_version": FORMAT_VERSION, "step": state.get("step"), "size_bytes": final.stat().st_size,
            "sha256": sha256_file(final), "fingerprint": fingerprint or {}, "files": files or {}}
    write_atomic(d / INFO_FILE, lambda tmp: tmp.write_text(json.dumps(info, indent=1, sort_keys=True)))
    return final


def read_info(directory: str | Path) -> dict:
    """``state.json`` of a checkpoint ({} for checkpoints written before it existed)."""
    path = Path(directory) / INFO_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def load_state(directory: str | Path) -> dict:
    """The state of one checkpoint, verified against ``state.json``; CheckpointError naming the file."""
    path = Path(directory) / STATE_FILE
    info = read_info(directory)
    try:
        if info:
            size = path.stat().st_size
            if size != info["size_bytes"]:
                raise CheckpointError(f"{path}: {size} bytes, {INFO_FILE} says {info['size_bytes']} (truncated?)")
            if sha256_file(path) != info["sha256"]:
                raise CheckpointError(f"{path}: SHA-256 does not match {INFO_FILE} (the file is damaged)")
            for name, (size, digest) in info.get("files", {}).items():
                other = Path(directory) / name
                if not other.is_file():
                    raise CheckpointError(f"{other}: missing (listed in {INFO_FILE})")
                if other.stat().st_size != size or sha256_file(other) != digest:
                    raise CheckpointError(f"{other}: size or SHA-256 does not match {INFO_FILE} (the file is damaged)")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # a missing, truncated or foreign file: name it, never half-load it
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format_version') if isinstance(state, dict) else '?'} "
                              f"is not {FORMAT_VERSION}")
    return state


def step_of(directory: Path) -> int:
    try:
        return int(directory.name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def load_latest(latest: str | Path, warn=None) -> tuple[dict, Path]:
    """The state of the checkpoint ``latest`` (Ray's newest registered one) or, when it does not
    load, of the newest older ``checkpoint_*`` beside it that does; ``warn(message)`` is told about
    each one skipped. CheckpointError when none loads: starting over silently would lose the run.
    """
    latest = Path(latest)
    candidates = [latest] + sorted((p for p in latest.parent.glob("checkpoint_*")
                                    if p.is_dir() and p != latest and step_of(p) < step_of(latest)),
                                   key=step_of, reverse=True)
    problems = []
    for d in candidates:
        try:
            state = load_state(d)
        except CheckpointError as e:
            problems.append(str(e))
            if warn is not None:
                warn(f"checkpoint {d.name} does not load: {e}; trying an older one")
            continue
        return state, d
    raise CheckpointError("no checkpoint of the run loads: " + "; ".join(problems))
