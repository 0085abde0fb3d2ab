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
    CONFIG_FILE, ENGINE_TAG, UNIVERSAL_DIR, CheckpointError, load_trainer_state, remove_partial, set_aside,
    step_folders, verify,
)
from trainer.distributed import World, barrier
from trainer.errors import UserError

# Config keys that may differ between the checkpoint and the relaunch: where outputs go, how they are
# shown, resources, checkpoint cadence, and the schedule's end (a run can be extended). Everything
# else changes results and must match.
DRIFT_FREE = (
    "run_dir", "exp_name", "logger.", "train.progress", "train.num_threads", "train.device", "train.resume",
    "train.save_every", "train.keep_last", "train.max_consecutive_skips", "train.requeue", "train.grid_every",
    "train.steps", "train.eval_every", "train.overlap_rewards",
    "data.max_prompt_chars",  # a guard that refuses inputs, never changes results (and older runs lack it)
)


class ConfigDriftError(UserError, ValueError):
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


def _from_main(value):
    """Rank 0's ``value`` on every rank (rank 0 alone reads and hashes checkpoints)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def metrics_rows(path: Path) -> int:
    """How many rows ``metrics.jsonl`` holds (0 when there is none)."""
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text(errors="replace").splitlines() if line.strip())


def _drift_error(source: Path, drift: list[str]) -> ConfigDriftError:
    return ConfigDriftError(
        f"cannot resume {source}: the config changed in keys that change results:\n  "
        + "\n  ".join(drift)
        + "\nRelaunch with the checkpoint's values, or start over with train.resume=fresh "
        "(the earlier run is kept beside it), or use a new run_dir=."
    )


def newest_sound_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of ``run_dir`` whose files match their seal (rank 0 only: it changes files).

    Damaged ones newer than it are renamed to ``step_<N>.corrupt`` (kept, never read again) with a
    warning naming the file and the mismatch. Returns (checkpoint or None, one line per damaged one).
    """
    damaged = []
    for ckpt in reversed(step_folders(run_dir)):
        problems, checksummed = verify(ckpt)
        if not problems:
            if not checksummed:
                print(f"note: {ckpt} was sealed by an older steerflow without checksums: only file sizes were checked",
                      flush=True)
            return ckpt, damaged
        aside = set_aside(ckpt)
        line = f"{ckpt.name}: {'; '.join(problems)} (moved to {aside.name})"
        damaged.append(line)
        print(f"WARNING: checkpoint {line}; falling back to the previous one", flush=True)
    return None, damaged


def prepare_resume(mode: str, run_dir: Path, resolved_yaml: str, world: World, zero_stage: int) -> ResumePoint:
    """Decide where this launch starts and make the run directory agree with it.

    mode: "auto" (continue from the newest sound checkpoint if there is one), "fresh" (move an
    existing run aside to ``<run_dir>.replaced-<time>`` and start over), or the path of a checkpoint
    folder to continue from. Every rank calls this; rank 0 alone reads checksums and changes files.

    Nothing is overwritten silently: a run directory that holds metrics is continued only from a
    checkpoint whose files match their checksums, and only if the config agrees with the one the run
    was launched with (its config.yaml) and with the checkpoint's. A damaged newest checkpoint falls
    back to the previous sound one, with a warning.
    Raises ConfigDriftError when a result-changing key differs; CheckpointError when the run has
    metrics but no sound checkpoint is left (train.resume=fresh moves it aside to start over), or
    when the checkpoint named by ``mode`` is damaged.
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
    rows = metrics_rows(metrics)
    # The run's own config.yaml (written at every launch) guards every path that reuses the folder,
    # also the one where no checkpoint is left.
    if rows and (run_dir / CONFIG_FILE).is_file():
        drift = config_drift((run_dir / CONFIG_FILE).read_text(), resolved_yaml)
        if drift:
            raise _drift_error(run_dir, drift)
    error, chosen = None, None
    if world.is_main:
        for d in remove_partial(run_dir):
            print(f"removed an interrupted checkpoint write: {d}", flush=True)
        if mode != "auto":
            problems, checksummed = verify(Path(mode))
            if problems:
                error = (f"train.resume={mode!r} is not a sound checkpoint folder: {'; '.join(problems)}. Pass another "
                         "run's checkpoints/step_<N> folder, or train.resume=auto for the newest sound one")
            else:
                chosen = mode
                if not checksummed:
                    print(f"note: {mode} was sealed by an older steerflow without checksums: only file sizes were "
                          "checked", flush=True)
        else:
            ckpt, damaged = newest_sound_checkpoint(run_dir)
            chosen = str(ckpt) if ckpt is not None else None
            if ckpt is None and (damaged or rows):
                what = ("every checkpoint is damaged:\n  " + "\n  ".join(damaged)) if damaged else "no checkpoint"
                error = (f"{run_dir} holds a run ({rows} metrics rows) but {what}\nNothing was changed. To start it over "
                         "from step 0, relaunch with train.resume=fresh (the earlier run is moved aside, not deleted), "
                         "or use a new run_dir=.")
    error, chosen = _from_main((error, chosen))
    if error is not None:
        raise CheckpointError(error)
    if chosen is None:
        barrier()
        return ResumePoint()
    ckpt = Path(chosen)

    drift = config_drift((ckpt / CONFIG_FILE).read_text(), resolved_yaml)
    if drift:
        raise _drift_error(ckpt, drift)
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
