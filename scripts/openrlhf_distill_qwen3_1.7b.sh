#!/usr/bin/env bash
# GRPO on math with DistillSparse, Qwen3-1.7B: rollouts run on the cheaper 0.80 schedule and a rollout-only LoRA (rank 16, alpha 16, KL 0.001) distils the dense policy into the sparse one.
# After each policy update the actor group trains φ with θ frozen (sparse teacher-forced forward vs the dense log-probs
# OpenRLHF already computed); the engines serve θ + φ, the trainer's policy stays θ; φ is saved in every checkpoint.
# The re-planner needs sparse teacher forcing on an engine, which only `--sparrow.engine embedded` offers: with SGLang
# engines it is off (replan_every 0) and the schedule stays 0.80. ZeRO-2: the LoRA shares the policy's full weights.
# GPUs: 8 on one node (4 DeepSpeed actor ranks + 4 SGLang engines with the sparrow backend, TP 1).
# Cost model (`sparrow plan --preset qwen3-1.7b-0.80 --explain --hardware h200 --drain`): predicted rollout speedup
# 2.72x vs dense (draining batch 16, 64 responses of 1K-32K tokens).
# Usage: MODEL_DIR=/models/Qwen3-1.7B DATA=/data/train.jsonl bash scripts/openrlhf_distill_qwen3_1.7b.sh   (DRY_RUN=1: print the config)
source "$(dirname "$0")/openrlhf_common.sh"
MODEL_DIR=${MODEL_DIR:-$HOME/models/Qwen3-1.7B}
DATA=${DATA:-$HOME/data/polaris-53k.jsonl}
launch "${GRPO_FLAGS[@]}" \
  --actor.model_name_or_path "$MODEL_DIR" --data.prompt_dataset "$DATA" \
  --actor.num_nodes 1 --actor.num_gpus_per_node 4 --vllm.num_engines 4 --vllm.gpu_memory_utilization 0.8 \
  --rollout.batch_size 64 --train.batch_size 512 --rollout.micro_batch_size 4 --train.micro_batch_size 1 \
  --data.max_len 38912 --rollout.max_new_tokens 37888 \
  --sparrow.engine sglang --sparrow.schedule qwen3-1.7b-0.80 --sparrow.tau 0.86 --sparrow.topk 20 \
  --sparrow.distill.enabled --sparrow.distill.rank 16 --sparrow.distill.alpha 16 --sparrow.distill.kl_coef 0.001 \
  --sparrow.distill.replan_every 0 --ds.zero_stage 2 \
  --train.num_episodes 1 "$@"
