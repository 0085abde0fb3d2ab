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
  COMPLETE.json         written last: the step, every file's size and its xxh3-128 checksum

Protocol: everything is written under ``step_<N>.tmp``, fsynced, then COMPLETE.json is written and
fsynced, then the folder is renamed to ``step_<N>`` (atomic on POSIX) and its parent fsynced. Readers
only trust ``step_<N>`` folders whose COMPLETE.json matches the files on disk. Old checkpoints are
pruned after the new one is complete, by renaming them to ``.deleting`` first, so a kill during the
delete never leaves a half-deleted folder that looks complete.

Integrity: the sizes make a kill mid-write visible for free (``is_complete``, used to list and prune);
the checksums catch what sizes cannot (a same-size corruption: bad disk, a copy gone wrong), and are
verified (``verify``) wherever a checkpoint is read: on resume (trainer/resume.py), by launch.sample
and launch.export. xxh3-128 (the xxhash package), not sha256: it guards against accidents, not
tampering, and hashes a 2 GiB file in 0.12 s against sha256's 1.27 s (page-cached, one core of the
CI machine), which matters when every resume re-reads tens of GB of optimizer state. Checkpoints
sealed before checksums existed (sizes only) are still accepted, with a note.
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
import xxhash
from safetensors.torch import save_file

from trainer.distributed import World, barrier
from trainer.errors import UserError, disk_error

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
HASH = "xxh3_128"  # COMPLETE.json's "hash"; its "checksums" map each file to this digest (hex)
_CHUNK = 8 << 20  # bytes hashed per read: large enough to stream at memory speed, small enough to not matter


class CheckpointError(UserError):
    """A checkpoint that cannot be written or trusted; the message names the file and what to do."""

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


