"""SLURM launch pieces without a cluster: hostlists, ranks from an srun task's environment (and a real
two-process group formed from it), self-requeue against a fake ``scontrol``, the sbatch template run
against a fake ``srun``, and the submitit launcher config rendered to the sbatch text it would submit."""
from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainer.slurm import current_job_id, expand_nodelist, in_slurm_job, requeue, torch_env_from_slurm

REPO = Path(__file__).resolve().parents[3]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"


# --- hostlists ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node01", ["node01"]),
        ("node[01-03,07],gpu-a5,rack1-[2-3]", ["node01", "node02", "node03", "node07", "gpu-a5", "rack1-2", "rack1-3"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),  # no padding: widths grow
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),  # padding from the lower bound
        ("a[1,3],b[2]", ["a1", "a3", "b2"]),  # commas inside brackets do not split hosts
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),  # several bracket groups: a product
        ("gpu-[1-2]-ib", ["gpu-1-ib", "gpu-2-ib"]),
        ("", []),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node01]", "node[[1]]", "node[3-1]", "node[]", "node[a-b]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="nodelist"):
        expand_nodelist(bad)


# --- environment of an srun task ----------------------------------------------------------------


def _srun_task(procid: int, localid: int, nodeid: int, **extra) -> dict[str, str]:
    """What srun gives task ``procid`` of a 2-node step of 4 + 3 tasks (job-level variables included)."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NTASKS": "7",
        "SLURM_TASKS_PER_NODE": "4,3",
        "SLURM_STEP_NUM_TASKS": "7",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_STEP_TASKS_PER_NODE": "4,3",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid),
    }
    env.update(extra)
    return env


def test_srun_task_gets_torch_ranks():
    env = torch_env_from_slurm(_srun_task(procid=5, localid=1, nodeid=1))
    assert env == {
        "RANK": "5",
        "WORLD_SIZE": "7",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "3",  # the second node runs 3 tasks
        "MASTER_ADDR": "gpu07",  # the step's first host, padding kept
        "MASTER_PORT": str(10000 + 4242 % 20000),
    }
    assert torch_env_from_slurm(_srun_task(procid=0, localid=0, nodeid=0))["LOCAL_WORLD_SIZE"] == "4"


def test_every_task_of_a_step_agrees_on_the_rendezvous():
    """Ranks 0..N-1 exactly once, one MASTER_ADDR:PORT, local ranks 0..n-1 on each node."""
    tasks = [(0, 0, 0), (1, 1, 0), (2, 2, 0), (3, 3, 0), (4, 0, 1), (5, 1, 1), (6, 2, 1)]
    envs = [torch_env_from_slurm(_srun_task(*t)) for t in tasks]
    assert sorted(int(e["RANK"]) for e in envs) == list(range(7))
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("gpu07", "14242")}
    assert all(int(e["LOCAL_RANK"]) < int(e["LOCAL_WORLD_SIZE"]) for e in envs)


def test_compressed_tasks_per_node():
    """SLURM writes repeated counts as "8(x2)": the third node of "8(x2),2" runs 2 tasks."""
    env = _srun_task(procid=17, localid=1, nodeid=2, SLURM_STEP_TASKS_PER_NODE="8(x2),2", SLURM_STEP_NUM_TASKS="18")
    assert torch_env_from_slurm(env)["LOCAL_WORLD_SIZE"] == "2"
    env = _srun_task(procid=9, localid=1, nodeid=1, SLURM_STEP_TASKS_PER_NODE="8(x2),2", SLURM_STEP_NUM_TASKS="18")
    assert torch_env_from_slurm(env)["LOCAL_WORLD_SIZE"] == "8"


def test_step_values_win_over_job_values():
    """A step on part of the allocation: WORLD_SIZE and MASTER_ADDR come from the step, not the job."""
    env = _srun_task(
        procid=0, localid=0, nodeid=0, SLURM_JOB_NODELIST="gpu[01-08]", SLURM_NTASKS="64", SLURM_TASKS_PER_NODE="8(x8)",
        SLURM_STEP_NODELIST="gpu[05-06]", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)",
    )
    out = torch_env_from_slurm(env)
    assert (out["WORLD_SIZE"], out["MASTER_ADDR"], out["LOCAL_WORLD_SIZE"]) == ("2", "gpu05", "1")


def test_bare_batch_shell_is_a_one_process_run():
    """The batch script itself has SLURM_NTASKS (the allocation's) but is one process, not a step task."""
    batch = {k: v for k, v in _srun_task(0, 0, 0).items() if not k.startswith("SLURM_STEP_")}
    assert in_slurm_job(batch)
    assert torch_env_from_slurm(batch) == {}


def test_launcher_ranks_are_left_alone():
    """torchrun inside srun already chose RANK: nothing is replaced."""
    assert torch_env_from_slurm(_srun_task(3, 3, 0, RANK="11", WORLD_SIZE="16")) == {}


def test_preset_master_address_and_port_are_kept():
    out = torch_env_from_slurm(_srun_task(1, 1, 0, MASTER_ADDR="10.0.0.1", MASTER_PORT="29500"))
    assert "MASTER_ADDR" not in out and "MASTER_PORT" not in out
    assert out["RANK"] == "1"


def test_outside_slurm():
    assert not in_slurm_job({})
    assert torch_env_from_slurm({}) == {}
    assert current_job_id({}) is None


def test_array_element_is_named_by_array_id():
    env = {"SLURM_JOB_ID": "1005", "SLURM_ARRAY_JOB_ID": "1000", "SLURM_ARRAY_TASK_ID": "5"}
    assert current_job_id(env) == "1000_5"
    assert current_job_id({"SLURM_JOB_ID": "77"}) == "77"


def _free_port_in_slurm_range() -> int:
    """A free port that 10000 + job_id % 20000 can produce, so the test exercises the derived port."""
    rnd = random.Random()
    for _ in range(200):
        port = rnd.randrange(10000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 10000-29999")


def test_two_srun_tasks_form_a_process_group(tmp_path):
    """init_distributed in two processes that carry only SLURM's variables (as bare srun tasks do)
    joins one gloo group of size 2 on the port derived from the job id."""
    port = _free_port_in_slurm_range()
    script = textwrap.dedent(
        """
        import os, sys
        import torch
        from trainer.distributed import all_reduce_sum, init_distributed, shutdown_distributed
        world = init_distributed("cpu", "gloo")
        total = all_reduce_sum(torch.tensor([float(world.rank + 1)]))
        print(world.rank, world.world_size, world.local_rank, world.local_world_size, int(total.item()),
              os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], flush=True)
        # As the trainer does: exiting with a live gloo group can abort ("terminate called without an active exception").
        shutdown_distributed()
        """
    )
    # Only the variables srun would set: none from a launcher or a SLURM job the tests may run in.
    launcher_keys = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    base = {k: v for k, v in os.environ.items() if k not in launcher_keys and not k.startswith("SLURM_")}
    procs = []
    for rank in range(2):
        env = dict(base, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", SLURM_JOB_ID=str(port - 10000),
                   SLURM_JOB_NODELIST="localhost", SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_TASKS="2",
                   SLURM_STEP_TASKS_PER_NODE="2", SLURM_NTASKS="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                   SLURM_NODEID="0")
        procs.append(subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    lines = sorted(out.strip().splitlines()[-1] for out, _ in outs)
    assert lines == [f"0 2 0 2 3 localhost {port}", f"1 2 1 2 3 localhost {port}"]


# --- requeue ------------------------------------------------------------------------------------


def _fake_scontrol(folder: Path, exit_code: int = 0, stderr: str = "") -> Path:
    """An executable ``scontrol`` that appends its arguments to folder/calls and exits ``exit_code``."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "scontrol"
    exe.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{folder / "calls"}"\n'
        + (f'echo "{stderr}" >&2\n' if stderr else "")
        + f"exit {exit_code}\n"
    )
    exe.chmod(0o755)
    return folder / "calls"


def test_requeue_runs_scontrol_from_path(tmp_path, monkeypatch, capsys):
    calls = _fake_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert requeue() is True
    assert calls.read_text().split("\n")[:-1] == ["requeue 123"]
    assert "requeued job 123" in capsys.readouterr().out


def test_requeue_of_an_array_element(tmp_path, monkeypatch):
    calls = _fake_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "1005")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1000")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    assert requeue() is True
    assert calls.read_text().strip() == "requeue 1000_5"


def test_refused_requeue_says_what_to_run(tmp_path, capsys):
    refusal = "scontrol: error: Requested operation is presently disabled"
    calls = _fake_scontrol(tmp_path / "bin", exit_code=1, stderr=refusal)
    assert requeue("123", scontrol=str(tmp_path / "bin" / "scontrol")) is False
    assert calls.read_text().strip() == "requeue 123"
    err = capsys.readouterr().err
    assert "will NOT come back" in err and "scontrol requeue 123" in err
    assert "presently disabled" in err  # scontrol's own reason is passed on


def test_missing_scontrol_does_not_raise(tmp_path, capsys):
    assert requeue("123", scontrol=str(tmp_path / "no-such-scontrol")) is False
    assert "scontrol requeue 123" in capsys.readouterr().err


def test_requeue_outside_slurm(monkeypatch, capsys):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    assert requeue(scontrol="/bin/false") is False
    assert "not inside a SLURM job" in capsys.readouterr().err


# --- the sbatch template ------------------------------------------------------------------------


def _sbatch_options() -> dict[str, str]:
    """``#SBATCH --key=value`` lines (only those before the first command count for sbatch)."""
    opts = {}
    for line in SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH"):
            key, _, value = line.split(None, 1)[1].partition("=")
            opts[key] = value
        elif line.strip() and not line.startswith("#"):
            break
    return opts


def test_sbatch_template_parses_and_requests_requeue_and_signal():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    opts = _sbatch_options()
    assert "--requeue" in opts
    # No "B:": the signal must reach the srun tasks (the ranks), not only the batch shell.
    assert re.fullmatch(r"USR1@\d+", opts["--signal"]), opts["--signal"]
    assert opts["--open-mode"] == "append"  # a requeued job appends to its log
    assert opts["--ntasks-per-node"] == opts["--gpus-per-node"]  # one task per GPU
    assert "%j" in opts["--output"]


def _run_sbatch(tmp_path: Path, srun_exit: int, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run the template's body with a fake ``srun`` first on PATH; returns the result and srun's args."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > "{tmp_path / "srun_args"}"\nexit {srun_exit}\n')
    srun.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="555",
               SLURM_JOB_NODELIST="gpu01", SLURM_CPUS_PER_TASK="8")
    proc = subprocess.run(["bash", str(SBATCH), *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    return proc, (tmp_path / "srun_args").read_text()


def test_sbatch_runs_one_train_per_task_and_passes_overrides(tmp_path):
    proc, srun_args = _run_sbatch(tmp_path, 0, "experiment=toy_digits", "rewards.digit.weight=0.5")
    assert proc.returncode == 0, proc.stderr
    args = srun_args.splitlines()
    assert args[-5:] == ["python", "-m", "launch.train", "experiment=toy_digits", "rewards.digit.weight=0.5"]
    assert "--cpus-per-task=8" in args


def test_sbatch_treats_exit_75_as_requeued(tmp_path):
    proc, _ = _run_sbatch(tmp_path, 75)
    assert proc.returncode == 0, proc.stderr
    assert "exit 75" in proc.stdout and "scontrol requeue 555" in proc.stdout


def test_sbatch_passes_other_failures_on(tmp_path):
    proc, _ = _run_sbatch(tmp_path, 3)
    assert proc.returncode == 3
    assert "exit 75" not in proc.stdout


# --- the submitit launcher config ---------------------------------------------------------------


def _compose_slurm(overrides=()):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    from hydra import compose, initialize_config_dir

    from trainer.config import register

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)


def test_submitit_launcher_config_composes():
    cfg = _compose_slurm(["hydra.launcher.tasks_per_node=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 4  # follows tasks_per_node: one task per GPU
    assert launcher.additional_parameters.requeue is True


def test_submitit_renders_requeue_and_signal(tmp_path, monkeypatch):
    """The sbatch text submitit would submit for a 2-node sweep point, built by the launcher's own
    parameter translation (SlurmLauncher.launch), stopped just before anything is submitted."""
    cfg = _compose_slurm(["hydra.launcher.nodes=2", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    import submitit
    from hydra.utils import instantiate

    # SlurmExecutor refuses to exist where there is no srun; a stub on PATH stands in.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    class Submitted(Exception):
        pass

    executors = []
    real = submitit.AutoExecutor

    def recording_executor(*args, **kwargs):
        ex = real(*args, **kwargs)
        executors.append(ex)
        ex.map_array = lambda *a, **k: (_ for _ in ()).throw(Submitted())
        return ex

    monkeypatch.setattr(submitit, "AutoExecutor", recording_executor)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg  # what Launcher.setup stores; launch() reads only the config
    with pytest.raises(Submitted):
        launcher.launch([["rewards.digit.weight=0.5"]], initial_job_idx=0)
    slurm = executors[0]._executor
    assert slurm.max_num_timeout == 20
    text = slurm._make_submission_file_text(slurm._submitit_command_str, "uid")
    flags = set(re.findall(r"^#SBATCH (\S+)$", text, flags=re.M))
    signal_name = submitit.JobEnvironment.USR_SIG  # USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
    assert {"--requeue", f"--signal={signal_name}@180", "--open-mode=append", "--nodes=2", "--ntasks-per-node=8",
            "--gpus-per-node=8", "--cpus-per-task=8", "--time=240", "--job-name=steerflow"} <= flags
    assert not any(f.startswith("--signal=B:") for f in flags)
    assert re.search(r"^srun .*-m submitit\.core\._submit ", text, flags=re.M)
