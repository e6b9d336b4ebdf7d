#!/usr/bin/env bash
# The GPU numerics check: six ranks share one GPU over gloo (NCCL refuses two ranks on one GPU),
# both codes, TF32 on and off, float32 and bf16-mixed, with and without a liar (rank 4, -100x).
# Each run trains the CNN on synthetic CIFAR-sized data, then again without the liar, and prints
# who was caught and how far the model is from the liar-free one. Writes docs/gpu_check.md.
#
#   bash scripts/gpu_check.sh [STEPS]        (make gpu-check)
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
