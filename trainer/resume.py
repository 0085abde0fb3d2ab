"""Where a launch starts: fresh, or from the newest complete checkpoint of the same run directory.

Relaunching the same command finds the same run directory (launch/run_dir.py) and continues it.
A resumed run on the same number of processes is bit-identical to an uninterrupted one: the
rollout noise, prompt order and minibatch order are pure functions of (seed, step, ids), and
everything else that changes over time is in the checkpoint (trainer/checkpoint.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from trainer.checkpoint import (
    CONFIG_FILE, ENGINE_TAG, UNIVERSAL_DIR, complete_checkpoints, is_complete, load_trainer_state, remove_partial,
)
from trainer.distributed import World, barrier

# Config keys that may differ between the checkpoint and the relaunch: where outputs go, how they are
# shown, resources, checkpoint cadence, and the schedule's end (a run can be extended). Everything
# else changes results and must match.
DRIFT_FREE = (
    "run_dir", "exp_name", "logger.", "train.progress", "train.num_threads", "train.device", "train.resume",
    "train.save_every", "train.keep_last", "train.max_consecutive_skips", "train.requeue", "train.grid_every",
    "train.steps", "train.eval_every", "train.overlap_rewards",
)


class ConfigDriftError(ValueError):
    """The relaunch's result-changing config differs from the checkpoint's."""


@dataclass
class ResumePoint:
    """Where training starts. ``checkpoint`` None means step 0."""

    step: int = 0
    checkpoint: Path | None = None
    state: dict = field(default_factory=dict)
    universal: bool = False  # load DeepSpeed's universal format (a different number of processes)

    @property
    def load_dir(self) -> Path | None:
        """The folder DeepSpeed loads tag ``engine`` from."""
        if self.checkpoint is None:
            return None
        return self.checkpoint / UNIVERSAL_DIR if self.universal else self.checkpoint


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_drift(saved_yaml: str, current_yaml: str) -> list[str]:
    """Result-changing keys whose value differs, as ``key: checkpoint=<a>, now=<b>`` lines."""
    saved = _flatten(OmegaConf.to_container(OmegaConf.create(saved_yaml)))
    now = _flatten(OmegaConf.to_container(OmegaConf.create(current_yaml)))
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if key.startswith(DRIFT_FREE) or key + "." in DRIFT_FREE:
            continue
        a, b = saved.get(key, "<absent>"), now.get(key, "<absent>")
        if a != b:
            diffs.append(f"{key}: checkpoint={a!r}, now={b!r}")
    return diffs


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` logged at or before ``step`` (atomically); returns rows dropped.

    A row cut short by a kill is not valid JSON and goes too. The dropped rows were logged after the
    checkpoint and are logged again, identically, by the resumed run.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped


def _universal(ckpt: Path, world: World) -> None:
    """Convert ``ckpt``'s ZeRO shards into DeepSpeed's universal format (rank 0; once per checkpoint)."""
    out = ckpt / UNIVERSAL_DIR
    if world.is_main and not (out / "latest_universal").is_file():
        tmp = ckpt / (UNIVERSAL_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / ENGINE_TAG),
               "--output_folder", str(tmp / ENGINE_TAG), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"converting {ckpt} to a universal checkpoint failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        (tmp / "latest_universal").write_text(ENGINE_TAG)
        os.replace(tmp, out)
    barrier()


def prepare_resume(mode: str, run_dir: Path, resolved_yaml: str, world: World, zero_stage: int) -> ResumePoint:
    """Decide where this launch starts and make the run directory agree with it.

    mode: "auto" (continue from the newest complete checkpoint if there is one), "fresh" (move an
    existing run aside to ``<run_dir>.replaced-<time>`` and start over), or the path of a checkpoint
    folder to continue from. Every rank calls this; rank 0 alone changes files.
    Raises ConfigDriftError when the checkpoint's result-changing config differs from this one.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if mode == "fresh":
        if world.is_main and (metrics.exists() or (run_dir / "checkpoints").exists()):
            aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(run_dir, aside)
            print(f"train.resume=fresh: the earlier run in {run_dir} was moved to {aside}", flush=True)
        barrier()
        return ResumePoint()
    if world.is_main:
        for d in remove_partial(run_dir):
            print(f"removed an interrupted checkpoint write: {d}", flush=True)
    barrier()
    if mode != "auto":
        ckpt = Path(mode)
        if not is_complete(ckpt):
            raise FileNotFoundError(
                f"train.resume={mode!r} is not a complete checkpoint folder (no valid COMPLETE.json); pass a "
                f"run's checkpoints/step_<N> folder, or train.resume=auto for the newest one"
            )
    else:
        found = complete_checkpoints(run_dir)
        ckpt = found[-1] if found else None
    if ckpt is None:
        if world.is_main and metrics.exists():
            truncate_metrics(metrics, -1)
            print(f"{run_dir} holds no complete checkpoint: starting it again from step 0", flush=True)
        barrier()
        return ResumePoint()

    drift = config_drift((ckpt / CONFIG_FILE).read_text(), resolved_yaml)
    if drift:
        raise ConfigDriftError(
            f"cannot resume {ckpt}: the config changed in keys that change results:\n  "
            + "\n  ".join(drift)
            + "\nRelaunch with the checkpoint's values, or start over with train.resume=fresh "
            "(the earlier run is kept beside it), or use a new run_dir=."
        )
    state = load_trainer_state(ckpt)
    universal = False
    if state["world_size"] != world.world_size:
        universal = zero_stage >= 1  # ZeRO shards optimizer state per rank; stage 0 keeps it whole
        if world.is_main:
            print(
                f"WARNING: {ckpt} was saved by {state['world_size']} processes and resumes on {world.world_size}"
                f"{' through a DeepSpeed universal checkpoint' if universal else ''}. This continues the run but is "
                "not bit-exact: each process now holds a different share of the samples, so sums are reduced in a "
                "different order and floating-point rounding differs from an uninterrupted run.", flush=True,
            )
        if universal:
            _universal(ckpt, world)
    if world.is_main:
        dropped = truncate_metrics(metrics, state["step"])
        print(f"resuming {run_dir} from {ckpt.name} (step {state['step']}; {dropped} later metrics rows dropped, "
              "they are logged again)", flush=True)
    barrier()
    return ResumePoint(step=state["step"], checkpoint=ckpt, state=state, universal=universal)
