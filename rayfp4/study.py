"""``python -m rayfp4.study STUDY.yaml``: a variant x seed matrix of runs, several at a time, and the
table of their mean and spread over seeds.

A study file names a run config (``base``), the variants to compare, the seeds, and settings for
every run; each (variant, seed) pair is an ordinary ``python -m rayfp4.run`` of ``base`` with that
one variant and ``train.seed``, named ``<study>-<variant>-s<seed>``::

    name: recipe-25m
    base: ../gpu-25m.yaml           # relative to this file
    seeds: [0, 1, 2]
    concurrent: 4                   # runs training at once (they share one Ray cluster)
    baseline: bf16                  # default: the first variant
    set: {scaling.gpus_per_worker: 0.25}   # for every run: four runs share one GPU
    variants:
      - {name: bf16, set: {precision.format: bf16}}
      - {name: nvfp4}
      - {name: nvfp4-msedens, seeds: [0], set: {precision.backward_rounding: ms_eden}}

A variant's ``seeds`` (a subset; default: all of the study's) keeps a candidate dropped after its
first seeds in the tables without training it again. Only ``train.seed`` (the model's initialisation and the stochastic-rounding streams) changes with
the seed; every run reads the same data in the same order, so the spread over seeds is the
method's own. The runs share one Ray cluster (this process starts it, or joins ``RAY_ADDRESS``),
so fractional ``scaling.gpus_per_worker`` / ``cpus_per_worker`` pack several onto one device and
Ray holds back a run until its resources are free. In MLflow the study is one parent run with every
(variant, seed) run nested under it; the tables (per variant: mean ± std over seeds; per run: each
seed's loss and gap) are its description, and ``study.md``, ``study.results.json`` and the plots
(``val_loss.png``, ``gap.png``, ``train_loss.png``, see rayfp4.tracking.study_plots) its artifacts,
all also written to ``<output_dir>/<study>/``.

``--report`` rebuilds the tables and plots from the runs on disk without starting Ray or training,
e.g. for a study that ran on another machine (``--out DIR``: where its run directories are);
missing or unfinished runs are listed as such.

Running the same study again skips the runs that finished and resumes the others from their
checkpoints (each run resumes as ``rayfp4.run`` does). Ctrl-C (or SIGTERM) stops every run; their
MLflow runs end KILLED. Exit codes: 0 when every run finished, 1 when one failed (``--report``:
did not finish), 2 for a bad study or run config (before anything starts; ``--report``: no run of
the study on disk), 130/143 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from .config import ConfigError, Variant, _Strict, check_run_name, load_config
from .yamlfile import format_validation_error, read_yaml_mapping

#: Set for each run of a study: the MLflow run its own run is nested under (rayfp4.train.launch).
PARENT_RUN_ENV = "RAYFP4_MLFLOW_PARENT_RUN_ID"
STATE_FILE = "study.json"


class StudyVariant(Variant):
    seeds: list[int] | None = Field(
        None, description="the study's seeds this variant trains (default: all of them); e.g. a candidate "
                          "dropped after one seed keeps that run in the tables without training more")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if v is not None and (not v or any(s < 0 for s in v) or len(set(v)) != len(v)):
            raise ValueError(f"must be a non-empty list of distinct non-negative integers, got {v}")
        return v


class StudyConfig(_Strict):
    name: str = Field(max_length=80, description="the study's name: the prefix of its runs' names")
    base: str = Field(description="the run config every run starts from (relative to the study file)")
    seeds: list[int] = Field(min_length=1, description="train.seed of each repetition")
    variants: list[StudyVariant] = Field(min_length=1)
    baseline: str | None = Field(None, description="the variant the others are compared with (default: the first)")
    set: dict[str, Any] = Field(default_factory=dict, description="key.path: value overrides for every run")
    concurrent: int = Field(1, ge=1, le=64, description="runs training at the same time")

    @field_validator("name")
    @classmethod
    def _name_is_one_folder(cls, v):
        return check_run_name(v)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if any(s < 0 for s in v) or len(set(v)) != len(v):
            raise ValueError(f"must be distinct non-negative integers, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants: names must be unique, got {names}")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline: {self.baseline!r} is not one of the variants {names}")
        base = next(v for v in self.variants if v.name == (self.baseline or names[0]))
        if base.seeds is not None:
            raise ValueError(f"variants: the baseline {base.name!r} trains every seed (its seeds are the study's)")
        for key in self.set:
            if key == "variants" or key == "name" or key == "train.seed" or key.startswith("variants."):
                raise ValueError(f"set: {key} is the study's to choose (each run gets its own)")
        return self

    @property
    def baseline_name(self) -> str:
        return self.baseline or self.variants[0].name


@dataclass
class StudyRun:
    """One (variant, seed) run: its name and the ``--set`` overrides it adds to the base config."""

    variant: str
    seed: int
    name: str
    overrides: list[str]
    status: str = "PENDING"  # PENDING, RUNNING, FINISHED, FAILED, KILLED
    exit_code: int | None = None
    seconds: float | None = None
    log: str | None = None
    run_dir: str | None = None
    detail: str | None = None  # why a run counts as not finished in a report, e.g. "step 60 of 120"


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: rayfp4.config.parse_override reads it back


def load_study(path: str | Path, overrides: list[str] = ()) -> tuple[StudyConfig, Path]:
    """The validated study and the path of its base config; ConfigError naming the field otherwise."""
    from .config import _set_path, parse_override

    data = read_yaml_mapping(path, "study", ConfigError, allow_empty=False)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(data, key, value, "--set")
    try:
        study = StudyConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: " + format_validation_error(e)) from None
    base = (Path(path).parent / study.base).resolve()
    if not base.is_file():
        raise ConfigError(f"{path}: base: no such run config {base}")
    return study, base


def expand(study: StudyConfig) -> list[StudyRun]:
    """Every (variant, seed) run, variants in the file's order within each seed (so the first
    results to arrive form complete rows)."""
    runs = []
    for seed in study.seeds:
        for v in study.variants:
            if v.seeds is not None and seed not in v.seeds:
                continue
            name = f"{study.name}-{v.name}-s{seed}"
            overrides = [_override(k, val) for k, val in study.set.items()]
            overrides += [_override("name", name), _override("train.seed", seed),
                          _override("variants", [{"name": v.name, "set": v.set}]), _override("baseline", None)]
            runs.append(StudyRun(v.name, seed, name, overrides))
    return runs


# --------------------------------------------------------------------------------- the table


@dataclass
class VariantSummary:
    name: str
    seeds: list[int] = field(default_factory=list)          # the seeds that finished
    final_val: list[float] = field(default_factory=list)
    gaps_pct: list[float] = field(default_factory=list)     # vs the baseline of the same seed
    tokens_per_s: list[float] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)        # "s1: FAILED" ...


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def run_throughput(metrics: dict[int, dict]) -> float | None:
    """Tokens/s of a run: the median over its second half of logged steps (the first steps carry
    compilation, caches and data start-up)."""
    vals = [r["tokens_per_s"] for s, r in metrics.items() if r.get("tokens_per_s")]
    vals = vals[len(vals) // 2:]
    return statistics.median(vals) if vals else None


def summarize(study: StudyConfig, runs: list[StudyRun], results: dict[str, tuple[float | None, float | None]]
              ) -> list[VariantSummary]:
    """Per variant: final validation loss and gap to the same seed's baseline, over the seeds where
    both finished. ``results``: run name -> (final val loss, tokens/s) of the runs that finished."""
    base = study.baseline_name
    by = {(r.variant, r.seed): r for r in runs}
    out = []
    for v in study.variants:
        s = VariantSummary(v.name)
        for seed in study.seeds:
            if (v.name, seed) not in by:  # a seed this variant does not train
                continue
            r = by[(v.name, seed)]
            got = results.get(r.name) if r.status == "FINISHED" else None
            if got is None or got[0] is None or not math.isfinite(got[0]):
                why = r.status if r.status != "FINISHED" else "no validation loss"
                s.missing.append(f"s{seed}: {why}" + (f" ({r.detail})" if r.detail else ""))
                continue
            s.seeds.append(seed)
            s.final_val.append(got[0])
            if got[1] is not None:
                s.tokens_per_s.append(got[1])
            b = by[(base, seed)]
            bgot = results.get(b.name) if b.status == "FINISHED" else None
            if bgot is not None and bgot[0]:
                s.gaps_pct.append(100.0 * (got[0] - bgot[0]) / bgot[0])
        out.append(s)
    return out


def _tokens_per_s_head(study: StudyConfig, *what: str) -> str:
    """Runs trained side by side share the machine: their speed is not a method's own, and the
    column says so."""
    notes = [*what] + ([f"{study.concurrent} runs at once"] if study.concurrent > 1 else [])
    return "tokens/s" + (f" ({', '.join(notes)})" if notes else "")


def study_table(study: StudyConfig, summaries: list[VariantSummary]) -> tuple[str, list[dict]]:
    """The table as Markdown (pipe table: readable in a terminal and rendered by MLflow) and as rows."""
    base = study.baseline_name
    head = ["variant", "seeds", "final val loss (mean ± std)", f"gap vs {base} % (mean ± std)",
            _tokens_per_s_head(study, "mean"), "missing"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    for s in summaries:
        lm, ls = _mean_std(s.final_val)
        gm, gs = _mean_std(s.gaps_pct)
        tm, _ = _mean_std(s.tokens_per_s)
        rows.append({"variant": s.name, "seeds": s.seeds, "final_val_loss_mean": lm, "final_val_loss_std": ls,
                     "gap_pct_mean": None if s.name == base else gm, "gap_pct_std": None if s.name == base else gs,
                     "tokens_per_s_mean": tm, "missing": s.missing})

        def pm(m, sd, fmt):
            if m is None:
                return "-"
            return format(m, fmt) + (f" ± {format(sd, fmt.lstrip('+'))}" if sd is not None else "")

        gap = "(baseline)" if s.name == base else pm(gm, gs, "+.2f")
        lines.append("| " + " | ".join([s.name, str(len(s.seeds)), pm(lm, ls, ".4f"), gap,
                                         f"{tm:,.0f}" if tm is not None else "-", ", ".join(s.missing) or "-"]) + " |")
    return "\n".join(lines), rows


def seed_table(study: StudyConfig, runs: list[StudyRun], results: dict[str, tuple[float | None, float | None]]
               ) -> tuple[str, list[dict]]:
    """Every run on its own row (variants in the file's order, then seeds): its status, final
    validation loss, gap to the baseline of the same seed and tokens/s, so the spread behind each
    mean of ``study_table`` is visible. As Markdown and as rows."""
    base = study.baseline_name
    by = {(r.variant, r.seed): r for r in runs}

    def final(r: StudyRun) -> float | None:
        got = results.get(r.name) if r.status == "FINISHED" else None
        return got[0] if got is not None and got[0] is not None and math.isfinite(got[0]) else None

    head = ["variant", "seed", "status", "final val loss", f"gap vs {base} % (same seed)",
            _tokens_per_s_head(study)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    for v in study.variants:
        for seed in study.seeds:
            if (v.name, seed) not in by:
                continue
            r = by[(v.name, seed)]
            loss, b = final(r), final(by[(base, seed)])
            tps = results.get(r.name, (None, None))[1] if r.status == "FINISHED" else None
            gap = 100.0 * (loss - b) / b if loss is not None and b else None
            status = r.status + (f" ({r.detail})" if r.detail else "")
            rows.append({"variant": v.name, "seed": seed, "run": r.name, "status": status, "final_val_loss": loss,
                         "gap_pct": None if v.name == base else gap, "tokens_per_s": tps})
            gap_text = "(baseline)" if v.name == base else f"{gap:+.2f}" if gap is not None else "-"
            lines.append("| " + " | ".join([v.name, str(seed), status, f"{loss:.4f}" if loss is not None else "-",
                                             gap_text, f"{tps:,.0f}" if tps is not None else "-"]) + " |")
    return "\n".join(lines), rows


# --------------------------------------------------------------------------------- the runner


def say(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


def _fmt_s(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    raise Interrupted(signum)


def command_for(base: Path, run: StudyRun) -> list[str]:
    """The command that trains one run: ``python -m rayfp4.run BASE --set ...``."""
    cmd = [sys.executable, "-m", "rayfp4.run", str(base)]
    for o in run.overrides:
        cmd += ["--set", o]
    return cmd


def _read_state(path: Path) -> dict[str, dict]:
    try:
        return {r["name"]: r for r in json.loads(path.read_text())["runs"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_state(path: Path, study: StudyConfig, runs: list[StudyRun]) -> None:
    from .fileio import write_atomic

    write_atomic(path, json.dumps({"study": study.name, "runs": [r.__dict__ for r in runs]}, indent=1))


def execute(runs: list[StudyRun], concurrent: int, command, log_dir: Path, env: dict[str, str],
            on_change=None, poll_s: float = 0.5, status_every_s: float = 60.0,
            start_until: float | None = None) -> None:
    """Run every PENDING run's command, at most ``concurrent`` at a time, each in its own process
    group with its output in ``log_dir/<name>.log``. A run's status follows its exit code (0
    FINISHED, 130/143 or a signal KILLED, else FAILED). On Interrupted / KeyboardInterrupt the
    running ones get SIGINT (they end their MLflow runs KILLED) and are waited for; then it re-raises.
    ``start_until`` (a ``time.monotonic()`` instant): no run starts after it; the running ones go
    on to their end and the others stay PENDING.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = [r for r in runs if r.status == "PENDING"]
    active: dict[str, tuple[StudyRun, subprocess.Popen, float, Any]] = {}
    total, done = len(pending), 0
    last_status = time.monotonic()
    closed = False  # start_until has passed
    try:
        while (pending and not closed) or active:
            if pending and not closed and start_until is not None and time.monotonic() >= start_until:
                closed = True
                say(f"--start-until reached: {len(pending)} run(s) not started ({', '.join(r.name for r in pending)}); "
                    + (f"waiting for {', '.join(active)}" if active else "none running"))
            while pending and not closed and len(active) < concurrent:
                r = pending.pop(0)
                log = log_dir / f"{r.name}.log"
                fh = open(log, "ab")  # noqa: SIM115 - the child writes to it; closed when it exits
                p = subprocess.Popen(command(r), stdout=fh, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
                r.status, r.log = "RUNNING", str(log)
                active[r.name] = (r, p, time.monotonic(), fh)
                say(f"started {r.name} ({total - len(pending)}/{total}), log: {log}")
                if on_change:
                    on_change()
            time.sleep(poll_s)
            for name, (r, p, t0, fh) in list(active.items()):
                rc = p.poll()
                if rc is None:
                    continue
                fh.close()
                del active[name]
                done += 1
                r.exit_code, r.seconds = rc, round(time.monotonic() - t0, 1)
                r.status = "FINISHED" if rc == 0 else "KILLED" if rc in (130, 143) or rc < 0 else "FAILED"
                tail = "" if rc == 0 else f" (exit {rc}); its log: {r.log}"
                say(f"{r.name} {r.status.lower()} after {_fmt_s(r.seconds)}{tail} [{done}/{total} done]")
                if on_change:
                    on_change()
            if active and time.monotonic() - last_status >= status_every_s:
                last_status = time.monotonic()
                say(f"running: {', '.join(active)}; {done}/{total} done, {len(pending)} waiting")
    except BaseException:
        for r, p, _, _ in active.values():
            try:
                os.killpg(p.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 120
        for r, p, t0, fh in active.values():
            try:
                rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                rc = p.wait()
            fh.close()
            r.exit_code, r.seconds = rc, round(time.monotonic() - t0, 1)
            r.status = "FINISHED" if rc == 0 else "KILLED"
        if on_change:
            on_change()
        raise


def _run_root(cfg) -> Path:
    return Path(cfg.output_dir).expanduser().resolve() / cfg.name


def _read_runs(runs: list[StudyRun], configs: dict) -> dict[str, dict[int, dict]]:
    """run name -> its per-step records, for every run with a metrics file on disk. A run of a
    study trains one variant, so its metrics are ``<output_dir>/<run name>/<variant>/metrics.jsonl``
    (rayfp4.train.metrics.RankZeroLog writes them)."""
    from .tracking.compare import read_metrics

    out = {}
    for r in runs:
        files = sorted(_run_root(configs[r.name]).glob("*/metrics.jsonl"))
        if files:
            out[r.name] = read_metrics(files[0])
            r.run_dir = str(files[0].parent)
    return out


def _results(runs: list[StudyRun], configs: dict, metrics: dict[str, dict[int, dict]] | None = None
             ) -> dict[str, tuple[float | None, float | None]]:
    """run name -> (final val loss, tokens/s) of each finished run, from its metrics file
    (``metrics``: what _read_runs read, to read each file once)."""
    if metrics is None:
        metrics = _read_runs(runs, configs)
    out = {}
    for r in runs:
        if r.status != "FINISHED" or r.name not in metrics:
            continue
        recs = metrics[r.name]
        vals = [rec["val_loss"] for rec in recs.values() if rec.get("val_loss") is not None]
        out[r.name] = (vals[-1] if vals else None, run_throughput(recs))
    return out


def status_on_disk(runs: list[StudyRun], configs: dict, metrics: dict[str, dict[int, dict]],
                   state: dict[str, dict]) -> None:
    """For a report of runs that this process did not train (``--report``): each run's status from
    what is on disk. A run whose metrics reach its ``train.steps`` is FINISHED; one that the
    study's state file (``study.json``) records as FAILED or KILLED keeps that; one with a run
    directory but fewer steps is UNFINISHED, one without is MISSING; ``detail`` says how far each
    not-finished run got."""
    for r in runs:
        cfg = configs[r.name]
        recs = metrics.get(r.name, {})
        last = max(recs, default=0)
        r.detail = None
        if recs and last >= cfg.train.steps:
            r.status = "FINISHED"
            continue
        prev = state.get(r.name, {}).get("status")
        if prev in ("FAILED", "KILLED"):
            r.status = prev
        elif _run_root(cfg).is_dir():
            r.status = "UNFINISHED"
        else:
            r.status, r.detail = "MISSING", "not on disk"
            continue
        r.detail = f"step {last} of {cfg.train.steps}" if recs else "no metrics"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayfp4.study",
                                description="Train a variant x seed matrix of runs and tabulate mean and spread.")
    p.add_argument("study", help="YAML study file (see the module doc / README)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a study value (YAML syntax), e.g. --set concurrent=2 or "
                        "--set 'set={train.steps: 100}'")
    p.add_argument("--check", action="store_true", help="validate the study and every run's config, then exit")
    p.add_argument("--rerun", action="store_true", help="train again the runs that already finished")
    p.add_argument("--start-until", type=float, default=None, metavar="SECONDS",
                   help="start no run later than SECONDS after the study starts; the running ones finish, the "
                        "others wait for the next invocation (e.g. to end inside a machine's time limit without "
                        "losing half-trained runs)")
    p.add_argument("--only", metavar="RUN[,RUN...]", default=None,
                   help="train only these runs of the matrix (names as the study prints them, e.g. "
                        "recipe-25m-nvfp4-auto-s2); the others are left as they are")
    p.add_argument("--report", action="store_true",
                   help="only rebuild the tables (study.md, study.results.json) and plots from the runs on disk: "
                        "no Ray, no training (e.g. for runs copied back from another machine)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="with --report: the directory that holds the study's run directories (default: the runs' "
                        "output_dir)")
    return p


def main(argv: list[str] | None = None, command=None) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.out is not None and not args.report:
        parser.error("--out goes with --report (to train into another directory: --set 'set={output_dir: DIR}')")
    if args.report and (args.check or args.rerun or args.start_until is not None or args.only is not None):
        parser.error("--report trains nothing: it does not go with --check, --rerun, --start-until or --only")
    if args.start_until is not None and not args.start_until >= 0:
        parser.error(f"--start-until: {args.start_until} is not a number of seconds >= 0")
    from .data.errors import DataError
    from .precision import PolicyError

    previous = {}
    import threading

    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            study, base = load_study(args.study, args.overrides)
            runs = expand(study)
            only = None
            if args.only is not None:
                only = {n.strip() for n in args.only.split(",") if n.strip()}
                unknown = sorted(only - {r.name for r in runs})
                if unknown or not only:
                    raise ConfigError(f"--only: {', '.join(unknown) or '(no run named)'} not in the study's runs: "
                                      f"{', '.join(r.name for r in runs)}")
            configs = {}
            # --out moves where the runs are looked for, not what they are (their overrides).
            where = [_override("output_dir", str(Path(args.out).expanduser().resolve()))] if args.out else []
            for r in runs:  # every run's config, validated before anything starts
                try:
                    configs[r.name] = load_config(base, r.overrides + where)
                except ConfigError as e:
                    raise ConfigError(f"run {r.name}: {e}") from None
            if args.report:
                return report_from_disk(study, runs, configs)
            from .train.launch import check_model_and_policy, preflight

            for r in runs:
                for _, vcfg in configs[r.name].variant_configs():
                    check_model_and_policy(vcfg, r.name)
            first = configs[runs[0].name]
            if args.check:
                preflight(first)
                print(f"study OK: {study.name}, {len(study.variants)} variant(s) x {len(study.seeds)} seed(s) "
                      f"= {len(runs)} run(s), {study.concurrent} at a time")
                return 0
            # The data (the embedded corpus is tokenized on first use) and the output directory,
            # once, before several runs would race to prepare them.
            out_dir, _ = preflight(first, create=True)
        except (ConfigError, PolicyError, DataError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return _run_study(study, base, runs, configs, out_dir, args.rerun, command, args.start_until, only)
    except (Interrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"\n[study] interrupted ({signal.Signals(signum).name}): runs stopped, their MLflow runs KILLED; "
              "run the study again to continue", file=sys.stderr, flush=True)
        return 128 + signum
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _run_study(study: StudyConfig, base: Path, runs: list[StudyRun], configs: dict, out_dir: Path,
               rerun: bool, command, start_until: float | None = None, only: set[str] | None = None) -> int:
    """Train the runs not finished yet (``only``: of those named), then the study's tables."""
    from .tracking.tracker import Tracker, resolve_tracking_uri
    from .train.launch import RunLock, start_shared_ray, stop_shared_ray

    started = time.monotonic()
    root = out_dir / study.name
    state_path = root / STATE_FILE
    with RunLock(root):
        before = _read_state(state_path)
        for r in runs:
            prev = before.get(r.name)
            # Finished with the same settings: done. With other settings it is not the same run:
            # rayfp4.run resumes it or refuses the change (resume_changes), as for any run.
            if prev and prev.get("status") == "FINISHED" and prev.get("overrides") == r.overrides and not rerun:
                r.status, r.exit_code, r.seconds, r.log = "FINISHED", prev.get("exit_code"), prev.get("seconds"), prev.get("log")
        skipped = [r.name for r in runs if r.status == "FINISHED"]
        if skipped:
            say(f"{len(skipped)} run(s) finished earlier, not trained again (--rerun trains them): {', '.join(skipped)}")
        first = configs[runs[0].name]
        tracker = Tracker(resolve_tracking_uri(first.tracking.uri), first.tracking.experiment,
                          enabled=first.tracking.enabled)
        parent = _parent_run(tracker, study, root)
        ray_ctx = None
        status = "FAILED"  # the study's, its MLflow run's
        result = None  # this invocation's, where it differs (--only)
        try:
            extra = {}
            if command is None:
                command = lambda r: command_for(base, r)
            chosen = [r for r in runs if only is None or r.name in only]
            if any(r.status == "PENDING" for r in chosen) and not os.environ.get("RAY_ADDRESS"):
                # one cluster for all runs: fractional resources pack them onto the devices
                extra["RAY_ADDRESS"], owned = start_shared_ray()
                ray_ctx = owned or None
            # Read after Ray started: ray.init sets what joining its cluster needs (RAY_AUTH_MODE).
            env = {**os.environ, **extra, **({PARENT_RUN_ENV: parent} if parent else {})}
            todo = sum(r.status == "PENDING" for r in chosen)
            say(f"{study.name}: {len(study.variants)} variant(s) x {len(study.seeds)} seed(s); {todo} run(s) to train"
                + ("" if only is None else f" (--only: {len(chosen)} of {len(runs)})")
                + f", {study.concurrent} at a time" + (f"; Ray at {env.get('RAY_ADDRESS')}" if env.get("RAY_ADDRESS") else ""))
            execute(chosen, study.concurrent, command, root / "logs", env,
                    on_change=lambda: _write_state(state_path, study, runs),
                    start_until=None if start_until is None else started + start_until)
            trained = [r for r in chosen if r.status != "PENDING"]
            if any(r.status != "FINISHED" for r in trained):
                status = "FAILED"
            elif len(trained) < len(chosen):  # stopped starting runs (--start-until): not done, not failed
                status = "KILLED"
                say(f"{sum(r.status == 'PENDING' for r in runs)} run(s) left to train: run the study again to go on")
            else:
                status = "FINISHED"
                others = [r.name for r in runs if r.status != "FINISHED"]
                if others:  # --only: what was asked is done, the study is not: its MLflow run ends KILLED
                    result = "FINISHED"
                    status = "KILLED"
                    say(f"the runs asked for (--only) finished; {len(others)} other run(s) of the study are not: "
                        + ", ".join(others))
        except BaseException as e:
            status = "KILLED" if isinstance(e, (Interrupted, KeyboardInterrupt)) else "FAILED"
            raise
        finally:
            _write_state(state_path, study, runs)
            try:
                _report(study, runs, configs, root, tracker, parent)
                _write_state(state_path, study, runs)  # with each run's directory
            finally:
                tracker.end_run(parent, status)
                if ray_ctx is not None:
                    stop_shared_ray()
    return 0 if (result or status) == "FINISHED" else 1


def _parent_run(tracker, study: StudyConfig, root: Path) -> str | None:
    """The study's MLflow run: the one it had (reopened) or a new one; every run nests under it."""
    from .fileio import write_atomic

    id_file = root / "mlflow_study_run_id"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        tracker.reopen_run(run_id)
        return run_id
    run_id = tracker.start_run(f"study {study.name} · {len(study.variants)} variants x {len(study.seeds)} seeds",
                               tags={"rayfp4.study": study.name, "rayfp4.run_dir": str(root)})
    if run_id:
        root.mkdir(parents=True, exist_ok=True)
        write_atomic(id_file, run_id)
        tracker.log_params(run_id, {"study.variants": ",".join(v.name for v in study.variants),
                                    "study.seeds": ",".join(map(str, study.seeds)),
                                    "study.baseline": study.baseline_name, "study.concurrent": study.concurrent,
                                    **{f"study.set.{k}": json.dumps(v) for k, v in study.set.items()}})
    return run_id


def report_from_disk(study: StudyConfig, runs: list[StudyRun], configs: dict) -> int:
    """``--report``: the tables and plots of the runs on disk, without Ray or training, for a study
    that ran elsewhere (its run directories copied back) or is still running. The state file
    (``study.json``) is read for the runs that failed but not rewritten: it is the runner's record
    of what it trained, which decides what the next ``python -m rayfp4.study`` skips. When the
    study's MLflow run is in the configured tracking store, its description and artifacts are
    updated (its status stays as it was). 0 when every run finished, 1 when some did not, 2 when
    none of the study's runs is on disk."""
    from .tracking.tracker import Tracker, resolve_tracking_uri

    first = configs[runs[0].name]
    out_dir = Path(first.output_dir).expanduser().resolve()
    root = out_dir / study.name
    metrics = _read_runs(runs, configs)
    if not any(_run_root(configs[r.name]).is_dir() for r in runs):
        print(f"error: no runs of study {study.name} on disk in {out_dir}: none of its {len(runs)} run directories "
              f"({out_dir / runs[0].name}, ...) exists; where the runs are elsewhere, give --out DIR",
              file=sys.stderr)
        return 2
    status_on_disk(runs, configs, metrics, _read_state(root / STATE_FILE))
    tracker = Tracker(resolve_tracking_uri(first.tracking.uri), first.tracking.experiment,
                      enabled=first.tracking.enabled, quiet=True)
    parent = None
    id_file = root / "mlflow_study_run_id"
    if id_file.is_file() and tracker.enabled:
        run_id = id_file.read_text().strip()
        if tracker._call("reading the study's run", lambda c: c.get_run(run_id)) is not None:
            parent = run_id
        else:
            say(f"MLflow: the study's run {run_id} is not in {tracker.uri}; the report is on disk only")
    _report(study, runs, configs, root, tracker, parent, metrics)
    done = sum(r.status == "FINISHED" for r in runs)
    say(f"{done} of {len(runs)} run(s) finished" + ("" if done == len(runs) else "; the others are listed as such"))
    return 0 if done == len(runs) else 1


def _tokens_per_step(cfgs: list) -> int | None:
    """Tokens per optimizer step, when every run has the same and the config says it (token shards
    without ``data.seq_len`` know their sequence length themselves)."""
    seen = set()
    for cfg in cfgs:
        seq = cfg.data.seq_len or (cfg.data.corpus_seq_len if cfg.data.shards is None else None)
        seen.add(cfg.data.global_batch_size * seq if seq else None)
    return seen.pop() if len(seen) == 1 else None


def _plots(study: StudyConfig, runs: list[StudyRun], configs: dict, metrics: dict[str, dict[int, dict]],
           results: dict, summaries: list[VariantSummary], root: Path) -> list[Path]:
    """val_loss.png, gap.png and train_loss.png of the finished runs (those the tables count);
    none, said once, where matplotlib is not installed (``--report`` can draw them elsewhere)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        say("plots: matplotlib is not installed here; the tables are written, the plots are not "
            "(rerun with --report where it is)")
        return []
    from .tracking.study_plots import VariantCurves, plot_study

    counted = {r.name for r in runs if r.name in results}
    curves = []
    for i, (v, s) in enumerate(zip(study.variants, summaries)):
        c = VariantCurves(v.name, f"C{i % 10}", gaps_pct=list(s.gaps_pct))
        for r in runs:
            if r.variant == v.name and r.name in counted:
                recs = metrics[r.name]
                c.val[r.seed] = [(k, x["val_loss"]) for k, x in recs.items() if x.get("val_loss") is not None]
                c.train[r.seed] = [(k, x["train_loss"]) for k, x in recs.items() if x.get("train_loss") is not None]
        curves.append(c)
    tps = _tokens_per_step([configs[n] for n in counted])
    return plot_study(curves, study.baseline_name, root, study.name, tps)


def _report(study: StudyConfig, runs: list[StudyRun], configs: dict, root: Path, tracker, parent,
            metrics: dict[str, dict[int, dict]] | None = None) -> None:
    """The tables (per variant, then per run) in study.md, study.results.json, the terminal and the
    MLflow parent's description, and the plots next to study.md (and as the parent's artifacts)."""
    from .fileio import write_atomic

    if metrics is None:
        metrics = _read_runs(runs, configs)
    results = _results(runs, configs, metrics)
    summaries = summarize(study, runs, results)
    table, rows = study_table(study, summaries)
    per_run, run_rows = seed_table(study, runs, results)
    root.mkdir(parents=True, exist_ok=True)
    try:
        plots = _plots(study, runs, configs, metrics, results, summaries, root)
    except Exception as e:  # a missing font or a full disk must not lose the tables
        plots = []
        say(f"could not write the plots: {type(e).__name__}: {e}")
    md = (f"# Study {study.name}\n\nFinal validation loss over seeds {study.seeds}; the gap is to "
          f"{study.baseline_name} of the same seed, in percent.\n\n{table}\n\n## Each run\n\n{per_run}\n")
    # The images only in the file: relative links do not resolve in MLflow's description.
    figures = "".join(f"\n![{p.stem.replace('_', ' ')}]({p.name})\n" for p in plots)
    write_atomic(root / "study.md", md + (f"\n## Plots\n{figures}" if plots else ""))
    write_atomic(root / "study.results.json", json.dumps({"study": study.name, "rows": rows, "per_run": run_rows,
                                                          "runs": [r.__dict__ for r in runs]}, indent=1))
    print(f"{table}\n\n{per_run}", flush=True)
    say(f"table: {root / 'study.md'}" + (f"; plots: {', '.join(p.name for p in plots)}" if plots else ""))
    if parent:
        tracker.set_note(parent, md)
        tracker.log_artifact(parent, root / "study.md")
        tracker.log_artifact(parent, root / "study.results.json")
        for p in plots:
            tracker.log_artifact(parent, p)


if __name__ == "__main__":
    sys.exit(main())
