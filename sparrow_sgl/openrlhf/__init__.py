"""OpenRLHF 0.11.2 orchestrates training; sparrow-sgl engines (SGLang with the sparse backend, or the embedded
engine) roll out. No fork: `python -m sparrow_sgl.openrlhf.train_ppo_ray` patches OpenRLHF at a few points and runs
its own CLI. Heavy imports (OpenRLHF, Ray, DeepSpeed) happen inside the modules that need them."""
