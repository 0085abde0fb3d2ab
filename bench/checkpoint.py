"""How long a checkpoint save and a resume take for a job; prints one JSON line.

    python bench/checkpoint.py                         # the default job (digits toy), 1 process
    python bench/checkpoint.py experiment=toy_shapes   # any overrides of launch.train

It trains 3 steps saving after each (save time: the ``time/checkpoint`` metric), then relaunches
with one more step (restore time: the trainer's "restored ... in X s" line; relaunch time: the
whole command, imports and model build included).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(overrides: list[str]) -> dict:
    env = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        common = [sys.executable, "-m", "launch.train", f"run_dir={run_dir}", "logger=none", "train.progress=false",
                  "train.save_every=1", "train.keep_last=0", *overrides]
        subprocess.run([*common, "train.steps=3"], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        t0 = time.time()
        out = subprocess.run([*common, "train.steps=4"], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        relaunch = time.time() - t0
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        saves = [r["time/checkpoint"] for r in rows if "time/checkpoint" in r]
        step_s = [r["time/step"] for r in rows if "time/step" in r]
        restored = re.search(r"restored .* in ([0-9.]+) s", out.stdout)
        ckpt = run_dir / "checkpoints" / "step_000004"
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    return {
        "overrides": overrides, "save_s_mean": round(sum(saves) / len(saves), 3), "save_s_max": round(max(saves), 3),
        "restore_s": float(restored.group(1)) if restored else None, "relaunch_to_done_s": round(relaunch, 1),
        "train_step_s_mean": round(sum(step_s) / len(step_s), 3), "checkpoint_mb": round(size / 1e6, 2),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
