"""Checkpoints that are complete or invisible, and the state a bit-exact resume needs.

``run_dir/checkpoints/step_<N>/``:
  engine/               DeepSpeed: trainable module weights, optimizer, LR schedule, ZeRO shards, counters
  policy.safetensors    the trainable weights alone (LoRA adapters or the full transformer), for sampling/export
  config.yaml           the resolved run config (drift is checked against it on resume)
  trainer_state.json    step, skip counters, wandb run id, world size, ZeRO stage, eval-before scores
  rng/rank_<r>.pt       each rank's torch / CUDA / numpy / python generator states
  rewards_state.pt      state of rewards that learn (only if one does)
  algorithm_state.pt    state of the algorithm beyond the weights (running baselines, EMA; only if it has one)
  ema.safetensors       the EMA of the trainable weights (only with train.ema_decay)
  COMPLETE.json         written last: the step and every file's size

Protocol: everything is written under ``step_<N>.tmp``, fsynced, then COMPLETE.json is written and
fsynced, then the folder is renamed to ``step_<N>`` (atomic on POSIX) and its parent fsynced. Readers
only trust ``step_<N>`` folders whose COMPLETE.json matches the files on disk. Old checkpoints are
pruned after the new one is complete, by renaming them to ``.deleting`` first, so a kill during the
delete never leaves a half-deleted folder that looks complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from trainer.distributed import World, barrier

POLICY_FILE = "policy.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "trainer_state.json"
COMPLETE_FILE = "COMPLETE.json"
REWARDS_STATE_FILE = "rewards_state.pt"
ALGORITHM_STATE_FILE = "algorithm_state.pt"
EMA_FILE = "ema.safetensors"  # train.ema_decay: the EMA of the trainable weights, keyed like policy.safetensors  # e.g. a running baseline or an EMA policy
ENGINE_TAG = "engine"
UNIVERSAL_DIR = "universal"  # DeepSpeed universal checkpoint, converted on demand (see trainer/resume.py)
_STEP_DIR = re.compile(r"^step_(\d{6,})$")

# Tests signal the process at named points to prove that no kill leaves a checkpoint that looks
# complete but is not, and that a signal mid-step stops cleanly:
# STEERFLOW_FAULT="<point>@<step>[:<SIGNAL>[:<rank>]]" sends SIGNAL (default KILL) to this process
# there (on every rank, or only on <rank>).
FAULT_ENV = "STEERFLOW_FAULT"


def fault_point(name: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec or not spec.startswith(f"{name}@"):
        return
    at, _, rest = spec[len(name) + 1 :].partition(":")
    sig, _, rank = rest.partition(":")
    if int(at) == step and (not rank or int(rank) == int(os.environ.get("RANK", 0))):
        os.kill(os.getpid(), signal.Signals["SIG" + (sig or "KILL")])


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def _full_parameters(engine, policy):
    """ZeRO-3 keeps only a shard of each parameter per rank: gather them (a collective, all ranks)."""
    if engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    params = [p for p in policy.transformer.parameters() if p.requires_grad]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    engine, policy, run_dir: Path, step: int, resolved_yaml: str, world: World, trainer_state: dict,
    rewards_state: dict | None = None, keep_last: int = 0, algorithm_state: dict | None = None,
    ema_state: dict | None = None,
) -> Path:
    """Write ``checkpoints/step_<step>`` (every rank takes part; rank 0 finalises) and prune to ``keep_last``.

    ``trainer_state`` must be JSON-serialisable; ``keep_last`` 0 keeps every checkpoint.
    Returns the final folder.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    barrier()
    # LoRA: the frozen base is not state (it is reloaded from the model folder), so only the
    # adapters go into the engine files; 2B frozen parameters per checkpoint would dwarf them.
    engine.save_checkpoint(
        str(tmp), tag=ENGINE_TAG, exclude_frozen_parameters=True,
        # DeepSpeed's universal-checkpoint converter requires this key (it is a plain version marker).
        client_state={"step": step, "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}},
    )
    fault_point("checkpoint.after_engine", step)
    torch.save(rng_state(), tmp / "rng" / f"rank_{world.rank:05d}.pt")
    with _full_parameters(engine, policy):
        state = policy.trainable_state_dict() if world.is_main else None
    if world.is_main:
        save_file(state, str(tmp / POLICY_FILE))
        (tmp / CONFIG_FILE).write_text(resolved_yaml)
        (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=1) + "\n")
        if rewards_state:
            torch.save(rewards_state, tmp / REWARDS_STATE_FILE)
        if algorithm_state:
            torch.save(algorithm_state, tmp / ALGORITHM_STATE_FILE)
        if ema_state is not None:
            save_file(ema_state, str(tmp / EMA_FILE))
    barrier()  # every rank's files are closed before rank 0 seals the folder
    if world.is_main:
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                _fsync(f)
                files[str(f.relative_to(tmp))] = f.stat().st_size
        fault_point("checkpoint.before_marker", step)
        (tmp / COMPLETE_FILE).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
        _fsync(tmp / COMPLETE_FILE)
        _fsync(tmp)
        fault_point("checkpoint.before_rename", step)
        if final.exists():  # the same step saved again (a resumed run's last save): replace it atomically
            _remove(final)
        os.replace(tmp, final)
        _fsync(final.parent)
        prune(run_dir, keep_last, step)
    barrier()
    return final


def _remove(path: Path, step: int = -1) -> None:
    """Rename first (atomic) so a kill mid-delete leaves a ``.deleting`` folder, never a partial ``step_<N>``."""
    doomed = path.with_name(path.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    fault_point("checkpoint.prune", step)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(run_dir: Path, keep_last: int, step: int) -> None:
    """Delete complete checkpoints beyond the newest ``keep_last`` (0 = keep all)."""
    if keep_last <= 0:
        return
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        _remove(old, step)


def is_complete(ckpt: Path) -> bool:
    """True if ``ckpt`` holds COMPLETE.json and every file it lists, with the listed size."""
    marker = ckpt / COMPLETE_FILE
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((ckpt / rel).is_file() and (ckpt / rel).stat().st_size == size for rel, size in files.items())


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (partial and ``.tmp``/``.deleting`` ones are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_DIR.match(d.name)) and d.is_dir()]
    return [d for _, d in sorted(found) if is_complete(d)]


def remove_partial(run_dir: Path) -> list[Path]:
    """Delete leftovers of interrupted saves and prunes (``.tmp``, ``.deleting``); returns what was removed."""
    root = Path(run_dir) / "checkpoints"
    removed = [d for d in root.glob("step_*") if d.suffix in (".tmp", ".deleting")] if root.is_dir() else []
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def load_trainer_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


def load_rank_rng(ckpt: Path, rank: int) -> dict | None:
    """This rank's saved generator states, or None when the checkpoint came from fewer ranks."""
    path = Path(ckpt) / "rng" / f"rank_{rank:05d}.pt"
    return torch.load(path, weights_only=False) if path.is_file() else None  # our own file: numpy state needs pickle
