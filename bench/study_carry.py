"""Bring a study's finished runs back to a fresh GPU machine, so that it trains only the rest.

    python -m bench.study_carry STUDY.tgz [STUDY.tgz ...]

``bench/run_h200.sh study`` returns ``study.tgz`` (the run directories without checkpoints, the
study's state and logs, the MLflow store). A later session's GPU machine starts bare, so the study
would train everything again. This unpacks the archives in order into ``runs/`` and ``mlruns.db``
here (the last archive's MLflow store and study state win), then removes the directories of every
run the study state does not list as finished: without their checkpoints (too large to carry) they
cannot resume and would only confuse a fresh start. Carry ``runs`` and ``mlruns.db`` with the next
call (``carry: [".whl", "runs", "mlruns.db"]``); ``python -m rayfp4.study ... --report --out runs``
reads the same files here.
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
from pathlib import Path


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    root = Path.cwd()
    for arg in argv:
        path = Path(arg)
        if not path.is_file():
            print(f"study_carry: {path}: no such archive", file=sys.stderr)
            return 2
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                if name.is_absolute() or ".." in name.parts or name.parts[0] not in ("runs", "mlruns.db"):
                    print(f"study_carry: {path}: refusing member {member.name!r}", file=sys.stderr)
                    return 2
            tar.extractall(root, filter="data")
    kept, removed = [], []
    for state_path in sorted((root / "runs").glob("*/study.json")):
        state = json.loads(state_path.read_text())
        for run in state.get("runs", []):
            run_dir = root / "runs" / run["name"]
            if run.get("status") == "FINISHED":
                kept.append(run["name"])
            elif run_dir.exists():
                shutil.rmtree(run_dir)
                removed.append(run["name"])
    print(f"study_carry: {len(kept)} finished run(s) kept, {len(removed)} unfinished removed "
          f"(they start again): {', '.join(kept) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
