"""``python -m rayfp4.run CONFIG [--set key.path=value ...]``: train as the config says.

Runs locally (starting Ray on this machine) or inside ``ray job submit`` (joining that cluster).
Exit codes: 0 when every variant finished, 1 when training failed, 2 for a bad config, policy,
data path, shard or output directory (one readable line on stderr, no traceback, before Ray
starts), 130 on SIGINT (Ctrl-C) and 143 on SIGTERM (the MLflow runs end KILLED).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayfp4.run", description="Pretrain an LLM with NVFP4 on Ray.")
    p.add_argument("config", nargs="?", help="YAML run config (e.g. configs/tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (YAML syntax), repeatable")
    p.add_argument("--schema", action="store_true", help="print the config's JSON schema and exit")
    p.add_argument("--check", action="store_true", help="validate the config (and data) and exit")
    p.add_argument("--verbose", action="store_true", help="show Ray's and the workers' own logs")
    return p


def _raise_interrupted(signum, frame):
    from .train.trainer import Interrupted

    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    args = _parser().parse_args(argv)
    if args.verbose:
        os.environ["RAYFP4_VERBOSE"] = "1"
    from .config import ConfigError, RunConfig, load_config

    if args.schema:
        print(json.dumps(RunConfig.model_json_schema(), indent=2))
        return 0
    if args.config is None:
        print("error: a config file is required (e.g. configs/tiny.yaml); --schema prints its schema",
              file=sys.stderr)
        return 2

    from .data.errors import DataError
    from .precision import PolicyError
    from .train.trainer import Interrupted

    # SIGINT and SIGTERM end the run as KILLED with one line, whatever the driver is doing (while
    # Ray Train runs, its trainer aborts the workers first; see rayfp4.train.trainer).
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        cfg = load_config(args.config, args.overrides)
        from .train.launch import preflight

        if args.check:
            preflight(cfg)
            print(f"config OK: {cfg.name}, {len(cfg.variant_configs())} run(s)")
            return 0
        from .train.launch import run_experiment, say

        out_dir, data = preflight(cfg, create=True)
        result = run_experiment(cfg, out_dir, data)
    except (ConfigError, PolicyError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"\ninterrupted ({signal.Signals(signum).name}): runs marked KILLED", file=sys.stderr, flush=True)
        return e.exit_code if isinstance(e, Interrupted) else 128 + signum
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    say(f"{result.name}: done")
    print(result.table, flush=True)
    return 0 if all(r.status == "FINISHED" for r in result.results) else 1


if __name__ == "__main__":
    sys.exit(main())
