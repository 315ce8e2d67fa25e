"""Per-model mutable state of the recipe: the step, the run length, the seed and the rank.

The training loop owns one :class:`PrecisionRuntime` per model (``apply_precision_policy``
returns it) and calls :meth:`PrecisionRuntime.set_step` before each optimizer step and
:meth:`PrecisionRuntime.set_micro_batch` before each micro-batch of it. The quantized
linears read it to decide the late switch to BF16, to derive their stochastic-rounding streams
and to know when to record telemetry. The gradient-noise probe (:mod:`rayfp4.precision.noise_probe`)
sets :attr:`PrecisionRuntime.auto_switch_step` when an automatic late switch fires, and runs its
reference pass inside :meth:`PrecisionRuntime.high_precision`.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch

from .policy import PolicyError, PrecisionPolicy


@dataclass
class PrecisionRuntime:
    policy: PrecisionPolicy
    seed: int = 0
    rank: int = 0
    step: int = 0
    total_steps: int | None = None
    micro_batch: int = 0
    #: The first BF16 step of an automatic late switch (``late_switch.auto``), once it has fired.
    auto_switch_step: int | None = None
    #: Set inside :meth:`high_precision`: every quantized linear runs both passes unquantized.
    forced_high_precision: bool = False
    #: Set inside :meth:`no_telemetry`: the linears record no telemetry.
    telemetry_off: bool = False

    #: ``forward_bf16 and backward_bf16``, kept as a plain attribute (refreshed whenever what decides
    #: it is assigned): a compiled model reads it, so its graph is specialised on this one flag
    #: (one recompilation at a late switch) instead of on the step, which changes every step.
    all_bf16 = False  # not a dataclass field: __init__ must not reset it after the fields set it

    _DECIDES = frozenset({"policy", "step", "total_steps", "auto_switch_step", "forced_high_precision"})

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in self._DECIDES and "forced_high_precision" in self.__dict__:
            try:
                both = self.forward_bf16 and self.backward_bf16
            except PolicyError:  # a switch at a fraction before total_steps is known: asking raises there
                both = False
            super().__setattr__("all_bf16", both)

    def set_step(self, step: int, total_steps: int | None = None) -> None:
        self.step = int(step)
        self.micro_batch = 0
        if total_steps is not None:
            self.total_steps = int(total_steps)

    def set_micro_batch(self, index: int) -> None:
        """The micro-batch of the step in progress (gradient accumulation): each gets its own
        stochastic-rounding streams, so SR noise is independent across the micro-batches whose
        gradients are summed."""
        self.micro_batch = int(index)

    @contextlib.contextmanager
    def high_precision(self):
        """Within the block, ``forward_bf16`` and ``backward_bf16`` are true: every quantized linear
        runs as a plain linear in the activation dtype (the noise probe's reference gradient)."""
        before = self.forced_high_precision
        self.forced_high_precision = True
        try:
            yield self
        finally:
            self.forced_high_precision = before

    @contextlib.contextmanager
    def no_telemetry(self):
        """Within the block no telemetry is recorded (passes outside training, such as the noise
        probe's, must not stand in for the step's own)."""
        before = self.telemetry_off
        self.telemetry_off = True
        try:
            yield self
        finally:
            self.telemetry_off = before

    def _switched(self, scope: str) -> bool:
        if self.forced_high_precision:
            return True
        ls = self.policy.late_switch
        if ls is None or ls.scope not in (scope, "both"):
            return False
        if ls.auto is not None:
            return self.auto_switch_step is not None and self.step >= self.auto_switch_step
        return self.step >= ls.first_bf16_step(self.total_steps)

    @property
    def forward_bf16(self) -> bool:
        """The late switch has moved the forward GEMM (Fprop) to BF16."""
        return self._switched("forward")

    @property
    def backward_bf16(self) -> bool:
        """The late switch has moved the backward GEMMs (Dgrad, Wgrad) to BF16."""
        return self._switched("backward")

    @property
    def telemetry_due(self) -> bool:
        """Record telemetry on the steps whose 1-based number is a multiple of telemetry_every
        (``step`` is the 0-based index of the step in progress), i.e. on the logged steps."""
        n = self.policy.telemetry_every
        return n > 0 and not self.telemetry_off and (self.step + 1) % n == 0

    def sr_seed(self, layer_index: int, stream: str) -> int:
        """A 63-bit seed unique to (run seed, step, micro-batch, layer, data-parallel rank, stream).

        A hash, not a sum, so that neighbouring steps, layers and ranks never share or shift
        random streams; reproducible across processes and restarts. The first micro-batch of a step
        keeps the key it had before micro-batches were part of it (runs without gradient
        accumulation draw the same bits as before).
        """
        mb = f"/mb{self.micro_batch}" if self.micro_batch else ""
        key = f"{self.seed}/{self.step}/{layer_index}/{self.rank}/{stream}{mb}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1

    def generator(self, layer_index: int, stream: str, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(self.sr_seed(layer_index, stream))
        return g
