"""`sparrow train --config c.yaml [--resume DIR] [--set key=value ...]`: embedded GRPO with sparse rollouts."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sparrow_sgl.rl.config import TrainConfig, describe_fields

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "config keys (YAML/JSON file or --set KEY=VALUE; values are checked against these types):\n"
        + "\n".join(describe_fields(TrainConfig))
        + "\n\nexample: sparrow train --config scripts/train_chain.yaml --set model=runs/demo/model --set steps=5"
    )
    p.add_argument("--config", required=True, help="YAML or JSON TrainConfig (see sparrow_sgl/rl/config.py)")
    p.add_argument("--resume", default=None, help="checkpoint dir, or a run dir (continues from its latest)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set lr=1e-5 --set distill.every=2 (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sparrow_sgl.rl.config import TrainConfig
    from sparrow_sgl.rl.trainer import Trainer

    cfg = TrainConfig.load(args.config, args.overrides)
    trainer = Trainer(cfg)
    try:
        if args.resume:
            step = trainer.resume(args.resume)
            print(f"sparrow train: resumed at step {step} from {args.resume}")
        cfg.save(Path(cfg.out_dir) / "config.json")
        records = trainer.train()
    except KeyboardInterrupt:
        print(interrupted_message(cfg, trainer.step), file=sys.stderr)
        return 130
    finally:
        trainer.close()
    if records:
        last = records[-1]
        tail = last.get("sparse/tail_p5/min")
        print(
            f"sparrow train: {trainer.step} steps done; last reward {last['rollout/reward_mean']:.3f}, "
            f"min tail_p5 {'-' if tail is None else f'{tail:.4f}'} (tau {cfg.tau}); log: {trainer.log.path}"
        )
    return 0


def interrupted_message(cfg, steps_done: int) -> str:
    """One line for Ctrl-C: the last checkpoint on disk and the command that continues from it."""
    from pathlib import Path

    from sparrow_sgl.config import ConfigError
    from sparrow_sgl.rl.checkpoint import find_checkpoint

    run_dir = Path(cfg.out_dir)
    try:
        ckpt = find_checkpoint(run_dir)
    except ConfigError:
        when = f"every {cfg.save_every} steps" if cfg.save_every else "only at the end (save_every: 0)"
        return (
            f"sparrow train: interrupted after {steps_done} completed step(s); no checkpoint yet (checkpoints are "
            f"saved {when}): start again with `sparrow train --config {run_dir / 'config.json'}`"
        )
    return (
        f"sparrow train: interrupted after {steps_done} completed step(s); last checkpoint {ckpt}; continue with "
        f"`sparrow train --config {run_dir / 'config.json'} --resume {run_dir}`"
    )
