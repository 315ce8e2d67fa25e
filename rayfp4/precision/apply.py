"""``apply_precision_policy``: swap a model's ``nn.Linear`` layers as the policy says.

Low precision is applied by converting modules at build time, not by flags threaded through the
model. Linears marked ``rayfp4_high_precision = True`` (the LM head of ``rayfp4.model``) are
never converted; the policy's block and glob rules choose which of the others stay BF16.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..kernels import BackendUnavailable, resolve
from .linear import MXFP4Linear, NVFP4Linear, QuantizedLinear
from .policy import PolicyError, PrecisionPolicy
from .runtime import PrecisionRuntime

_LINEAR_CLASSES = {"nvfp4": NVFP4Linear, "mxfp4": MXFP4Linear}


@dataclass
class LayerDecision:
    name: str
    precision: str  # "nvfp4", "mxfp4" or "bf16"
    reason: str
    shape: tuple[int, int]  # (out_features, in_features)


@dataclass
class PrecisionSummary:
    """What ``apply_precision_policy`` did: one decision per linear layer, and the runtime."""

    policy: PrecisionPolicy
    runtime: PrecisionRuntime
    layers: list[LayerDecision] = field(default_factory=list)
    backend: str = "none"
    #: How FSDP2 gathers the quantized layers' weights (set by the training loop; "" without FSDP2).
    weight_gather: str = ""
    #: Whether the layers fuse their producers (:func:`set_producer_fusions`; "" where not asked).
    fusions: str = ""

    @property
    def quantized(self) -> list[str]:
        return [d.name for d in self.layers if d.precision != "bf16"]

    @property
    def high_precision(self) -> list[str]:
        return [d.name for d in self.layers if d.precision == "bf16"]

    def quantized_fraction(self) -> float:
        """Fraction of linear-layer weights (by parameter count) that run in 4 bits."""
        total = sum(o * i for d in self.layers for o, i in [d.shape]) or 1
        return sum(o * i for d in self.layers if d.precision != "bf16" for o, i in [d.shape]) / total

    def to_params(self) -> dict[str, str]:
        """Flat key/values for run tracking (MLflow params)."""
        return {
            "precision.summary.format": self.policy.format,
            "precision.summary.backend": self.backend,
            "precision.summary.quantized_layers": str(len(self.quantized)),
            "precision.summary.bf16_layers": str(len(self.high_precision)),
            "precision.summary.quantized_weight_fraction": f"{self.quantized_fraction():.4f}",
            "precision.summary.bf16_layer_names": ",".join(self.high_precision)[:6000],
            **({"precision.summary.weight_gather": self.weight_gather} if self.weight_gather else {}),
            **({"precision.summary.fusions": self.fusions} if self.fusions else {}),
        }

    def table(self) -> str:
        w = max([len(d.name) for d in self.layers] + [5])
        lines = [f"{'layer':<{w}}  {'precision':<9}  {'out x in':>13}  reason"]
        for d in self.layers:
            lines.append(f"{d.name:<{w}}  {d.precision:<9}  {d.shape[0]:>6}x{d.shape[1]:<6}  {d.reason}")
        lines.append(f"{len(self.quantized)} of {len(self.layers)} linear layers in {self.policy.format} "
                     f"({100 * self.quantized_fraction():.1f}% of linear weights), backend {self.backend}")
        return "\n".join(lines)


def set_producer_fusions(model: nn.Module, on: bool) -> str:
    """Switches every NVFP4 layer's producer fusions (``QuantizedLinear.fuse_rmsnorm``: an RMSNorm
    computed in the next layer's amax pass; ``fuse_swiglu``: the SwiGLU product, likewise) on or
    off; bit for bit the same training either way. Returns what a run's summary says of it."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.format == "nvfp4"]
    for m in layers:
        m.fuse_rmsnorm = m.fuse_swiglu = on
    if not on:
        return "off"
    return f"on ({len(layers)} NVFP4 layers)" if layers else "off (no NVFP4 layers)"


