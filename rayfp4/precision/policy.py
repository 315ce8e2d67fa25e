"""The precision policy: which linear layers run which GEMMs in which 4-bit format.

The recipe is data. A :class:`PrecisionPolicy` (pydantic, loadable from YAML) says

- ``format``: ``bf16`` (the baseline), ``nvfp4`` or ``mxfp4``;
- the recipe's switches, each on by default for the 4-bit formats, so each ablation of the paper
  is one flag: ``rht_wgrad`` (Hadamard transform of the Wgrad operands),
  ``stochastic_rounding_grads`` (SR of the gradient dY), ``weight_2d_scaling`` (16x16 weight
  tiles, or 32x32 for MXFP4, so Fprop and Dgrad see the same weight codes);
- which linear layers stay BF16: the first N and last M transformer blocks and/or module-name
  globs (the LM head, embeddings and norms are always high precision);
- an optional late switch to BF16 at a step or fraction of training, or when the measured
  gradient-to-quantization-noise ratio falls low (``auto``), for the forward pass, the backward
  pass or both;
- the GEMM backend (``auto`` picks the best for the device);
- NVFP4's block-scale selection (``scale_selection``): the recipe's ``max6`` (block amax -> 6) or
  ``four_over_six`` (arXiv 2512.02010: per block, map to 4 or to 6, whichever errs less), for all
  operands or per operand role (``fprop.x``, ``fprop.w``, ``dgrad.dy``, ``dgrad.w``, ``wgrad.dy``,
  ``wgrad.x``), with ``scale_selection_metric`` and ``scale_selection_cap``;
- NVFP4's backward rounding (``backward_rounding``): the recipe's ``sr`` (stochastic rounding of dY,
  the 16x16 RHT on the Wgrad operands) or ``ms_eden`` (Quartet II, arXiv 2601.22813: every backward
  operand rotated by a random Hadamard transform of ``ms_eden_hadamard`` = 16 or 128, rounded to
  nearest, and made unbiased by stochastic rounding of the corrected block scales;
  ``rayfp4.formats.ms_eden``).

With every switch off and 1x16 weights the policy is the paper's "base" NVFP4 recipe.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..yamlfile import format_validation_error, read_yaml_mapping


class PolicyError(ValueError):
    """An impossible or malformed precision policy; the message names the field."""

    retry_cannot_help = True  # deterministic: the same input fails the same way again


class AutoSwitch(BaseModel):
    """When to switch, measured: "FP4 All the Way" (arXiv 2505.19115) finds that 4-bit training stops
    making progress once the gradient norm falls below about sqrt(3) times the quantization noise
    of the gradient. Every ``probe_every`` steps :mod:`rayfp4.precision.noise_probe` measures
    ||g_bf16|| / ||g_4bit - g_bf16|| on one micro-batch; after ``patience`` probes in a row below
    ``threshold`` (at or after ``min_fraction`` of the run), the steps that follow run in BF16."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(1.732, gt=0, description="switch when the gradient-to-noise ratio is below this "
                                                      "(the paper's sqrt(3))")
    probe_every: int = Field(50, ge=1, description="measure the ratio every this many steps")
    patience: int = Field(2, ge=1, description="this many probes in a row must measure a ratio below threshold")
    min_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="probes before this fraction of the run's "
                                                                 "steps do not count towards the switch")