def file_digest(path: Path) -> str:
    """The xxh3-128 digest (hex) of a file, read in chunks."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def seal(folder: Path, step: int) -> None:
    """fsync every file under ``folder`` and write COMPLETE.json (sizes and checksums), fsynced."""
    files, sums = {}, {}
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file() and f.name != COMPLETE_FILE:
            _fsync(f)
            rel = str(f.relative_to(folder))
            files[rel], sums[rel] = f.stat().st_size, file_digest(f)
    marker = {"step": step, "files": files, "hash": HASH, "checksums": sums}
    (Path(folder) / COMPLETE_FILE).write_text(json.dumps(marker, indent=1) + "\n")
    _fsync(Path(folder) / COMPLETE_FILE)


def _write_failed(exc: BaseException, tmp: Path, run_dir: Path) -> CheckpointError | None:
    """A CheckpointError for a save that failed because the disk is full or read-only, else None.

    torch.save reports a full disk as a RuntimeError ("unexpected pos ..." or "file write failed")
    without an errno, so for those the free space is what tells.
    """
    resumes = "the run can be relaunched and resumes from its last complete checkpoint"
    disk = disk_error(exc)
    if disk is not None:
        return CheckpointError(f"saving checkpoint {tmp.name} failed: {disk}; the partial folder was removed and "
                               f"{resumes}")
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("unexpected pos" in text or "file write failed" in text):
        try:
            free = shutil.disk_usage(tmp if tmp.exists() else run_dir).free
        except OSError:
            free = -1
        if 0 <= free < 256 << 20:
            return CheckpointError(f"saving checkpoint {tmp.name} failed: no space left in {run_dir} "
                                   f"({free / 2**20:.1f} MiB free; torch said: {text.strip()[-120:]}); the partial "
                                   f"folder was removed; free space (or lower train.keep_last): {resumes}")
    return None


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
    try:
        return _save(engine, policy, run_dir, step, resolved_yaml, world, trainer_state, rewards_state, keep_last,
                     algorithm_state, ema_state, final, tmp)
    except Exception as e:
        # A failed write (full or read-only disk, above all) leaves no step_<N>.tmp behind to fill the disk further.
        translated = _write_failed(e, tmp, Path(run_dir))
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if translated is not None:
            raise translated from e
        raise


def _save(engine, policy, run_dir, step, resolved_yaml, world, trainer_state, rewards_state, keep_last,
          algorithm_state, ema_state, final: Path, tmp: Path) -> Path:
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
        fault_point("checkpoint.before_marker", step)
        seal(tmp, step)
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


def verify(ckpt: Path, only: tuple[str, ...] | None = None) -> tuple[list[str], bool]:
    """Check a checkpoint's files against its COMPLETE.json: (problems, whether checksums were checked).

    ``only``: the files to check (those a reader is about to load, e.g. launch.sample's policy);
    default every file the marker lists. Each problem names the file and what is wrong with it
    (missing, size, checksum). Checksums are checked when the marker has them (checkpoints sealed
    before they existed list sizes only: then ``False`` is returned and only sizes are checked).
    """
    ckpt = Path(ckpt)
    marker = ckpt / COMPLETE_FILE
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except OSError as e:
        return [f"{marker}: cannot be read ({e.strerror or e}); the checkpoint was never sealed or was damaged"], False
    except (ValueError, KeyError, TypeError):
        return [f"{marker}: not a valid checkpoint marker (damaged JSON)"], False
    sums = info.get("checksums") if info.get("hash") == HASH else None
    problems = []
    for rel in only if only is not None else files:
        path = ckpt / rel
        if rel not in files:
            problems.append(f"{path}: not listed in {COMPLETE_FILE} (not part of the sealed checkpoint)")
        elif not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != files[rel]:
            problems.append(f"{path}: size {path.stat().st_size} bytes, sealed with {files[rel]} (truncated or overwritten)")
        elif sums is not None and rel in sums and (got := file_digest(path)) != sums[rel]:
            problems.append(f"{path}: {HASH} checksum {got} does not match the sealed {sums[rel]} (corrupted)")
    return problems, sums is not None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (partial and ``.tmp``/``.deleting`` ones are ignored).

    Complete by size only (cheap: for listing and pruning); ``verify`` checks the checksums.
    """
    return [d for d in step_folders(run_dir) if is_complete(d)]


def step_folders(run_dir: Path) -> list[Path]:
    """Every ``step_<N>`` folder of a run, oldest first, complete or not."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_DIR.match(d.name)) and d.is_dir()]
    return [d for _, d in sorted(found)]


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint to ``step_<N>.corrupt[-k]`` (kept for inspection, never read or pruned)."""
    aside, k = ckpt.with_name(ckpt.name + ".corrupt"), 1
    while aside.exists():
        aside, k = ckpt.with_name(f"{ckpt.name}.corrupt-{k}"), k + 1
    os.replace(ckpt, aside)
    return aside


def remove_partial(run_dir: Path) -> list[Path]:
    """Delete leftovers of interrupted saves and prunes (``.tmp``, ``.deleting``); returns what was removed."""
    root = Path(run_dir) / "checkpoints"
    removed = [d for d in root.glob("step_*") if d.suffix in (".tmp", ".deleting")] if root.is_dir() else []
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def check_files(ckpt: Path, files: tuple[str, ...]) -> None:
    """Refuse to read ``files`` of ``ckpt`` unless they match its seal (launch.sample and launch.export).

    Raises CheckpointError naming each damaged file. A folder with no COMPLETE.json (copied without
    it, or written by hand) is read with a note: there is nothing to check it against.
    """
    ckpt = Path(ckpt)
    if not (ckpt / COMPLETE_FILE).is_file():
        print(f"note: {ckpt} has no {COMPLETE_FILE} (it was not sealed by the trainer): its files cannot be checked",
              flush=True)
        return
    problems, checksummed = verify(ckpt, files)
    if problems:
        raise CheckpointError(f"checkpoint {ckpt} is damaged:\n  " + "\n  ".join(problems) + "\nUse another checkpoint "
                              "of the run (its checkpoints/step_<N> folders), or copy this one again from where it came from")
    if not checksummed:
        print(f"note: {ckpt} was sealed by an older steerflow without checksums: only file sizes were checked", flush=True)


def load_safetensors(path: Path) -> dict:
    """``safetensors.torch.load_file`` that names the file when it cannot be parsed (CheckpointError)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({e}): the file is damaged; use another "
                              "checkpoint of the run or copy it again") from e


def load_trainer_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


def load_rank_rng(ckpt: Path, rank: int) -> dict | None:
    """This rank's saved generator states, or None when the checkpoint came from fewer ranks."""
    path = Path(ckpt) / "rng" / f"rank_{rank:05d}.pt"
    return torch.load(path, weights_only=False) if path.is_file() else None  # our own file: numpy state needs pickle
