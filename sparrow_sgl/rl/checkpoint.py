"""Atomic training checkpoints: `<run>/checkpoints/step_000012/` holding

  model/            the policy in HF format with the run's tokenizer (an engine or `sparrow generate` loads it)
  trainer_state.pt  optimizer, LR scheduler, RNG states (python, numpy, torch, cuda)
  state.json        step, data cursor, current schedule, TailGuard state, config, extra
  <name>_state.pt   optional components (e.g. `distill_state.pt`: the DistillSparse LoRA, its optimizer, re-planner)

Each is written into a temporary directory which is renamed into place only when complete, then `latest` (a
one-line file, itself replaced atomically) is pointed at it, then older checkpoints beyond `keep_last` are removed.
A crash at any moment leaves the previous `latest` intact and loadable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sparrow_sgl.config import ConfigError

LATEST = "latest"


@dataclass
class TrainState:
    step: int  # RL steps completed
    cursor: int  # index of the next task sample
    schedule: dict | None = None  # Schedule.to_dict() of the schedule in use
    guard: dict | None = None  # TailGuard state
    extra: dict = field(default_factory=dict)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: str | os.PathLike,
    state: TrainState,
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    config: dict | None = None,
    keep_last: int = 2,
    components: dict[str, dict] | None = None,
    tokenizer=None,
) -> Path:
    """Write a complete checkpoint under `root/step_XXXXXX` atomically; returns its path.

    components: extra state dicts saved as `<name>_state.pt` in the same atomic directory (`load_component`).
    tokenizer: saved beside the weights in `model/`, so the checkpoint is a complete model dir.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state.step:06d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        model.save_pretrained(tmp / "model")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
            tmp / "trainer_state.pt",
        )
        for name, component in (components or {}).items():
            torch.save(component, tmp / f"{name}_state.pt")
        payload = {
            "step": state.step,
            "cursor": state.cursor,
            "schedule": state.schedule,
            "guard": state.guard,
            "extra": state.extra,
            "config": config,
        }
        (tmp / "state.json").write_text(json.dumps(payload, indent=1) + "\n")
        if final.exists():  # re-saving the same step: move the old one aside first
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(root / LATEST, final.name + "\n")
    _prune(root, keep_last, final.name)
    return final


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint dir from itself, a `checkpoints/` root (its `latest`) or a run dir (`<run>/checkpoints`)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        latest = root / LATEST
        if latest.is_file():
            candidate = root / latest.read_text().strip()
            if (candidate / "state.json").is_file():
                return candidate
        complete = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
        if complete:  # `latest` missing or stale: the newest complete checkpoint
            return complete[-1]
    raise ConfigError(f"no checkpoint found at {path} (expected state.json, or a 'latest' file naming one)")


def load_checkpoint(path: str | os.PathLike, model, optimizer=None, scheduler=None, restore_rng: bool = True):
    """Load weights (and optimizer/scheduler/RNG when given) in place; returns (TrainState, config dict, dir)."""
    from safetensors.torch import load_file

    ckpt = find_checkpoint(path)
    weights = {}
    for file in sorted((ckpt / "model").glob("*.safetensors")):
        weights.update(load_file(file))
    if not weights:
        raise ConfigError(f"checkpoint {ckpt} has no model weights (model/*.safetensors)")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {ckpt} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    trainer_state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(trainer_state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    if restore_rng:
        set_rng_state(trainer_state["rng"])
    data = json.loads((ckpt / "state.json").read_text())
    state = TrainState(data["step"], data["cursor"], data.get("schedule"), data.get("guard"), data.get("extra", {}))
    return state, data.get("config"), ckpt


def load_component(ckpt: str | os.PathLike, name: str) -> dict | None:
    """The `<name>_state.pt` component of a checkpoint dir (from `load_checkpoint`), or None if it has none."""
    path = Path(ckpt) / f"{name}_state.pt"
    return torch.load(path, weights_only=False) if path.is_file() else None


def _is_tied(model, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int, current: str) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep_last]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # leftovers of an earlier crash
        shutil.rmtree(stale, ignore_errors=True)
