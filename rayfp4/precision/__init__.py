"""The NVFP4 training recipe as modules: the precision policy, the quantized linear, telemetry.

>>> summary = apply_precision_policy(model, PrecisionPolicy(format="nvfp4", bf16_last_blocks=2))
>>> summary.runtime.set_step(step, total_steps)   # each step, from the training loop
"""

from .apply import LayerDecision, PrecisionSummary, apply_precision_policy, set_producer_fusions
from .linear import MXFP4Linear, NVFP4Linear, QuantizedLinear
from .noise_probe import GradNoiseProbe, grad_noise_ratio
from .oscillation import OscillationTracker
from .policy import AutoSwitch, LateSwitch, OscillationReset, PolicyError, PrecisionPolicy, format_validation_error
from .runtime import PrecisionRuntime
from .telemetry import collect_telemetry, operand_stats

__all__ = [
    "AutoSwitch",
    "GradNoiseProbe",
    "LateSwitch",
    "LayerDecision",
    "MXFP4Linear",
    "NVFP4Linear",
    "OscillationReset",
    "OscillationTracker",
    "PolicyError",
    "PrecisionPolicy",
    "PrecisionRuntime",
    "PrecisionSummary",
    "QuantizedLinear",
    "apply_precision_policy",
    "collect_telemetry",
    "format_validation_error",
    "grad_noise_ratio",
    "operand_stats",
    "set_producer_fusions",
]
