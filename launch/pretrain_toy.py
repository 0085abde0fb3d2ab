"""Pre-train the embedded toy model: ``python -m launch.pretrain_toy out=DIR steps=N``.

Snapshots land in ``out/step_<N>`` with held-out scores in ``out/history.json``. The shipped base is
one of them: ``python -m launch.pretrain_toy ship_from=out/step_<N>`` stores it (fp16) in
models/toy/weights/shapes32, re-scores it and writes its model card.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataclasses import dataclass
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore


@dataclass
class PretrainConfig:
    out: str = "runs/pretrain_toy"
    steps: int = 3000
    batch: int = 64
    lr: float = 1e-3
    eval_every: int = 250
    eval_prompts: int = 128
    image_size: int = 32
    seed: int = 0
    num_threads: int = 1
    t_sampling: str = "uniform"
    layout: str = "grid"  # "free": continuous placement (harder; a longer benchmark)
    init_from: Optional[str] = None  # continue from a snapshot folder instead of a random init
    decay: bool = False  # cosine-anneal the learning rate to 10% over the run
    warmup: int = 200  # linear learning-rate warm-up steps (1 when continuing from a snapshot)
    prompt_dir: str = str(Path(__file__).resolve().parents[1] / "models" / "toy" / "prompts")
    # Ship mode: copy snapshot `ship_from` into `ship_to` (fp16), re-score it and write its model card.
    ship_from: Optional[str] = None
    ship_to: Optional[str] = None  # default: models/toy/weights/<world><image_size>
    world: str = "shapes"  # "shapes" (GenEval-like scenes), "digits" (sklearn's digits; image_size=16) or "text" (words, OCR)


ConfigStore.instance().store(name="pretrain_toy", node=PretrainConfig)


@hydra.main(config_path=None, config_name="pretrain_toy", version_base="1.3")
def main(cfg: PretrainConfig) -> None:
    import torch

    from trainer.pretrain import pretrain_toy

    torch.set_num_threads(cfg.num_threads)
    if cfg.ship_from:
        from trainer.pretrain import ship_snapshot

        ship_to = Path(cfg.ship_to or Path(__file__).resolve().parents[1] / "models" / "toy" / "weights"
                       / f"{cfg.world}{cfg.image_size}")
        row = ship_snapshot(Path(cfg.ship_from), ship_to, cfg.image_size, cfg.seed, cfg.eval_prompts,
                            prompt_dir=Path(cfg.prompt_dir), world_name=cfg.world, layout=cfg.layout)
        print(f"shipped {cfg.ship_from} -> {ship_to}: {row}")
        return
    pretrain_toy(Path(cfg.out), cfg.steps, cfg.batch, cfg.lr, cfg.eval_every, cfg.image_size, cfg.seed,
                 Path(cfg.prompt_dir), eval_prompts=cfg.eval_prompts,
                 t_sampling=cfg.t_sampling, layout=cfg.layout,
                 init_from=Path(cfg.init_from) if cfg.init_from else None, decay=cfg.decay, world_name=cfg.world,
                 warmup=cfg.warmup)


if __name__ == "__main__":
    # Hydra writes no folder or log of its own here: the outputs are the snapshots in `out`.
    sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    main()
