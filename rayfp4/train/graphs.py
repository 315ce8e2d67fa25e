"""``train.compile: graph``: each micro-batch's forward and backward replayed from CUDA graphs.

The 4-bit step on a GPU spends much of its time on the host (each quantized linear launches a
dozen small kernels and does its bookkeeping in Python, ~2 ms per layer per step on the H200;
BENCHMARKS.md). :class:`GraphedLoss` captures the model's forward and backward of one micro-batch
once (``torch.cuda.make_graphed_callables``) and replays both afterwards: the same kernels on
the same memory, so the step computes exactly what the eager step computes, without the host.
The optimizer step, gradient clipping and the finiteness check stay eager, so skipped steps,
learning-rate changes and the oscillation reset behave as in any run.

What a replay cannot see is Python state that the capture read once; each piece is handled here:

- stochastic rounding: the keys of every (layer, stream) sit in the precision runtime's device
  seed table, rewritten before each step and micro-batch (``PrecisionRuntime.enable_device_seeds``;
  the bits equal the generator path's);
- the late switch to BF16 changes which kernels run: the graph is captured again when the
  runtime's forward/backward switch state changes (once per run), as for a new micro-batch shape;
- telemetry is measured in Python on its steps (``precision.telemetry_every``): those steps run
  eagerly, as do passes outside training (validation, the gradient-noise probe's), which call the
  model itself.

Requirements, checked by the config (:class:`rayfp4.config.RunConfig`) and again here: a CUDA
device, one worker, and quantizers that draw their stochastic rounding from device seeds (NVFP4
on the triton or cutlass backend; MXFP4 and MS-EDEN still draw from CUDA generators).
"""

from __future__ import annotations

import gc
import time

import torch

from ..config import ConfigError


class _Loss(torch.nn.Module):
    """The model's loss as a module of its own, so that capturing replaces this wrapper's forward
    and not the model's (validation and the probes keep calling the model itself).

    ``autocast``: the caller's CUDA autocast state ``(enabled, dtype)``, entered here around the
    forward only. ``make_graphed_callables`` captures the backward inside the context it is called
    in; an eager step calls ``backward()`` outside autocast, so the capture must too, or autocast
    would rewrite the backward's ops (FP32 matmuls run in BF16, BF16 sums in FP32) and the replayed
    gradients would not be the eager ones."""

    def __init__(self, model: torch.nn.Module, autocast: tuple[bool, torch.dtype]):
        super().__init__()
        self.model, self.autocast = model, autocast

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        enabled, dtype = self.autocast
        with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
            return self.model(inputs, targets)


