"""Exact resume: a job stopped any way and relaunched with the same command equals the uninterrupted job.

Equality is bitwise for every metrics.jsonl value except wall-clock timings (time/*, throughput/*),
for the trained weights, and for the optimizer state.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs import ROOT, SMALL, Torchrun, job_env, run
from trainer.checkpoint import COMPLETE_FILE, complete_checkpoints, is_complete
from trainer.errors import EXIT_USER_ERROR
from trainer.preemption import EXIT_PREEMPTED

TRAIN = [sys.executable, "-m", "launch.train"]
TORCHRUN = Torchrun(2)
STEPS = ["train.steps=4", "train.save_every=1", "train.keep_last=2"]
HERE = str(Path(__file__).parent)


def launch(run_dir: Path, *overrides: str, expect: int = 0, launcher=TRAIN, fault: str | None = None,
           extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = job_env(PYTHONPATH=HERE, **(extra_env or {}))
    if fault:
        env["STEERFLOW_FAULT"] = fault
    return run([*launcher, f"run_dir={run_dir}", *SMALL, *STEPS, *overrides], env=env, expect=expect)


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]


def engine_state(run_dir: Path, step: int) -> dict:
    """The engine's saved trainable weights and optimizer state (rank 0's files) at ``step``."""
    ckpt = run_dir / "checkpoints" / f"step_{step:06d}" / "engine"
    out = {}
    for f in sorted(ckpt.glob("*.pt")):
        out[f.name] = torch.load(f, map_location="cpu", weights_only=False)
    return out


def assert_same_run(a: Path, b: Path, step: int = 4) -> None:
    assert metrics(a) == metrics(b)
    wa, wb = load_file(str(a / "checkpoints" / f"step_{step:06d}" / "policy.safetensors")), load_file(
        str(b / "checkpoints" / f"step_{step:06d}" / "policy.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ea, eb = engine_state(a, step), engine_state(b, step)
    for name in ea:
        oa, ob = ea[name].get("optimizer"), eb[name].get("optimizer")
        if oa is not None:
            for pid, st in oa["state"].items():
                for key, t in st.items():
                    assert torch.equal(torch.as_tensor(t), torch.as_tensor(ob["state"][pid][key])), (name, pid, key)


def assert_no_fake_complete(run_dir: Path) -> None:
    """Every folder named like a finished checkpoint really is one."""
    for d in (run_dir / "checkpoints").glob("step_*"):
        if d.suffix not in (".tmp", ".deleting"):
            assert is_complete(d), f"{d} looks like a checkpoint but is incomplete: {sorted(p.name for p in d.iterdir())}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted 4-step job (one process)."""
    d = tmp_path_factory.mktemp("reference")
    launch(d)
    return d


def test_killed_at_every_checkpoint_phase_and_resumed_twice_equals_uninterrupted(reference, tmp_path):
    """SIGKILL inside a checkpoint write (after the engine files, before COMPLETE.json, before the rename,
    while pruning), relaunching after each: every relaunch resumes from a complete checkpoint and the
    result equals the uninterrupted run bit for bit."""
    for fault in ("checkpoint.after_engine@2", "checkpoint.before_marker@3", "checkpoint.prune@3",
                  "checkpoint.before_rename@4"):
        launch(tmp_path, fault=fault, expect=-signal.SIGKILL)
        assert_no_fake_complete(tmp_path)
    out = launch(tmp_path).stdout
    assert "resuming" in out and "removed an interrupted checkpoint write" in out
    assert_same_run(reference, tmp_path)
    assert [d.name for d in complete_checkpoints(tmp_path)] == ["step_000003", "step_000004"]  # keep_last=2


def test_sigterm_mid_iteration_saves_at_the_step_boundary_and_resumes_exactly(reference, tmp_path):
    proc = launch(tmp_path, fault="train.mid_update@2:TERM", expect=EXIT_PREEMPTED)
    assert "received SIGTERM" in proc.stderr and "Relaunch the same command" in proc.stdout
    assert [d.name for d in complete_checkpoints(tmp_path)][-1] == "step_000002"
    assert max(r["step"] for r in metrics(tmp_path)) == 2
    launch(tmp_path)
    assert_same_run(reference, tmp_path)
    # A finished run relaunched does nothing, and says so.
    assert "already complete" in launch(tmp_path).stdout


