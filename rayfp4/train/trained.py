"""A trained model back from disk: what eval, generate and export share.

A run on disk (see docs/architecture.md) is ``<output_dir>/<name>/<variant>/checkpoint_NNNNNNNN``;
any of the three levels may be given:

- a **run** folder: its variants (every subfolder holding ``config.yaml`` and ``fingerprint.json``,
  ``train`` for a run without variants), optionally narrowed by name;
- a **variant** folder: that variant, at its newest checkpoint that loads (older ones are tried
  when the newest does not, as a resume does: :func:`rayfp4.train.checkpoint.load_latest`);
- a **checkpoint** folder: exactly that checkpoint, or an error.

(A run with ``checkpoint.storage`` set to a directory keeps its checkpoints in
``<storage>/<name>/<variant>``; they are looked for there. Remote storage is not read here.)

Checkpoints are verified as training verifies them (sizes and SHA-256 from ``state.json``) and
must have been written for the model the variant's ``config.yaml`` describes. Whole checkpoints
hold the weights in ``state.pt``; FSDP2 runs on several workers wrote them sharded under
``shards/`` (``torch.distributed.checkpoint``), which one process reads without a process group.

The variant's token shards give the tokenizer (and the validation split); they must be the shards
the run trained on (its fingerprint's ``data.identity``), or the ids would mean other text.

Two precisions a loaded model runs in (:func:`in_precision`): ``bf16`` (no linear quantized,
activations in BF16) and ``trained`` (the variant's own precision policy applied as in training,
backend resolved the same way, activations in ``train.dtype``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import RunConfig, fingerprint_changes
from ..model import Transformer, build_model
from .checkpoint import INFO_FILE, STATE_FILE, load_latest, load_state, read_info, step_of
from .errors import CheckpointError

CONFIG_FILE = "config.yaml"
FINGERPRINT_FILE = "fingerprint.json"
MLFLOW_ID_FILE = "mlflow_run_id"
SHARDS_DIR = "shards"  # as rayfp4.train.loop.SHARDS_DIR writes it
PRECISIONS = ("bf16", "trained")


class RunPathError(ValueError):
    """A path that is not a run, variant or checkpoint, a variant name that does not exist, or a
    variant without checkpoints: the user's input, named in the message."""

    retry_cannot_help = True


class DeviceError(ValueError):
    """A ``--device`` that does not exist here."""

    retry_cannot_help = True


def pick_device(name: str | None) -> torch.device:
    """``name`` as a torch device (DeviceError when this machine has none such); None: CUDA when
    available, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: no CUDA GPU is available here")
    return device


def run_command(action: Callable[[], str], *errors: type[Exception]) -> int:
    """The body of eval, generate and export: print what ``action`` returns and exit 0. A user's
    mistake (the path, the checkpoint, the run's config, data, policy or device, or one of
    ``errors``) is one line on stderr and exit 2; Ctrl-C is exit 130."""
    import sys

    from ..config import ConfigError
    from ..data import DataError
    from ..precision import PolicyError

    try:
        text = action()
    except (RunPathError, DeviceError, CheckpointError, ConfigError, DataError, PolicyError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(text, flush=True)
    return 0


@dataclass
class Variant:
    """One trained variant's folder and the settings it ran with."""

    name: str  # its folder name: the variant's label, or "train" for a run without variants
    path: Path
    config: RunConfig
    fingerprint: dict[str, str]

    @property
    def mlflow_run_id(self) -> str | None:
        f = self.path / MLFLOW_ID_FILE
        return (f.read_text().strip() or None) if f.is_file() else None

    @property
    def checkpoint_dir(self) -> Path:
        """Where Ray Train put the variant's checkpoints: its folder, or ``<storage>/<run>/<variant>``
        when the run set ``checkpoint.storage`` to a directory. RunPathError for a remote URI."""
        storage = getattr(self.config.checkpoint, "storage", None)
        if storage is None:
            return self.path
        if "://" in storage and not storage.startswith("file://"):
            raise RunPathError(f"{self.path}: its checkpoints are in {storage}, which is not a local directory; "
                               f"copy a checkpoint_* folder into {self.path} and give its path")
        return Path(storage.removeprefix("file://")).expanduser() / self.path.parent.name / self.path.name

    def checkpoints(self) -> list[Path]:
        where = self.checkpoint_dir
        return sorted((p for p in where.glob("checkpoint_*") if p.is_dir() and step_of(p) >= 0), key=step_of)

    def require_checkpoints(self) -> list[Path]:
        """:meth:`checkpoints`, or RunPathError when there is none."""
        found = self.checkpoints()
        if not found:
            raise RunPathError(f"{self.path}: no checkpoint_* folder in {self.checkpoint_dir} "
                               f"(the run has not written a checkpoint yet)")
        return found


