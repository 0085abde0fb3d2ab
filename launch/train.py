"""Train: ``python -m launch.train [overrides]``; also ``torchrun -m launch.train`` and
``deepspeed --num_gpus N launch/train.py`` (same code, gloo on CPU, NCCL on GPUs)."""
from __future__ import annotations

import os
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
    from launch.run_dir import default_run_dir
    from trainer.config import validate
    from trainer.distributed import init_distributed, set_threads
    from trainer.grpo import train

    cfg = OmegaConf.to_object(dcfg)
    world = init_distributed(cfg.train.device, cfg.deepspeed.backend)
    validate(cfg, world.world_size)
    set_threads(cfg.train.num_threads, world)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.exp_name, list(HydraConfig.get().overrides.task))
    if (run_dir / "metrics.jsonl").exists():
        # Never append to or overwrite another run's outputs.
        raise FileExistsError(
            f"{run_dir} already holds a run (metrics.jsonl). Resuming is not implemented yet: pass run_dir=<new folder> "
            f"or move {run_dir} away."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_yaml(dcfg, resolve=True)
    if world.is_main:
        (run_dir / "config.yaml").write_text(resolved)
    summary = train(cfg, world, run_dir, resolved)
    if world.is_main:
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