@pytest.mark.slow  # about a minute: run with `make test-all`
def test_random_sigkills_and_an_external_sigterm_never_break_the_run(reference, tmp_path):
    """kill -9 at random moments (seeded), then a SIGTERM from outside; each relaunch continues."""
    rng = random.Random(1234)
    env = job_env(PYTHONPATH=HERE)
    cmd = [*TRAIN, f"run_dir={tmp_path}", *SMALL, *STEPS]
    for attempt in range(3):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(4.0, 12.0))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGTERM if attempt == 2 else signal.SIGKILL)
        code = proc.wait(timeout=120)
        assert code in (-signal.SIGKILL, -signal.SIGTERM, EXIT_PREEMPTED, 0), code
        assert_no_fake_complete(tmp_path)
    launch(tmp_path)
    assert_same_run(reference, tmp_path)


def test_nan_reward_leaves_weights_and_optimizer_untouched(tmp_path):
    """A NaN reward at step 2 skips that update on all ranks: the state after step 2 equals the state
    after step 1. K consecutive NaN steps abort with a message naming the cause."""
    nan = ["+rewards.bad._target_=faulty_reward.NaNOnCalls", "+rewards.bad.weight=0.5"]
    launch(tmp_path / "run", *nan, "+rewards.bad.calls=[3]", "train.steps=3", "train.keep_last=0")  # call 3: step 2
    rows = {r["step"]: r for r in metrics(tmp_path / "run") if "train/skipped_updates" in r}
    assert [rows[s]["train/skipped_updates"] for s in (1, 2, 3)] == [0, 1, 0]
    s1, s2 = engine_state(tmp_path / "run", 1), engine_state(tmp_path / "run", 2)
    for name in s1:
        for key in ("module", "optimizer"):
            assert _equal(s1[name][key], s2[name][key]), (name, key)
    w1 = load_file(str(tmp_path / "run/checkpoints/step_000001/policy.safetensors"))
    w2 = load_file(str(tmp_path / "run/checkpoints/step_000002/policy.safetensors"))
    w3 = load_file(str(tmp_path / "run/checkpoints/step_000003/policy.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not all(torch.equal(w2[k], w3[k]) for k in w2)  # training went on after the skip

    proc = launch(tmp_path / "abort", *nan, "train.max_consecutive_skips=2", expect=1)
    assert "2 consecutive updates skipped" in proc.stderr and "NaN/inf" in proc.stderr


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_reward_state_is_restored_on_resume(tmp_path):
    """A reward with state (here: a call counter that places a NaN at its 5th training call) behaves the
    same after a resume as without one."""
    nan = ["+rewards.bad._target_=faulty_reward.NaNOnCalls", "+rewards.bad.weight=0.5",
           "+rewards.bad.calls=[5]"]  # call 5: the first chunk of step 3
    launch(tmp_path / "ref", *nan)
    launch(tmp_path / "cut", *nan, fault="train.mid_update@2:TERM", expect=EXIT_PREEMPTED)
    launch(tmp_path / "cut", *nan)
    assert [r.get("train/skipped_updates") for r in metrics(tmp_path / "cut") if "train/skipped_updates" in r] == [0, 0, 1, 0]
    assert_same_run(tmp_path / "ref", tmp_path / "cut")


def test_config_drift_is_refused_and_infrastructure_keys_may_change(tmp_path):
    launch(tmp_path, "train.steps=1")
    proc = launch(tmp_path, "train.steps=2", "algorithm.kl_beta=0.5", "data.prompts_per_step=2", expect=EXIT_USER_ERROR)
    assert "algorithm.kl_beta: checkpoint=0.01, now=0.5" in proc.stderr
    assert "data.prompts_per_step: checkpoint=4, now=2" in proc.stderr and "train.resume=fresh" in proc.stderr
    # Logging, threads, checkpoint cadence and the schedule's end may change: the run is extended.
    out = launch(tmp_path, "train.steps=2", "logger=wandb", "train.progress=true", "train.save_every=5").stdout
    assert "resuming" in out and max(r["step"] for r in metrics(tmp_path)) == 2
    # fresh: the earlier run is moved aside, not deleted.
    out = launch(tmp_path, "train.steps=1", "train.resume=fresh").stdout
    assert "was moved to" in out
    assert len(list(tmp_path.parent.glob(tmp_path.name + ".replaced-*"))) == 1


def test_sigusr1_under_slurm_saves_requeues_and_exits_75(tmp_path):
    """The SLURM path with a fake scontrol: SIGUSR1 on one rank of two stops both at the same step
    boundary; rank 0 requeues the job; the wandb run id survives into the resumed launch."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    run_dir = tmp_path / "run"
    proc = launch(run_dir, "logger=wandb", "train.steps=3", launcher=TORCHRUN, fault="train.mid_update@1:USR1:1",
                  extra_env=env, expect=1)  # torchrun reports a failed worker with 1; the workers exit 75
    assert f"exitcode  : {EXIT_PREEMPTED}" in proc.stderr
    assert log.read_text().split() == ["requeue", "4242"]
    assert [d.name for d in complete_checkpoints(run_dir)] == ["step_000001"]
    state = json.loads((run_dir / "checkpoints/step_000001/trainer_state.json").read_text())
    launch(run_dir, "logger=wandb", "train.steps=3", launcher=TORCHRUN, extra_env=env)
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith("-" + state["wandb_id"]) for r in runs), runs


def test_two_processes_resume_exactly(tmp_path):
    launch(tmp_path / "ref", launcher=TORCHRUN)
    launch(tmp_path / "cut", launcher=TORCHRUN, fault="train.mid_update@3:TERM:1", expect=1)
    assert [d.name for d in complete_checkpoints(tmp_path / "cut")][-1] == "step_000003"
    launch(tmp_path / "cut", launcher=TORCHRUN)
    assert_same_run(tmp_path / "ref", tmp_path / "cut")


@pytest.mark.slow  # about a minute: run with `make test-all`
def test_zero2_run_on_two_processes_resumes_on_one_through_a_universal_checkpoint(tmp_path):
    two = tmp_path / "two"
    launch(two, "deepspeed=zero2", "train.steps=2", launcher=TORCHRUN)
    launch(tmp_path / "ref", "deepspeed=zero2", "train.steps=3", launcher=TORCHRUN)
    proc = launch(two, "deepspeed=zero2", "train.steps=3")
    assert "universal checkpoint" in proc.stdout and "not bit-exact" in proc.stdout
    assert (two / "checkpoints/step_000002/universal/latest_universal").is_file()
    assert COMPLETE_FILE in os.listdir(two / "checkpoints/step_000003")
    # The optimizer and weights really were restored: step 3 lands next to the 2-process run's step 3.
    wa = load_file(str(two / "checkpoints/step_000003/policy.safetensors"))
    wb = load_file(str(tmp_path / "ref/checkpoints/step_000003/policy.safetensors"))
    w2 = load_file(str(two / "checkpoints/step_000002/policy.safetensors"))
    for k in wa:
        step = (wb[k] - w2[k]).norm()
        assert (wa[k] - wb[k]).norm() <= 1e-3 * step + 1e-7, k


def test_multirun_runs_each_job_in_one_process_and_resumes_per_job(tmp_path):
    sweep = [*TRAIN, "-m", *SMALL, "train.save_every=1", f"hydra.sweep.dir={tmp_path}",
             "run_dir=" + str(tmp_path) + "/job${hydra:job.num}", "train.steps=1,2"]
    env = job_env(PYTHONPATH=HERE, STEERFLOW_FAULT="checkpoint.after_engine@2")
    run(sweep, env=env, expect=-signal.SIGKILL)  # job 0 (1 step) finishes; job 1 dies saving its last step
    assert (tmp_path / "job0" / "summary.json").is_file() and not (tmp_path / "job1" / "summary.json").exists()
    out = run(sweep, env=job_env(PYTHONPATH=HERE)).stdout
    assert "job0 is already complete" in out and "resuming" in out
    assert max(r["step"] for r in metrics(tmp_path / "job1")) == 2 and (tmp_path / "job1" / "summary.json").is_file()
    # The sweep's picture: runs labelled by the swept key, PNGs written.
    out = run([sys.executable, "-m", "launch.plot_sweep", str(tmp_path)]).stdout
    assert "train.steps=1" in out and "train.steps=2" in out
    assert (tmp_path / "sweep_final.png").is_file() and (tmp_path / "sweep_reward.png").is_file()
