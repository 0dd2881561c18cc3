#!/usr/bin/env bash
# Issue 20, the single-GPU colocated run; the two device calls are in bench/results/NOTES.md. On the GPU machine:
#   probe  call 1 (carries .whl_a): checks .whl_a arrived whole, prints the GPU and the image's packages the run uses
#   run    call 2 (carries .whl_b): joins .whl_a + .whl_b (sha256), installs them into $SITE, then for each mode of
#          MODES (dense, then SPARSE_SCHEDULE) a local Ray head and OpenRLHF's train() through sparrow-sgl's entry
#          point, colocated on the one GPU (DeepSpeed ZeRO-2 + the embedded-engine rollout actor, CUDA-IPC weight
#          update), STEPS GRPO steps of the testbed's long chain task; writes $OUT/openrlhf_gpu.json, the logs and
#          runs.tar.gz (at most 8 files come back from $OUT)
# LAYOUT=split (a machine of GPUS >= 2 GPUs): the actor group (DeepSpeed ZeRO-2) on one GPU and one rollout actor on
#          each other GPU, the weights broadcast over NCCL through sparrow-sgl's process group (trainer_sync.py);
#          no sleep/wake-up. LAYOUT=colocated (default): everything on GPU 0, CUDA-IPC weight update.
# DRY_RUN=1 (run): checks the kit and prints each mode's command and resolved configuration (--sparrow.dry_run);
# no Ray, no GPU; works on a CPU with PYTHON=.venv-sglang/bin/python.
# env: OUT, WORK (/tmp/gpu_colocated), PYTHON (python3), SITE (/tmp/site), KIT_DIRS (".whl_a .whl_b"), MODEL_DIR,
#      MODES ("dense sparse"), SPARSE_SCHEDULE (fixed:1024), STEPS (4), PROMPTS (8 a step), SAMPLES (8 a prompt),
#      TASK (long), EXTRA_ARGS (appended flags), RUN_TIMEOUT (s per mode, 220; the device call's own limit must also
#      cover ~35 s of kit install and random-model build before the first mode), CALL_LIMIT_S (the device call's
#      timeout_s: each mode's timeout is cut so the last one ends 30 s before it and the summary still comes back;
#      a mode with < 60 s left is skipped), RAY_PORT (6379),
#      LAYOUT (colocated | split), GPUS (split: the GPUs to use; default all nvidia-smi lists, 2 in a dry run)
set -euo pipefail
SCRIPT_START=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
source scripts/gpu_kit_lib.sh
what=${1:-run}
OUT=${OUT:-$REPO/runs/gpu_colocated}
WORK=${WORK:-/tmp/gpu_colocated}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
KIT_DIRS=${KIT_DIRS:-.whl_a .whl_b}
MODEL_DIR=${MODEL_DIR:-$REPO/bench/results/testbed/sweep2/model}
RANDOM_SHAPE=${RANDOM_SHAPE:-}  # e.g. qwen3-0.6b: random weights of that shape, MODEL_DIR's tokenizer (gpu_random_model.py)
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-32}
MODES=${MODES:-dense sparse}
SPARSE_SCHEDULE=${SPARSE_SCHEDULE:-fixed:1024}
STEPS=${STEPS:-4}
RUN_TIMEOUT=${RUN_TIMEOUT:-220}
CALL_LIMIT_S=${CALL_LIMIT_S:-}
[[ "$CALL_LIMIT_S" =~ ^[0-9]*$ ]] || { echo "CALL_LIMIT_S=$CALL_LIMIT_S: give the call's timeout in whole seconds" >&2; exit 2; }
PROMPTS=${PROMPTS:-8}    # per step
SAMPLES=${SAMPLES:-8}    # per prompt
TASK=${TASK:-long}       # a testbed.SWEEP_TASKS name
RAY_PORT=${RAY_PORT:-6379}
LAYOUT=${LAYOUT:-colocated}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"  # more entry-point flags (a later flag wins in OpenRLHF's parser)
if [ -n "$RANDOM_SHAPE" ]; then
  # gpu_random_model.py scales the logits x10: bf16 engine vs HF trainer numerics move the greedy canary by 0.17-0.29
  # nats on an H200 (session 9), a wrong sync by several; EXTRA_ARGS can still override (it comes later)
  EXTRA=(--sparrow.canary_atol 0.5 "${EXTRA[@]}")
fi
mkdir -p "$OUT"

