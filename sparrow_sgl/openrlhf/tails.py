"""Tails inside OpenRLHF: the rollout's top-k travel with each sample, the trainer's forward measures the acceptance
rate against its dense top-k in the same pass, the per-bin tail is logged next to `vllm_kl`, and TailGuard moves the
engines' schedule between steps.

Path of the data (OpenRLHF 0.11.2):
- the rollout actor puts `[ids, logprobs]` per generated token in the response dict (`sparrow_topk`);
- `SamplesGenerator._process_response_into_experience` (samples_generator.py:243) keeps it as `info["sparrow_topk"]`
  (a one-element list: `Experience.concat_experiences` chains lists, so it survives micro-batching);
- `RemoteExperienceMaker.make_experience` (experience_maker.py:113) pops it and hands it to the actor group's
  `sparrow_forward` (`_dispatch_forward`), which returns `(action_log_probs, alpha per token)` from one forward;
  `_flatten_results` unwraps that again;
- the batch's per-bin q-quantile of alpha (`sparrow_sgl.mismatch.tail_by_bin`, the embedded trainer's statistic)
  goes into every sample's `info` as `sparrow/tail_bin_<i>` (with its token count `sparrow/tail_tokens_<i>`),
  `sparrow/tail_min`, ... (logged as `train/...`; DistillSparse's re-planner reads them back, distill_hook.py);
- with `--sparrow.guard`, the same wrapper feeds those tails to a TailGuard (guard.py), which sends a changed
  schedule to every engine before the next rollout.
"""

from __future__ import annotations

import functools
import logging

import torch

from sparrow_sgl.mismatch import BinStat, acceptance_rate_vs_dense_topk, min_tail, tail_by_bin
from sparrow_sgl.openrlhf.rollout_actor import TOPK_KEY

log = logging.getLogger(__name__)


