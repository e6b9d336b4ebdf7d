#!/usr/bin/env bash
# The GPU checks, on one GPU.
#
# 1. Decode speed (issue 16): benchmarks/decode.py on CUDA at P = 15 and 63, d = 11.2M and 100M,
#    float32 and bfloat16: the plain mean, the repetition code (fused by default on CUDA, and its
#    block-wise reference), the cyclic code, both codes with every row off by 1e-4 (kernel noise:
#    the cyclic code's measured floor, the repetition code's whole-vector vote), median, trimmed mean
#    and Krum, each against the mean and in GB/s. Writes docs/decode_cuda.md and docs/decode_cuda.json (a few minutes; the first fused
#    decode of each dtype compiles with Triton during the warm-up run, not timed).
# 2. Numerics: six ranks share one GPU over gloo (NCCL refuses two ranks on one GPU),
#    both codes, TF32 on and off, float32 and bf16-mixed, with and without a liar (rank 4, -100x).
#    Each run trains the CNN on synthetic CIFAR-sized data, then again without the liar, and prints
#    who was caught and how far the model is from the liar-free one. Writes docs/gpu_check.md.
#
#   bash scripts/gpu_check.sh [STEPS]        (make gpu-check)
#   GPU_CHECK_TRAINING=0 bash scripts/gpu_check.sh     # the decode table only
#   GPU_CHECK_DECODE=0 bash scripts/gpu_check.sh       # the numerics only
#
# Needs a CUDA GPU and the project's dependencies (hydra-core included) in the python on PATH,
# or PYTHON=... .
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
STEPS=${1:-40}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)'; then
    echo "gpu_check: no CUDA GPU here; nothing was run." >&2
    exit 3
fi
if [ "${GPU_CHECK_DECODE:-1}" != 0 ]; then
    DECODE_MD=docs/decode_cuda.md
    {
        echo "# Decode speed on CUDA"
        echo
        echo "\`bash scripts/gpu_check.sh\` (benchmarks/decode.py), $(date -u +%Y-%m-%d) on $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))')."
        echo "ratio: seconds over the plain mean of the same tensor in the same run; GB/s: the received tensor's bytes"
        echo "over the method's time (the mean's in brackets). code:frc is the fused decode (CUDA default),"
        echo "code:frc:reference the block-wise one; aggregator:NAME:network sorts each column with the sorting"
        echo "network (one kernel per compare-exchange over all columns) instead of torch.sort; code:NAME:noisy adds"
        echo "noise of 1e-4 (relative) to every row, as non-deterministic kernels do; rows that do not fit in memory say so."
        echo
    } > "$DECODE_MD.tmp"
    PYTHONPATH=. "$PYTHON" benchmarks/decode.py --devices cuda --workers 15 63 --dims 11200000 100000000 \
        --dtypes float32 bfloat16 --repeats 11 \
        --methods aggregator:mean code:none code:frc code:frc:reference code:crc code:crc:noisy code:frc:noisy \
                  aggregator:median aggregator:median:network aggregator:trimmed_mean \
                  aggregator:trimmed_mean:network aggregator:krum \
        --json docs/decode_cuda.json --markdown "$DECODE_MD.table"
    cat "$DECODE_MD.table" >> "$DECODE_MD.tmp" && rm "$DECODE_MD.table" && mv "$DECODE_MD.tmp" "$DECODE_MD"
    echo "wrote $DECODE_MD"
fi
if [ "${GPU_CHECK_TRAINING:-1}" = 0 ]; then
    exit 0
fi
OUT=docs/gpu_check.md
RUNS=$(mktemp -d)
{
    echo "# GPU numerics check"
    echo
    echo "\`bash scripts/gpu_check.sh $STEPS\` on $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)'):"
    echo "six ranks sharing the GPU over gloo, CNN on synthetic 3x32x32 data, $STEPS steps; liar: rank 4 sends -100x."
    echo
    echo "| code | TF32 | precision | liar | caught | skipped | model vs liar-free run |"
    echo "|---|---|---|---|---|---|---|"
} > "$OUT"
port=29600
for code in frc crc; do
  for tf32 in true false; do
    for precision in 32-true bf16-mixed; do
      for attack in none reverse; do
        port=$((port + 1))
        id="gpu-$code-$tf32-$precision-$attack"
        args=(examples/train.py code=$code code.projection_secret=7 attack=$attack model=cnn data=synthetic
              data.shape=[3,32,32] trainer=gpu trainer.devices=1 trainer.num_nodes=6 trainer.max_epochs=1000
              +trainer.max_steps=$STEPS trainer.precision=$precision tf32=$tf32 ddp.process_group_backend=gloo
              compare_clean=true loggers=[csv] hydra.run.dir="$RUNS/$id")
        pids=()
        for node in 0 1 2 3 4 5; do
            "$PYTHON" -m torch.distributed.run --nnodes=6 --nproc-per-node=1 --node-rank=$node \
                --master-addr=127.0.0.1 --master-port=$port "${args[@]}" > "$RUNS/$id.$node.log" 2>&1 &
            pids+=($!)
        done
        status=ok
        for pid in "${pids[@]}"; do wait "$pid" || status=failed; done
        "$PYTHON" - "$RUNS/$id/summary.json" "$code" "$tf32" "$precision" "$attack" "$status" "$RUNS/$id.0.log" >> "$OUT" <<'PY'
import json, sys
path, code, tf32, precision, attack, status, log = sys.argv[1:]
try:
    s = json.load(open(path))
except OSError:
    tail = open(log).read().strip().splitlines()[-1:] or ["no output"]
    print(f"| {code} | {tf32} | {precision} | {attack} | run {status}: {tail[0][:120]} | | |")
    sys.exit(0)
caught = ", ".join(f"rank {r}: {n}" for r, n in s["faulty_counts"].items()) or "nobody"
model = "identical" if s["identical_to_clean"] else f"{s['relative_distance_to_clean']:.1e} relative"
print(f"| {code} | {tf32} | {precision} | {attack} | {caught} | {s['skipped_steps']} | {model} |")
PY
        tail -1 "$OUT"
      done
    done
  done
done
echo "wrote $OUT (runs in $RUNS)"
