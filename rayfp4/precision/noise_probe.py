"""The gradient-to-quantization-noise ratio, and the automatic late switch to BF16 it drives.

"FP4 All the Way" (arXiv 2505.19115) observes that 4-bit training keeps making progress while the
gradient is large against the noise quantization adds to it, and stalls once the gradient norm
falls below about sqrt(3) times that noise: late in training, as the gradient shrinks, the 4-bit
gradient is mostly noise. So instead of switching to higher precision at a fixed fraction of the
run, measure the ratio and switch when it falls low.

The probe (``precision.grad_noise_probe_every``, and the cadence of ``late_switch.auto``), on the
steps whose 1-based number is a multiple of the cadence, before the step's own passes:

- takes the step's first micro-batch and computes the gradient of its loss twice, with the same
  weights: ``g_q`` as the policy runs the model now (the same stochastic-rounding bits the step's
  first micro-batch draws), and ``g_hp`` with every quantized linear unquantized in both passes
  (:meth:`PrecisionRuntime.high_precision`, so in the activation dtype: BF16 under BF16 autocast);
- reports, over all trainable parameters with FP32 sums, ``grad_norm_hp = ||g_hp||``,
  ``grad_noise_norm = ||g_q - g_hp||`` and ``grad_noise_ratio = grad_norm_hp / grad_noise_norm``
  (``inf`` when the two gradients are identical, e.g. every quantized layer already switched; NaN
  when both are zero or not finite);
- puts every parameter's ``.grad`` back as it was (the loop calls it with none), draws no global
  random numbers and records no telemetry, so the step that follows computes exactly what it would
  have computed without the probe.

It costs two extra forward and backward passes of one micro-batch per probe. Under DDP both passes
all-reduce their gradients as a training step does, so the norms are those of the averaged
gradient; the two sums are then broadcast from rank 0, so every rank takes the same decision.
FSDP2 is refused for now (the 4-bit weight gather leaves no FP32 weight for the reference pass).

The automatic switch (``late_switch: {auto: {threshold, probe_every, patience, min_fraction}}``):
after ``patience`` probes in a row measure a ratio below ``threshold`` (probes before
``min_fraction`` of the run do not count, and reset the count), the steps from the next one on run
in BF16 for the switch's ``scope``, as a fixed ``late_switch.at_step`` equal to
``quant/late_switch_step`` would. The count of probes below the threshold and the switch step are
saved in checkpoints, so a resumed run switches exactly where an uninterrupted one does. Once the
automatic switch has fired it probes no more (unless ``grad_noise_probe_every`` asks for the metric
and some pass still runs in 4 bits).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .policy import PrecisionPolicy
from .runtime import PrecisionRuntime


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().float().clone() for p in params]


def grad_noise_ratio(model: nn.Module, loss_fn: Callable[[], torch.Tensor], runtime: PrecisionRuntime,
                     sync: bool = True) -> dict[str, float]:
    """``grad_norm_hp``, ``grad_noise_norm`` and ``grad_noise_ratio`` of ``loss_fn()`` (the loss of
    one micro-batch through ``model``), leaving every parameter's ``.grad`` as it found it.

    ``sync``: broadcast the two sums from rank 0 when a process group of several ranks is up.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        with runtime.no_telemetry():
            loss_fn().backward()
        g_q = _grads(params)
        for p in params:
            p.grad = None
        with runtime.no_telemetry(), runtime.high_precision():
            loss_fn().backward()
        device = next((g.device for g in g_q if g is not None), torch.device("cpu"))
        sums = torch.zeros(2, dtype=torch.float32, device=device)  # ||g_hp||^2, ||g_q - g_hp||^2
        with torch.no_grad():
            for p, q in zip(params, g_q):
                h = None if p.grad is None else p.grad.detach().float()
                if h is not None:
                    sums[0] += h.square().sum()
                if q is not None or h is not None:
                    diff = q if h is None else (-h if q is None else q - h)
                    sums[1] += diff.square().sum()
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(sums, src=0)
    hp_sq, noise_sq = sums.tolist()
    hp, noise = math.sqrt(hp_sq), math.sqrt(noise_sq)
    if noise > 0:
        ratio = hp / noise
    else:
        ratio = math.inf if hp > 0 else math.nan
    if not (math.isfinite(hp_sq) and math.isfinite(noise_sq)):
        ratio = math.nan
    return {"grad_noise_ratio": ratio, "grad_norm_hp": hp, "grad_noise_norm": noise}


