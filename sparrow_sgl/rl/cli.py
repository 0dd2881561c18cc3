"""`sparrow train --config c.yaml [--resume DIR] [--set key=value ...]`: embedded GRPO with sparse rollouts."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
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