class LateSwitch(BaseModel):
    """Switch to BF16 late in training (the paper's 12B run: both passes at 82% of tokens), at a
    fixed step or fraction, or ``auto``: when the measured gradient-to-noise ratio says so."""

    model_config = ConfigDict(extra="forbid")

    at_step: int | None = Field(None, ge=0, description="first optimizer step that runs in BF16")
    at_fraction: float | None = Field(None, description="fraction of the run's steps, in (0, 1]")
    auto: AutoSwitch | None = Field(None, description="switch when the gradient-to-noise ratio falls below "
                                                      "a threshold (rayfp4.precision.noise_probe)")
    scope: Literal["forward", "backward", "both"] = "both"

    @model_validator(mode="after")
    def _one_trigger(self):
        if sum(t is not None for t in (self.at_step, self.at_fraction, self.auto)) != 1:
            raise ValueError("give exactly one of at_step, at_fraction or auto")
        if self.at_fraction is not None and not (0.0 < self.at_fraction <= 1.0):
            raise ValueError(f"at_fraction must be in (0, 1], got {self.at_fraction}")
        return self

    def first_bf16_step(self, total_steps: int | None) -> int:
        """The first BF16 step of a fixed switch (an automatic one's is known only once it fires:
        ``PrecisionRuntime.auto_switch_step``)."""
        if self.auto is not None:
            raise PolicyError("precision.late_switch.auto: the switch step is measured during training, "
                              "not known in advance")
        if self.at_step is not None:
            return self.at_step
        if total_steps is None:
            raise PolicyError("precision.late_switch.at_fraction needs the run's total number of steps, "
                              "which was not set on the precision runtime")
        return int(round(self.at_fraction * total_steps))


class OscillationReset(BaseModel):
    """Reset oscillating weights late in training (TetraJet-v2's OsciReset; rayfp4.precision.oscillation)."""

    model_config = ConfigDict(extra="forbid")

    start_step: int | None = Field(None, ge=1, description="first update after which a detection window opens")
    start_fraction: float | None = Field(None, description="or that step as a fraction of the run's steps, in (0, 1)")
    period: int = Field(200, ge=2, description="a window opens every this many updates")
    window: int = Field(50, ge=1, description="updates each window measures, then resets (less than period)")
    threshold: float = Field(8.0, gt=0, description="reset where the quantized weight moved this many times "
                                                    "the distance the master weight moved")

    @model_validator(mode="after")
    def _check(self):
        if (self.start_step is None) == (self.start_fraction is None):
            raise ValueError("give exactly one of start_step or start_fraction")
        if self.start_fraction is not None and not (0.0 < self.start_fraction < 1.0):
            raise ValueError(f"start_fraction must be in (0, 1), got {self.start_fraction}")
        if self.window >= self.period:
            raise ValueError(f"window ({self.window}) must be less than period ({self.period})")
        return self

    def first_step(self, total_steps: int | None) -> int:
        if self.start_step is not None:
            return self.start_step
        if total_steps is None:
            raise PolicyError("precision.oscillation_reset.start_fraction needs the run's total number of steps")
        return max(1, int(round(self.start_fraction * total_steps)))


#: The operand roles of a linear layer's three GEMMs (``precision.linear.OperandRoles``).
OPERAND_ROLES = ("fprop.x", "fprop.w", "dgrad.dy", "dgrad.w", "wgrad.dy", "wgrad.x")
SCALE_SELECTIONS = ("max6", "four_over_six")


class PrecisionPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["bf16", "nvfp4", "mxfp4"] = "nvfp4"
    rht_wgrad: bool | None = Field(None, description="RHT of the Wgrad operands (default: on for 4-bit formats)")
    stochastic_rounding_grads: bool | None = Field(None, description="SR of dY (default: on for 4-bit formats)")
    weight_2d_scaling: bool | None = Field(None, description="2-D weight tiles (default: on for 4-bit formats)")
    bf16_first_blocks: int = Field(0, ge=0, description="keep the first N transformer blocks' linears in BF16")
    bf16_last_blocks: int = Field(0, ge=0, description="keep the last M transformer blocks' linears in BF16")
    bf16_modules: list[str] = Field(default_factory=list, description="module-name globs kept in BF16")
    late_switch: LateSwitch | None = None
    oscillation_reset: OscillationReset | None = Field(
        None, description="reset weights whose 4-bit value oscillates, late in training (off by default)")
    backend: Literal["auto", "reference", "triton", "cutlass"] = "auto"
    gemm_mode: Literal["device", "lt"] = Field(
        "lt", description="how the triton backend's emulated GEMM applies the FP32 tensor factor on CUDA: "
                          "'lt' (the default: cuBLASLt reading it from device memory in its epilogue, one "
                          "pass) or 'device' (FP32 output, then a rescale pass); the same arithmetic up to "
                          "the summation order")
    mxfp4_scale_rule: Literal["ceil", "floor"] = "ceil"
    telemetry_every: int = Field(0, ge=0, description="quantization telemetry every N steps (0: off)")
    grad_noise_probe_every: int = Field(
        0, ge=0, description="every N steps, log the gradient-to-quantization-noise ratio (rayfp4.precision."
                             "noise_probe; 0: off)")
    fp4_weight_gather: bool | None = Field(
        None, description="under FSDP2, all-gather the NVFP4 layers' weights as 4-bit codes and scales "
                          "quantized on the shards (default: on; it applies to nvfp4 layers, the others "
                          "gather FP32, and the policy summary says which and why)")
    block_pattern: str = Field(r"(?:^|\.)layers\.(\d+)\.", description="regex whose group 1 is the block index")
    scale_selection: str | dict[str, str] = Field(
        "max6", description="NVFP4 block-scale selection: max6 (the recipe) or four_over_six, for every "
                            "operand, or a mapping operand role -> rule (roles left out: max6)")
    scale_selection_metric: Literal["mse", "mae"] = Field(
        "mse", description="error the four_over_six choice minimises per block: squared or absolute")
    scale_selection_cap: Literal[256, 448] = Field(
        256, description="block-scale cap of the tensor scale of four_over_six operands (6 * cap / amax)")
    backward_rounding: Literal["sr", "ms_eden"] = Field(
        "sr", description="how the backward GEMMs' operands are made unbiased: sr (the recipe: stochastic "
                          "rounding of dY, RHT of the Wgrad operands) or ms_eden (random Hadamard rotation, "
                          "round to nearest, stochastic rounding of the corrected block scales)")
    ms_eden_hadamard: Literal[16, 128] = Field(
        128, description="size of MS-EDEN's random Hadamard rotation and correction groups")

    @field_validator("scale_selection")
    @classmethod
    def _selection(cls, v):
        if isinstance(v, str):
            if v not in SCALE_SELECTIONS:
                raise ValueError(f"unknown rule {v!r}; expected max6 or four_over_six, or a mapping "
                                 f"operand role -> rule")
            return v
        for role, rule in v.items():
            if role not in OPERAND_ROLES:
                raise ValueError(f"unknown operand role {role!r}; expected one of {', '.join(OPERAND_ROLES)}")
            if rule not in SCALE_SELECTIONS:
                raise ValueError(f"{role}: unknown rule {rule!r}; expected max6 or four_over_six")
        return dict(v)

    @field_validator("block_pattern")
    @classmethod
    def _one_group(cls, v: str) -> str:
        try:
            rx = re.compile(v)
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
        if rx.groups < 1:
            raise ValueError("needs a capturing group for the block index")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        switches = ("rht_wgrad", "stochastic_rounding_grads", "weight_2d_scaling")
        if self.format == "bf16":
            on = [s for s in switches if getattr(self, s)]
            if on:
                raise ValueError(f"{', '.join(on)} only apply to 4-bit formats, not format=bf16")
            if self.late_switch is not None:
                raise ValueError("late_switch to BF16 makes no sense with format=bf16")
            if self.oscillation_reset is not None:
                raise ValueError("oscillation_reset acts on 4-bit weights; format=bf16 has none")
            if self.grad_noise_probe_every:
                raise ValueError("grad_noise_probe_every measures the noise of 4-bit GEMMs; format=bf16 has none")
        auto = self.late_switch.auto if self.late_switch is not None else None
        if auto is not None and self.grad_noise_probe_every not in (0, auto.probe_every):
            raise ValueError(f"grad_noise_probe_every ({self.grad_noise_probe_every}) and late_switch.auto.probe_every "
                             f"({auto.probe_every}) disagree: the probe runs at one cadence; set them equal or leave "
                             f"grad_noise_probe_every at 0")
        if self.oscillation_reset is not None and self.late_switch is not None:
            raise ValueError("oscillation_reset and late_switch: choose one (after the switch the forward pass no "
                             "longer quantizes the weights the reset acts on)")
        four6 = [r for r in OPERAND_ROLES if self.selection_for(r) == "four_over_six"]
        if four6 and self.format != "nvfp4":
            raise ValueError(f"scale_selection: four_over_six chooses NVFP4's E4M3 block scales; "
                             f"format={self.format} has none (operands: {', '.join(four6)})")
        if self.backward_rounding == "ms_eden":
            if self.format != "nvfp4":
                raise ValueError(f"backward_rounding: ms_eden rounds NVFP4's E4M3 block scales; format={self.format} "
                                 f"has none")
            # (dgrad.w's rule inherited from fprop.w does not count: MS-EDEN requantizes W itself)
            four6 = [r for r in ("dgrad.dy", "dgrad.w", "wgrad.dy", "wgrad.x") if self._named_selection(r) != "max6"]
            if four6:
                raise ValueError(f"scale_selection: four_over_six on the backward operands ({', '.join(four6)}) and "
                                 f"backward_rounding: ms_eden both choose those block scales; use four_over_six on "
                                 f"the forward operands only (fprop.x, fprop.w) with ms_eden")
            # MS-EDEN replaces SR and the 16x16 RHT of the backward operands: they would do nothing.
            on = [s for s in ("stochastic_rounding_grads", "rht_wgrad") if getattr(self, s)]
            if on:
                raise ValueError(f"{', '.join(on)}: backward_rounding: ms_eden replaces the stochastic rounding "
                                 f"and the RHT of the backward operands; leave {' and '.join(on)} unset")
            for s in ("stochastic_rounding_grads", "rht_wgrad"):
                if getattr(self, s) is None:
                    setattr(self, s, False)
                    self.__pydantic_fields_set__.discard(s)
        elif self.ms_eden_hadamard != 128:
            # (the default is accepted: a policy dumped in full and read back must validate)
            raise ValueError("ms_eden_hadamard: only applies with backward_rounding: ms_eden")
        defaulted = [s for s in switches if getattr(self, s) is None]
        for s in defaulted:
            setattr(self, s, self.format != "bf16")
        # Resolved defaults are not the user's choice: a dump with exclude_unset (used to apply a
        # variant's overrides, e.g. format: bf16) must not carry them over.
        self.__pydantic_fields_set__.difference_update(defaulted)
        if (self.weight_2d_scaling and self.backward_rounding == "sr"
                and self.selection_for("dgrad.w") != self.selection_for("fprop.w")):
            raise ValueError(
                f"scale_selection: dgrad.w is {self.selection_for('dgrad.w')} but fprop.w is "
                f"{self.selection_for('fprop.w')}; with weight_2d_scaling Dgrad reuses the Fprop weight codes, "
                f"so give both roles the same rule")
        return self

    def _named_selection(self, role: str) -> str:
        """The rule the policy names for ``role`` itself (a single rule names every role)."""
        if isinstance(self.scale_selection, str):
            return self.scale_selection
        return self.scale_selection.get(role, "max6")

    def selection_for(self, role: str) -> str:
        """The block-scale selection rule of operand ``role`` (e.g. "dgrad.dy"). With 2-D weight
        scaling, dgrad.w follows fprop.w unless the mapping names it."""
        if isinstance(self.scale_selection, str):
            return self.scale_selection
        if role == "dgrad.w" and role not in self.scale_selection and self.weight_2d_scaling:
            return self.selection_for("fprop.w")  # Dgrad reuses the Fprop weight codes
        return self.scale_selection.get(role, "max6")

    # -- derived facts -------------------------------------------------------------------------

    @property
    def quantized(self) -> bool:
        return self.format != "bf16"

    @property
    def block(self) -> int:
        return {"nvfp4": 16, "mxfp4": 32}.get(self.format, 0)

    @property
    def weight_tile(self) -> tuple[int, int]:
        b = self.block
        return (b, b) if self.weight_2d_scaling else (1, b)

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict | None, prefix: str = "precision") -> "PrecisionPolicy":
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            raise PolicyError(format_validation_error(e, prefix)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PrecisionPolicy":
        """A policy from a YAML file holding the policy itself or a run config with ``precision:``."""
        p = Path(path)
        data = read_yaml_mapping(p, "policy", PolicyError)
        if isinstance(data.get("precision"), dict):
            data = data["precision"]
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise PolicyError(f"{p}:\n" + format_validation_error(e, "precision")) from None
