"""Training-state checkpoints: one ``state.pt`` written atomically, loadable with weights_only.

The state is plain tensors and Python data (model and optimizer state dicts, the step, the data
stream position, RNG states, counters), so ``torch.load(weights_only=True)`` reads it: a
checkpoint can never execute code. Ray Train copies the directory into the run's storage as a
new ``checkpoint_*`` folder and registers it only when complete, so a crash while writing leaves
the previous checkpoint as the latest good one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

STATE_FILE = "state.pt"
FORMAT_VERSION = 1


def save_state(directory: str | Path, state: dict) -> Path:
    d = Path(directory)
    tmp = d / (STATE_FILE + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    final = d / STATE_FILE
    os.replace(tmp, final)
    return final


def load_state(directory: str | Path) -> dict:
    path = Path(directory) / STATE_FILE
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {state.get('format_version')} is not {FORMAT_VERSION}")
    return state


def latest_checkpoint_dir(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run directory, if any (for inspection/tools)."""
    dirs = sorted(p for p in Path(run_dir).glob("checkpoint_*") if (p / STATE_FILE).is_file())
    return dirs[-1] if dirs else None
