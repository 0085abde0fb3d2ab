"""Train: ``python -m launch.train [overrides]``; also ``torchrun -m launch.train`` and
``deepspeed --num_gpus N launch/train.py`` (same code, gloo on CPU, NCCL on GPUs)."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (the deepspeed launcher does this): make the repo root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainer.config import register

register()


def _strip_launcher_args() -> None:
    """The deepspeed launcher appends ``--local_rank=N``; Hydra would reject it (LOCAL_RANK is in env)."""
    argv, skip = [sys.argv[0]], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg.startswith("--local_rank="):
            continue
        elif arg == "--local_rank":
            skip = True
        else:
            argv.append(arg)
    sys.argv = argv


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def _main(dcfg: DictConfig) -> None:
    from trainer.errors import reporting_user_errors

    # Inside the task function, so that Hydra's handler (a traceback and its HYDRA_FULL_ERROR hint)
    # only ever sees bugs; steerflow's own errors print one message and exit EXIT_USER_ERROR.
    with reporting_user_errors(verbose=bool(HydraConfig.get().verbose), rank=int(os.environ.get("RANK", 0))):
        _train(dcfg)


def _train(dcfg: DictConfig) -> None:
    from launch.run_dir import default_run_dir, run_dir_problems
    from trainer.config import ConfigError, validate
    from trainer.distributed import init_distributed, set_threads, shutdown_distributed
    from trainer.errors import UserError
    from trainer.loop import train
    from trainer.preemption import EXIT_PREEMPTED, Preempted, StopRequests
    from trainer.resume import prepare_resume

    cfg = OmegaConf.to_object(dcfg)
    world = init_distributed(cfg.train.device, cfg.deepspeed.backend)
    ok = False
    try:
        validate(cfg, world.world_size, files=True)
        set_threads(cfg.train.num_threads, world)
        run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.exp_name, list(HydraConfig.get().overrides.task))
        problems = run_dir_problems(run_dir, "run_dir" if cfg.run_dir else "the run directory")
        if problems:
            raise ConfigError(problems)
        resolved = OmegaConf.to_yaml(dcfg, resolve=True)
        resume = prepare_resume(cfg.train.resume, run_dir, resolved, world, cfg.deepspeed.zero_stage)
        if resume.step > cfg.train.steps:
            raise UserError(f"{resume.checkpoint} is at step {resume.step}, beyond train.steps={cfg.train.steps}; "
                            "raise train.steps or start over with train.resume=fresh")
        if resume.step == cfg.train.steps and (run_dir / "summary.json").is_file():
            if world.is_main:
                print(f"{run_dir} is already complete ({resume.step} steps); nothing to do. "
                      "Raise train.steps to continue it, or train.resume=fresh to run it again.")
            ok = True
            return
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        if world.is_main:
            (run_dir / "config.yaml").write_text(resolved)
        try:
            with StopRequests() as stop:
                summary = train(cfg, world, run_dir, resolved, resume, stop)
        except Preempted as p:
            # Requeueing makes SLURM SIGTERM the job; the checkpoint is sealed, so leave quietly with 75.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if world.is_main:
                print(f"\n{p}. Relaunch the same command to continue (exit code {EXIT_PREEMPTED}).", flush=True)
                if p.requeue and cfg.train.requeue and os.environ.get("SLURM_JOB_ID"):
                    from trainer.slurm import requeue

                    requeue()
            shutdown_distributed()
            sys.exit(EXIT_PREEMPTED)
        except BaseException:
            if created and world.is_main:
                _remove_if_empty(run_dir)
            raise
        _report(summary, run_dir, world)
        ok = True
    finally:
        # Multirun: the next job builds its own process group and engine in this same process. After a
        # failure no barrier: the other ranks may be stuck in another collective.
        shutdown_distributed(clean=ok)


def _remove_if_empty(run_dir: Path) -> None:
    """A launch that failed before logging anything leaves no run directory behind (only its config.yaml)."""
    import shutil

    if (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size:
        return
    if any(f.is_file() and f.name != "config.yaml" for f in run_dir.rglob("*")):
        return
    shutil.rmtree(run_dir, ignore_errors=True)


def _report(summary: dict, run_dir: Path, world) -> None:
    if not world.is_main:
        return
    print(f"\nrun directory: {run_dir}")
    print(f"  metrics:     {run_dir / 'metrics.jsonl'}")
    print(f"  samples:     {run_dir / 'samples'}")
    print(f"  checkpoint:  {summary['checkpoint']}")
    print(f"  summary:     {run_dir / 'summary.json'}")
    print(f"  plots:       {run_dir / 'plots'}")
    for key in sorted(summary["eval_before"]):
        if key.count("/") == 1 and key != "eval/num_prompts":  # per reward; components are in the files
            print(f"  {key}: {summary['eval_before'][key]:.3f} -> {summary['eval_after'][key]:.3f}")
    print(f"  wall time:   {summary['wall_time_s']:.0f} s")


def main() -> None:
    _strip_launcher_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _main()


if __name__ == "__main__":
    main()
