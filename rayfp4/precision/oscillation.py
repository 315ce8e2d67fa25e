"""Oscillation reset: late in training, put weights whose 4-bit value flips back and forth on it.

A master weight that sits near the edge between two quantization bins can be carried across the
edge by every small update, one way and then back: its quantized value then jumps by a whole bin
at each step while the master weight itself hardly moves, and the forward pass sees noise the
optimizer never asked for. TetraJet-v2 (arXiv 2510.27527, "OsciReset") detects such elements
late in training and moves them onto the value they quantize to, the centre of their bin, where
small updates no longer flip them.

The rule rayfp4 implements (``precision.oscillation_reset``), per element of the weight of every
4-bit linear layer:

- from the first step ``start`` (``start_step``, or ``start_fraction`` of the run's steps), every
  ``period`` optimizer updates a window opens: after update ``start + k * period`` the weights
  ``W`` are recorded, and after each of the next ``window`` updates ``t``::

      dist_q += |Q(W_t) - Q(W_{t-1})|      dist_w += |W_t - W_{t-1}|     (FP32, element-wise)

  where ``Q`` is the layer's own forward weight quantization (its format, tiles, scale rule and
  block-scale selection, RTNE), dequantized to FP32 values;
- after the window's last update, the elements with ``dist_w > 0`` and
  ``dist_q >= threshold * dist_w`` are set to ``Q(W)`` (the other elements are not touched), and
  the fraction of elements reset is reported (``quant/oscillation_reset_fraction``).

An element that did not move (``dist_w == 0``) is never reset, even if its quantized value changed
through the tensor or block scale. Steps whose update was skipped (non-finite) count as updates
that moved nothing. The state of an open window (``W_{t-1}``, ``dist_q``, ``dist_w``: three FP32
copies of the quantized weights) is saved in checkpoints, so a run that resumes inside a window
computes exactly what an uninterrupted run does. The detection runs on whole weights, so it is
refused with FSDP2 (whose weights are sharded) for now, and with a late switch to BF16 (after
which the forward no longer quantizes the weights it acts on).
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import QuantizedLinear
from .policy import OscillationReset


class OscillationTracker:
    """Runs :class:`~rayfp4.precision.policy.OscillationReset` on the 4-bit layers of ``model``.

    Call :meth:`after_update` after every optimizer update with the number of updates applied so
    far; it returns the metrics of the step (the reset fraction at a window's end, else nothing).
    :meth:`state_dict` / :meth:`load_state_dict` carry an open window through a checkpoint.
    """

    def __init__(self, model: nn.Module, settings: OscillationReset, total_steps: int):
        self.settings = settings
        self.start = settings.first_step(total_steps)
        self.layers = {name: m for name, m in model.named_modules()
                       if isinstance(m, QuantizedLinear) and m.format != "bf16"}
        self._prev: dict[str, torch.Tensor] = {}  # W after the previous update of the window
        self._prev_q: dict[str, torch.Tensor] = {}  # Q(W) of those (recomputed after a restore)
        self._dist_q: dict[str, torch.Tensor] = {}
        self._dist_w: dict[str, torch.Tensor] = {}

    def phase(self, step: int) -> int | None:
        """Where update ``step`` falls in the period (0: the window opens), None before ``start``."""
        if step < self.start:
            return None
        return (step - self.start) % self.settings.period

    @property
    def window_open(self) -> bool:
        return bool(self._prev)

    def quantized_values(self, layer: QuantizedLinear, w: torch.Tensor | None = None) -> torch.Tensor:
        """Q(W): the layer's forward weight quantization of ``w`` (default: its weight), as FP32 values."""
        w = layer.weight.detach() if w is None else w
        return layer.quantize(w, layer.roles.fprop_w).dequantize(torch.float32)

    @torch.no_grad()
    def after_update(self, step: int) -> dict[str, float]:
        ph = self.phase(step)
        if ph is None:
            return {}
        if ph == 0:
            self._open()
            return {}
        if not self.window_open or ph > self.settings.window:
            return {}  # outside a window (or resumed from a checkpoint written before one opened)
        current_q = {}
        for name, layer in self.layers.items():
            w = layer.weight.detach()
            q = self.quantized_values(layer)
            prev_q = self._prev_q.get(name)
            if prev_q is None:
                prev_q = self.quantized_values(layer, self._prev[name])
            self._dist_q[name].add_((q - prev_q).abs())
            self._dist_w[name].add_((w.float() - self._prev[name]).abs())
            self._prev[name].copy_(w)
            self._prev_q[name] = q
            current_q[name] = q
        if ph < self.settings.window:
            return {}
        return self._reset(current_q)

    def _open(self) -> None:
        self.clear()
        for name, layer in self.layers.items():
            w = layer.weight.detach()
            self._prev[name] = w.float().clone()
            self._dist_q[name] = torch.zeros_like(self._prev[name])
            self._dist_w[name] = torch.zeros_like(self._prev[name])

    def _reset(self, current_q: dict[str, torch.Tensor]) -> dict[str, float]:
        reset = total = 0
        for name, layer in self.layers.items():
            dist_w = self._dist_w[name]
            mask = (dist_w > 0) & (self._dist_q[name] >= self.settings.threshold * dist_w)
            w = layer.weight.detach()
            w.copy_(torch.where(mask, current_q[name].to(w.dtype), w))
            reset += int(mask.sum())
            total += mask.numel()
        self.clear()
        return {"oscillation_reset_fraction": reset / total if total else 0.0,
                "oscillation_reset_count": float(reset)}

    def clear(self) -> None:
        self._prev.clear()
        self._prev_q.clear()
        self._dist_q.clear()
        self._dist_w.clear()

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict | None:
        """The open window's tensors (on the CPU), or None when no window is open."""
        if not self.window_open:
            return None
        return {kind: {name: t.detach().cpu().clone() for name, t in part.items()}
                for kind, part in (("prev", self._prev), ("dist_q", self._dist_q), ("dist_w", self._dist_w))}

    def load_state_dict(self, state: dict | None) -> None:
        self.clear()
        if not state:
            return
        if set(state.get("prev", {})) != set(self.layers):
            raise ValueError(f"oscillation reset state: layers {sorted(state.get('prev', {}))} do not match the "
                             f"model's 4-bit layers {sorted(self.layers)}")
        for name, layer in self.layers.items():
            dev = layer.weight.device
            self._prev[name] = state["prev"][name].to(dev)
            self._dist_q[name] = state["dist_q"][name].to(dev)
            self._dist_w[name] = state["dist_w"][name].to(dev)
