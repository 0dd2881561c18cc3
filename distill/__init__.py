"""DistillSparse: a rollout-only LoRA distilled toward the dense policy (DESIGN.md §1.5)."""