class GradNoiseProbe:
    """When to probe, what to log, and the state of the automatic late switch of one run.

    The loop calls :meth:`due` after ``runtime.set_step(step)``, then :meth:`measure` on the due
    steps, before the step's passes. :meth:`state_dict` / :meth:`load_state_dict` carry the switch
    through checkpoints.
    """

    def __init__(self, policy: PrecisionPolicy, runtime: PrecisionRuntime, total_steps: int):
        self.policy, self.runtime = policy, runtime
        self.auto = policy.late_switch.auto if policy.late_switch is not None else None
        self.every = policy.grad_noise_probe_every or (self.auto.probe_every if self.auto is not None else 0)
        self.first_counted = int(round(self.auto.min_fraction * total_steps)) if self.auto is not None else 0
        self.in_a_row = 0  # probes in a row below the threshold

    @classmethod
    def wanted(cls, policy: PrecisionPolicy) -> bool:
        """Whether ``policy`` asks for probes at all."""
        auto = policy.late_switch is not None and policy.late_switch.auto is not None
        return policy.quantized and (policy.grad_noise_probe_every > 0 or auto)

    @property
    def switched(self) -> bool:
        return self.runtime.auto_switch_step is not None

    def due(self, step: int) -> bool:
        """Step ``step`` (0-based, the runtime's current step) is a probe step: its 1-based number
        is a multiple of the cadence and some pass still runs in 4 bits (after an automatic switch,
        only when ``grad_noise_probe_every`` asks for the metric)."""
        if not self.every or (step + 1) % self.every:
            return False
        if self.runtime.forward_bf16 and self.runtime.backward_bf16:
            return False  # nothing quantized left to measure: the ratio would be inf
        return not (self.switched and not self.policy.grad_noise_probe_every)

    def measure(self, step: int, model: nn.Module, loss_fn: Callable[[], torch.Tensor]
                ) -> tuple[dict[str, float], str | None]:
        """Probe step ``step``: (its metrics, a line for the terminal when the switch fires)."""
        self.runtime.set_micro_batch(0)  # the first micro-batch's stochastic-rounding streams
        out = grad_noise_ratio(model, loss_fn, self.runtime)
        if self.auto is None or self.switched:
            return out, None
        ratio = out["grad_noise_ratio"]
        counts = step >= self.first_counted
        self.in_a_row = self.in_a_row + 1 if counts and ratio < self.auto.threshold else 0
        if self.in_a_row < self.auto.patience:
            return out, None
        first = step + 1
        self.runtime.auto_switch_step = first
        out["late_switch_step"] = float(first)
        scope = {"both": "both passes", "forward": "the forward pass", "backward": "the backward pass"}
        return out, (f"late switch to BF16 ({scope[self.policy.late_switch.scope]}) from step {first + 1} on: "
                     f"the gradient-to-noise ratio was below {self.auto.threshold:g} at {self.in_a_row} probe(s) "
                     f"in a row (last {ratio:.4g} at step {first}); equivalent to late_switch.at_step={first}")

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict | None:
        """The automatic switch's state (None without one)."""
        if self.auto is None:
            return None
        return {"in_a_row": self.in_a_row, "switch_step": self.runtime.auto_switch_step}

    def load_state_dict(self, state: dict | None) -> None:
        self.in_a_row = int(state["in_a_row"]) if state else 0
        self.runtime.auto_switch_step = state.get("switch_step") if state else None
