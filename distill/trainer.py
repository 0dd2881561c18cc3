"""`DistillTrainer`: the φ step of DistillSparse, called by the RL loop after its θ update (DESIGN.md §1.5).

Per call of `step`: θ frozen; for `epochs` passes over the batch in micro-batches, the sparse teacher-forced
log-probs of the rollout tokens under θ + φ (exactly the engine's sparse decode, `distill.sparse_forward`) feed
L_LoRA = ppo_coef * L_PPO(sparse) + λ * KL(sparse ‖ dense), with the dense log-probs the RL step already
recomputed; one AdamW step on φ per pass; then φ is saved (peft format) and pushed to the engine, which serves
θ + φ merged. θ reaches the engine through the RL loop's own `update_weights`, which re-merges φ on top.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from distill.config import DistillConfig
from distill.lora import RolloutLora
from distill.loss import distill_loss
from distill.replan import Replanner, ReplanSettings, replan_log_path
from distill.sparse_forward import sparse_token_logprobs
from sparrow_sgl.config import ConfigError, Schedule

HELDOUT_OFFSET = 1_000_000_000  # task sample indices of the held-out prompts (never reached by a training cursor)


class DistillTrainer:
    def __init__(self, cfg: DistillConfig, train_cfg, policy: torch.nn.Module, engine, tokenizer, *,
                 heldout_prompts: list[list[int]] | None = None) -> None:
        self.cfg, self.train_cfg = cfg, train_cfg
        self.policy, self.engine, self.tokenizer = policy, engine, tokenizer
        self.lora = RolloutLora(policy, cfg)
        self.optimizer = torch.optim.AdamW(self.lora.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.schedule: Schedule = engine.resolve_schedule(train_cfg.schedule)
        self.out_dir = Path(train_cfg.out_dir) / "distill"
        self.adapter_dir = self.out_dir / "adapter"
        self.device = next(policy.parameters()).device
        self.replanner = self._build_replanner(heldout_prompts) if cfg.replan_every else None

    # -- the φ step -----------------------------------------------------------------------------------------------
    def step(self, batch, old_dense_logprobs: torch.Tensor, step: int, schedule: Schedule | None = None) -> dict:
        """Update φ on one RL batch (`RolloutBatch`); push it to the engine. Returns `distill/*` metrics.

        old_dense_logprobs: [N, L] dense log-probs of the sampled tokens aligned like the batch (k3), or the full
        log-distributions [N, L, V] (needed by kl_mode forward/reverse). `schedule`: the one the batch was rolled
        out with (default: the last one seen by `maybe_replan`, else the train config's).
        """
        cfg, tcfg = self.cfg, self.train_cfg
        schedule = schedule or self.schedule
        full = cfg.kl_mode != "k3"
        if full != (old_dense_logprobs.dim() == 3) or old_dense_logprobs.shape[:2] != batch.input_ids.shape:
            want = "[N, L, V] full log-distributions" if full else "[N, L] token log-probs"
            raise ConfigError(
                f"distill kl_mode {cfg.kl_mode!r} needs dense {want} for a batch of {tuple(batch.input_ids.shape)}, "
                f"got {tuple(old_dense_logprobs.shape)}"
            )
        start = time.perf_counter()
        num_tokens = max(float(batch.response_mask.sum()), 1.0)
        self.lora.model.train()
        sums = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "log_ratio_abs": 0.0}
        rollout_gap = 0.0  # first pass, before this call's φ steps: the trainer's sparse forward vs the rollout
        grad_norms = []
        with self.lora.frozen_base():
            for epoch in range(cfg.epochs):
                self.optimizer.zero_grad(set_to_none=True)
                for rows in torch.arange(len(batch)).split(tcfg.micro_batch_size):
                    out = self._micro_step(batch.select(rows).to(self.device), old_dense_logprobs[rows], schedule,
                                           num_tokens)
                    for key in sums:
                        sums[key] += out[key] / cfg.epochs
                    rollout_gap += out["rollout_gap"] if epoch == 0 else 0.0
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(self.lora.parameters(), _max_norm(tcfg))))
                self.optimizer.step()
        self.lora.model.eval()
        self.push()
        metrics = {f"distill/{k}": v for k, v in sums.items()}
        metrics["distill/rollout_gap"] = rollout_gap
        metrics["distill/grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["distill/seconds"] = time.perf_counter() - start
        return metrics

    def _micro_step(self, mb, dense: torch.Tensor, schedule: Schedule, num_tokens: float) -> dict:
        cfg, tcfg = self.cfg, self.train_cfg
        width = mb.input_ids.shape[1]
        dense = dense[:, :width].to(self.device)
        full = cfg.kl_mode != "k3"
        logprobs, dist = sparse_token_logprobs(
            self.lora.model, mb.input_ids, mb.prompt_lens, schedule, temperature=tcfg.temperature, keep_dist=full
        )
        dense_lp = dense.gather(-1, mb.input_ids[..., None]).squeeze(-1) if full else dense
        res = distill_loss(
            logprobs, mb.rollout_logprobs, dense_lp, mb.advantages, mb.response_mask, kl_mode=cfg.kl_mode,
            kl_coef=cfg.kl_coef, ppo_coef=cfg.ppo_coef, clip_low=tcfg.clip_low, clip_high=tcfg.clip_high,
            sparse_logdist=dist, dense_logdist=dense if full else None, num_tokens=num_tokens,
        )
        res.loss.backward()
        mask = mb.response_mask
        gap = ((logprobs.detach() - dense_lp).abs() * mask).sum() / num_tokens
        rollout_gap = ((logprobs.detach() - mb.rollout_logprobs).abs() * mask).sum() / num_tokens
        return {
            "loss": float(res.loss.detach()), "pg_loss": float(res.pg_loss), "kl": float(res.kl),
            "clip_frac": float(res.clip_frac), "log_ratio_abs": float(gap), "rollout_gap": float(rollout_gap),
        }

    def push(self) -> Path:
        """Save φ (peft format) and make the engine serve θ + φ."""
        self.lora.save(self.adapter_dir)
        self.engine.set_adapter(str(self.adapter_dir))
        return self.adapter_dir

    # -- checkpoint state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """φ, its optimizer and the re-planner's memory: what an exact resume of DistillSparse needs."""
        state = {"adapter": self.lora.adapter_state(), "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.to_dict()}
        if self.replanner is not None:
            state["replanner"] = self.replanner.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` and push φ to the engine."""
        self.lora.load_adapter_state(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule = Schedule.from_dict(state["schedule"], where="distill checkpoint state")
        if self.replanner is not None and "replanner" in state:
            self.replanner.load_state_dict(state["replanner"])
        self.push()

    # -- re-planning ----------------------------------------------------------------------------------------------
    def maybe_replan(self, step: int, schedule: Schedule, live_tails=None) -> Schedule | None:
        """Every `replan_every` steps, try a cheaper schedule (see `distill.replan`); None = keep `schedule`.

        live_tails (optional): this step's per-bin tails (`BinStat`s) of `schedule`, for the switch-back guard.
        """
        self.schedule = schedule
        if self.replanner is None:
            return None
        if live_tails is not None:
            raised = self.replanner.observe(step, live_tails)
            if raised is not None:
                self.schedule = raised
                return raised
        if step % self.cfg.replan_every:
            return None
        new, _ = self.replanner.replan(step, schedule)
        if new is not None:
            self.schedule = new
        return new

    @property
    def last_replan(self):
        return self.replanner.events[-1] if self.replanner is not None and self.replanner.events else None

    def _build_replanner(self, prompts: list[list[int]] | None) -> Replanner:
        tcfg = self.train_cfg
        if prompts is None:
            from sparrow_sgl.rl.tasks import build_task, encode_prompt

            task = build_task(tcfg.task, tcfg.task_args, tcfg.seed)
            samples = [task.sample(HELDOUT_OFFSET + i) for i in range(self.cfg.heldout_prompts)]
            prompts = [encode_prompt(self.tokenizer, s.prompt) for s in samples]
        settings = ReplanSettings(
            tau=tcfg.tau, margin=self.cfg.margin, bin_tokens=tcfg.bin_tokens, quantile=tcfg.quantile,
            max_new_tokens=tcfg.max_new_tokens, samples=self.cfg.replan_samples, candidates=self.cfg.replan_candidates,
            factor=self.cfg.replan_factor, ignore_eos=self.cfg.replan_ignore_eos, seed=tcfg.seed,
            batch=tcfg.prompts_per_step * tcfg.group_size, model=tcfg.model, hardware=tcfg.hardware,
        )
        return Replanner(self.engine, prompts, settings, log_path=str(replan_log_path(tcfg.out_dir)))


def _max_norm(train_cfg) -> float:
    clip = getattr(train_cfg, "grad_clip", 0.0)
    return clip if clip and clip > 0 else float("inf")
