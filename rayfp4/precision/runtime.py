"""Per-model mutable state of the recipe: the step, the run length, the seed and the rank.

The training loop owns one :class:`PrecisionRuntime` per model (``apply_precision_policy``
returns it) and calls :meth:`PrecisionRuntime.set_step` before each optimizer step and
:meth:`PrecisionRuntime.set_micro_batch` before each micro-batch of it. The quantized
linears read it to decide the late switch to BF16, to derive their stochastic-rounding streams
and to know when to record telemetry. The gradient-noise probe (:mod:`rayfp4.precision.noise_probe`)
sets :attr:`PrecisionRuntime.auto_switch_step` when an automatic late switch fires, and runs its
reference pass inside :meth:`PrecisionRuntime.high_precision`.

Stochastic rounding keys come either from a :class:`torch.Generator` made per quantization
(:meth:`PrecisionRuntime.generator`, the default) or, once :meth:`PrecisionRuntime.enable_device_seeds`
is called, from a table of device seeds: one persistent int64 device tensor with a fixed slot per
(layer, stream), rewritten in place for each step and micro-batch. A captured CUDA graph reads
the keys from that memory at every replay, where a host integer would be baked into the capture.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field

import torch

from ..kernels.triton_nvfp4 import generator_seed
from .policy import PolicyError, PrecisionPolicy

#: Slots of the device seed table: one per (layer, stream) that draws from it. Generous, since the
#: table is never reallocated (a captured graph holds its address): two SR streams per quantized
#: linear fill it only past 2048 linears.
DEVICE_SEED_SLOTS = 4096


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
    #: The device seed table (int64, one slot per (layer, stream)) once :meth:`enable_device_seeds`
    #: has made it; None while the quantizers take generators.
    device_seeds: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    #: The registered (layer_index, stream) keys in slot order: slot i is the i-th key.
    _seed_slots: dict = field(default_factory=dict, init=False, repr=False, compare=False)

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
        self.refresh_device_seeds()

    def set_micro_batch(self, index: int) -> None:
        """The micro-batch of the step in progress (gradient accumulation): each gets its own
        stochastic-rounding streams, so SR noise is independent across the micro-batches whose
        gradients are summed."""
        self.micro_batch = int(index)
        self.refresh_device_seeds()

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

    def enable_device_seeds(self, device, slots: int = DEVICE_SEED_SLOTS) -> torch.Tensor:
        """Make the device seed table on ``device`` (``slots`` int64 entries, allocated once and
        never again: a CUDA graph captured over it stays valid) and return it; the quantized
        linears then draw their NVFP4 SR keys from it (:meth:`device_seed`). Calling it again for
        the same device keeps the table."""
        device = torch.device(device)
        if self.device_seeds is not None:
            if not self._on_table_device(device):
                raise ValueError(f"device seeds are already enabled on {self.device_seeds.device}, not {device}")
            return self.device_seeds
        self.device_seeds = torch.zeros(slots, dtype=torch.int64, device=device)
        return self.device_seeds

    def _on_table_device(self, device: torch.device) -> bool:
        table = self.device_seeds.device
        return device.type == table.type and (device.index is None or device.index == table.index)

    def device_seed(self, layer_index: int, stream: str, device) -> torch.Tensor:
        """The device seed of (layer, stream): a 1-element view of the table's slot for the key,
        which holds ``generator_seed(self.sr_seed(layer_index, stream), device)``, so quantizing
        with it draws what :meth:`generator` would draw, bit for bit.

        A key gets its slot on first use, with the current value, and keeps it; every later
        :meth:`set_step` / :meth:`set_micro_batch` rewrites all slots. Register every key (run one
        step eagerly) before capturing a CUDA graph: a slot written during capture would be
        rewritten to that value at every replay, so that raises.
        """
        if self.device_seeds is None:
            raise RuntimeError("device seeds are off: call PrecisionRuntime.enable_device_seeds(device) first")
        device = torch.device(device)
        if not self._on_table_device(device):
            raise ValueError(f"the device seed table is on {self.device_seeds.device}, not {device}")
        key = (layer_index, stream)
        slot = self._seed_slots.get(key)
        if slot is None:
            slot = len(self._seed_slots)
            if slot == self.device_seeds.numel():
                raise RuntimeError(
                    f"the device seed table is full: all {slot} slots are taken by (layer, stream) keys, and it "
                    f"cannot grow (a captured graph holds its address); enable device seeds with more slots")
            if self.device_seeds.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"device seed of {key} first asked for during CUDA graph capture: run a step "
                                   f"eagerly first, so that every slot exists before capture")
            self._seed_slots[key] = slot
            value = generator_seed(self.sr_seed(layer_index, stream), self.device_seeds.device)
            self.device_seeds[slot:slot + 1].fill_(value)
        return self.device_seeds[slot:slot + 1]

    def refresh_device_seeds(self) -> None:
        """Write every registered slot's key for the current step, micro-batch and rank into the
        table, in place, with one host-to-device copy (no host sync). On CUDA the copy comes from
        a pinned tensor made afresh each time: PyTorch's caching host allocator hands its block
        out again only once the copies reading it have run, so a refresh never changes the keys
        of work still queued from the micro-batch before. A no-op while device seeds are off."""
        if self.device_seeds is None or not self._seed_slots:
            return
        table = self.device_seeds
        keys = [generator_seed(self.sr_seed(layer, stream), table.device) for layer, stream in self._seed_slots]
        staged = torch.tensor(keys, dtype=torch.int64, pin_memory=table.is_cuda)
        table[:len(keys)].copy_(staged, non_blocking=True)
