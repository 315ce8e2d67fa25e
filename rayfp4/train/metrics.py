"""What a worker reports: rank 0's metrics (a JSON-lines file, MLflow, the driver's progress line)
and the throughput figures (tokens/s, MFU)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# Dense BF16 tensor-core peak (TFLOP/s) by device name, for the MFU estimate.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "B200": 2250.0, "GB200": 2500.0, "L40S": 362.0}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


class Throughput:
    """Step time, tokens/s, MFU and the ETA from the steps timed so far in this attempt."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, device: torch.device, world: int):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak = peak_flops(device)
        self.device, self.world = device, world
        self.started, self.steps = time.perf_counter(), 0
        self._t0 = None

    def start_step(self) -> None:
        self._t0 = time.perf_counter()

    def end_step(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self._t0
        self.steps += 1
        out = {"tokens_per_s": self.tokens_per_step / dt, "step_time_s": dt}
        if self.peak:
            out["mfu"] = self.flops_per_token * self.tokens_per_step / dt / (self.peak * self.world)
        return out

    def eta_s(self, steps_left: int) -> float:
        return (time.perf_counter() - self.started) / max(self.steps, 1) * steps_left


class RankZeroLog:
    """Metrics of rank 0: a JSON-lines file in the run dir, MLflow, and the driver's progress board."""

    def __init__(self, rank: int, run_dir: Path, tracker, run_id, board):
        self.active = rank == 0
        self.path = run_dir / "metrics.jsonl"
        self.tracker, self.run_id, self.board = tracker, run_id, board

    def write(self, step: int, metrics: dict, progress: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tracker is not None:
            self.tracker.log_metrics(self.run_id, metrics, step)
        if self.board is not None:
            self.board.post.remote(progress)

    def notice(self, message: str) -> None:
        """A line the driver prints as it is (e.g. a checkpoint that does not load)."""
        if self.active and self.board is not None:
            self.board.notice.remote(message)
