#!/usr/bin/env bash
# Shared by the openrlhf_*.sh launch scripts (source it). `launch FLAGS...` submits OpenRLHF's PPO job through
# sparrow-sgl's entry point to a running Ray cluster, the way OpenRLHF's own scripts do (`ray job submit`; start the
# head first: `ray start --head --num-gpus 8`). DRY_RUN=1 instead runs the entry point here with --sparrow.dry_run:
# it prints the resolved configuration (OpenRLHF's validation included) and touches no GPU and no cluster.
# Environment: MODEL_DIR, DATA (local paths; nothing is downloaded), OUT (outputs), RAY_ADDRESS, PYTHON.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv-sglang/bin/python}
OUT=${OUT:-$REPO/runs/openrlhf}

# GRPO as in the paper: 8 samples per prompt, clip 0.2 / 0.28, no KL, TIS (token-level ratio clipped at 2).
GRPO_FLAGS=(
  --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt 8 --algo.kl.init_coef 0
  --actor.eps_clip_low_high 0.2 0.28
  --algo.advantage.is_correction_level token --algo.advantage.is_correction_mode clip
  --algo.advantage.is_correction_threshold 2.0
  --rollout.temperature 1.0 --rollout.top_p 1.0
  --actor.adam.lr 1e-6 --ds.zero_stage 3 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable
  --ds.attn_implementation sdpa
  --reward.remote_url "$REPO/rewards/openrlhf.py"
  --data.apply_chat_template --data.input_key prompt --data.label_key label
  --vllm.sync_backend nccl --vllm.tensor_parallel_size 1
  --logger.tensorboard_dir "$OUT/tensorboard" --ckpt.output_dir "$OUT/model" --ckpt.path "$OUT/checkpoints"
  --ckpt.save_steps 20 --ckpt.load_enable
)

launch() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    (cd "$REPO" && "$PYTHON" -m sparrow_sgl.openrlhf.train_ppo_ray "$@" --sparrow.dry_run)
    return
  fi
  ray job submit --address="${RAY_ADDRESS:-http://127.0.0.1:8265}" \
    --runtime-env-json="{\"working_dir\": \"$REPO\", \"excludes\": [\".venv\", \".venv-sglang\", \"runs\", \".git\"]}" \
    -- python -m sparrow_sgl.openrlhf.train_ppo_ray "$@"
}
