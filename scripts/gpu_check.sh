#!/usr/bin/env bash
# The GPU checks, on one GPU.
#
# 1. Decode on CUDA against the CPU (issues 10 and 16): the tests that skip without a GPU. The
#    repetition code's fused decode (its Triton pass and its compiled passes) gives the CPU reference's
#    totals bit for bit and names the same workers; the cyclic code on CUDA tensors (its Triton certifying
#    pass) keeps its guarantees and names whom the CPU names, with and without kernel noise;
#    reactive mode's exchange and escalation on CUDA buckets over gloo gives the CPU world's results.
#    The order-statistics rules choose the sorting network on CUDA up to 64 rows.
# 2. Numerics: six ranks share one GPU over gloo (NCCL refuses two ranks on one GPU): the cyclic code,
#    the repetition code and its reactive mode (groups of s+1, recomputed only where replicas disagree),
#    TF32 on and off, float32 and bf16-mixed, with and without a liar (rank 4, -100x). Each run trains
#    the CNN on synthetic CIFAR-sized data, then again without the liar, and prints who was caught, the
#    reactive mode's escalations (steps recomputed and voted) and how far the model is from the
#    liar-free one. GPU_CHECK_JOBS runs (default 1) go at once. Writes docs/gpu_check.md.
# 3. Decode speed (issue 16): benchmarks/decode.py on CUDA at P = 15 and 63, d = 11.2M and 100M,
#    float32 and bfloat16: the plain mean, the repetition code (its Triton pass by default on CUDA, its
#    compiled passes, its block-wise reference), the cyclic code (its Triton certifying pass by default,
#    and its torch passes), both codes with every row off by 1e-4 (kernel noise:
#    the cyclic code's measured floor, the repetition code's whole-vector vote), median, trimmed mean
#    and Krum, each against the mean and in GB/s, medians of GPU_CHECK_REPEATS (default 11). Writes
#    docs/decode_cuda.md and docs/decode_cuda.json, row by row (a few minutes; the first fused decode of
#    each dtype compiles with Triton during the warm-up run, not timed).
# 4. Where a decode's fixed time goes (issue 16; GPU_CHECK_PROFILE=0 skips it): at P = 15 and 63,
#    d = 11.2M, where fixed work weighs most, the mean and both codes' default decodes (and their Triton
#    passes looping over the rows instead of unrolled, as they run past 64 rows) under torch.profiler:
#    kernel launches, host syncs and ATen operators per decode, and each one's operators by their GPU time.
#    Writes docs/decode_cuda_profile.json and the tables in docs/decode_cuda_profile/ (two minutes), and
#    beside each table its timeline (.trace.json, for Perfetto; not committed: 0.3 to 0.5 MB each).
# 5. Sharded step time on this machine's CPU cores (issue 11; off unless GPU_CHECK_STEP_TIMES=1): PS
#    mode, sharded mode and DDP at P = 9 on CPU ranks over gloo (benchmarks/traffic.py steps). On a
#    2-core machine every rank's decode shares two cores, so sharded mode's spread work cannot show;
#    a GPU machine's cores can. Writes docs/traffic_steps_cores.json and prints the table (some minutes).
#
#   bash scripts/gpu_check.sh [STEPS]        (make gpu-check)
#   GPU_CHECK_TESTS=0 GPU_CHECK_TRAINING=0 bash scripts/gpu_check.sh     # the decode table only
#   GPU_CHECK_TESTS=0 GPU_CHECK_TRAINING=0 GPU_CHECK_DECODE=0 GPU_CHECK_PROFILE=0 GPU_CHECK_STEP_TIMES=1 \
#       bash scripts/gpu_check.sh                                        # step times
#   GPU_CHECK_TESTS=0 GPU_CHECK_TRAINING=0 GPU_CHECK_DECODE=0 bash scripts/gpu_check.sh   # the profile only
#   GPU_CHECK_DECODE=0 GPU_CHECK_JOBS=4 bash scripts/gpu_check.sh 30     # tests and numerics, four runs at once
#   GPU_CHECK_CONFIGS="reactive true 32-true none;crc false bf16-mixed reverse" bash scripts/gpu_check.sh  # these runs
#   GPU_CHECK_ACCELERATOR=cpu GPU_CHECK_TESTS=0 GPU_CHECK_DECODE=0 GPU_CHECK_CODES=reactive GPU_CHECK_REPORT=/tmp/r.md \
#       bash scripts/gpu_check.sh 2          # the reactive runs on CPU ranks (checks this script without a GPU)
# GPU_CHECK_CODES: which rows of the numerics (default "crc reactive frc"); GPU_CHECK_REPORT: where the
# numerics table goes (default docs/gpu_check.md).
#
# Needs a CUDA GPU and the project's dependencies (hydra-core included) in the python on PATH,
# or PYTHON=... .
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
STEPS=${1:-40}
ACCELERATOR=${GPU_CHECK_ACCELERATOR:-gpu}
JOBS=${GPU_CHECK_JOBS:-1}
case $JOBS in
    '' | *[!0-9]* | 0) echo "gpu_check: GPU_CHECK_JOBS must be a whole number >= 1 (got '$JOBS')." >&2; exit 2 ;;
