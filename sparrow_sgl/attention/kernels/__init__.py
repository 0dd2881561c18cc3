"""GPU kernels (Triton / FlashInfer), imported lazily: nothing here may be imported on a CPU-only path."""
