"""DistillSparse settings (the `distill:` section of the trainer config)."""

from __future__ import annotations

from dataclasses import dataclass

from sparrow_sgl.config import ConfigError

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KL_MODES = ("k3", "forward", "reverse")


@dataclass(slots=True)
class DistillConfig:
    enabled: bool = False
    every: int = 1  # distill step every N RL steps
    replan_every: int = 10  # re-measure tails and try a cheaper schedule every N RL steps (0 = never)
    rank: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    lr: float = 1e-4
    kl_coef: float = 0.001  # lambda in L_LoRA = L_PPO(sparse) + lambda * KL
    kl_mode: str = "k3"  # k3 estimate on sampled tokens (the paper's code) or exact full-vocabulary KL
    ppo_coef: float = 1.0
    epochs: int = 1
    margin: float = 0.0  # a cheaper schedule must reach tau + margin before the re-planner switches to it
    heldout_prompts: int = 8  # held-out task prompts the re-planner measures tails on
    replan_samples: int = 2  # responses per held-out prompt
    replan_candidates: int = 2  # cheaper schedules tried per re-plan
    replan_factor: float = 0.75  # each candidate scales every sparse budget by this factor
    replan_ignore_eos: bool = False  # generate the full max_new_tokens when measuring (covers late bins)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"distill.every must be >= 1, got {self.every}")
        if self.replan_every < 0:
            raise ConfigError(f"distill.replan_every must be >= 0, got {self.replan_every}")
        if self.rank < 1 or self.alpha <= 0:
            raise ConfigError(f"distill.rank must be >= 1 and alpha > 0, got rank={self.rank}, alpha={self.alpha}")
        if self.kl_mode not in KL_MODES:
            raise ConfigError(f"distill.kl_mode must be one of {KL_MODES}, got {self.kl_mode!r}")
        if self.kl_coef < 0 or self.lr <= 0:
            raise ConfigError(f"distill.kl_coef must be >= 0 and lr > 0, got {self.kl_coef}, {self.lr}")
        if self.epochs < 1 or self.heldout_prompts < 1 or self.replan_samples < 1 or self.replan_candidates < 1:
            raise ConfigError("distill.epochs, heldout_prompts, replan_samples and replan_candidates must be >= 1")
        if not 0.0 < self.replan_factor < 1.0:
            raise ConfigError(f"distill.replan_factor must lie in (0, 1), got {self.replan_factor}")
        if not 0.0 <= self.dropout < 1.0 or self.ppo_coef < 0 or self.margin < 0:
            raise ConfigError("distill.dropout must lie in [0, 1), ppo_coef and margin must be >= 0")
        self.target_modules = tuple(self.target_modules)
