#!/usr/bin/env bash
# One device call of the testbed (see README.md beside this file): pretrain (unless MODEL_DIR is given), then the
# sweep (calibrate, plan, speed, concurrent GRPO runs, report), everything under OUT_DIR, inside CALL_SECONDS.
# usage: bash scripts/testbed/device_call.sh OUT_DIR PRETRAIN_MINUTES SWEEP_STEPS CALL_SECONDS [MODEL_DIR]
# env: PRETRAIN_PROFILE (default h200; h200-lengths continues from the demo checkpoint), TASK (a name of
#      testbed.SWEEP_TASKS, or auto: the longest task the pretrained model solves, read from its pretrain.json),
#      SWEEP_SET (space-separated KEY=VALUE overrides of the sweep, each passed as --set)
set -u
out=$1; minutes=$2; steps=$3; budget=$4; model=${5:-}
start=$(date +%s)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2 \
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers",
transformers.__version__, "triton", triton.__version__)' | tee -a "$out/gpu.txt"
if [ -z "$model" ]; then
  model=$out/model
  python3 -m sparrow_sgl.cli testbed pretrain --profile "${PRETRAIN_PROFILE:-h200}" --out "$model" --minutes "$minutes" --no-progress 2>&1 \
    | grep -v "it/s]" | tee "$out/pretrain.log"
fi
task=${TASK:-}
[ "$task" = auto ] && task="auto=$model/pretrain.json"
sets=()
for kv in ${SWEEP_SET:-}; do sets+=(--set "$kv"); done
deadline=$(( start + budget - 45 ))
echo "sweep: $(( deadline - $(date +%s) )) s left for calibration, speed and the runs"
timeout $(( deadline - $(date +%s) + 35 )) python3 -m sparrow_sgl.cli testbed sweep --model "$model" \
  --out "$out/sweep" ${task:+--task "$task"} --steps "$steps" "${sets[@]}" --set deadline=$deadline --results "$out/report" --no-progress 2>&1 \
  | grep -v "it/s]" | tee "$out/sweep.log"
echo "call done in $(( $(date +%s) - start )) s"