class GraphedLoss:
    """Callable as ``loss = forward(inputs, targets)`` in :func:`rayfp4.train.loop.train_step`;
    replays the captured graphs where it can and calls the model eagerly where it cannot
    (counted in :attr:`eager_calls`).

    ``model``: the bare model (not wrapped for data parallelism) on a CUDA device, with its
    precision policy applied; ``runtime``: its :class:`rayfp4.precision.PrecisionRuntime`
    (None for a model without quantized layers).
    """

    def __init__(self, model: torch.nn.Module, runtime, device: torch.device, notice=lambda msg: None,
                 fallback: bool = False):
        device = torch.device(device)
        if device.type != "cuda":
            raise ConfigError(f"train.compile: graph replays CUDA graphs; this worker's device is {device} "
                              f"(set scaling.use_gpu: true, or train.compile: none)")
        from ..precision.linear import DEVICE_SEED_BACKENDS, QuantizedLinear

        for name, m in model.named_modules():
            if not isinstance(m, QuantizedLinear):
                continue
            if m.format != "nvfp4" or m.roles.dgrad_dy.ms_eden or m.backend.name not in DEVICE_SEED_BACKENDS:
                raise ConfigError(
                    f"train.compile: graph needs every 4-bit layer to draw its stochastic rounding from device "
                    f"seeds (NVFP4 on the triton or cutlass backend); layer {name} is {m.format} on the "
                    f"{m.backend.name} backend{' with MS-EDEN backward' if m.roles.dgrad_dy.ms_eden else ''}. "
                    f"Use train.compile: none for it")
        self.model, self.runtime, self.notice, self.fallback = model, runtime, notice, fallback
        #: Why the step runs eagerly for good (``fallback``: a capture failed), else None.
        self.disabled: str | None = None
        if runtime is not None:
            runtime.enable_device_seeds(device)
        self.graphed = None
        self.key = None
        # A replayed backward hands back the graph's own gradient buffers, which the next replay
        # overwrites; autograd would keep the first micro-batch's buffer as a parameter's .grad and
        # add the next one to itself. Each replayed gradient is copied before it is accumulated.
        self._replayed = False
        self._hooks = [p.register_hook(self._own_gradient) for p in model.parameters() if p.requires_grad]
        self.captures = 0
        self.eager_calls = 0
        self.replays = 0

    def _own_gradient(self, grad: torch.Tensor):
        return grad.clone() if self._replayed else None

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self._replayed = False
        if not self._replayable(inputs):
            self.eager_calls += 1
            return self.model(inputs, targets)
        key = self._key(inputs, targets)
        if key != self.key:
            try:
                self._capture(inputs, targets, key)
            except Exception as e:  # noqa: BLE001 - with fallback, any failure to capture means eager steps
                if not self.fallback:
                    raise
                self.graphed, self.disabled = None, (str(e).strip().splitlines() or [type(e).__name__])[0]
                self.notice(f"train.compile: auto: capturing the step failed ({self.disabled}); eager steps "
                            f"from now on")
                self.eager_calls += 1
                return self.model(inputs, targets)
        self.replays += 1
        self._replayed = True
        return self.graphed(inputs, targets)

    def _replayable(self, inputs: torch.Tensor) -> bool:
        rt = self.runtime
        return (self.disabled is None and self.model.training and torch.is_grad_enabled() and inputs.is_cuda
                and not (rt is not None and rt.telemetry_due)
                and not (rt is not None and rt.forced_high_precision))

    def _key(self, inputs, targets) -> tuple:
        """What the capture depends on besides memory it reads at replay: the shapes, the late
        switch's state and autocast's."""
        rt = self.runtime
        switch = (rt.forward_bf16, rt.backward_bf16) if rt is not None else ()
        cast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        return (tuple(inputs.shape), tuple(targets.shape), inputs.dtype, targets.dtype, switch, cast)

    def _capture(self, inputs, targets, key) -> None:
        if torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled():
            raise RuntimeError("train.compile: graph captures under autocast with its weight cache off "
                               "(torch.autocast(..., cache_enabled=False)); the training loop sets that")
        before, started = self.key, time.perf_counter()
        self.graphed = None  # the previous graphs' memory goes back before the new capture
        # Graphs sit in reference cycles (the autograd Functions make_graphed_callables builds),
        # so only a garbage collection frees them, and one that ran during a capture (they run
        # whenever Python objects are allocated) would free an earlier graph's memory mid-capture:
        # the likeliest cause of the invalidated capture seen once on the H200 (BENCHMARKS.md,
        # 2026-12-03, fifth session; not confirmed, and not seen again since this guard). So
        # collect now, and not during the capture.
        gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        try:
            # Warm-up passes (make_graphed_callables runs three on a side stream before capturing)
            # use this step's keys and leave no trace: their gradients are returned, not accumulated.
            loss = _Loss(self.model, key[5])  # the autocast state :meth:`_key` read
            with torch.autocast("cuda", enabled=False):
                self.graphed = torch.cuda.make_graphed_callables(loss, (inputs, targets), allow_unused_input=True)
        finally:
            if collecting:
                gc.enable()
        self.key = key
        self.captures += 1
        took = time.perf_counter() - started
        if before is None:
            self.notice(f"train.compile: graph: captured the forward and backward of a micro-batch of shape "
                        f"{key[0]} in {took:.1f} s; replayed from now on (telemetry steps run eagerly)")
        else:
            why = ("the late switch moved GEMMs to BF16" if before[4] != key[4]
                   else f"a micro-batch of shape {key[0]}, not {before[0]}")
            self.notice(f"train.compile: graph: captured again in {took:.1f} s ({why})")