def _is_variant(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / FINGERPRINT_FILE).is_file()


def _is_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).exists() or (path / INFO_FILE).exists()


def _read_variant(path: Path) -> Variant:
    import yaml

    try:
        data = yaml.safe_load((path / CONFIG_FILE).read_text())
        fingerprint = json.loads((path / FINGERPRINT_FILE).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        raise RunPathError(f"{path}: unreadable {CONFIG_FILE} or {FINGERPRINT_FILE} ({type(e).__name__}: {e})") from None
    try:
        cfg = RunConfig.model_validate(data)
    except Exception as e:  # a config this version of rayfp4 does not accept
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RunPathError(f"{path / CONFIG_FILE}: not a valid run config ({first})") from None
    return Variant(path.name, path, cfg, fingerprint)


def locate(path: str | Path, names: list[str] | tuple[str, ...] = ()) -> tuple[list[Variant], Path | None]:
    """The variants ``path`` designates (narrowed to ``names`` when given, in that order; else in
    name order) and, when ``path`` is a checkpoint folder, that checkpoint. RunPathError naming
    the problem otherwise, a variant without any checkpoint included."""
    path = Path(path).expanduser()
    if not path.exists():
        raise RunPathError(f"{path}: does not exist")
    if not path.is_dir():
        raise RunPathError(f"{path}: not a directory (expected a run, variant or checkpoint folder under output_dir)")
    path = path.resolve()
    checkpoint = None
    if _is_checkpoint(path):
        if not _is_variant(path.parent):
            raise RunPathError(f"{path}: a checkpoint outside a variant folder (no {CONFIG_FILE} and "
                               f"{FINGERPRINT_FILE} beside it); its model cannot be built")
        checkpoint, found = path, [_read_variant(path.parent)]
    elif _is_variant(path):
        found = [_read_variant(path)]
    else:
        found = [_read_variant(p) for p in sorted(path.iterdir()) if p.is_dir() and _is_variant(p)]
        if not found:
            raise RunPathError(f"{path}: not a rayfp4 run, variant or checkpoint folder (a variant folder holds "
                               f"{CONFIG_FILE} and {FINGERPRINT_FILE}; a run folder holds variant folders)")
    if names:
        by_name = {v.name: v for v in found}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise RunPathError(f"{path}: no variant {', '.join(map(repr, missing))} "
                               f"(there: {', '.join(by_name)})")
        found = [by_name[n] for n in dict.fromkeys(names)]
    if checkpoint is None:  # before a command prepares data or a tokenizer for a model it cannot load
        for v in found:
            v.require_checkpoints()
    return found, checkpoint


def locate_one(path: str | Path, name: str | None = None) -> tuple[Variant, Path | None]:
    """Like :func:`locate` for commands that need exactly one variant."""
    found, checkpoint = locate(path, [name] if name else [])
    if len(found) > 1:
        raise RunPathError(f"{path}: the run has {len(found)} variants ({', '.join(v.name for v in found)}); "
                           f"choose one with --variant")
    return found[0], checkpoint


@dataclass
class TrainedModel:
    variant: Variant
    model: Transformer  # the plain transformer (no policy), FP32 weights, eval mode
    checkpoint: Path
    step: int
    #: The first BF16 step of an automatic late switch that had fired by the checkpoint, else None.
    late_switch_step: int | None = None


def load_model(variant: Variant, checkpoint: Path | None = None, device: str | torch.device = "cpu",
               warn: Callable[[str], None] | None = None) -> TrainedModel:
    """The variant's model with the weights of ``checkpoint`` (verified; CheckpointError when it
    does not load) or, when None, of its newest checkpoint that loads."""
    if checkpoint is None:
        found = variant.require_checkpoints()
        state, checkpoint = load_latest(found[-1], warn)
    else:
        state = load_state(checkpoint)
    cfg = variant.config
    written_for = read_info(checkpoint).get("fingerprint") or {}
    changes = fingerprint_changes({k: v for k, v in written_for.items() if k.startswith("model.")},
                                  {k: v for k, v in cfg.fingerprint().items() if k.startswith("model.")})
    if written_for and changes:
        raise CheckpointError(f"{checkpoint}: written for another model than {variant.path / CONFIG_FILE} "
                              f"describes ({'; '.join(changes)})")
    model = build_model(cfg.model)
    try:
        if "model" in state:
            model.load_state_dict(state["model"])
        else:
            _load_sharded(model, checkpoint / SHARDS_DIR)
    except CheckpointError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{checkpoint}: its weights do not load into the model of "
                              f"{variant.path / CONFIG_FILE} ({type(e).__name__}: {first})") from None
    switch = (state.get("late_switch_auto") or {}).get("switch_step")
    return TrainedModel(variant, model.to(device).eval(), checkpoint, int(state["step"]), switch)


