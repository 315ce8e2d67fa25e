"""Per-model mutable state of the recipe: the step, the run length, the seed and the rank.

The training loop owns one :class:`PrecisionRuntime` per model (``apply_precision_policy``
returns it) and calls :meth:`PrecisionRuntime.set_step` before each optimizer step and
:meth:`PrecisionRuntime.set_micro_batch` before each micro-batch of it. The quantized
linears read it to decide the late switch to BF16, to derive their stochastic-rounding streams
and to know when to record telemetry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .policy import PrecisionPolicy


@dataclass
class PrecisionRuntime:
    policy: PrecisionPolicy
    seed: int = 0
    rank: int = 0
    step: int = 0
    total_steps: int | None = None
    micro_batch: int = 0

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

    def _switched(self, scope: str) -> bool:
        ls = self.policy.late_switch
        if ls is None or ls.scope not in (scope, "both"):
            return False
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
        return n > 0 and (self.step + 1) % n == 0

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
