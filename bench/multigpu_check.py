"""Compare runs of one config trained on different numbers of GPUs: the sample ledger step for step,
the training loss curve, the final validation loss.

    python -m bench.multigpu_check REFERENCE OTHER [OTHER ...] [--json OUT.json]

REFERENCE and each OTHER are variant folders (``runs/<name>/<variant>``), e.g. the 1-GPU run and
the N-GPU runs (DDP, FSDP2, one killed and resumed) of the same config and global batch. For each
OTHER it prints whether its ledger equals REFERENCE's (else the first step where they differ),
the largest relative difference of ``train_loss`` over the steps both logged (BF16: reduction
order only; NVFP4: stochastic rounding draws per rank, so expect more), and both final validation
losses. Exit code 0 when every ledger matches REFERENCE's, 1 when one does not, 2 for a folder
without metrics or ledger.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _losses(folder: Path) -> dict[int, dict]:
    from rayfp4.tracking.compare import read_metrics

    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no metrics.jsonl (a variant folder is runs/<name>/<variant>)")
    return read_metrics(path)


def compare(reference: Path, other: Path) -> dict:
    """What the module doc lists, for one pair of variant folders."""
    from rayfp4.data import read_ledger

    ref_ledger, ledger = read_ledger(reference / "ledger").steps, read_ledger(other / "ledger").steps
    differs = sorted(g for g in set(ref_ledger) | set(ledger) if ref_ledger.get(g) != ledger.get(g))
    ref, run = _losses(reference), _losses(other)
    both = sorted(s for s in set(ref) & set(run) if "train_loss" in ref[s] and "train_loss" in run[s])
    rel = [abs(run[s]["train_loss"] - ref[s]["train_loss"]) / abs(ref[s]["train_loss"]) for s in both]

    def final_val(recs):
        vals = [(s, r["val_loss"]) for s, r in sorted(recs.items()) if r.get("val_loss") is not None]
        return vals[-1] if vals else (None, None)

    return {"reference": str(reference), "run": str(other), "ledger_steps": len(ledger),
            "ledger_equal": not differs and bool(ledger), "first_ledger_difference": differs[0] if differs else None,
            "loss_steps_compared": len(both), "max_rel_loss_diff": max(rel) if rel else None,
            "max_rel_loss_diff_step": both[rel.index(max(rel))] if rel else None,
            "final_val": final_val(run), "reference_final_val": final_val(ref)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.multigpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("reference")
    p.add_argument("others", nargs="+")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from rayfp4.data import DataError

    results = []
    try:
        for other in a.others:
            results.append(compare(Path(a.reference), Path(other)))
    except (FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"reference: {a.reference}")
    print("| run | ledger | steps compared | max rel. train-loss diff (step) | final val (step) | reference final val |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ledger = "equal" if r["ledger_equal"] else f"differs from step {r['first_ledger_difference']}"
        diff = "-" if r["max_rel_loss_diff"] is None else f"{r['max_rel_loss_diff']:.2e} ({r['max_rel_loss_diff_step']})"
        val = "-" if r["final_val"][1] is None else f"{r['final_val'][1]:.4f} ({r['final_val'][0]})"
        ref = "-" if r["reference_final_val"][1] is None else f"{r['reference_final_val'][1]:.4f}"
        print(f"| {r['run']} | {ledger} | {r['loss_steps_compared']} | {diff} | {val} | {ref} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["ledger_equal"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