def _load_sharded(model: Transformer, shards: Path) -> None:
    """Weights from a ``torch.distributed.checkpoint`` folder, read whole by this one process."""
    import torch.distributed.checkpoint as dcp

    if not (shards / ".metadata").is_file():
        raise CheckpointError(f"{shards}: the checkpoint has no model weights (neither in {STATE_FILE} nor sharded)")
    sd = {"model": model.state_dict()}  # the tensors DCP fills in place; every rank's shards are read
    with warnings.catch_warnings():  # "no process group, assuming a single process": just so
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=str(shards), no_dist=True)
    model.load_state_dict(sd["model"])


def in_precision(trained: TrainedModel, precision: str, backend: str | None = None):
    """``(model, autocast)`` for running ``trained`` in ``precision`` (see the module docstring);
    ``autocast()`` is the context to run each forward in. ``trained`` converts a copy: the plain
    model stays as it is. ``backend`` overrides the policy's GEMM backend (all are bit-identical)."""
    from ..precision import apply_precision_policy

    device = next(trained.model.parameters()).device
    if precision == "bf16":
        return trained.model, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    assert precision == "trained", precision
    cfg = trained.variant.config
    policy = cfg.precision.model_copy(update={"telemetry_every": 0, **({"backend": backend} if backend else {})})
    model = copy.deepcopy(trained.model)
    summary = apply_precision_policy(model, policy, seed=cfg.train.seed, total_steps=cfg.train.steps)
    # Where the late switch stands: the validation after step S ran with the runtime at step S - 1.
    summary.runtime.set_step(max(trained.step - 1, 0))
    summary.runtime.auto_switch_step = trained.late_switch_step  # an automatic switch: where it fired
    if cfg.train.dtype == "bf16":
        return model, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return model, contextlib.nullcontext


def precision_label(variant: Variant, precision: str) -> str:
    """What a table shows for ``precision`` of ``variant``: ``bf16``, or ``trained (nvfp4)`` (the
    linears' format; the activation dtype when they were not quantized, e.g. ``trained (fp32)``)."""
    if precision == "bf16":
        return "bf16"
    cfg = variant.config
    return f"trained ({cfg.precision.format if cfg.precision.quantized else cfg.train.dtype})"


def run_shards(variant: Variant):
    """The token shards ``variant`` trained on (the embedded corpus is tokenized again if its cache
    is gone), checked against the run's record of them. DataError / RunPathError otherwise."""
    from ..data import open_shards

    cfg = variant.config
    if cfg.data.shards is None:
        from ..data.corpus import shakespeare_shards

        path = shakespeare_shards(cfg.data.corpus_tokenizer, cfg.data.corpus_seq_len)
    else:
        path = Path(cfg.data.shards).expanduser()
    shards = open_shards(path)
    recorded = variant.fingerprint.get("data.identity")
    if recorded is not None and recorded != shards.manifest.identity():
        raise RunPathError(f"{variant.path}: the shards at {path} are not the ones the run trained on (their "
                           f"contents differ from its {FINGERPRINT_FILE}); its token ids would decode to other text")
    return shards


__all__ = ["DeviceError", "PRECISIONS", "RunPathError", "TrainedModel", "Variant", "in_precision", "load_model",
           "locate", "locate_one", "pick_device", "precision_label", "run_shards"]
