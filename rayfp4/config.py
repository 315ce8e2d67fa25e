"""The whole run as one pydantic model, loaded from YAML with ``--set key.path=value`` overrides.

``load_config(path, overrides)`` returns a validated :class:`RunConfig` or raises
:class:`ConfigError` whose message names every bad key path (``optim.lr: Input should be greater
than 0``). ``RunConfig.model_json_schema()`` is what ``python -m rayfp4.run --schema`` prints for
editors. A config may list ``variants``: named sets of overrides that run as sibling runs (e.g.
NVFP4 vs BF16) and are compared at the end against ``baseline``.
"""

from __future__ import annotations

import copy
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from .data.order import StreamConfig
from .model import ModelConfig
from .precision import PrecisionPolicy
from .yamlfile import format_validation_error, read_yaml_mapping


class ConfigError(ValueError):
    """A config a user wrote that cannot run; the message names the key path."""

    retry_cannot_help = True  # deterministic: the same input fails the same way again


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSection(StreamConfig):
    """The run's data: where the shards are (or which embedded corpus), how the stream reads them
    (the fields of :class:`rayfp4.data.StreamConfig`, defined once there), and how a step uses them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shards: str | None = Field(None, description="token shard directory (pipelines.tokenize); "
                               "None: the embedded Shakespeare corpus, tokenized on first use")
    corpus_tokenizer: str = Field("bpe:8192", description="tokenizer of the embedded corpus: bpe:VOCAB or byte")
    corpus_seq_len: int = Field(256, gt=0, description="sequence length the embedded corpus is packed to")
    micro_batch_size: int | None = Field(None, gt=0, description="sequences per forward/backward on one worker; "
                                         "smaller than its share of the batch means gradient accumulation")
    val_sequences: int = Field(64, ge=0, description="held-out sequences evaluated at each "
                               "validation, evenly spaced over the whole validation split")
    ledger: bool = Field(True, description="record the global ids of the sequences each step consumed")


class OptimSection(_Strict):
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final LR as a fraction of lr")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm (None: no clipping)")
    schedule: Literal["cosine", "wsd"] = "cosine"
    warmup_steps: int = Field(20, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: fraction of steps spent decaying")


class TrainSection(_Strict):
    steps: int = Field(200, gt=0, description="optimizer steps")
    seed: int = Field(0, ge=0, description="seed of the model init and the stochastic-rounding streams")
    dtype: Literal["bf16", "fp32"] = Field("bf16", description="activation dtype (autocast); master weights stay FP32")
    val_every: int = Field(50, ge=0, description="validation every N steps and at the end (0: only at the end)")
    log_every: int = Field(5, gt=0)
    max_nonfinite_in_a_row: int = Field(5, gt=0, description="stop after this many consecutive skipped steps")
    compile: Literal["auto", "none", "aot_eager", "inductor", "graph"] = Field(
        "auto", description="auto: graph where a run meets its requirements, else none. "
        "torch.compile the training forward and backward: the whole model is one graph "
        "(the 4-bit layers enter as custom ops, rayfp4.precision.ops). aot_eager runs it with the eager "
        "kernels, bit for bit an eager step; inductor also fuses the model's other ops (norms, attention, "
        "SwiGLU), whose last bits may then differ. graph: no compiler; each micro-batch's forward and "
        "backward are captured once in CUDA graphs and replayed (rayfp4.train.graphs), bit for bit an eager "
        "step without its host time; one GPU worker, NVFP4 with SR (not MXFP4 or MS-EDEN) or BF16. Not with "
        "scaling.strategy: fsdp2 yet")
    fusions: Literal["auto", "on", "off"] = Field(
        "auto", description="the 4-bit layers after an RMSNorm (attention's qkv, the MLP's gate_up) and after "
        "the SwiGLU (down) compute the norm's output and the SwiGLU product themselves, in the pass that "
        "measures their input's amax: bit for bit the same training, less activation memory. auto: on where "
        "the steps are replayed from CUDA graphs (train.compile resolves to graph; measured faster there on "
        "an H200), off elsewhere (eager steps on a GPU were not measurably faster); on, off: always, never. "
        "Only NVFP4 layers on the triton or cutlass backend with the recipe's backward (not MS-EDEN) fuse; "
        "others compute their input as usual")

    @field_validator("fusions", mode="before")
    @classmethod
    def _yaml_booleans(cls, v):
        # YAML reads an unquoted on/off as a boolean
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class CheckpointSection(_Strict):
    every: int = Field(50, ge=0, description="checkpoint every N steps and at the end (0: only at the end)")
    keep: int = Field(2, gt=0, description="checkpoints kept on storage")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the latest checkpoint")
    stop_grace_s: float = Field(
        60.0, ge=0, description="on SIGINT/SIGTERM (Ctrl-C, ray job stop, a study's time limit): seconds the "
        "workers get to save a checkpoint of their current step and return, so that the rerun loses nothing; "
        "then, or at a second signal, they are stopped (0: stop at once; the rerun resumes from the last "
        "checkpoint of the cadence)")
    storage: str | None = Field(
        None, description="where Ray Train keeps the checkpoints (its storage_path): a directory (on several "
        "nodes, one they all mount) or a pyarrow filesystem URI (file:///..., s3://bucket/prefix, gs://..., "
        "hdfs://...); a run's checkpoints go to <storage>/<name>/<variant>. None: in the run directory")

    @field_validator("storage")
    @classmethod
    def _storage_is_a_path_or_uri(cls, v):
        return check_storage_location(v)


class ScalingSection(_Strict):
    num_workers: int | tuple[int, int] = Field(
        2, description="Ray Train workers; [min, max]: elastic, Ray Train (re)starts the group with as many "
        "workers as the cluster holds, at least min (a group that loses a node continues smaller)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional on small machines, so Ray Data can read")
    strategy: Literal["ddp", "fsdp2"] = "ddp"
    fsdp_param_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="FSDP2's mixed precision: the dtype its high-precision parameters (norms, "
        "embeddings, BF16 layers) are gathered and computed in; gradients are reduced in FP32 either way. "
        "NVFP4 layers quantize their FP32 master weight regardless (see precision.fp4_weight_gather)")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs each worker reserves with use_gpu; below 1, "
                                   "several workers share a GPU (their process group then uses gloo)")
    dist_backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend: auto = nccl with whole GPUs, gloo on CPUs or when "
        "workers share a GPU (NCCL refuses two ranks on one device)")
    rendezvous: Literal["auto", "loopback", "node"] = Field(
        "auto", description="where torch.distributed listens: auto = 127.0.0.1 when all workers share a node, "
        "else rank 0's node address; loopback = refuse several nodes; node = always the node address")
    resources_per_worker: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="custom Ray resources each worker also reserves (CPU and GPU have "
        "their own fields), e.g. {trainer_slot: 1} with each node started with --resources "
        "'{\"trainer_slot\": 1}' puts at most one worker on a node")
    elastic_resize_interval_s: float = Field(
        60.0, ge=0, description="elastic num_workers: how often a running group checks whether the cluster "
        "now holds more workers; growing restarts the group from its latest checkpoint")

    @field_validator("num_workers", mode="before")
    @classmethod
    def _count_or_range(cls, v):
        def count(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if not (count(v) or (isinstance(v, (list, tuple)) and len(v) == 2 and all(count(x) for x in v))):
            raise ValueError(f"expected a number of workers or [min, max], got {v!r}")
        n = (v,) if count(v) else tuple(v)
        if min(n) < 1:
            raise ValueError(f"{v!r}: a run needs at least 1 worker")
        if len(n) == 2 and n[0] > n[1]:
            raise ValueError(f"[min, max] = [{n[0]}, {n[1]}]: min is larger than max")
        return v if count(v) else n

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources_only(cls, v):
        for key, field in (("CPU", "cpus_per_worker"), ("GPU", "gpus_per_worker")):
            if key in v:
                raise ValueError(f"{key} has its own setting, scaling.{field}")
        return v

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    @property
    def workers_text(self) -> str:
        """``2``, or ``1-2`` for an elastic run."""
        return f"{self.min_workers}-{self.max_workers}" if self.elastic else str(self.max_workers)

    def world_sizes(self) -> range:
        """Every number of workers the run may have."""
        return range(self.min_workers, self.max_workers + 1)


class TrackingSection(_Strict):
    enabled: bool = True
    uri: str = Field("sqlite:///mlruns.db", description="MLflow tracking URI (a local SQLite file by default)")
    experiment: str = "rayfp4"
    system_metrics_every_s: float = Field(
        10.0, ge=0, description="sample rank 0's node (CPU, memory, disk, network; GPUs with nvidia-ml-py) into "
        "the run's system/ metrics every N seconds (MLflow's system metrics; needs psutil); 0: off")


class HookSpec(_Strict):
    path: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="package.module:Class (a rayfp4.train.hooks.TrainHook)")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the hook's constructor")


class DebugSection(_Strict):
    fail_at_step: int | None = Field(None, ge=0, description="raise in rank 0 at this step, once per run (tests)")
    nan_at_steps: list[int] = Field(default_factory=list, description="poison the loss at these steps (tests)")
    hooks: list[HookSpec] = Field(default_factory=list, description="training-loop hooks by import path "
                                  "(rayfp4.train.hooks), e.g. for fault-injection tests")


_NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]+")
_URI_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def check_storage_location(value: str | None) -> str | None:
    """``checkpoint.storage``: a filesystem path or a URI ``scheme://...`` (pyarrow resolves the
    scheme; the driver checks it can be opened, rayfp4.train.launch.preflight)."""
    if value is None:
        return value
    if not value.strip():
        raise ValueError("must not be empty; leave it out to keep checkpoints in the run directory")
    if value != value.strip():
        raise ValueError(f"{value!r} has leading or trailing spaces")
    scheme = _URI_SCHEME.match(value)
    if scheme and len(scheme.group(1)) > 1 and not value.startswith(scheme.group(0) + "//"):
        raise ValueError(f"{value!r} looks like a URI but lacks '//' after '{scheme.group(0)}' "
                         f"(e.g. s3://bucket/prefix or file:///absolute/path)")
    if value.startswith("file://") and not value.startswith("file:///"):
        raise ValueError(f"{value!r}: a file URI needs an absolute path, file:///...")
    return value


def check_run_name(value: str | None) -> str | None:
    """A run or variant name is a single directory under ``output_dir``: letters, digits, ``_``,
    ``-`` and ``.``, not starting with ``.`` (which excludes ``.``, ``..`` and hidden folders)."""
    if value is None:
        return value
    if not _NAME_CHARS.fullmatch(value):
        raise ValueError(f"{value!r} may only contain letters, digits, '_', '-' and '.'")
    if value.startswith("."):
        raise ValueError(f"{value!r} must not start with '.' (it names a folder under output_dir)")
    return value


class Variant(_Strict):
    name: str = Field(min_length=1, max_length=100)
    set: dict[str, Any] = Field(default_factory=dict, description="key.path: value overrides for this variant")

    @field_validator("name")
    @classmethod
    def _name_is_one_folder(cls, v):
        return check_run_name(v)


class RunConfig(_Strict):
    name: str | None = Field(None, max_length=100,
                             description="run name; default: the config file's stem and the start time")
    output_dir: str = Field("runs", description="where runs keep checkpoints, ledgers and artifacts")
    resume: Literal["auto", "never", "must"] = Field(
        "auto", description="auto: continue a run of the same name if it has a checkpoint; never: refuse "
                            "an existing run; must: refuse to start fresh")
    resume_changes: list[str] = Field(
        default_factory=list, description="settings a resumed run may change from the run it continues, "
        "e.g. [train.steps] or [optim] (a whole section); any other difference is refused")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataSection = Field(default_factory=DataSection)
    precision: PrecisionPolicy = Field(default_factory=PrecisionPolicy)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    debug: DebugSection = Field(default_factory=DebugSection)
    variants: list[Variant] = Field(default_factory=list)
    baseline: str | None = Field(None, description="the variant the others are compared with (default: the first)")
    _source: str | None = PrivateAttr(None)

    @field_validator("name")
    @classmethod
    def _name_is_one_folder(cls, v):
        return check_run_name(v)

    @model_validator(mode="after")
    def _consistent(self):
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants: names must be unique, got {names}")
        if self.baseline is not None and names and self.baseline not in names:
            raise ValueError(f"baseline: {self.baseline!r} is not one of the variants {names}")
        elastic = (f" (scaling.num_workers={list(self.scaling.num_workers)} may run with any number in between)"
                   if self.scaling.elastic else "")
        for w in self.scaling.world_sizes():  # with a fixed global batch, each rank takes an equal share
            if self.data.global_batch_size % w:
                raise ValueError(f"data.global_batch_size={self.data.global_batch_size} is not divisible by "
                                 f"scaling.num_workers={w}{elastic}")
            share = self.data.global_batch_size // w
            mb = self.data.micro_batch_size or share
            if share % mb:
                raise ValueError(f"data.micro_batch_size={mb} does not divide each worker's share of the batch "
                                 f"({share}){elastic}")
        seq = self.data.seq_len or self.data.corpus_seq_len
        if self.data.shards is None and seq > self.data.corpus_seq_len:
            raise ValueError(f"data.seq_len={seq} exceeds data.corpus_seq_len={self.data.corpus_seq_len}")
        if seq > self.model.seq_len:
            raise ValueError(f"data.seq_len={seq} exceeds model.seq_len={self.model.seq_len}")
        if self.scaling.dist_backend == "nccl" and not self.scaling.use_gpu:
            raise ValueError("scaling.dist_backend=nccl needs scaling.use_gpu=true")
        if self.scaling.dist_backend == "nccl" and self.scaling.gpus_per_worker < 1 and self.scaling.max_workers > 1:
            raise ValueError(f"scaling.dist_backend=nccl with scaling.gpus_per_worker={self.scaling.gpus_per_worker}: "
                             f"NCCL refuses two ranks on one GPU; use gloo (or auto)")
        if self.scaling.fsdp_param_dtype != "fp32" and self.scaling.strategy != "fsdp2":
            raise ValueError(f"scaling.fsdp_param_dtype={self.scaling.fsdp_param_dtype} applies to FSDP2 only; "
                             f"set scaling.strategy: fsdp2 (DDP computes in train.dtype through autocast)")
        if self.precision.oscillation_reset is not None and self.scaling.strategy == "fsdp2":
            raise ValueError("precision.oscillation_reset: not available with scaling.strategy: fsdp2 yet (its "
                             "detection works on whole weights, which FSDP2 shards); use ddp")
        if self.train.compile not in ("none", "auto") and self.scaling.strategy == "fsdp2":
            raise ValueError("train.compile: not available with scaling.strategy: fsdp2 yet (the 4-bit weight "
                             "gather and the sharded parameters are untried under torch.compile); use ddp or "
                             "train.compile: none")
        if self.train.compile == "graph" and self.graph_refusal() is not None:
            raise ValueError(f"train.compile: graph: {self.graph_refusal()}")
        if self.scaling.strategy == "fsdp2":
            ls = self.precision.late_switch
            if ls is not None and ls.auto is not None:
                raise ValueError("precision.late_switch.auto: not available with scaling.strategy: fsdp2 yet (its "
                                 "gradient-noise probe needs the FP32 weights FSDP2 shards); use ddp, or a fixed "
                                 "at_step / at_fraction")
            if self.precision.grad_noise_probe_every:
                raise ValueError("precision.grad_noise_probe_every: not available with scaling.strategy: fsdp2 yet "
                                 "(the probe's BF16 reference pass needs the FP32 weights FSDP2 shards); use ddp")
        if self.precision.fp4_weight_gather and self.scaling.strategy != "fsdp2":
            raise ValueError("precision.fp4_weight_gather: only FSDP2 gathers weights; it needs "
                             "scaling.strategy: fsdp2")
        keys = set(self.fingerprint()) | set(OMIT_WHEN_DEFAULT)
        for change in self.resume_changes:
            if not any(_covers(change, k) for k in keys):
                raise ValueError(f"resume_changes: {change!r} is not a setting that defines a run; those are "
                                 f"{', '.join(DEFINING)} (and not {', '.join(NOT_DEFINING)})")
        return self

    def compile_mode(self) -> str:
        """What ``train.compile`` runs: the setting, or for ``auto`` ``graph`` where this run meets
        its requirements (:meth:`graph_refusal`) and ``none`` elsewhere (the CPU, several workers,
        FSDP2, MXFP4, MS-EDEN, the reference backend)."""
        if self.train.compile != "auto":
            return self.train.compile
        return "graph" if self.scaling.strategy != "fsdp2" and self.graph_refusal() is None else "none"

    def fusions_on(self) -> bool:
        """Whether the 4-bit layers fuse their producers (``train.fusions`` resolved: auto follows
        :meth:`compile_mode`)."""
        if self.train.fusions != "auto":
            return self.train.fusions == "on"
        return self.compile_mode() == "graph"

    def graph_refusal(self) -> str | None:
        """Why ``train.compile: graph`` cannot run this config (rayfp4.train.graphs), naming the
        field at fault; None where it can."""
        why = None
        if not self.scaling.use_gpu:
            why = "it replays CUDA graphs: set scaling.use_gpu: true"
        elif self.scaling.max_workers > 1:
            why = (f"it runs one worker for now (scaling.num_workers={self.scaling.num_workers}: data-parallel "
                   f"gradient hooks under graph replay are untried); use train.compile: none on several workers")
        elif self.precision.format == "mxfp4":
            why = ("precision.format: mxfp4 draws its stochastic rounding from CUDA generators, which a "
                   "captured graph would replay with the same bits every step; use nvfp4 or bf16")
        elif self.precision.format == "nvfp4" and self.precision.backward_rounding == "ms_eden":
            why = ("precision.backward_rounding: ms_eden draws from CUDA generators, which a captured graph "
                   "would replay with the same bits every step; use sr")
        elif self.precision.format == "nvfp4" and self.precision.backend == "reference":
            why = ("precision.backend: reference checks every operand for NaN/Inf on the host, which a graph "
                   "cannot capture; use auto, triton or cutlass")
        return why

    def fingerprint(self, data_identity: str | None = None) -> dict[str, str]:
        """The settings that define what a run computes, flattened (``optim.lr: '0.003'``).

        A checkpoint is resumed only by a run with the same fingerprint, except for the keys in
        ``resume_changes``. Where output goes, tracking, logging and checkpoint cadence, the number
        of workers and the GEMM backend (all backends are bit-identical) are not part of it.
        ``data_identity`` stands for the token shards themselves (their checksums), not their path.
        """
        flat = flatten(self.model_dump(mode="json", exclude={"variants", "baseline"}))
        out = {k: v for k, v in flat.items()
               if any(_covers(d, k) for d in DEFINING) and not any(_covers(n, k) for n in NOT_DEFINING)
               and OMIT_WHEN_DEFAULT.get(k) != v}
        if data_identity is not None:
            out["data.identity"] = data_identity
        return out

    @property
    def dist_backend(self) -> str:
        """The torch.distributed backend the workers use (``scaling.dist_backend`` resolved)."""
        s = self.scaling
        if s.dist_backend != "auto":
            return s.dist_backend
        return "nccl" if s.use_gpu and s.gpus_per_worker >= 1 else "gloo"

    @property
    def grad_accum(self) -> int:
        return self.grad_accum_for(self.scaling.max_workers)

    def grad_accum_for(self, world_size: int) -> int:
        """Micro-batches per step on each of ``world_size`` workers (elastic runs change it)."""
        share = self.data.global_batch_size // world_size
        return share // (self.data.micro_batch_size or share)

    def variant_configs(self) -> list[tuple[str, "RunConfig"]]:
        """(name, config) for each variant with its overrides applied; one unnamed run if none."""
        if not self.variants:
            return [("", self)]
        base = self.model_dump(mode="json", exclude_unset=True, exclude={"variants", "baseline"})
        base["name"] = self.name
        out = []
        for v in self.variants:
            data = copy.deepcopy(base)
            for key, value in v.set.items():
                _set_path(data, key, value, f"variants[{v.name}].set")
            _leave_other_formats_alone(data, v)
            out.append((v.name, _validate(data, f"variant {v.name}: ")))
        return out

    @property
    def source(self) -> str | None:
        """The YAML file this config was loaded from (None when built otherwise): run names and tags."""
        return self._source


#: Precision settings that mean something only for the 4-bit formats (format=bf16 refuses them).
#: Set for the whole run (the config's precision section or --set), they apply to its 4-bit
#: variants and are left out of its bf16 variants; a bf16 variant's own ``set`` may not hold them.
FOUR_BIT_ONLY = ("late_switch", "rht_wgrad", "stochastic_rounding_grads", "weight_2d_scaling", "oscillation_reset",
                 "grad_noise_probe_every")
#: Likewise for the settings of NVFP4 alone (its E4M3 block scales): set for the whole run, they
#: apply to its nvfp4 variants and are left out of its bf16 and mxfp4 variants.
NVFP4_ONLY = ("scale_selection", "scale_selection_metric", "scale_selection_cap", "backward_rounding",
              "ms_eden_hadamard")


def _leave_other_formats_alone(data: dict, variant: Variant) -> None:
    precision = data.get("precision")
    if not isinstance(precision, dict) or precision.get("format", "nvfp4") == "nvfp4":
        return
    keys = NVFP4_ONLY + (FOUR_BIT_ONLY if precision.get("format") == "bf16" else ())
    for key in keys:
        path = f"precision.{key}"
        if not any(_covers(s, path) or _covers(path, s) for s in variant.set):
            precision.pop(key, None)


#: What defines a run (prefixes of flattened config keys), and the exceptions among them.
DEFINING = ("model", "optim", "precision", "train.steps", "train.seed", "train.dtype", "data.seed",
            "data.global_batch_size", "data.seq_len", "data.val_sequences", "data.identity")
NOT_DEFINING = ("precision.backend", "precision.gemm_mode", "precision.telemetry_every", "precision.fp4_weight_gather",
                "precision.grad_noise_probe_every")  # the probe leaves training bit-identical
#: Settings added after runs were fingerprinted without them: left out of the fingerprint at their
#: default value, so that those runs still resume (they computed exactly what the default does).
OMIT_WHEN_DEFAULT = {"precision.scale_selection": "max6", "precision.scale_selection_metric": "mse",
                     "precision.scale_selection_cap": "256", "precision.oscillation_reset": "None",
                     "precision.backward_rounding": "sr", "precision.ms_eden_hadamard": "128",
                     "precision.late_switch.auto": "None"}


def _covers(prefix: str, key: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def fingerprint_changes(old: dict[str, str], new: dict[str, str], allowed: list[str] = ()) -> list[str]:
    """``key: old -> new`` for each defining setting that differs and is not in ``allowed``."""
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key) and not any(_covers(a, key) for a in allowed):
            if key == "data.identity":
                out.append("data: the token shards are different (other files or checksums)")
            else:
                out.append(f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}")
    return out


def _set_path(data: dict, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = data
    for i, p in enumerate(parts[:-1]):
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ConfigError(f"{where}: {'.'.join(parts[:i + 1])} is not a section, cannot set {key}")
        node = node[p]
    node[parts[-1]] = value


def _validate(data: dict, prefix: str = "") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(prefix + format_validation_error(e).replace("\n", "\n" + " " * len(prefix))) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``key.path=value`` with the value read as YAML (numbers, booleans, lists, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value is not valid YAML: {e}") from None
    return key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The validated run config of a YAML file (or the defaults) with ``--set`` overrides applied."""
    data = read_yaml_mapping(path, "config", ConfigError, allow_empty=False) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        _set_path(data, key, value, "--set")
    cfg = _validate(data, f"{path}: " if path is not None else "")
    if cfg.name is None:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(path).stem if path is not None else "run").lstrip(".") or "run"
        cfg = cfg.model_copy(update={"name": f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"})
    cfg._source = str(path) if path is not None else None
    # Variants must validate too, before anything starts.
    cfg.variant_configs()
    return cfg


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} for tracking params."""
    out: dict[str, str] = {}
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = str(data)
    return out
