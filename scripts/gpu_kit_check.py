"""Does the GPU kit cover every import of the colocated OpenRLHF run? Checked here, on a CPU, without the GPU image.

Builds a view of a local site-packages that holds only the distributions the GPU image has
(scripts/gpu_image_packages.txt) plus the kit's (scripts/gpu_kit.txt), as symlinks, then imports in a fresh
`python -S` whose path is that view + the repo: every module the driver and the Ray workers import, and the entry
point's `--sparrow.dry_run` on the given arguments. A missing dependency fails here as it would there (versions can
differ: this environment's torch/transformers are not the image's).

usage: python scripts/gpu_kit_check.py [--site-packages DIR] -- [entry-point args for the dry run]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = [
    "ray", "ray.util.placement_group", "ray.scripts.scripts", "ray._private.runtime_env.agent.runtime_env_agent",
    "deepspeed", "deepspeed.runtime.engine", "torch.utils.tensorboard", "torchdata.stateful_dataloader",
    "openrlhf.cli.train_ppo_ray", "openrlhf.trainer.ray.ppo_actor", "openrlhf.trainer.ray.launcher",
    "openrlhf.trainer.ppo_trainer", "openrlhf.trainer.ray.vllm_engine", "openrlhf.trainer.ppo_utils.experience_maker",
    "openrlhf.trainer.ppo_utils.samples_generator", "openrlhf.utils.agent", "openrlhf.datasets", "openrlhf.models",
    "sparrow_sgl.openrlhf.rollout_actor", "sparrow_sgl.openrlhf.embedded_backend", "sparrow_sgl.openrlhf.tails",
    "sparrow_sgl.openrlhf.distill_hook", "sparrow_sgl.engine",
]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def names(path: Path) -> set[str]:
    """Distribution names of a package list (one a line, `name==version` allowed, # comments)."""
    out = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            out.add(norm(re.split(r"[=<>!~ ;\[]", line)[0]))
    return out


def build_view(site: Path, allowed: set[str], view: Path) -> list[str]:
    """Symlink each allowed distribution's top-level entries (and its .dist-info) into `view`; returns the
    distributions found in `site` but left out."""
    left_out = []
    for info in sorted(site.glob("*.dist-info")):
        dist = norm(info.name[: -len(".dist-info")].rsplit("-", 1)[0])
        if dist not in allowed:
            left_out.append(dist)
            continue
        tops = {info.name}
        record = info / "RECORD"
        if record.exists():
            for line in record.read_text().splitlines():
                top = line.split(",")[0].split("/")[0]
                if top and not top.startswith("..") and top != "__pycache__":
                    tops.add(top)
        for top in tops:
            src, dst = site / top, view / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
    return left_out


PROBE = r"""
import sys, traceback
sys.path[:0] = {paths!r}
from sparrow_sgl.openrlhf import shims
print("shims:", shims.install())
bad = []
for name in {modules!r}:
    try:
        __import__(name)
    except Exception as e:
        bad.append(name)
        print("FAIL", name, type(e).__name__, e)
if {dry_args!r}:
    from sparrow_sgl.openrlhf.train_ppo_ray import main
    try:
        main({dry_args!r})
    except SystemExit as e:
        if e.code not in (0, None):
            bad.append("dry_run")
            print("FAIL dry_run exit", e.code)
print("IMPORT_CHECK", "ok" if not bad else "failed: " + ", ".join(bad))
sys.exit(1 if bad else 0)
"""


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--site-packages", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    p.add_argument("--image", type=Path, default=ROOT / "scripts" / "gpu_image_packages.txt")
    p.add_argument("--kit", type=Path, default=ROOT / "scripts" / "gpu_kit.txt")
    p.add_argument("dry_args", nargs="*", help="entry-point args for a --sparrow.dry_run (after --)")
    args = p.parse_args()
    allowed = names(args.image) | names(args.kit)
    with tempfile.TemporaryDirectory(prefix="gpu-kit-view-") as tmp:
        view = Path(tmp)
        build_view(args.site_packages, allowed, view)
        dry = [*args.dry_args, "--sparrow.dry_run"] if args.dry_args else []
        code = PROBE.format(paths=[str(ROOT), str(view)], modules=MODULES, dry_args=dry)
        return subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
