#!/usr/bin/env bash
# The multi-GPU measurements (the multi-GPU issue), for a machine with several GPUs of one host,
# run through the device tool from the repo root with `.whl` carried (../shared/tools/gpu-wheels):
#   bash bench/run_multigpu.sh check      # correctness under NCCL: N GPUs against 1, DDP and FSDP2
#   bash bench/run_multigpu.sh scaling    # bench.scaling: tokens/s and efficiency on 1, 2, 4 (8) GPUs
# Logs and tables under $OUT (the device tool returns what is there).
#
# check: configs/gpu-125m-4gpu.yaml (global batch 32, embedded corpus) for CHECK_STEPS steps (100),
# BF16 and NVFP4 each, on 1 GPU and on all N GPUs with DDP and with FSDP2 (NVFP4 weights gathered
# in 4 bits), then DDP on N GPUs with a worker failure injected mid-run (resumed from its
# checkpoint), then a second seed of NVFP4 on 1 and N GPUs. bench.multigpu_check compares each
# with the 1-GPU run: the sample ledger step for step, the training-loss curve, the final
# validation loss.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
# A rehearsal of the flow on the CPU: GPUS=2 CHECK_CONFIG=configs/tiny.yaml PY=.venv/bin/python
# EXTRA="--set scaling.use_gpu=false --set scaling.cpus_per_worker=0.5" CHECK_VARIANTS="fp32 nvfp4" CHECK_STEPS=20 \
#   bash bench/run_multigpu.sh check
if command -v nvidia-smi > /dev/null && [ -d .whl ]; then bash .whl/install.sh && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}; fi
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
py=${PY:-python3}
n=${GPUS:-$(nvidia-smi -L | wc -l)}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
echo "GPUs: $n" | tee -a "$out/gpu.txt"
case "${1:-check}" in
  check)
    steps=${CHECK_STEPS:-100}
    run() {  # run NAME WORKERS [--set ...]: one rayfp4.run, its log under $out
      local name=$1 workers=$2; shift 2
      $py -m rayfp4.run ${CHECK_CONFIG:-configs/gpu-125m-4gpu.yaml} --set train.steps=$steps --set train.log_every=1 \
        --set train.val_every=$((steps / 2)) --set checkpoint.every=$((steps / 4)) \
        --set scaling.num_workers=$workers --set scaling.cpus_per_worker=2 ${EXTRA:-} \
        --set output_dir="$out/runs" --set tracking.uri="sqlite:///$out/mlruns.db" --set name=$name "$@" \
        > "$out/$name.txt" 2>&1
      echo "$name rc=$?"; grep -E "FINISHED|FAILED|Error" "$out/$name.txt" | tail -3
    }
    {
      run one-gpu 1
      run ddp-$n $n --set scaling.strategy=ddp
      run fsdp2-$n $n --set scaling.strategy=fsdp2
      run ddp-$n-killed $n --set scaling.strategy=ddp --set debug.fail_at_step=$((steps * 3 / 5))
      run one-gpu-s1 1 --set train.seed=1 --set 'variants=[{name: nvfp4}]' --set baseline=null
      run ddp-$n-s1 $n --set train.seed=1 --set 'variants=[{name: nvfp4}]' --set baseline=null
      for v in ${CHECK_VARIANTS:-bf16 nvfp4}; do
        echo "== $v: $n GPUs against 1"
        $py -m bench.multigpu_check "$out/runs/one-gpu/$v" "$out/runs/ddp-$n/$v" "$out/runs/fsdp2-$n/$v" \
          "$out/runs/ddp-$n-killed/$v" --json "$out/check-$v.json"
      done
      echo "== nvfp4, seed 1: $n GPUs against 1"
      $py -m bench.multigpu_check "$out/runs/one-gpu-s1/nvfp4" "$out/runs/ddp-$n-s1/nvfp4" --json "$out/check-nvfp4-s1.json"
      echo "== the killed run against the uninterrupted one on $n GPUs"
      for v in ${CHECK_VARIANTS:-bf16 nvfp4}; do
        $py -m bench.multigpu_check "$out/runs/ddp-$n/$v" "$out/runs/ddp-$n-killed/$v"
      done
    } 2>&1 | tee "$out/check.txt"
    tar czf "$out/check-runs.tgz" --exclude='checkpoint_*' -C "$out" runs 2>/dev/null && rm -rf "$out/runs"
    ;;
  scaling)
    gpus=1; for k in 2 4 8; do [ "$k" -le "$n" ] && gpus="$gpus,$k"; done
    $py -m bench.scaling --gpus "${SCALING_GPUS:-$gpus}" --sizes "${SCALING_SIZES:-350m,1b}" \
      --formats "${SCALING_FORMATS:-bf16,nvfp4}" --strategies "${SCALING_STRATEGIES:-ddp,fsdp2}" \
      --json "$out/scaling.json" 2>&1 | grep -v Warn | tee "$out/scaling.txt"
    # the FP32 gather for the same model, for the bytes it moves against the 4-bit gather
    $py -m bench.scaling --gpus "$n" --sizes "${SCALING_SIZES:-350m,1b}" --formats nvfp4 --strategies fsdp2 \
      --set precision.fp4_weight_gather=false --json "$out/scaling-fp32-gather.json" 2>&1 | grep -v Warn \
      | tee "$out/scaling-fp32-gather.txt"
    ;;
  *) echo "usage: bash bench/run_multigpu.sh check|scaling" >&2; exit 2 ;;
esac