probe() {
  local d
  for d in $KIT_DIRS; do
    [ -f "$d/kit.sha256" ] || continue
    (cd "$d" && for f in *; do [ "$f" = kit.sha256 ] || awk -v f="$f" '$2 == f' kit.sha256; done \
      | sha256sum --quiet -c - && echo "probe: $d arrived whole ($(ls | wc -l) files)")
  done
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  nproc; df -h /tmp /dev/shm | tail -n +2
  "$PYTHON" - <<'PY'
import importlib.metadata as md, sys
print("python", sys.version.split()[0])
for d in ("torch", "transformers", "peft", "accelerate", "tensorboard", "aiohttp", "grpcio", "msgpack", "protobuf",
          "psutil", "nvidia-ml-py", "einops", "ninja", "py-cpuinfo", "click", "filelock", "pyyaml", "requests",
          "pandas", "pyarrow", "xxhash", "fsspec", "huggingface-hub", "safetensors", "tokenizers", "attrs",
          "typing-extensions", "numpy", "triton", "tqdm", "sympy", "torchmetrics"):
    try:
        print(d, md.version(d))
    except md.PackageNotFoundError:
        print(d, "MISSING")
import torch
print("torch cuda", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
  ls /usr/lib/python3*/sitecustomize.py 2>/dev/null || true
}

install_kit() {
  # shellcheck disable=SC2086
  kit_join "$WORK/kit" $KIT_DIRS
  echo "kit: $(ls "$WORK"/kit/*.whl | wc -l) wheels joined and checked against kit.sha256"
  if [ "${DRY_RUN:-0}" = 1 ] && "$PYTHON" -c 'import openrlhf, ray, deepspeed' 2>/dev/null; then
    return  # the CPU check: this Python already holds the same versions
  fi
  "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" "$WORK"/kit/*.whl
  rm -rf "$SITE/tests"  # OpenRLHF's wheel ships its own top-level `tests` package
}

ray_cli() { "$PYTHON" -m ray.scripts.scripts "$@"; }

mode_args() {  # MODE SCHEDULE DIR
  local schedule=$2 dir=$3
  args=(
    --actor.model_name_or_path "$MODEL_DIR" --data.prompt_dataset "$WORK/prompts.jsonl"
    --data.input_key prompt --data.label_key label --data.max_samples $((PROMPTS * STEPS))
    --data.max_len 12288 --rollout.max_new_tokens "$MAX_NEW_TOKENS" --reward.remote_url "$REPO/scripts/gpu_colocated_task.py"
    "${LAYOUT_ARGS[@]}" --vllm.tensor_parallel_size 1
    --vllm.sync_backend nccl --actor.num_nodes 1 --actor.num_gpus_per_node 1
    --algo.advantage.estimator group_norm --algo.kl.init_coef 0 --actor.eps_clip_low_high 0.2 0.28
    --algo.advantage.is_correction_level token --algo.advantage.is_correction_mode clip
    --algo.advantage.is_correction_threshold 2.0
    --rollout.batch_size "$PROMPTS" --rollout.n_samples_per_prompt "$SAMPLES"
    --rollout.micro_batch_size $(( PROMPTS * SAMPLES < 8 ? PROMPTS * SAMPLES : 8 ))
    --train.batch_size $((PROMPTS * SAMPLES)) --train.micro_batch_size 4 --train.num_episodes 1
    --rollout.temperature 1.0 --rollout.top_p 1.0
    --ds.zero_stage 2 --ds.param_dtype bf16 --ds.attn_implementation sdpa
    --actor.adam.lr 1e-4 --actor.lr_scheduler constant
    --ckpt.output_dir "$dir/ckpt" --ckpt.path "$dir/ckpt/checkpoints" --logger.tensorboard_dir "$dir/tb"
    --sparrow.engine embedded --sparrow.schedule "$schedule" --sparrow.topk 20 --sparrow.out_dir "$dir/sparrow" "${EXTRA[@]}"
  )
}

mode_timeout() {  # RUN_TIMEOUT, cut to end 30 s before CALL_LIMIT_S (counted from the script's start)
  local left
  if [ -z "$CALL_LIMIT_S" ]; then echo "$RUN_TIMEOUT"; return; fi
  left=$(( CALL_LIMIT_S - ($(date +%s) - SCRIPT_START) - 30 ))
  echo $(( left < RUN_TIMEOUT ? left : RUN_TIMEOUT ))
}

run_mode() {  # MODE SCHEDULE
  local mode=$1 schedule=$2 dir=$WORK/$1 start rc limit
  rm -rf "$dir"
  mkdir -p "$dir"
  mode_args "$mode" "$schedule" "$dir"
  limit=$(mode_timeout)
  echo "$PYTHON -m sparrow_sgl.openrlhf.train_ppo_ray ${args[*]}" > "$dir/command.txt"
  echo "== $mode (timeout $limit s): $(cat "$dir/command.txt")"
  if [ -n "$CALL_LIMIT_S" ] && [ "$limit" -lt 60 ]; then
    echo "== $mode: skipped, $limit s left before CALL_LIMIT_S=$CALL_LIMIT_S (30 s kept for the summary)"
    return
  fi
  if [ "${DRY_RUN:-0}" = 1 ]; then
    "$PYTHON" -m sparrow_sgl.openrlhf.train_ppo_ray "${args[@]}" --sparrow.dry_run > "$dir/dry_run.json"
    cat "$dir/dry_run.json"
    return
  fi
  ray_cli stop --force > /dev/null 2>&1 || true  # a head left by a mode killed at its timeout
  ray_cli start --head --port "$RAY_PORT" --num-gpus "$GPUS" --num-cpus "$(nproc)" --include-dashboard=false --disable-usage-stats \
    > "$dir/ray_start.log" 2>&1 || { cat "$dir/ray_start.log"; return 1; }
  start=$(date +%s)
  set +e
  RAY_ADDRESS=127.0.0.1:$RAY_PORT timeout -k 10 "$limit" "$PYTHON" -m sparrow_sgl.openrlhf.train_ppo_ray "${args[@]}" \
    > "$dir/run.log" 2>&1
  rc=$?
  set -e
  echo "$rc" > "$dir/rc"
  echo "{\"seconds\": $(( $(date +%s) - start ))}" > "$dir/wall.json"
  echo "== $mode: exit $rc after $(( $(date +%s) - start )) s"
  grep -E "Global step|Error|error:|Traceback" "$dir/run.log" | tail -n 15 || true
  for f in /tmp/ray/session_latest/logs/{raylet.out,gcs_server.out} /tmp/ray/session_latest/logs/worker-*.err; do
    [ -f "$f" ] && { echo "--- $f"; tail -n 40 "$f"; }
  done > "$dir/ray_logs_tail.txt" 2>/dev/null || true
  ray_cli stop --force > /dev/null 2>&1 || true
}

finish() {
  local mode
  "$PYTHON" scripts/gpu_colocated_summary.py "$WORK" "$OUT/openrlhf_gpu.json" || true
  for mode in $MODES; do
    [ -f "$WORK/$mode/run.log" ] && tail -c 12000000 "$WORK/$mode/run.log" > "$OUT/$mode.log"
  done
  tar -czf "$OUT/runs.tar.gz" -C "$WORK" --exclude=ckpt --exclude=kit --exclude="model_*" . 2>/dev/null || true
}

layout() {  # sets GPUS and LAYOUT_ARGS
  case $LAYOUT in
    colocated)
      GPUS=1
      LAYOUT_ARGS=(--train.colocate_all --vllm.enable_sleep --vllm.num_engines 1) ;;
    split)
      if [ -z "${GPUS:-}" ]; then
        if [ "${DRY_RUN:-0}" = 1 ]; then GPUS=2; else GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
      fi
      if [ "$GPUS" -lt 2 ]; then
        echo "LAYOUT=split needs 2 or more GPUs (one trains, the others roll out); this machine has $GPUS" >&2
        exit 2
      fi
      LAYOUT_ARGS=(--vllm.num_engines $((GPUS - 1))) ;;
    *) echo "LAYOUT=$LAYOUT: choose colocated or split" >&2; exit 2 ;;
  esac
}

layout
if [ "$what" = probe ]; then
  probe 2>&1 | tee "$OUT/probe.txt"
  exit 0
fi
[ "$what" = run ] || { echo "usage: $0 [probe|run]" >&2; exit 2; }
mkdir -p "$WORK"
install_kit
export PYTHONPATH="$REPO/scripts/gpu_site:$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=0 RAY_USAGE_STATS_ENABLED=0 \
  TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled \
  DS_BUILD_OPS=0 TORCH_CUDA_ARCH_LIST=9.0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ "${DRY_RUN:-0}" != 1 ] && command -v nvidia-smi > /dev/null; then export DS_ACCELERATOR=cuda; fi
if [ -n "$RANDOM_SHAPE" ]; then
  "$PYTHON" scripts/gpu_random_model.py "$MODEL_DIR" "$WORK/model_$RANDOM_SHAPE" --shape "$RANDOM_SHAPE"
  MODEL_DIR=$WORK/model_$RANDOM_SHAPE
fi
"$PYTHON" scripts/gpu_colocated_task.py "$MODEL_DIR" "$WORK/prompts.jsonl" $((PROMPTS * STEPS)) "$TASK"
if [ "${DRY_RUN:-0}" != 1 ]; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c 'import importlib.metadata as m; print(*(d + " " + m.version(d) for d in ("torch", "transformers", "deepspeed", "ray", "openrlhf")))'
  } > "$WORK/gpu.txt" 2>&1 || true
  cat "$WORK/gpu.txt"
  trap 'ray_cli stop --force > /dev/null 2>&1 || true; finish' EXIT
fi
echo "{\"model\": \"$MODEL_DIR\", \"task\": \"testbed chain lookup, SWEEP_TASKS['$TASK']\", \"steps\": $STEPS, \"prompts_per_step\": $PROMPTS, \"samples_per_prompt\": $SAMPLES, \"max_new_tokens\": $MAX_NEW_TOKENS, \"random_shape\": \"$RANDOM_SHAPE\", \"extra_args\": \"${EXTRA_ARGS:-}\", \"schedules\": {\"dense\": \"dense\", \"sparse\": \"$SPARSE_SCHEDULE\"}, \"run_timeout_s\": $RUN_TIMEOUT, \"layout\": \"$LAYOUT\", \"gpus\": $GPUS}" > "$WORK/settings.json"
for mode in $MODES; do
  case $mode in
    dense) run_mode dense dense ;;
    sparse) run_mode sparse "$SPARSE_SCHEDULE" ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
  esac
done
