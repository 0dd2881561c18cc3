"""DistillSparse inside OpenRLHF: the `distill/` φ step on the actor group after each policy update.

Patched into every Ray worker (patches.apply_worker), on plain classes (the @ray.remote actor classes are shipped
by value from the driver, so patches of their own methods do not reach the actors):
- `ActorPPOTrainer.ppo_train` (ppo_actor.py:153): after OpenRLHF's θ update, while the replay buffer still holds the
  step's experiences (`PolicyModelActor.fit` clears it afterwards), `DistillTrainer.step` trains φ with θ frozen on
  those experiences: sparse teacher-forced log-probs under θ + φ (the engines' schedule) against the rollout's own
  log-probs (PPO) and the dense log-probs OpenRLHF already computed (`action_log_probs`, k3 KL). φ is saved and
  every engine serves θ + φ (`set_adapter`); the weight sync that follows sends θ alone (the trainer's policy never
  holds φ) and the engines merge φ on top again. Every `--sparrow.distill.replan_every` steps the re-planner
  (`distill.replan`) measures a cheaper schedule on engine 0 and, when it holds, the engines switch to it; after a
  switch its TailGuard watches the live tails (tails.py, `--sparrow.topk`) and raises failing bins. Metrics
  (`sparrow/distill_*`: the `distill/` trainer's loss, kl, rollout_gap, ...; `budget_max` in tokens; on a re-plan
  step `replan_action` 1 switch / 0 hold / -1 revert / 2 guard raise, `replan_tail_min`, `speedup_predicted`) join
  OpenRLHF's status, logged as `train/sparrow/distill_*` next to `sparrow/tail_bin_*`; events go to
  `distill/replan.jsonl`.
- `DeepspeedStrategy.save_ckpt` / `load_ckpt` (deepspeed.py:685,766): φ, its optimizer, the re-planner and the step
  count go into the actor checkpoint's tag dir (`sparrow_distill.pt`); with `--ckpt.load_enable` they come back and
  φ goes to the engines before OpenRLHF's resume sync (ppo_trainer.py:515).
Data-parallel ranks keep one φ: rank 0's initial φ is broadcast, gradients are averaged before each φ step (after
each rank clipped its own), rank 0 alone talks to the engines and re-plans (its decision is broadcast). Checked once
by hand on CPU with 2 DeepSpeed ranks (both ranks' φ identical after a step); the tests run one rank.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from sparrow_sgl.mismatch import BinStat
from sparrow_sgl.openrlhf.engine_group import EngineGroup

STATE_FILE = "sparrow_distill.pt"
PREFIX = "sparrow/distill_"
REPLAN_ACTIONS = {"hold": 0.0, "switch": 1.0, "revert": -1.0, "guard": 2.0}

_hook: DistillHook | None = None
_resume_dir: Path | None = None  # the actor checkpoint dir `load_ckpt` restored (this process)


@dataclass
class RunConfig:
    """The fields `DistillTrainer` reads from the embedded trainer's TrainConfig, taken from OpenRLHF's args."""

    schedule: dict
    out_dir: str
    micro_batch_size: int
    temperature: float
    clip_low: float
    clip_high: float
    grad_clip: float
    tau: float
    bin_tokens: int
    quantile: float
    max_new_tokens: int
    seed: int
    prompts_per_step: int
    group_size: int
    model: str
    hardware: str = "h100"

    @classmethod
    def from_args(cls, args, sparrow, schedule: dict, out_dir: str) -> RunConfig:
        low, high = args.actor.eps_clip_low_high
        return cls(
            schedule=schedule, out_dir=out_dir, micro_batch_size=args.train.micro_batch_size,
            temperature=args.rollout.temperature, clip_low=low, clip_high=high, grad_clip=args.actor.max_norm,
            tau=sparrow.tau, bin_tokens=sparrow.bin_tokens, quantile=sparrow.quantile,
            max_new_tokens=args.rollout.max_new_tokens, seed=args.train.seed, prompts_per_step=args.rollout.batch_size,
            group_size=args.rollout.n_samples_per_prompt, model=args.actor.model_name_or_path,
        )


class DistillHook:
    """One per actor process: the DistillTrainer over this rank's policy, and the engines it pushes φ to."""

    def __init__(self, trainer, heldout: list[list[int]], state: dict | None = None) -> None:
        from distill.trainer import DistillTrainer
        from sparrow_sgl.openrlhf.flags import from_hierarchical

        args = trainer.strategy.args
        sparrow = from_hierarchical(args)[0]
        self.cfg, self.owner, self.heldout, self.step = sparrow.distill, trainer, heldout, 0
        self.bin_tokens = sparrow.bin_tokens  # the live tails' bin width (tails.py)
        self.rank, world = _rank_world()
        self.engines = EngineGroup(args.vllm.num_engines, sparrow.sync_timeout, sparrow.bin_tokens, self.rank == 0)
        out_dir = sparrow.out_dir if self.rank == 0 else str(Path(sparrow.out_dir) / f"rank{self.rank}")
        run = RunConfig.from_args(args, sparrow, self.engines.current_schedule().to_dict(), out_dir)
        self.pad_id = trainer.tokenizer.pad_token_id or 0
        self.distill = DistillTrainer(self.cfg, run, trainer.actor.model.module, self.engines, trainer.tokenizer,
                                      heldout_prompts=heldout)
        if world > 1:
            _share_lora(self.distill)
        if state is not None:
            self.load_state_dict(state)

    def served_model(self) -> torch.nn.Module:
        """θ + φ as the engines serve it (dense attention): what the weight-sync canary is compared with."""
        return self.distill.lora.model

    def after_policy_update(self, items: list) -> dict:
        """The φ step (every `distill.every` steps) and re-planning on this step's experiences; returns metrics."""
        self.step += 1
        logs = {}
        if self.step % self.cfg.every == 0:
            batch, dense = experience_batch(items, self.pad_id)
            metrics = self.distill.step(batch, dense, self.step, schedule=self.distill.schedule)
            logs.update({PREFIX + k.removeprefix("distill/"): float(v) for k, v in metrics.items()})
        same_bins = self.bin_tokens == self.distill.schedule.bin_tokens  # else the guard could not compare them
        logs.update(self._replan(live_tails(items, self.bin_tokens) if same_bins else None))
        logs[PREFIX + "budget_max"] = float(max((b or 0) for b in self.distill.schedule.budgets))
        return logs

    def _replan(self, live: dict | None) -> dict:
        if not self.cfg.replan_every:
            return {}
        old = self.distill.schedule
        new = self.distill.maybe_replan(self.step, old, live_tails=live) if self.rank == 0 else None
        new = _from_rank0(None if new is None else new.to_dict())
        if new is None:
            self.distill.schedule = old
        else:
            self.distill.schedule = self.engines.resolve_schedule(new)
            self.engines.set_schedule(self.distill.schedule)
        event = self.distill.last_replan if self.rank == 0 else None
        if event is None or event.step != self.step:
            return {}
        logs = {PREFIX + "replan_action": REPLAN_ACTIONS.get(event.action, -2.0)}
        measured = [t for t in event.tails.values() if t is not None]  # lowest bin tail of any schedule it measured
        if measured:
            logs[PREFIX + "replan_tail_min"] = min(measured)
        if event.speedup_new is not None:
            logs[PREFIX + "speedup_predicted"] = event.speedup_new
        return logs

    # -- checkpoint state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "heldout": self.heldout, "distill": self.distill.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """φ, optimizer, re-planner and step count; φ and the schedule go to the engines."""
        self.step = int(state["step"])
        self.distill.load_state_dict(state["distill"])  # pushes φ to the engines
        if self.distill.schedule.budgets != self.engines.current_schedule().budgets:
            self.engines.set_schedule(self.distill.schedule)


