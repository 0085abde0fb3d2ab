"""Process-group setup and the few collectives the loop needs (gloo on CPU, NCCL on GPUs)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_SELF_RDZV = "STEERFLOW_SELF_RENDEZVOUS"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_comm_op_safely() -> None:
    """Load DeepSpeed's CPU shared-memory comm op without the stale-lock hang.

    DeepSpeed JIT-loads this op on every start, and torch guards the build folder with a plain lock
    file (FileBaton). A process killed inside that window (kill -9, preemption, a crashed node) leaves
    the file behind, and every later start on the machine waits on it forever. Here the load runs
    under an flock, which the kernel releases when its holder dies: holding it, a leftover lock file
    can only be stale, so it is removed. DeepSpeed is then handed the loaded module instead of loading
    it again. (Only steerflow processes take the flock; a foreign DeepSpeed build at the same instant
    could race, which is harmless when the op is already built.)
    """
    import fcntl
    import sys

    # One build per environment: two venvs sharing the default folder rebuild it for each other.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    import importlib

    # importlib: `import deepspeed.comm.torch as m` binds the torch package (deepspeed.comm imports torch).
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    from deepspeed.accelerator import get_accelerator
    from torch.utils import cpp_extension

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or getattr(ds_torch.build_shm_op, "steerflow_loaded", False):
        return
    build_dir = cpp_extension._get_build_directory(builder.name, verbose=False)
    with open(os.path.join(os.path.dirname(build_dir), f"{builder.name}.steerflow.flock"), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        stale = os.path.join(build_dir, "lock")
        if os.path.exists(stale):
            os.remove(stale)
        module = ds_torch.build_shm_op()

    def loaded():
        return module

    loaded.steerflow_loaded = True
    ds_torch.build_shm_op = loaded


def init_distributed(device: str = "auto", backend: str = "auto") -> World:
    """Join (or create) the process group that rollout and learning share.

    Launchers (torchrun, deepspeed, srun+torchrun) set RANK/WORLD_SIZE/MASTER_*; a plain
    ``python -m launch.train`` gets a one-process group on a free loopback port, so the same code
    path runs everywhere.
    """
    if device == "cpu":
        # Otherwise DeepSpeed detects the GPU and moves the model there behind the policy's back.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    _load_comm_op_safely()
    from trainer.slurm import torch_env_from_slurm

    # A bare `srun python -m launch.train` task (one per GPU, no torchrun) gets its ranks from SLURM's env.
    os.environ.update(torch_env_from_slurm(os.environ))
    if "RANK" not in os.environ:
        # Marked as ours, so shutdown_distributed() removes it and the next job gets a fresh port.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", **{_SELF_RDZV: "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    world = dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return World(dist.get_rank(), world, local_rank, local_world, dev)


def shutdown_distributed(clean: bool = True) -> None:
    """Tear the process group down, so a Hydra multirun's next job (same process) can build its own.

    ``clean``: all ranks got here together (a barrier first); False after an error on this rank.
    """
    if dist.is_initialized():
        if clean:
            barrier()
        dist.destroy_process_group()
        # DeepSpeed caches a clone of the world group at module level; a new engine in this process
        # would use the destroyed one ("Group ... is not registered") unless the cache is dropped.
        from deepspeed.utils import groups

        groups._WORLD_GROUP = None
        groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    if os.environ.get(_SELF_RDZV) == "1":
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", _SELF_RDZV):
            os.environ.pop(key, None)


def set_threads(num_threads: int, world: World) -> int:
    """Pin torch's CPU threads; oversubscribing 2 cores with 2 processes x 2 threads is ~50x slower."""
    if num_threads <= 0:
        num_threads = max(1, (os.cpu_count() or 1) // world.local_world_size)
    torch.set_num_threads(num_threads)
    return num_threads


def _comm_device() -> torch.device:
    """Where collective buffers must live: NCCL only moves CUDA tensors, gloo only CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0, in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    local = t.to(_comm_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX)


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        local = t.to(_comm_device()).clone()
        dist.all_reduce(local, op=op)
        return local.to(t.device)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def global_nanmean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over all ranks of each [N_local] tensor, ignoring NaN (a reward component a prompt kind lacks).

    One all-reduce for all keys: a collective per metric would cost a network round trip each.
    """
    keys = sorted(values)
    if dist.is_initialized() and dist.get_world_size() > 1:
        # Ranks may hold different keys (a component only some prompts have, a remote reward that
        # failed on one rank): reduce over the union, a missing key counting as no values, instead of
        # mismatched all-reduces (an error or a hang).
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, keys)
        keys = sorted(set().union(*every))
        n = next(iter(values.values())).numel() if values else 0
        values = {k: values.get(k, torch.full((max(n, 1),), float("nan"))) for k in keys}
    if not keys:
        return {}
    # float64 sums: exact for fp32 inputs at these sizes, so the mean does not depend on how the
    # samples are split across ranks (1 and N processes log identical numbers).
    stacked = torch.stack([values[k].detach().double().cpu().reshape(-1) for k in keys])  # [K, N]
    finite = torch.isfinite(stacked)
    sums = all_reduce_sum(torch.cat([torch.where(finite, stacked, 0.0).sum(1), finite.sum(1).double()]))
    k = len(keys)
    return {key: (sums[i] / sums[k + i]).item() if sums[k + i] > 0 else float("nan") for i, key in enumerate(keys)}
