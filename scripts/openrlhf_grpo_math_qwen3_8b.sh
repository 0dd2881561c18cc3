#!/usr/bin/env bash
# GRPO on math, Qwen3-8B, sparse rollouts at the paper's 0.86 preset (ZeRO-3 with Adam offload for the 8B actor).
# GPUs: 8 on one node (4 DeepSpeed actor ranks + 4 SGLang engines with the sparrow backend, TP 1).
# Cost model (`sparrow plan --preset qwen3-8b-0.86 --explain --hardware h200 --drain`): predicted rollout speedup
# 1.69x vs dense (draining batch 16, 64 responses of 1K-32K tokens).
# Usage: MODEL_DIR=/models/Qwen3-8B DATA=/data/train.jsonl bash scripts/openrlhf_grpo_math_qwen3_8b.sh   (DRY_RUN=1: print the config)
source "$(dirname "$0")/openrlhf_common.sh"
MODEL_DIR=${MODEL_DIR:-$HOME/models/Qwen3-8B}
DATA=${DATA:-$HOME/data/polaris-53k.jsonl}
launch "${GRPO_FLAGS[@]}" \
  --actor.model_name_or_path "$MODEL_DIR" --data.prompt_dataset "$DATA" \
  --actor.num_nodes 1 --actor.num_gpus_per_node 4 --vllm.num_engines 4 --vllm.gpu_memory_utilization 0.85 \
  --ds.adam_offload \
  --rollout.batch_size 64 --train.batch_size 512 --rollout.micro_batch_size 1 --train.micro_batch_size 1 \
  --data.max_len 38912 --rollout.max_new_tokens 37888 \
  --sparrow.engine sglang --sparrow.schedule qwen3-8b-0.86 --sparrow.topk 20 --sparrow.guard \
  --train.num_episodes 1 "$@"
