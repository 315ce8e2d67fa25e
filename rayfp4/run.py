"""``python -m rayfp4.run CONFIG [--set key.path=value ...]``: train as the config says.

Runs locally (starting Ray on this machine) or inside ``ray job submit`` (joining that cluster).
Exit codes: 0 when every variant finished, 1 when training failed, 2 for a bad config, policy,
data path or shard (one readable line on stderr, no traceback), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayfp4.run", description="Pretrain an LLM with NVFP4 on Ray.")
    p.add_argument("config", nargs="?", help="YAML run config (e.g. configs/tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (YAML syntax), repeatable")
    p.add_argument("--schema", action="store_true", help="print the config's JSON schema and exit")
    p.add_argument("--check", action="store_true", help="validate the config (and data) and exit")
    p.add_argument("--verbose", action="store_true", help="show Ray's and the workers' own logs")
    return p


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

    try:
        cfg = load_config(args.config, args.overrides)
        if args.check:
            from .train.launch import prepare_shards

            prepare_shards(cfg)
            print(f"config OK: {cfg.name}, {len(cfg.variant_configs())} run(s)")
            return 0
        from .train.launch import run_experiment, say

        result = run_experiment(cfg)
    except (ConfigError, PolicyError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    say(f"{result.name}: done")
    print(result.table, flush=True)
    return 0 if all(r.status == "FINISHED" for r in result.results) else 1


if __name__ == "__main__":
    sys.exit(main())
