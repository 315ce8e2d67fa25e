"""What a worker reports: rank 0's metrics (a JSON-lines file, MLflow, the driver's progress line)
and the throughput figures (tokens/s, MFU)."""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..tracking import read_metrics

#: How metrics.jsonl names a metric -> its MLflow key. MLflow's UI groups charts by the part of a
#: key before its first '/', so training, validation and throughput figures land in their own
#: sections (``quant/...`` telemetry and MLflow's own ``system/...`` too); metrics.jsonl keeps its
#: flat names, which read_metrics and the comparison use.
MLFLOW_KEYS = {"train_loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
               "skipped_steps": "train/skipped_steps", "val_loss": "val/loss",
               "tokens_per_s": "perf/tokens_per_s", "step_time_s": "perf/step_time_s",
               "mfu": "perf/mfu", "mfu_fp4": "perf/mfu_fp4", "data_wait_s": "perf/data_wait_s"}


def mlflow_key(key: str) -> str:
    return MLFLOW_KEYS.get(key, key)


@dataclass(frozen=True)
class Peak:
    """A device's published peak that MFU is measured against."""

    tflops: float
    name: str  # what the figure is and where it comes from


# Dense (no 2:4 sparsity) tensor-core peaks of one GPU in TFLOP/s, from NVIDIA's published
# datasheets; where a datasheet gives only "with sparsity" figures, half of them. Columns: a regular
# expression matched against torch.cuda.get_device_name() (first match wins, so GB200 comes before
# B200 and the PCIe/NVL cards before their SXM names), dense BF16, dense FP4 (Blackwell only), and
# the source. Left out on purpose (no MFU rather than a wrong one): the H100/H200 NVL cards (other
# clocks and power) and B300's FP4 peak (published per-GPU figures disagree).
_PEAKS: list[tuple[str, float | None, float | None, str]] = [
    (r"\bGB300\b", 2500.0, 15000.0, "NVIDIA GB300 NVL72 datasheet: 360 PFLOPS FP16/BF16 (sparse) and "
                                     "1,080 PFLOPS FP4 (dense) for 72 GPUs"),
    (r"\bGB200\b", 2500.0, 10000.0, "NVIDIA GB200 NVL72 datasheet: 360 PFLOPS FP16/BF16 and 1,440 PFLOPS "
                                     "FP4 (both sparse) for 72 GPUs"),
    (r"\bB300\b", 2250.0, None, "NVIDIA HGX B300 datasheet: 36 PFLOPS FP16/BF16 (sparse) for 8 GPUs"),
    (r"\bB200\b", 2250.0, 9000.0, "NVIDIA HGX B200 / DGX B200 datasheets: 36 PFLOPS FP16/BF16 and "
                                   "144 PFLOPS FP4 (both sparse) for 8 GPUs"),
    (r"\bH[12]00 NVL\b", None, None, "left out"),
    (r"\bH100 PCIe\b", 756.0, None, "NVIDIA H100 datasheet: 1,513 TFLOPS BF16 (sparse), PCIe"),
    (r"\bH200\b", 989.0, None, "NVIDIA H200 datasheet: 1,979 TFLOPS BF16 (sparse), SXM"),
    (r"\bH100\b", 989.0, None, "NVIDIA H100 datasheet: 1,979 TFLOPS BF16 (sparse), SXM"),
    (r"\bA100\b", 312.0, None, "NVIDIA A100 datasheet: 312 TFLOPS BF16 (dense)"),
    (r"\bL40S\b", 362.0, None, "NVIDIA L40S datasheet: 733 TFLOPS BF16 (sparse)"),
]


def device_peaks(device_name: str | None, fmt: str) -> tuple[Peak | None, Peak | None]:
    """(the dense BF16 peak, the dense FP4 peak) of a device for a run in precision format ``fmt``.

    MFU is measured against the BF16 peak for every format, so runs compare on one scale; a 4-bit
    run on a GPU with FP4 tensor cores (Blackwell) also gets the FP4 peak (its 4-bit GEMMs could
    run at most that fast; attention and the BF16 layers cannot). None where no figure is known
    (CPUs, unlisted GPUs), or for the FP4 peak of a BF16 run or a GPU without FP4 tensor cores.
    """
    if not device_name:
        return None, None
    for pattern, bf16, fp4, source in _PEAKS:
        if re.search(pattern, device_name):
            base = Peak(bf16, f"{device_name}: dense BF16 tensor core ({source})") if bf16 else None
            four = Peak(fp4, f"{device_name}: dense FP4 tensor core ({source})") \
                if fp4 and fmt in ("nvfp4", "mxfp4") else None
            return base, four
    return None, None


