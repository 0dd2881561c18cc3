"""Embedded GRPO trainer: sparse rollouts -> rewards -> dense recompute -> PPO-clip with TIS -> weight sync.

Heavy pieces (the trainer, transformers) are imported from their modules; this package import stays light so
that `RolloutBatch` and the loss can be reused by the OpenRLHF integration and DistillSparse.
"""
