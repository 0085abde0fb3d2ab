"""SLURM glue: hostlist expansion, the torch.distributed environment of an ``srun`` task, self-requeue.

Functions of an environment mapping (no module state), testable without a cluster; only
:func:`requeue` has an effect (it runs ``scontrol``). ``srun python -m launch.train ...`` with one
task per GPU needs no torchrun: ``init_distributed`` applies :func:`torch_env_from_slurm` first.
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from collections.abc import Mapping

# MASTER_PORT = _PORT_BASE + job_id % _PORT_SPAN: every task of a job computes the same port with no
# communication, and 10000..29999 stays below Linux's default ephemeral range (32768-60999), where
# outgoing connections on the master node could already hold the port.
_PORT_BASE = 10000
_PORT_SPAN = 20000


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM hostlist syntax into host names, in order.

    ``"node[01-03,07],gpu-a5,rack1-[2-3]"`` -> ``node01 node02 node03 node07 gpu-a5 rack1-2 rack1-3``.
    Zero padding is kept (the width of a range's lower bound, as SLURM writes it); several bracket
    groups in one name expand as a product (``r[1-2]n[1-2]`` -> ``r1n1 r1n2 r2n1 r2n2``).

    Raises:
        ValueError: unbalanced or nested brackets, or a range that is not ``lo-hi`` with ``lo <= hi``.
    """
    hosts: list[str] = []
    for group in _split_top_level(nodelist.strip()):
        # Alternating literal text and bracket bodies: "a[1-2]b[3]" -> ["a", "1-2", "b", "3", ""].
        parts = re.split(r"\[([^\[\]]*)\]", group)
        choices = [[p] if i % 2 == 0 else _expand_ranges(p, nodelist) for i, p in enumerate(parts)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas outside brackets: ``"a[1,2],b"`` -> ``["a[1,2]", "b"]``."""
    groups, depth, start = [], 0, 0
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if depth < 0 or depth > 1:
            raise ValueError(f"unbalanced or nested brackets in SLURM nodelist {nodelist!r}")
        if c == "," and depth == 0:
            groups.append(nodelist[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced or nested brackets in SLURM nodelist {nodelist!r}")
    groups.append(nodelist[start:])
    return [g for g in groups if g]


def _expand_ranges(body: str, nodelist: str) -> list[str]:
    """``"01-03,07"`` -> ``["01", "02", "03", "07"]``."""
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"bad range {item!r} in SLURM nodelist {nodelist!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def _tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed counts: ``"4(x2),3"`` -> ``[4, 4, 3]``."""
    counts = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise ValueError(f"bad SLURM tasks-per-node value {spec!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def in_slurm_job(env: Mapping[str, str] | None = None) -> bool:
    """True inside a SLURM allocation (batch shell, salloc shell or srun task)."""
    return "SLURM_JOB_ID" in (os.environ if env is None else env)


def torch_env_from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables for a task of an ``srun`` step, or ``{}``.

    Only a task of a step has ``SLURM_STEP_NUM_TASKS``; the bare batch shell has ``SLURM_NTASKS``
    but is one process, so it gets ``{}`` (a plain one-process run). ``{}`` too when ``RANK`` is set:
    torchrun or another launcher already chose the ranks. MASTER_ADDR (the step's first host) and
    MASTER_PORT (derived from the job id, identical in every task) are left out when already set.

    Returns:
        RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and, unless set, MASTER_ADDR, MASTER_PORT.

    Raises:
        KeyError: a variable every srun task has (SLURM_PROCID, ...) is missing.
    """
    if "RANK" in env or "SLURM_STEP_NUM_TASKS" not in env:
        return {}
    per_node = _tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env["SLURM_TASKS_PER_NODE"])
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": env["SLURM_LOCALID"],
        # SLURM_NODEID indexes the step's nodes, the same order as the tasks-per-node list.
        "LOCAL_WORLD_SIZE": str(per_node[int(env["SLURM_NODEID"])]),
    }
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])[0]
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(_PORT_BASE + int(env["SLURM_JOB_ID"]) % _PORT_SPAN)
    return out


def current_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """The id ``scontrol`` takes for this job: ``<array job>_<task>`` for an array element, else SLURM_JOB_ID."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue(job_id: str | None = None, scontrol: str = "scontrol") -> bool:
    """Put this job back in the queue with ``scontrol requeue <id>``; never raises.

    SLURM then ends the running job (SIGTERM, SIGKILL after its KillWait), so call this only once the
    checkpoint is complete on every rank. The requeued job runs the same batch script (same job id,
    same log file with ``--open-mode=append``), and the same command resumes the same run directory.

    Args:
        job_id: defaults to this job's (see :func:`current_job_id`).
        scontrol: the scontrol executable (tests pass a fake).

    Returns:
        True when scontrol accepted the requeue; False (with a message on stderr saying what to run)
        when not in a SLURM job, scontrol is missing, times out or refuses.
    """
    jid = job_id if job_id is not None else current_job_id()
    if not jid:
        print("slurm: not inside a SLURM job (no SLURM_JOB_ID), nothing to requeue; relaunch the same command "
              "to resume from the latest checkpoint", file=sys.stderr, flush=True)
        return False
    try:
        # A busy or unreachable slurmctld can stall scontrol; 60 s keeps the exit well inside the
        # --signal margin before the time limit.
        proc = subprocess.run([scontrol, "requeue", jid], capture_output=True, text=True, timeout=60)
        reason = "" if proc.returncode == 0 else f"exit code {proc.returncode}: {(proc.stderr or proc.stdout).strip()}"
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        reason = f"{type(e).__name__}: {e}"
    if not reason:
        print(f"slurm: requeued job {jid}; it resumes from the latest checkpoint when it starts again", flush=True)
        return True
    print(f"slurm: `{scontrol} requeue {jid}` failed ({reason}). The job will NOT come back by itself: run "
          f"`scontrol requeue {jid}` (the job must be a batch job submitted with --requeue), or submit the same "
          "command again; it resumes from the latest checkpoint in the same run directory.",
          file=sys.stderr, flush=True)
    return False
