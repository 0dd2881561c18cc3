"""The embedded GRPO loop: one process, one engine, one trainable policy.

step: task prompts -> n rollouts each from the engine under the current schedule -> rewards -> group-normalised
advantages -> (sparse replay for the full-vocabulary mismatch) -> dense recompute of the OLD log-probs -> TIS
weights min(pi_old / pi_rollout, C) -> PPO-clip updates (mini-batches x micro-batches) -> weight sync into the
engine -> optional DistillSparse step -> per-bin tails (TailGuard may move budgets) -> log -> checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from sparrow_sgl.config import ConfigError, EngineConfig, Schedule, check_device
from sparrow_sgl.jsonio import nearest_existing
from sparrow_sgl.rl.batch import RolloutBatch
from sparrow_sgl.rl.checkpoint import TrainState, load_checkpoint, load_component, save_checkpoint
from sparrow_sgl.rl.config import TrainConfig
from sparrow_sgl.rl.loss import group_advantages, importance_weights, ppo_clip_loss
from sparrow_sgl.rl.metrics import MetricsLog, mismatch_metrics, plot_run, predicted_speedup, rollout_metrics
from sparrow_sgl.rl.recompute import OldPolicy, recompute_old, token_logprobs
from sparrow_sgl.rl.tasks import Task, build_task, encode_prompt
from sparrow_sgl.schedule import resolve_schedule, with_bin_width


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_policy(model_dir: str, device: str = "cpu", dtype: str = "float32"):
    """The trainable dense policy: transformers' Qwen3ForCausalLM in training mode."""
    from transformers import AutoModelForCausalLM

    if not Path(model_dir).is_dir():
        raise ConfigError(f"model directory not found: {model_dir!r}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return model.to(device).train()


def build_engine(cfg: TrainConfig):
    if cfg.engine == "sglang":
        return build_sglang_engine(cfg)
    from sparrow_sgl.engine import Engine

    return Engine(
        EngineConfig(
            model=cfg.model,
            device=cfg.device,
            dtype=cfg.engine_dtype,
            page_size=cfg.page_size,
            sink_pages=cfg.sink_pages,
            local_pages=cfg.local_pages,
            scorer=cfg.scorer,
            kv_gb=cfg.kv_gb,
            seed=cfg.seed,
        )
    )


def build_sglang_engine(cfg: TrainConfig):
    """An SGLang rollout engine: `cfg.sglang_url`, or a sparrow server started on `cfg.model` (LoRA on for
    DistillSparse; log under `<out_dir>/sglang/`), whose default schedule carries the run's page geometry."""
    from sparrow_sgl.sglang.engine_adapter import SGLangEngine

    default = Schedule.dense(
        page_size=cfg.page_size, sink_pages=cfg.sink_pages, local_pages=cfg.local_pages, scorer=cfg.scorer
    )
    if cfg.sglang_url:
        return SGLangEngine(cfg.sglang_url, model=cfg.model, default_schedule=default)
    return SGLangEngine.launch(
        cfg.model,
        default,
        device=cfg.device,
        dtype=cfg.engine_dtype,
        enable_lora=cfg.distill.enabled,
        max_lora_rank=max(cfg.distill.rank, 8),
        log_dir=str(Path(cfg.out_dir) / "sglang"),
    )


def check_schedule_pages(cfg: TrainConfig) -> None:
    """The schedule resolves and its pages are the engine's (a schedule JSON carries its own page_size)."""
    schedule = resolve_schedule(cfg.schedule, page_size=cfg.page_size)
    if schedule.page_size != cfg.page_size:
        raise ConfigError(
            f"schedule {cfg.schedule!r} uses {schedule.page_size}-token pages but the config has page_size "
            f"{cfg.page_size}; set page_size: {schedule.page_size} (or --set page_size={schedule.page_size})"
        )


def small_budget_ladder(schedule: Schedule, above: int = 512) -> list[int]:
    """Budgets doubling from the schedule's smallest (a page multiple) up to `above` tokens (the paper grid's
    smallest), so that a TailGuard raise on a short-context schedule (the CPU demo's 48 tokens) takes a step, not
    a jump to 512 tokens."""
    page = schedule.page_size
    budget = min((b for b in schedule.budgets if b is not None), default=above)
    ladder = []
    while budget < above:
        ladder.append(budget)
        budget = -(-2 * budget // page) * page
    return ladder


class Timer(dict):
    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[f"timing/{name}"] = self.get(f"timing/{name}", 0.0) + time.perf_counter() - start


def check_out_dir(out_dir: Path) -> None:
    """The run directory can be created (or is one): refused before any model loads, not after."""
    blocker = nearest_existing(out_dir)
    if not blocker.is_dir():
        raise ConfigError(f"out_dir {out_dir}: {blocker} is a file, not a directory")


class Trainer:
    def __init__(self, cfg: TrainConfig, *, engine=None, policy=None, task: Task | None = None) -> None:
        if not cfg.model and (engine is None or policy is None):
            raise ConfigError("train config needs `model`: a local HF model directory")
        seed_everything(cfg.seed)
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.device = torch.device(cfg.device)
        # task and schedule errors surface before the policy, the engine and its KV pool are built
        self.task = task if task is not None else build_task(cfg.task, cfg.task_args, cfg.seed)
        check_schedule_pages(cfg)
        check_device(cfg.device)
        check_out_dir(self.out_dir)
        self.policy = policy if policy is not None else load_policy(cfg.model, cfg.device, cfg.dtype)
        self.engine = engine if engine is not None else build_engine(cfg)
        self.tokenizer = self.engine.tokenizer
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.schedule: Schedule = self._adopt_bins(self.engine.resolve_schedule(cfg.schedule))
        self.guard = self._build_guard() if cfg.tailguard else None
        self.distill = self._build_distill() if cfg.distill.enabled else None
        self.step, self.cursor = 0, 0
        self.extra: dict = {}  # survives checkpoints: noise floor done, dense throughput reference
        self._log: MetricsLog | None = None
        self._resumed = False

    @property
    def log(self) -> MetricsLog:
        """Opened on first use: a fresh run starts new files, a resumed one drops the steps it will redo."""
        if self._log is None:
            self._log = MetricsLog(self.out_dir, resume_step=self.step if self._resumed else None)
            self._log.event(self.step, "schedule", schedule=self.schedule.describe())
        return self._log

    # -- setup ----------------------------------------------------------------------------------------------------
    def _lr_factor(self, opt_step: int) -> float:
        cfg = self.cfg
        warm = min(1.0, (opt_step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.lr_schedule == "cosine":
            total = max(cfg.steps * cfg.mini_batches, 1)
            return warm * 0.5 * (1.0 + math.cos(math.pi * min(opt_step, total) / total))
        return warm

    def _build_guard(self):
        try:
            from sparrow_sgl.tailguard import TailGuard
        except ImportError as e:
            raise ConfigError(f"tailguard: true needs sparrow_sgl.tailguard.TailGuard, not in this build ({e})") from e
        from sparrow_sgl.calibrate import paper_budget_grid

        return TailGuard(self.schedule, tau=self.cfg.tau, grid=paper_budget_grid() + small_budget_ladder(self.schedule))

    def _adopt_bins(self, schedule: Schedule) -> Schedule:
        """A one-budget schedule takes the run's bin width (it changes nothing for the budget, but the TailGuard
        compares live tails per bin with it); a multi-bin schedule must already use it."""
        schedule = with_bin_width(schedule, self.cfg.bin_tokens)
        if schedule.bin_tokens != self.cfg.bin_tokens and self.cfg.tailguard:
            raise ConfigError(
                f"schedule {schedule.name!r} has {schedule.bin_tokens}-token bins but bin_tokens is "
                f"{self.cfg.bin_tokens}: the TailGuard needs both equal"
            )
        return schedule

    def _build_distill(self):
        try:
            from distill.trainer import DistillTrainer
        except ImportError as e:
            raise ConfigError(f"distill.enabled needs distill.trainer.DistillTrainer, not in this build ({e})") from e
        return DistillTrainer(self.cfg.distill, self.cfg, self.policy, self.engine, self.tokenizer)

    def close(self) -> None:
        """Release the rollout engine's resources (an SGLang server this run started goes down)."""
        if hasattr(self.engine, "close"):
            self.engine.close()

    # -- resume / save --------------------------------------------------------------------------------------------
    def resume(self, path: str | Path) -> int:
        """Restore weights, optimizer, LR schedule, RNG, cursor, schedule and guard; sync the engine."""
        state, _, ckpt = load_checkpoint(path, self.policy, self.optimizer, self.lr_scheduler)
        self.step, self.cursor, self.extra = state.step, state.cursor, dict(state.extra)
        if state.schedule is not None:
            self.schedule = Schedule.from_dict(state.schedule, where=f"checkpoint {ckpt}")
        if self.guard is not None and state.guard is not None:
            self.guard.load_state_dict(state.guard)
        self.engine.update_weights(self.policy.state_dict())
        self._resumed, self._log = True, None
        distill_state = load_component(ckpt, "distill") if self.distill is not None else None
        if distill_state is not None:
            self.distill.load_state_dict(distill_state)  # pushes φ to the engine, on top of the restored θ
        self.log.event(self.step, "resume", checkpoint=str(ckpt),
                       distill_state=None if self.distill is None else distill_state is not None)
        return self.step

    def save(self) -> Path:
        state = TrainState(
            step=self.step,
            cursor=self.cursor,
            schedule=self.schedule.to_dict(),
            guard=self.guard.state_dict() if self.guard is not None else None,
            extra=self.extra,
        )
        return save_checkpoint(
            self.out_dir / "checkpoints",
            state,
            self.policy,
            self.optimizer,
            self.lr_scheduler,
            config=self.cfg.to_dict(),
            keep_last=self.cfg.keep_last,
            components={"distill": self.distill.state_dict()} if self.distill is not None else None,
            tokenizer=self.tokenizer,
        )

    # -- the loop ---------------------------------------------------------------------------------------------------
    def train(self, steps: int | None = None) -> list[dict]:
        """Run until `steps` (default cfg.steps) steps are done in total; returns this call's step records."""
        from tqdm.auto import tqdm

        target = self.cfg.steps if steps is None else steps
        records = []
        bar = tqdm(total=target, initial=self.step, desc="grpo", unit="step", disable=not self.cfg.progress)
        try:
            while self.step < target:
                metrics = self.train_step()
                records.append(metrics)
                bar.update(1)
                tail = metrics.get("sparse/tail_p5/min")
                bar.set_postfix_str(
                    f"reward {metrics['rollout/reward_mean']:.3f}, tail_p5 {'-' if tail is None else f'{tail:.3f}'}, "
                    f"step {metrics['timing/step']:.1f} s"
                )
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self.save()
        finally:
            bar.close()
        if records and not (self.cfg.save_every and self.step % self.cfg.save_every == 0):
            self.save()
        if self.cfg.plot:
            plot_run(self.log.records(), self.out_dir / "plots", tau=self.cfg.tau, bin_tokens=self.cfg.bin_tokens)
        return records

    def train_step(self) -> dict:
        cfg, timer = self.cfg, Timer()
        start = time.perf_counter()
        samples = [self.task.sample(self.cursor + i) for i in range(cfg.prompts_per_step)]
        prompts = [encode_prompt(self.tokenizer, s.prompt) for s in samples]
        metrics: dict = {}
        if cfg.noise_floor and not self.extra.get("noise_floor_done") and not self.schedule.is_dense:
            metrics.update(self._noise_floor(prompts))
        with timer("rollout"):
            rollouts = self.engine.generate(prompts, self._sampling_params(), self.schedule, progress=False)
        rollout_tokens = sum(len(r.token_ids) for r in rollouts)
        with timer("reward"):
            rewards = [self.task.score(r.text or "", samples[r.prompt_index]) for r in rollouts]
        batch = self._make_batch(rollouts, rewards)
        with timer("recompute"):
            old = self._old_policy(batch, timer)
        weights = importance_weights(
            old.logprobs,
            batch.rollout_logprobs,
            batch.response_mask,
            cfg.tis_cap,
            cfg.icepop,
            cfg.icepop_low,
            cfg.icepop_high,
        )
        with timer("train"):
            metrics.update(self._update(batch, old, weights.weights))
        with timer("sync"):
            self.engine.update_weights(self.policy.state_dict())
        metrics.update(self._rollout_metrics(batch, rollouts, rollout_tokens / max(timer["timing/rollout"], 1e-9)))
        mismatch, stats = self._mismatch_metrics(batch, old, weights)
        metrics.update(mismatch)
        if self.distill is not None:
            with timer("distill"):
                metrics.update(self._distill_step(batch, old, stats))
        if self.schedule.is_dense and cfg.noise_floor and not self.extra.get("noise_floor_done"):
            metrics.update(self._noise_floor_from(mismatch, rollout_tokens / max(timer["timing/rollout"], 1e-9)))
        self.step += 1
        self.cursor += cfg.prompts_per_step
        self._update_guard(stats, metrics)
        metrics.update(timer)
        metrics["timing/step"] = time.perf_counter() - start
        self.log.log(self.step, metrics)
        return {"step": self.step, **metrics}

    # -- pieces ---------------------------------------------------------------------------------------------------
    def _sampling_params(self, n: int | None = None):
        from sparrow_sgl.engine import SamplingParams

        cfg = self.cfg
        return SamplingParams(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            n=n or cfg.group_size,
            seed=cfg.seed * 1_000_003 + self.step,  # a pure function of the step: resume redoes the same rollouts
            logprobs_topk=cfg.topk if cfg.mismatch == "topk" else 0,
        )

    def _make_batch(self, rollouts, rewards) -> RolloutBatch:
        rewards_t = torch.tensor(rewards, dtype=torch.float32)
        groups = torch.tensor([r.prompt_index for r in rollouts], dtype=torch.long)
        advantages = group_advantages(rewards_t, groups)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return RolloutBatch.from_rollouts(
            rollouts, rewards_t, advantages, pad_id=pad, with_topk=self.cfg.mismatch == "topk"
        )

    def _old_policy(self, batch: RolloutBatch, timer: Timer, schedule: Schedule | None = None) -> OldPolicy:
        """Dense log-probs before the update, and the acceptance rate against the rollout's distributions."""
        cfg = self.cfg
        dists = None
        if cfg.mismatch == "full":
            with timer("score"):  # replay the rollout's own decode to get the distributions it sampled from
                results = self.engine.score(
                    [batch.prompt_ids(i) for i in range(len(batch))],
                    [batch.response_ids(i) for i in range(len(batch))],
                    sparse=schedule or self.schedule,
                    return_full=True,
                    temperature=cfg.temperature,
                )
            dists = [r.full_logprobs for r in results]
        keep_dist = self.distill is not None and cfg.distill.kl_mode != "k3"  # full-vocabulary KL needs them
        return recompute_old(
            self.policy,
            batch,
            cfg.micro_batch_size,
            cfg.temperature,
            dists,
            topk=cfg.mismatch == "topk",
            keep_dist=keep_dist,
        )

    def _update(self, batch: RolloutBatch, old: OldPolicy, is_weights: torch.Tensor) -> dict:
        cfg, policy = self.cfg, self.policy
        policy.train()
        sums = {"loss": 0.0, "pg_loss": 0.0, "clip_frac": 0.0, "ratio_mean": 0.0, "entropy": 0.0}
        grad_norms = []
        rows = torch.arange(len(batch))
        for mini in rows.chunk(cfg.mini_batches):
            num_tokens = max(float(batch.response_mask[mini].sum()), 1.0)
            self.optimizer.zero_grad(set_to_none=True)
            for micro in mini.split(cfg.micro_batch_size):
                mb = batch.select(micro).to(self.device)
                width = mb.input_ids.shape[1]
                out = token_logprobs(
                    policy, mb.input_ids, mb.attention_mask, cfg.temperature, entropy_grad=cfg.entropy_coef > 0
                )
                res = ppo_clip_loss(
                    out.logprobs,
                    old.logprobs[micro, :width].to(self.device),
                    mb.advantages,
                    mb.response_mask,
                    is_weights=is_weights[micro, :width].to(self.device),
                    clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high,
                    entropy=out.entropy,
                    entropy_coef=cfg.entropy_coef,
                    num_tokens=num_tokens,
                )
                res.loss.backward()
                for key in sums:
                    sums[key] += float(torch.as_tensor(getattr(res, key)).detach()) / cfg.mini_batches
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)))
            self.optimizer.step()
            self.lr_scheduler.step()
        out = {f"train/{k}": v for k, v in sums.items()}
        out["train/grad_norm"] = float(np.mean(grad_norms))
        out["train/lr"] = self.lr_scheduler.get_last_lr()[0]
        return out

    def _distill_step(self, batch: RolloutBatch, old: OldPolicy, live_tails) -> dict:
        """DistillSparse φ step every `distill.every` steps (θ is already updated and synced), then re-planning."""
        step = self.step + 1
        out = {}
        if step % self.cfg.distill.every == 0:
            dense = old.log_dist if self.cfg.distill.kl_mode != "k3" else old.logprobs
            out = dict(self.distill.step(batch, dense, step, schedule=self.schedule))
        new = self.distill.maybe_replan(step, self.schedule, live_tails=live_tails)
        if new is not None and new.budgets != self.schedule.budgets:
            self.log.event(step, "replan", old=self.schedule.describe(), new=new.describe())
            self.schedule = new
            if self.guard is not None:
                self.guard = self._build_guard()
        return out

    def _rollout_metrics(self, batch: RolloutBatch, rollouts, tokens_per_s: float) -> dict:
        out = rollout_metrics(batch, rollouts, tokens_per_s)
        dense_rate = self.extra.get("dense_tokens_per_s")
        if dense_rate:
            out["sparse/speedup_measured"] = tokens_per_s / dense_rate
        predicted = predicted_speedup(self.schedule, batch, self.cfg.model, self.cfg.hardware)
        if predicted is not None:
            out["sparse/speedup_predicted"] = predicted
        return out

    def _mismatch_metrics(self, batch: RolloutBatch, old: OldPolicy, weights) -> tuple[dict, list | None]:
        return mismatch_metrics(batch, old, weights, self.cfg.bin_tokens, self.cfg.quantile, self.cfg.tau)

    def _noise_floor(self, prompts) -> dict:
        """Once per run: a dense rollout of the same prompts against the trainer — the numerics-only tail."""
        timer = Timer()
        dense = dataclasses.replace(self.schedule, budgets=[None], name="dense")
        with timer("rollout"):
            rollouts = self.engine.generate(prompts, self._sampling_params(), dense, progress=False)
        tokens = sum(len(r.token_ids) for r in rollouts)
        batch = self._make_batch(rollouts, [0.0] * len(rollouts))
        old = self._old_policy(batch, timer, schedule=dense)
        weights = importance_weights(old.logprobs, batch.rollout_logprobs, batch.response_mask, self.cfg.tis_cap)
        metrics, _ = self._mismatch_metrics(batch, old, weights)
        floor = self._noise_floor_from(metrics, tokens / max(timer["timing/rollout"], 1e-9))
        floor["timing/noise_floor"] = sum(timer.values())
        return floor

    def _noise_floor_from(self, metrics: dict, dense_tokens_per_s: float) -> dict:
        """`sparse/noise_floor/*` copies of a dense rollout's tails; logged once per run as an event too."""
        floor = {
            k.replace("sparse/", "sparse/noise_floor/", 1): v
            for k, v in metrics.items()
            if k.startswith("sparse/tail_p") or k in ("sparse/alpha_mean", "sparse/is_truncated_frac")
        }
        self.extra.update(noise_floor_done=True, dense_tokens_per_s=dense_tokens_per_s)
        self.log.event(self.step, "noise_floor", mismatch=self.cfg.mismatch, **floor)
        return floor

    def _update_guard(self, stats, metrics: dict) -> None:
        if self.guard is None or stats is None:
            return
        for e in self.guard.update(self.step, stats):
            self.log.event(self.step, "tailguard", **{k: v for k, v in e.to_dict().items() if k != "step"})
        if self.guard.budgets != self.schedule.budgets:
            self.schedule = self.guard.schedule
        metrics["sparse/schedule_budget_max"] = max((b or 0) for b in self.schedule.budgets)
