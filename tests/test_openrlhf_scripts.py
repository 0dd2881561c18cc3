"""The OpenRLHF launch scripts: `bash -n`, what each says about its GPUs and predicted speedup, and `DRY_RUN=1`
(the entry point's --sparrow.dry_run: OpenRLHF's own parsing and validation, no Ray, no GPU)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("openrlhf_*.sh"))
LAUNCHERS = [s for s in SCRIPTS if s.name != "openrlhf_common.sh"]


def test_every_script_parses_and_says_its_gpus_and_speedup():
    assert len(LAUNCHERS) == 6
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)
    for script in LAUNCHERS:
        head = script.read_text()
        assert re.search(r"^# GPUs: \d+", head, re.M), script.name
        assert re.search(r"predicted rollout speedup\s*\n?#?\s*\d\.\d+x", head), script.name


@pytest.mark.openrlhf
@pytest.mark.timeout(600)
def test_dry_run_of_every_script(tmp_path):
    pytest.importorskip("openrlhf")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # the entry point checks the directory, not the weights
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "1+1?", "label": "2"}) + "\n")  # the scripts' keys
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "OUT": str(tmp_path),
           "MODEL_DIR": str(tmp_path / "model"), "DATA": str(tmp_path / "data.jsonl")}

    def run(script):
        return script, subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=500)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, LAUNCHERS))
    for script, done in results:
        assert done.returncode == 0, (script.name, done.stderr[-3000:])
        config = json.loads(done.stdout[done.stdout.index("{\n"):])
        assert config["sparrow"]["engine"] == "sglang" and config["sparrow"]["topk"] == 20, script.name
        assert config["vllm"]["num_engines"] >= 4 and config["rollout"]["n_samples_per_prompt"] == 8
        assert config["algo"]["advantage"]["is_correction_level"] == "token"
        assert config["actor"]["eps_clip_low_high"] == [0.2, 0.28]
        preset = re.search(r"--preset (\S+)", script.read_text()).group(1)
        assert config["sparrow"]["schedule"] == preset, script.name
    missing = subprocess.run(["bash", str(LAUNCHERS[0])], env={**env, "MODEL_DIR": str(tmp_path / "no_model")},
                             capture_output=True, text=True, timeout=500)
    assert missing.returncode == 2 and "no_model: model directory not found" in missing.stderr.splitlines()[-1]
