"""`sparrow` command line: each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args)`.

Only the invoked subcommand's module is imported; it keeps heavy imports (sglang, ray, triton) inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("sparrow_sgl.demo", "run the embedded end-to-end demo on a tiny model"),
    "generate": ("sparrow_sgl.engine.cli", "generate rollouts with the embedded engine"),
    "calibrate": ("sparrow_sgl.calibrate", "measure per-bin acceptance-rate tails over a budget grid"),
    "plan": ("sparrow_sgl.plan", "choose the cheapest schedule whose tails stay >= tau"),
    "train": ("sparrow_sgl.rl.cli", "GRPO training with sparse rollouts (embedded)"),
    "distill": ("distill.cli", "DistillSparse: train a rollout-only LoRA toward the dense policy"),
    "serve": ("sparrow_sgl.sglang.serve", "launch SGLang with the sparrow block-sparse backend"),
    "bench": ("sparrow_sgl.bench", "run a benchmark and print JSON"),
    "reward": ("rewards.cli", "score rollouts with the math or code reward"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """All subcommands are listed; only the one named in `argv` has its module imported and its options added."""
    parser = argparse.ArgumentParser(prog="sparrow", description="Sparse rollouts for long-context RL of LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    from sparrow_sgl.config import ConfigError

    try:
        return int(args._run(args) or 0)
    except (ConfigError, FileNotFoundError) as e:
        print(f"sparrow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