# -- the statistic ---------------------------------------------------------------------------------------------
def token_alpha(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Acceptance rate per generated token: dense top-k (k = the rollout's) vs the rollout's top-k, as the embedded
    trainer computes it (`rl/recompute.py` `_alpha`). logits [T, V]: the rows that predict the T tokens, already
    divided by the temperature."""
    dense = torch.log_softmax(logits.float(), dim=-1)
    return acceptance_rate_vs_dense_topk(dense, topk_ids.to(dense.device), topk_logprobs.to(dense.device))


def experience_alpha(logits: torch.Tensor, action_mask: torch.Tensor, topk: list) -> list[tuple]:
    """Per sample of one (right-padded) Experience: (alpha [T], absolute positions [T]) of its generated tokens.
    Action column j is token j + 1, predicted by logits row j."""
    out = []
    for i, entry in enumerate(topk):
        if entry is None:
            out.append((torch.empty(0), torch.empty(0, dtype=torch.long)))
            continue
        ids, lps = torch.as_tensor(entry[0], dtype=torch.long), torch.as_tensor(entry[1], dtype=torch.float32)
        cols = torch.nonzero(action_mask[i]).flatten()
        first, count = int(cols[0]) if len(cols) else 0, min(len(ids), len(cols))
        rows = logits[i, first : first + count]
        out.append((token_alpha(rows, ids[:count], lps[:count]).cpu(), torch.arange(first, first + count) + 1))
    return out


def tail_logs(alphas: list[torch.Tensor], positions: list[torch.Tensor], bin_tokens: int, quantile: float,
              tau: float) -> tuple[dict[str, float], list[BinStat]]:
    alpha, pos = torch.cat(alphas) if alphas else torch.empty(0), torch.cat(positions) if positions else torch.empty(0)
    stats = tail_by_bin(alpha, pos, bin_tokens=bin_tokens, q=quantile)
    logs = {f"sparrow/tail_bin_{i}": s.tail for i, s in enumerate(stats) if s.tail is not None}
    logs.update({f"sparrow/tail_tokens_{i}": float(s.count) for i, s in enumerate(stats) if s.tail is not None})
    lowest = min_tail(stats)
    if lowest is not None:
        logs["sparrow/tail_min"] = lowest
        logs["sparrow/alpha_mean"] = float(alpha[~torch.isnan(alpha)].mean())
        logs["sparrow/bins_below_tau"] = float(sum(1 for s in stats if s.tail is not None and s.tail < tau))
    return logs, stats


# -- the patches -------------------------------------------------------------------------------------------------
def patch() -> None:
    import openrlhf.trainer.ppo_utils.experience_maker as em
    import openrlhf.trainer.ppo_utils.samples_generator as sg
    import openrlhf.trainer.ray.launcher as launcher

    if getattr(sg.SamplesGenerator, "_sparrow_patched", False):
        return
    generator = sg.SamplesGenerator
    generator._process_response_into_experience = _keep_topk(generator._process_response_into_experience)
    em.RemoteExperienceMaker.make_experience = _measure(em.RemoteExperienceMaker.make_experience)
    em.RemoteExperienceMaker._dispatch_forward = _pass_topk(em.RemoteExperienceMaker._dispatch_forward)
    em.RemoteExperienceMaker._flatten_results = _unwrap(em.RemoteExperienceMaker._flatten_results)
    # A new method on the plain base class: Ray ships the @ray.remote PolicyModelActor class itself by value from the
    # driver, so a patch of its own `forward` does not reliably reach the actor; its base class is imported (and
    # patched by the setup hook) in every worker.
    launcher.BaseModelActor.sparrow_forward = forward_with_alpha
    sg.SamplesGenerator._sparrow_patched = True


def _keep_topk(original):
    @functools.wraps(original)
    def process(self, response, **kwargs):
        experience = original(self, response, **kwargs)
        if response.get(TOPK_KEY) is not None:
            experience.info[TOPK_KEY] = [response[TOPK_KEY]]
        return experience

    return process


def _measure(original):
    @functools.wraps(original)
    def make_experience(self, samples_list):
        self._sparrow_topk = [s.info.pop(TOPK_KEY, None) for s in samples_list]
        if all(t is None for t in self._sparrow_topk):
            self._sparrow_topk = None
        self._sparrow_alpha = []
        try:
            samples_list = original(self, samples_list)
        finally:
            self._sparrow_topk = None
        if self._sparrow_alpha:
            sparrow = self.strategy.args.sparrow
            pairs = [p for per_exp in self._sparrow_alpha for p in per_exp]
            logs, stats = tail_logs([a for a, _ in pairs], [p for _, p in pairs], sparrow.bin_tokens,
                                    sparrow.quantile, sparrow.tau)
            if sparrow.guard:
                from sparrow_sgl.openrlhf.guard import guard_step

                logs.update(guard_step(self, stats))
            for s in samples_list:  # one batch statistic: every sample carries it, so OpenRLHF's mean is it
                s.info.update({k: torch.full((len(s.sequences),), float(v)) for k, v in logs.items()})
            self.sparrow_last_stats = stats
        return samples_list

    return make_experience


def _pass_topk(original):
    @functools.wraps(original)
    def dispatch(self, group, sync_condition, **kwargs):
        if group is not self.actor_model_group or getattr(self, "_sparrow_topk", None) is None:
            return original(self, group, sync_condition, **kwargs)
        # experience_maker.py:100-106 with the actor's forward that also measures the acceptance rate
        import ray

        ref = group.async_run_method_batch(method_name="sparrow_forward", sparrow_topk=self._sparrow_topk, **kwargs)
        if sync_condition:
            ray.get(ref)
            ray.get(group.async_run_method(method_name="empty_cache"))
        return ref

    return dispatch


def _unwrap(original):
    @functools.wraps(original)
    def flatten(self, refs, duplicate_factor):
        results = original(self, refs, duplicate_factor)
        if any(isinstance(r, tuple) for r in results):  # only the actor's patched forward returns pairs
            self._sparrow_alpha = [r[1] for r in results if isinstance(r, tuple)]
            results = [r[0] if isinstance(r, tuple) else r for r in results]
        return results

    return flatten


def forward_with_alpha(self, sequences, action_mask=None, attention_mask=None, packed_seq_lens=None,
                       mm_train_inputs_list=None, sparrow_topk=None):
    """`PolicyModelActor.forward` (ppo_actor.py:618-644) returning `(action_log_probs, [(alpha, positions)])`:
    the dense log-probs and the acceptance rate against the rollout's top-k come from the same forward."""
    if sparrow_topk is None or all(t is None for t in sparrow_topk):
        return self.forward(sequences, action_mask, attention_mask, packed_seq_lens, mm_train_inputs_list)
    if self.strategy.args.ds.packing_samples or any(mm_train_inputs_list or []):
        raise ValueError("--sparrow.topk tails need unpacked text samples (leave --ds.packing_samples off)")
    device = torch.cuda.current_device()
    self.actor.eval()
    with torch.no_grad():
        action_log_probs, output = self.actor(sequences.to(device), action_mask.to(device), attention_mask.to(device),
                                              return_output=True, ring_attn_group=self.strategy.ring_attn_group)
        alpha = experience_alpha(output["logits"], action_mask.to(device), sparrow_topk)
    self.actor.train()
    return action_log_probs.to("cpu"), alpha