class Throughput:
    """Step time, tokens/s, MFU and the ETA from the steps timed so far in this attempt."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, device: torch.device, world: int,
                 fmt: str = "bf16"):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        self.peak, self.peak_fp4 = device_peaks(self.device_name, fmt)
        self.device, self.world = device, world
        self.started, self.steps = time.perf_counter(), 0
        self._t0 = None
        self._idle_from = None               # when the loop last asked for a batch
        self._wait_sum, self._wait_steps = 0.0, 0

    def params(self) -> dict[str, str]:
        """Which peaks MFU is measured against (MLflow params)."""
        device = self.device_name or self.device.type
        out = {"perf.device": f"{self.world} x {device}",
               "perf.peak_tflops": f"{self.peak.tflops:g}" if self.peak else "none",
               "perf.peak": self.peak.name if self.peak else
               f"none: no published tensor-core peak for {device}, so no MFU"}
        if self.peak_fp4:
            out["perf.peak_tflops_fp4"] = f"{self.peak_fp4.tflops:g}"
            out["perf.peak_fp4"] = self.peak_fp4.name
        return out

    def start_step(self) -> None:
        self._t0 = time.perf_counter()
        if self._idle_from is not None:  # not the first batch: its wait includes starting the pipeline
            self._wait_sum += self._t0 - self._idle_from
            self._wait_steps += 1

    def waiting_for_data(self) -> None:
        """The loop body is done and the next batch is being fetched: the time until the next
        ``start_step`` is time the step waited for its data (not counted in tokens/s)."""
        self._idle_from = time.perf_counter()

    def take_data_wait(self) -> float | None:
        """Mean seconds a step waited for its batch since the last call (None: no step yet)."""
        if not self._wait_steps:
            return None
        mean = self._wait_sum / self._wait_steps
        self._wait_sum, self._wait_steps = 0.0, 0
        return mean

    def end_step(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self._t0
        self.steps += 1
        out = {"tokens_per_s": self.tokens_per_step / dt, "step_time_s": dt}
        achieved = self.flops_per_token * self.tokens_per_step / dt / self.world  # per GPU
        if self.peak:
            out["mfu"] = achieved / (self.peak.tflops * 1e12)
        if self.peak_fp4:
            out["mfu_fp4"] = achieved / (self.peak_fp4.tflops * 1e12)
        return out

    def eta_s(self, steps_left: int) -> float:
        return (time.perf_counter() - self.started) / max(self.steps, 1) * steps_left


class RankZeroLog:
    """Metrics of rank 0: a JSON-lines file in the run dir, MLflow, and the driver's progress board.

    A resumed attempt replays the steps after its checkpoint. metrics.jsonl gets them again (its
    reader keeps the last record of a step), but MLflow does not: a step at or before the last one
    already in metrics.jsonl was sent to MLflow by the earlier attempt, and MLflow would otherwise
    show two points for it. MLflow thus keeps the first attempt's values of the replayed steps
    (identical on CPU, where training is deterministic).
    """

    def __init__(self, rank: int, run_dir: Path, tracker, run_id, board):
        self.active = rank == 0
        self.path = run_dir / "metrics.jsonl"
        self.tracker, self.run_id, self.board = tracker, run_id, board
        self.logged_through = max(read_metrics(self.path), default=0) if self.active else 0

    def write(self, step: int, metrics: dict, progress: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tracker is not None and step > self.logged_through:
            self.tracker.log_metrics(self.run_id, {mlflow_key(k): v for k, v in metrics.items()}, step)
        if self.board is not None:
            self.board.post.remote(progress)

    def describe(self, params: dict[str, str], tags: dict[str, str]) -> None:
        """Params (kept from the first attempt) and tags (updated by each attempt) of rank 0's run."""
        if self.active and self.tracker is not None:
            self.tracker.log_params(self.run_id, params)
            self.tracker.set_tags(self.run_id, tags)

    def notice(self, message: str) -> None:
        """A line the driver prints as it is (e.g. a checkpoint that does not load)."""
        if self.active and self.board is not None:
            self.board.notice.remote(message)


@contextlib.contextmanager
def system_metrics(rank: int, loop_config: dict):
    """On rank 0, MLflow's system metrics (CPU, memory, disk, network, GPUs) of its node sampled
    into the run while the block runs; the sampling thread is stopped and joined on the way out."""
    tracking = loop_config["config"].get("tracking", {})
    run_id, every = loop_config.get("mlflow_run_id"), tracking.get("system_metrics_every_s", 0)
    sampler = None
    if rank == 0 and run_id and tracking.get("enabled", True) and every:
        from ..tracking import Tracker

        tracker = Tracker(tracking["uri"], tracking.get("experiment", "rayfp4"), quiet=True)
        sampler = tracker.system_metrics(run_id, every)
        if sampler is None and tracker.system_metrics_off and loop_config.get("board") is not None:
            loop_config["board"].notice.remote(tracker.system_metrics_off)
    try:
        yield
    finally:
        if sampler is not None:
            sampler.stop()
