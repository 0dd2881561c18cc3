"""`bench/results/openrlhf_gpu.json` from the runs of scripts/gpu_colocated_run.sh (issue 20, single GPU).

usage: python scripts/gpu_colocated_summary.py OUT_DIR [JSON]   (OUT_DIR holds gpu.txt, settings.json and one
folder per mode: tb/ (OpenRLHF's tensorboard), sparrow/ (engine/trainer event logs), run.log, rc)

Per step, from OpenRLHF's own `train/timing/*` (ppo_trainer.py): generate = `generation` (rollout; the reward runs
inside the engine actor, so it is part of it), reward = the summed `reward_ms` the reward function measured for the
step's samples (threads in the engine actor: an upper bound of its share), train = `make_experience` (log-prob
forwards) + `ppo_train`, sync = `broadcast` (the CUDA-IPC weight update). Rollout tokens/s = generated tokens
(`rollout/num_samples` x `rollout/response_length_mean`) / generate. Tails: `sparrow/*` (tails.py).
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path
from statistics import mean

STEP_LINE = re.compile(r"Global step (\d+): (\{.*\})")


def tb_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return out
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            key = tag.removeprefix("train/")
            out.setdefault(key, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def log_scalars(log: Path) -> dict[str, dict[int, float]]:
    """Fallback: OpenRLHF's `Global step N: {...}` lines (forwarded by Ray into the driver's log)."""
    out: dict[str, dict[int, float]] = {}
    if not log.exists():
        return out
    for line in log.read_text(errors="replace").splitlines():
        m = STEP_LINE.search(line)
        if not m:
            continue
        try:
            status = ast.literal_eval(re.sub(r"\b(nan|inf)\b", "None", m.group(2)))
        except (ValueError, SyntaxError):
            continue
        for k, v in status.items():
            if isinstance(v, int | float):
                out.setdefault(k, {})[int(m.group(1))] = float(v)
    return out


def _get(scalars: dict, key: str, step: int) -> float | None:
    return scalars.get(key, {}).get(step)


def step_rows(scalars: dict) -> list[dict]:
    steps = sorted(scalars.get("timing/step_total", scalars.get("timing/generation", {})))
    rows = []
    for s in steps:
        gen = _get(scalars, "timing/generation", s)
        samples = _get(scalars, "rollout/num_samples", s)
        length = _get(scalars, "rollout/response_length_mean", s)
        reward_ms = _get(scalars, "reward_ms", s)
        tokens = samples * length if samples is not None and length is not None else None
        reward_s = reward_ms * samples / 1000 if reward_ms is not None and samples is not None else None
        make, ppo = _get(scalars, "timing/make_experience", s), _get(scalars, "timing/ppo_train", s)
        rows.append({
            "step": s,
            "generate_s": gen,
            "reward_s": reward_s,
            "train_s": make + ppo if make is not None and ppo is not None else None,
            "make_experience_s": make,
            "ppo_train_s": ppo,
            "sync_s": _get(scalars, "timing/broadcast", s),
            "total_s": _get(scalars, "timing/step_total", s),
            "samples": samples,
            "generated_tokens": tokens,
            "rollout_tokens_per_s": tokens / gen if tokens and gen else None,
            "reward_mean": _get(scalars, "rollout/reward_mean", s),
            "kv_tokens_mean": _get(scalars, "sparrow_kv_tokens_mean", s),
            "batch_samples": _get(scalars, "sparrow_batch_samples", s),
            "graph_captures": _get(scalars, "sparrow_graph_captures", s),
            "graph_capture_s": _get(scalars, "sparrow_graph_capture_s", s),
            "engine_prefill_s": _get(scalars, "sparrow_prefill_s", s),
            "engine_decode_ms_per_step": _get(scalars, "sparrow_decode_ms_per_step", s),
            "vllm_kl": _get(scalars, "vllm_kl", s),
            "tails": {k.removeprefix("sparrow/"): v[s] for k, v in sorted(scalars.items())
                      if k.startswith("sparrow/") and s in v},
        })
    return rows


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(mean(values), 4) if values else None


def ipc_syncs(engine_log: Path) -> list[dict]:
    """The engine's side of each CUDA-IPC sync: its update_weight_cuda_ipc calls (one tensor each) or bucket calls,
    grouped between other calls."""
    if not engine_log.exists():
        return []
    syncs, current = [], []
    for line in engine_log.read_text().splitlines():
        event = json.loads(line)
        if event.get("call") in ("update_weight_cuda_ipc", "update_weight_bucket_cuda_ipc"):
            current.append((event["t"], event.get("tensors", 1)))
        elif current:
            syncs.append(current)
            current = []
    if current:
        syncs.append(current)
    return [{"tensors": sum(n for _, n in c), "calls": len(c), "first_to_last_s": round(c[-1][0] - c[0][0], 4)}
            for c in syncs]


def trainer_syncs(trainer_log: Path) -> list[dict]:
    """sparrow-sgl's weight-sync records (`path`: process_group, or cuda_ipc — OpenRLHF's broadcast, then the
    canary check trainer_sync.py runs after it)."""
    if not trainer_log.exists():
        return []
    events = [json.loads(line) for line in trainer_log.read_text().splitlines() if line.strip()]
    keys = ("path", "tensors", "buckets", "transfer_seconds", "seconds", "canary_max_abs_diff")
    return [{k: e.get(k) for k in keys} for e in events if e.get("event") == "weight_sync"]


def summarize_mode(mode_dir: Path) -> dict:
    scalars = tb_scalars(mode_dir / "tb") or log_scalars(mode_dir / "run.log")
    rows = step_rows(scalars)
    later = rows[1:] or rows  # step 1 carries one-time costs (CUDA graphs, allocator warm-up)
    rc = (mode_dir / "rc").read_text().strip() if (mode_dir / "rc").exists() else None
    return {
        "exit_code": int(rc) if rc not in (None, "") else None,
        "wall_s": json.loads((mode_dir / "wall.json").read_text())["seconds"] if (mode_dir / "wall.json").exists()
        else None,
        "steps": len(rows),
        "mean_after_step_1": {k: _mean(later, k) for k in (
            "generate_s", "reward_s", "train_s", "make_experience_s", "ppo_train_s", "sync_s", "total_s",
            "rollout_tokens_per_s", "reward_mean", "kv_tokens_mean")},
        "per_step": rows,
        "engine_ipc_syncs": ipc_syncs(mode_dir / "sparrow" / "engine_0.jsonl"),
        "trainer_syncs": trainer_syncs(mode_dir / "sparrow" / "trainer.jsonl"),
        "scalars_seen": sorted(scalars),
    }


def summarize(out_dir: Path) -> dict:
    settings = json.loads((out_dir / "settings.json").read_text()) if (out_dir / "settings.json").exists() else {}
    gpu = (out_dir / "gpu.txt").read_text().strip() if (out_dir / "gpu.txt").exists() else None
    runs = {d.name: summarize_mode(d) for d in sorted(out_dir.iterdir()) if d.is_dir() and (d / "rc").exists()}
    tps = {m: r["mean_after_step_1"]["rollout_tokens_per_s"] for m, r in runs.items()}
    result = {
        "issue": 20,
        "what": "OpenRLHF 0.11.2 train() colocated on one GPU (--train.colocate_all), DeepSpeed ZeRO-2 on the GPU, "
                "the embedded-engine rollout actor (sparse CUDA-graph decode), CUDA-IPC weight update, GRPO",
        "gpu": gpu,
        "settings": settings,
        "rollout_tokens_per_s": tps,
        "sync_s": {m: r["mean_after_step_1"]["sync_s"] for m, r in runs.items()},
        "runs": runs,
    }
    if tps.get("dense") and tps.get("sparse"):
        result["rollout_speedup_sparse_vs_dense"] = round(tps["sparse"] / tps["dense"], 3)
    return result


if __name__ == "__main__":
    out = Path(sys.argv[1])
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else out / "openrlhf_gpu.json"
    target.write_text(json.dumps(summarize(out), indent=2) + "\n")
    print(f"wrote {target}")
