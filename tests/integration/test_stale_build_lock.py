"""A process killed while DeepSpeed loads its CPU comm op leaves torch's build lock file behind; the
next start must not wait on it forever (it did: every relaunch after such a kill -9 hung)."""
from __future__ import annotations

import sys
from pathlib import Path

from jobs import SMALL, job_env, run


def test_a_stale_extension_build_lock_does_not_hang_the_next_start(tmp_path):
    cmd = [sys.executable, "-m", "launch.train", *SMALL, "train.steps=1"]
    run([*cmd, f"run_dir={tmp_path / 'a'}"], env=job_env(), timeout=600)  # the op is built (or was already)
    # trainer/distributed.py keeps the build in the environment's own folder.
    lock = Path(sys.prefix) / "torch_extensions" / "deepspeed_shm_comm" / "lock"
    assert lock.parent.is_dir()
    lock.touch()  # what a SIGKILL inside the load window leaves
    try:
        run([*cmd, f"run_dir={tmp_path / 'b'}"], env=job_env(), timeout=300)
    finally:
        lock.unlink(missing_ok=True)  # never leave the hazard for the tests after this one
    assert (tmp_path / "b" / "summary.json").is_file()