def _decide(name: str, block_index: int | None, n_blocks: int, policy: PrecisionPolicy,
            module: nn.Linear) -> tuple[bool, str]:
    if getattr(module, "rayfp4_high_precision", False):
        return False, "always high precision (model)"
    if not policy.quantized:
        return False, "format bf16"
    for pat in policy.bf16_modules:
        if fnmatch.fnmatchcase(name, pat):
            return False, f"bf16_modules '{pat}'"
    if block_index is not None:
        if block_index < policy.bf16_first_blocks:
            return False, f"bf16_first_blocks={policy.bf16_first_blocks}"
        if block_index >= n_blocks - policy.bf16_last_blocks:
            return False, f"bf16_last_blocks={policy.bf16_last_blocks}"
    return True, f"block {block_index}" if block_index is not None else "outside blocks"


def apply_precision_policy(model: nn.Module, policy: PrecisionPolicy | dict, *, seed: int = 0, rank: int = 0,
                           total_steps: int | None = None, device=None) -> PrecisionSummary:
    """Replace ``model``'s linears in place according to ``policy``; returns the summary.

    ``seed`` and ``rank`` make the stochastic-rounding streams reproducible per run and distinct
    per data-parallel rank; ``total_steps`` resolves a late switch given as a fraction (it can
    also be set later on ``summary.runtime``). Raises PolicyError naming the field when the
    policy does not fit the model (a block rule or glob that selects nothing, a layer whose dims
    are not multiples of the block size, a backend that cannot run on the model's device).
    ``device`` is where the backend must run when it is not the model's (a model built on the meta
    device to check a policy before any worker starts).
    """
    if isinstance(policy, dict):
        policy = PrecisionPolicy.from_dict(policy)
    runtime = PrecisionRuntime(policy, seed=seed, rank=rank, total_steps=total_steps)
    summary = PrecisionSummary(policy=policy, runtime=runtime)

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise PolicyError("precision: the model has no nn.Linear layers to apply a policy to")
    rx = re.compile(policy.block_pattern)
    block_of = {}
    for n, _ in linears:
        m = rx.search(n)
        block_of[n] = int(m.group(1)) if m else None
    n_blocks = max((b for b in block_of.values() if b is not None), default=-1) + 1
    for fld in ("bf16_first_blocks", "bf16_last_blocks"):
        v = getattr(policy, fld)
        if v and n_blocks == 0:
            raise PolicyError(f"precision.{fld}: no linear layer name matches block_pattern "
                              f"{policy.block_pattern!r}, so there are no blocks to count")
        if v > n_blocks:
            raise PolicyError(f"precision.{fld}: {v} is more than the model's {n_blocks} transformer blocks")
    for pat in policy.bf16_modules:
        if not any(fnmatch.fnmatchcase(n, pat) for n, _ in linears):
            names = ", ".join(n for n, _ in linears[:8]) + (", ..." if len(linears) > 8 else "")
            raise PolicyError(f"precision.bf16_modules: {pat!r} matches no linear layer (they are: {names})")

    device = torch.device(device) if device is not None else next(model.parameters()).device
    if policy.quantized and device.type != "meta":
        try:
            summary.backend = resolve(policy.backend, device).name
        except BackendUnavailable as e:
            raise PolicyError(f"precision.backend: {e}") from None

    cls = _LINEAR_CLASSES.get(policy.format)
    modules = dict(model.named_modules())
    layer_index = 0
    for name, lin in linears:
        quantize, reason = _decide(name, block_of[name], n_blocks, policy, lin)
        shape = (lin.out_features, lin.in_features)
        if quantize:
            new = cls.from_linear(lin, policy=policy, runtime=runtime, layer_index=layer_index, name=name)
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, new)
            layer_index += 1
        summary.layers.append(LayerDecision(name, policy.format if quantize else "bf16", reason, shape))
    return summary