esac
failed=0  # a part that fails is reported and the others still run; the exit status says so at the end
if [ "$ACCELERATOR" = gpu ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)'; then
    echo "gpu_check: no CUDA GPU here; nothing was run." >&2
    exit 3
fi
if [ "${GPU_CHECK_TESTS:-1}" != 0 ] && [ "$ACCELERATOR" = gpu ]; then
    PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_frc_fused.py \
        tests/test_crc.py tests/test_aggregators.py tests/exchange/test_hooks.py tests/test_seeding.py tests/test_one_ddp_forward.py -k cuda || failed=1
fi
if [ "${GPU_CHECK_TRAINING:-1}" != 0 ]; then
    OUT=${GPU_CHECK_REPORT:-docs/gpu_check.md}
    RUNS=$(mktemp -d)
    if [ "$ACCELERATOR" = gpu ]; then
        where=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)')
        share="six ranks sharing the GPU over gloo"
    else
        where="CPU ranks (a dry run of this script), torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
        share="six CPU ranks over gloo"
    fi
    {
        echo "# GPU numerics check"
        echo
        echo "\`GPU_CHECK_JOBS=$JOBS bash scripts/gpu_check.sh $STEPS\`, $(date -u +%Y-%m-%d) on $where:"
        echo "$share, CNN (BatchNorm, max-pool) on synthetic 3x32x32 data, $STEPS optimizer steps, s = 1;"
        echo "liar: rank 4 sends -100x. TF32: matmuls and cuDNN convolutions. reactive: the repetition code in"
        echo "groups of s+1 = 2, a group recomputed by s more ranks and voted only where its replicas disagree;"
        echo "escalations: steps (groups) that needed it. Model: the final parameters against the same run without the liar."
        echo
        echo "| code | TF32 | precision | liar | caught | skipped | escalations | model vs liar-free run |"
        echo "|---|---|---|---|---|---|---|---|"
    } > "$OUT"
    # The cyclic code first (the numerics it failed on), then reactive mode's escalation rate, then the rest.
    named=() configs=()
    IFS=';' read -r -a named <<< "${GPU_CHECK_CONFIGS:-}"  # "code tf32 precision attack;...": these runs only
    for config in "${named[@]}"; do
        set -- $config
        if [ $# -eq 4 ]; then configs+=("$config"); else echo "gpu_check: skipping '$config' (want: code tf32 precision attack)" >&2; fi
    done
    [ ${#named[@]} -eq 0 ] && for code in ${GPU_CHECK_CODES:-crc reactive frc}; do
      for attack in none reverse; do
        for tf32 in true false; do
          for precision in 32-true bf16-mixed; do
            configs+=("$code $tf32 $precision $attack")
          done
        done
      done
    done
    launch() {  # launch ID PORT CODE TF32 PRECISION ATTACK: six torchrun agents, one rank each
        local id=$1 port=$2 code=$3 tf32=$4 precision=$5 attack=$6 node
        local codeargs=(code=$code)
        [ "$code" = reactive ] && codeargs=(code=frc code.redundancy_mode=reactive)
        local args=(examples/train.py "${codeargs[@]}" code.projection_secret=7 attack=$attack model=cnn
                    data=synthetic data.shape=[3,32,32] trainer=$ACCELERATOR trainer.devices=1 trainer.num_nodes=6
                    trainer.max_epochs=1000 trainer.max_steps=$STEPS trainer.precision=$precision tf32=$tf32
                    trainer.enable_progress_bar=false ddp.process_group_backend=gloo compare_clean=true
                    loggers=[csv] hydra.run.dir="$RUNS/$id")
        for node in 0 1 2 3 4 5; do
            "$PYTHON" -m torch.distributed.run --nnodes=6 --nproc-per-node=1 --node-rank=$node \
                --master-addr=127.0.0.1 --master-port=$port "${args[@]}" > "$RUNS/$id.$node.log" 2>&1 &
        done
    }
    port=29600
    for ((first = 0; first < ${#configs[@]}; first += JOBS)); do
        wave=("${configs[@]:first:JOBS}")
        for config in "${wave[@]}"; do
            port=$((port + 1))
            set -- $config
            launch "gpu-$1-$2-$3-$4" "$port" "$@"
        done
        wait  # every agent of the wave (a failed run shows in its row)
        for config in "${wave[@]}"; do
            set -- $config
            id="gpu-$1-$2-$3-$4"
            "$PYTHON" - "$RUNS/$id/summary.json" "$@" "$RUNS/$id".*.log >> "$OUT" <<'PY'
import json, sys
path, code, tf32, precision, attack, *logs = sys.argv[1:]
head = f"| {code} | {tf32} | {precision} | {attack} |"
try:
    s = json.load(open(path))
    caught = ", ".join(f"rank {r}: {n} steps" for r, n in s["faulty_counts"].items()) or "nobody"
    esc = s.get("escalations", {"steps": 0, "groups": 0})
    escalated = f"{esc['steps']} ({esc['groups']})" if code == "reactive" else ""
    model = "identical" if s["identical_to_clean"] else f"{s['relative_distance_to_clean']:.1e} relative"
    print(f"{head} {caught} | {s['skipped_steps']} | {escalated} | {model} |")
except Exception as error:  # no summary (the run failed) or an unreadable one: the ranks' first error
    # Ranks in order; the ranks that lost a peer report only the lost connection, so those come last.
    marks = ("Error", "error:", "Could not", "what():")
    lines = [l.strip() for log in sorted(logs) for l in open(log, errors="replace") if any(m in l for m in marks)]
    noise = ("elastic", "Connection closed", "ChildFailedError", "HYDRA_FULL_ERROR", "raise ")
    causes = [l for l in lines if not any(w in l for w in noise)]
    why = (causes or lines or [f"{type(error).__name__}: {error}"])[0]
    print(f"{head} run failed: {why[:160].replace('|', '/')} | | | |")
PY
            tail -1 "$OUT"
        done
    done
    echo "wrote $OUT (runs in $RUNS)"
fi
if [ "${GPU_CHECK_DECODE:-1}" != 0 ]; then
    DECODE_MD=docs/decode_cuda.md
    {
        echo "# Decode speed on CUDA"
        echo
        echo "\`bash scripts/gpu_check.sh\` (benchmarks/decode.py), $(date -u +%Y-%m-%d) on $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))')."
        echo "ratio: seconds over the plain mean of the same tensor in the same run; GB/s: the received tensor's bytes"
        echo "over the method's time (the mean's in brackets). code:frc is the fused decode (CUDA default: its"
        echo "Triton pass), code:frc:compiled its two compiled passes, code:frc:reference the block-wise decode;"
        echo "code:crc certifies with its Triton pass (CUDA default), code:crc:torch with torch products;"
        echo "aggregator:NAME:network sorts each column with the sorting"
        echo "network (one kernel per compare-exchange over all columns) instead of torch.sort; code:NAME:noisy adds"
        echo "noise of 1e-4 (relative) to every row, as non-deterministic kernels do; rows that do not fit in memory say so."
        echo
    } > "$DECODE_MD.tmp"
    # ByzFL's rules alongside where it is installed (pip install --no-deps byzfl==0.0.11)
    peer=()
    "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("byzfl") is None)' 2>/dev/null && peer=(--peer byzfl)
    # decode.py rewrites the table after every row: a run stopped midway keeps what it measured
    PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/decode.py --devices cuda --workers 15 63 --dims 11200000 100000000 \
        --dtypes float32 bfloat16 --repeats "${GPU_CHECK_REPEATS:-11}" "${peer[@]}" \
        --methods aggregator:mean code:none code:frc code:frc:compiled code:frc:reference code:crc code:crc:torch \
                  code:crc:noisy code:frc:noisy \
                  aggregator:median aggregator:median:network aggregator:trimmed_mean \
                  aggregator:trimmed_mean:network aggregator:krum \
        --json docs/decode_cuda.json --markdown "$DECODE_MD.table" || failed=1
    # the rows measured, even when the run stopped midway
    cat "$DECODE_MD.table" >> "$DECODE_MD.tmp" && rm "$DECODE_MD.table" && mv "$DECODE_MD.tmp" "$DECODE_MD"
    echo "wrote $DECODE_MD"
fi
if [ "${GPU_CHECK_PROFILE:-1}" != 0 ] && [ "$ACCELERATOR" = gpu ]; then
    rm -rf docs/decode_cuda_profile
    PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/decode.py --devices cuda --workers 15 63 --dims 11200000 \
        --dtypes float32 bfloat16 --repeats "${GPU_CHECK_REPEATS:-11}" \
        --methods aggregator:mean code:frc code:crc code:frc:looped code:crc:looped --profile docs/decode_cuda_profile \
        --json docs/decode_cuda_profile.json || failed=1
fi
if [ "${GPU_CHECK_STEP_TIMES:-0}" != 0 ]; then
    PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/traffic.py steps --worlds 9 --repeats 1 \
        --json docs/traffic_steps_cores.json || failed=1
fi
exit $failed
