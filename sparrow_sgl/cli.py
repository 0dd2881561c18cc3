"""`sparrow` command line: each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args)`.

Only the invoked subcommand's module is imported; it keeps heavy imports (sglang, ray, triton) inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
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
    "testbed": ("sparrow_sgl.testbed", "pretrain a small model on the chain task; sweep tail targets with GRPO"),
}


# modules a subcommand needs beyond the core install, and how to get them
EXTRAS: dict[str, tuple[str, str]] = {
    "serve": (
        "sglang",
        "run `make setup-sglang` (creates .venv-sglang with sglang==0.5.23, ~11 GB) and use "
        "`.venv-sglang/bin/sparrow serve ...`, or `pip install -e '.[sglang]'` into this environment",
    ),
}
_NEGATIVE_LIST = re.compile(r"^-\d[\d.,:+-]*$")


def attach_negative_values(argv: list[str]) -> list[str]:
    """`--budgets -256,512` -> `--budgets=-256,512`: argparse takes a value that starts with '-' (other than one
    plain negative number) for an option and reports "expected one argument"; attached, the option's own parser
    sees the value and can say what is wrong with it."""
    out: list[str] = []
    for arg in argv:
        prev = out[-1] if out else ""
        if _NEGATIVE_LIST.match(arg) and prev.startswith("--") and "=" not in prev:
            out[-1] = f"{prev}={arg}"
        else:
            out.append(arg)
    return out


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
    if argv is None:  # the console entry: thread settings before torch starts OpenMP (see sparrow_sgl/threads.py)
        from sparrow_sgl.threads import apply_process_policy

        apply_process_policy()
    argv = attach_negative_values(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    missing = _missing_extra(args.command)
    if missing:
        return _fail(args.command, missing)
    from sparrow_sgl.config import ConfigError

    try:
        return int(args._run(args) or 0)
    except (ConfigError, FileNotFoundError) as e:
        return _fail(args.command, _os_message(e))
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: keep the traceback
            raise
        return _fail(args.command, _os_message(e))
    except ModuleNotFoundError as e:
        return _fail(args.command, f"needs the Python module {e.name!r}, not installed in {sys.prefix}")
    except KeyboardInterrupt:
        print(f"sparrow {args.command}: interrupted", file=sys.stderr)
        return 130


def _missing_extra(command: str) -> str | None:
    if command not in EXTRAS:
        return None
    module, how = EXTRAS[command]
    if importlib.util.find_spec(module) is not None:
        return None
    return f"needs {module}, which is not installed in this environment ({sys.prefix}): {how}"


def _os_message(e: Exception) -> str:
    """`PATH: Is a directory` for an error about a file, instead of `[Errno 21] Is a directory: 'PATH'`."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def _fail(command: str, message: str) -> int:
    print(f"sparrow {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
