"""bench.scaling on the CPU (gloo): the measurement code a multi-GPU machine runs, on two processes."""

from __future__ import annotations

import json

import pytest

from bench import scaling


# Four gloo process groups and a fifth run (~50 s): the full suite's, run when bench/scaling.py or
# the FSDP2 gather changes (a multi-GPU session runs `bash bench/run_multigpu.sh check` first too).
@pytest.mark.extended
def test_scaling_reports_each_world_size_and_the_4bit_gather_moves_fewer_bytes(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["--device", "cpu", "--sizes", "tiny", "--formats", "nvfp4", "--strategies", "fsdp2,ddp",
            "--gpus", "1,2", "--steps", "2", "--warmup", "1", "--micro-batch", "2"]
    assert scaling.main(args + ["--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [(r["strategy"], r["gpus"]) for r in results] == [("fsdp2", 1), ("fsdp2", 2), ("ddp", 1), ("ddp", 2)]
    by = {(r["strategy"], r["gpus"]): r for r in results}
    assert by[("fsdp2", 1)]["efficiency"] == 1.0 and 0 < by[("fsdp2", 2)]["efficiency"]
    assert by[("ddp", 2)]["gather_bytes_per_step"] == 0  # DDP all-reduces gradients, gathers nothing
    fp4 = by[("fsdp2", 2)]
    assert fp4["gather_bytes_per_step"] > 0 and fp4["weight_gather"] == "nvfp4 for all 8 quantized layers"
    assert "| tiny (" in capsys.readouterr().out

    # The same with FP32 gathers: the 4-bit gather moves fewer bytes for the same model.
    fp32_out = tmp_path / "fp32.json"
    assert scaling.main(args[:6] + ["--strategies", "fsdp2", "--gpus", "2"] + args[10:] +
                        ["--set", "precision.fp4_weight_gather=false", "--json", str(fp32_out)]) == 0
    fp32 = json.loads(fp32_out.read_text())[0]
    assert fp32["weight_gather"].startswith("fp32") and fp32["efficiency"] is None  # no 1-process run
    assert fp4["gather_bytes_per_step"] < fp32["gather_bytes_per_step"]


def test_bad_arguments_exit_2_before_any_process_starts(capsys):
    assert scaling.main(["--device", "cpu", "--sizes", "tiny", "--set", "optim.lr=-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert scaling.main(["--device", "cpu", "--sizes", "tiny", "--steps", "0"]) == 2