# -- OpenRLHF experiences -> the embedded trainer's batch ---------------------------------------------------------
def experience_batch(items: list, pad_id: int = 0):
    """Replay-buffer items (one unpadded sample each) -> (`RolloutBatch`, dense log-probs [N, L]).

    OpenRLHF's per-action tensors are right-aligned to the sequence: action column j is token j + 1. The batch's
    token-aligned layout puts a token's value in its own column (column 0 is never an action)."""
    from sparrow_sgl.rl.batch import RolloutBatch

    n, width = len(items), max(int(it.sequences.numel()) for it in items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros(n, width, dtype=torch.bool)
    per_token = {k: torch.zeros(n, width) for k in ("response", "rollout", "advantages", "dense")}
    for i, it in enumerate(items):
        if it.rollout_log_probs is None:
            raise ValueError("DistillSparse needs the rollout log-probs: set --algo.advantage.is_correction_level")
        t = int(it.sequences.numel())
        input_ids[i, :t] = it.sequences.flatten()
        attention[i, :t] = it.attention_mask.flatten().bool()
        for key, value in (("response", it.action_mask), ("rollout", it.rollout_log_probs),
                           ("advantages", it.advantages), ("dense", it.action_log_probs)):
            value = value.flatten().float()
            per_token[key][i, t - value.numel() : t] = value
    response = per_token["response"].bool() & attention
    has = response.any(dim=1)
    prompt_lens = torch.where(has, response.float().argmax(dim=1), attention.sum(dim=1)).clamp(min=1)
    response_lens = response.sum(dim=1)
    batch = RolloutBatch(
        input_ids=input_ids, attention_mask=attention, response_mask=response,
        rollout_logprobs=per_token["rollout"] * response, advantages=per_token["advantages"] * response,
        positions=torch.arange(width).expand(n, width).clone(), group_ids=torch.arange(n),
        rewards=torch.zeros(n), prompt_lens=prompt_lens, response_lens=response_lens,
    )
    return batch, per_token["dense"] * response


def live_tails(items: list, bin_tokens: int) -> dict[int, BinStat] | None:
    """This step's per-bin tails as tails.py measured them (`--sparrow.topk`, bins of `--sparrow.bin_tokens`), read
    back from the experiences' info: what the re-planner's TailGuard watches after a switch. None without tails."""
    info = items[0].info if items else {}
    out = {}
    for key, tail in info.items():
        i = key.removeprefix("sparrow/tail_bin_")
        if i != key and f"sparrow/tail_tokens_{i}" in info:
            count = int(float(info[f"sparrow/tail_tokens_{i}"]))
            out[int(i)] = BinStat(int(i) * bin_tokens, (int(i) + 1) * bin_tokens, count, float(tail), None)
    return out or None


def heldout_prompts(items: list, count: int) -> list[list[int]]:
    """The re-planner's measuring prompts: the first `count` distinct prompts of the first distilled batch."""
    batch, _ = experience_batch(items)
    seen: dict[tuple, None] = {}
    for i in range(len(batch)):
        seen.setdefault(tuple(batch.prompt_ids(i)), None)
    return [list(p) for p in list(seen)[:count]]


# -- process state ------------------------------------------------------------------------------------------------
def _enabled(trainer) -> bool:
    sparrow = getattr(trainer.strategy.args, "sparrow", None)
    return bool(sparrow is not None and sparrow.distill.enabled)


def current(trainer, items: list | None = None) -> DistillHook | None:
    """This process's hook: created on first use from the resumed checkpoint's state, else from `items`; None
    while neither exists (φ is still zero: the engines serve θ)."""
    global _hook
    if not _enabled(trainer):
        return None
    if _hook is not None and _hook.owner is trainer:
        return _hook
    state = load_state(_resume_dir)
    if state is None and not items:
        return None
    count = trainer.strategy.args.sparrow.distill.heldout_prompts
    heldout = state["heldout"] if state is not None else heldout_prompts(items, count)
    _hook = DistillHook(trainer, heldout, state)
    return _hook


def load_state(ckpt_dir: Path | None) -> dict | None:
    path = Path(ckpt_dir) / STATE_FILE if ckpt_dir is not None else None
    return torch.load(path, map_location="cpu", weights_only=True) if path is not None and path.is_file() else None


def _latest_tag(ckpt_dir: str) -> str:
    return (Path(ckpt_dir) / "latest").read_text().strip()


# -- the patches ----------------------------------------------------------------------------------------------------
def patch() -> None:
    import openrlhf.trainer.ray.ppo_actor as ppo_actor
    import openrlhf.utils.deepspeed.deepspeed as ds

    cls = ppo_actor.ActorPPOTrainer
    if getattr(cls, "_sparrow_distill_patched", False):
        return
    cls.ppo_train = _ppo_train(cls.ppo_train)
    ds.DeepspeedStrategy.save_ckpt = _save_ckpt(ds.DeepspeedStrategy.save_ckpt)
    ds.DeepspeedStrategy.load_ckpt = _load_ckpt(ds.DeepspeedStrategy.load_ckpt)
    cls._sparrow_distill_patched = True


def _ppo_train(original):
    @functools.wraps(original)
    def ppo_train(self, kl_ctl: float):
        status = original(self, kl_ctl)
        items = self.replay_buffer.items
        hook = current(self, items) if items else None
        if hook is not None:
            status.update(hook.after_policy_update(items))
        return status

    return ppo_train


def _save_ckpt(original):
    @functools.wraps(original)
    def save_ckpt(self, model, save_dir, tag=None, *args, **kwargs):
        out = original(self, model, save_dir, tag, *args, **kwargs)
        if _hook is not None and Path(save_dir).name == "_actor" and self.is_rank_0():
            target = Path(save_dir) / (tag or _latest_tag(save_dir)) / STATE_FILE
            torch.save(_hook.state_dict(), target)
        return out

    return save_ckpt


def _load_ckpt(original):
    @functools.wraps(original)
    def load_ckpt(self, model, load_dir, tag=None, *args, **kwargs):
        global _resume_dir
        load_path, states = original(self, model, load_dir, tag, *args, **kwargs)
        if load_path is not None and Path(load_dir).name == "_actor":
            _resume_dir = Path(load_dir) / (tag or _latest_tag(load_dir))
        return load_path, states

    return load_ckpt


# -- data-parallel ranks ------------------------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share_lora(distill) -> None:
    """Every rank starts from rank 0's φ and averages φ's gradients before each optimizer step."""
    import torch.distributed as dist

    params = distill.lora.parameters()
    for p in params:
        dist.broadcast(p.data, src=0)

    def average(optimizer, args, kwargs):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
            offset += g.numel()

    distill.optimizer.register_step_pre_hook(average)


def _from_rank0(obj):
    """Rank 0's value on every rank (the re-planner's decision)."""
    _, world = _rank_world()
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
