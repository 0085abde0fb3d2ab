"""Generate with a trained checkpoint: ``python -m launch.sample checkpoint=PATH prompts=FILE out=DIR``.

Writes one PNG per (prompt, sample) and ``index.jsonl`` rows {file, prompt, prompt_index, sample, seed,
steps, guidance_scale}. The model is rebuilt from the checkpoint's config.yaml and its trained weights
loaded from policy.safetensors; sampling is the ODE (noise 0) unless ``noise_level`` is set.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class SampleConfig:
    checkpoint: str = MISSING  # a run's checkpoints/step_<N> folder
    prompts: str = MISSING  # text file, one prompt per line
    out: str = MISSING
    num_per_prompt: int = 1
    seed: int = 0
    num_steps: Optional[int] = None  # default: the run's sampler.eval_num_steps
    guidance_scale: Optional[float] = None  # default: the run's sampler.guidance_scale
    noise_level: float = 0.0
    batch: int = 16
    device: str = "auto"
    num_threads: int = 0


ConfigStore.instance().store(name="sample", node=SampleConfig)


def sample(cfg: SampleConfig) -> Path:
    """Generate and write the images; returns the index.jsonl path."""
    import json

    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from PIL import Image
    from safetensors.torch import load_file
    from tqdm import tqdm

    from trainer.checkpoint import CONFIG_FILE, POLICY_FILE
    from trainer.prompts import load_prompts
    from trainer.rng import STREAM_EVAL, seed_for
    from trainer.rollout import rollout_chunks

    ckpt = Path(cfg.checkpoint)
    for name in (CONFIG_FILE, POLICY_FILE):
        if not (ckpt / name).is_file():
            raise FileNotFoundError(f"checkpoint={cfg.checkpoint!r} has no {name}; pass a run's checkpoints/step_<N> folder")
    run_cfg = OmegaConf.load(ckpt / CONFIG_FILE)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    policy = instantiate(run_cfg.model, device=device, needs_reference=False)
    policy.load_trainable_state_dict(load_file(str(ckpt / POLICY_FILE)))
    steps = cfg.num_steps or run_cfg.sampler.eval_num_steps
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else run_cfg.sampler.guidance_scale
    # The run's sampler (window, log-prob reduction, ...) with this command's noise, steps and guidance.
    sampler = instantiate(run_cfg.sampler, noise_level=cfg.noise_level, num_steps=steps, guidance_scale=guidance)
    prompts = load_prompts(cfg.prompts, "prompts")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pids = torch.arange(len(prompts)).repeat_interleave(cfg.num_per_prompt)
    sids = torch.arange(cfg.num_per_prompt).repeat(len(prompts))
    index = out / "index.jsonl"
    with index.open("w") as f, torch.no_grad():
        for start in tqdm(range(0, len(pids), cfg.batch), desc="sample", unit="batch"):
            p, s = pids[start : start + cfg.batch], sids[start : start + cfg.batch]
            _, images = rollout_chunks(policy, sampler, prompts, p, s, (cfg.seed, STREAM_EVAL, 0), steps, guidance,
                                       cfg.batch, policy.height, policy.width)
            arr = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for img, pi, si in zip(arr, p.tolist(), s.tolist()):
                name = f"{pi:05d}_{si:02d}.png"
                Image.fromarray(img).save(out / name)
                f.write(json.dumps({
                    "file": name, "prompt": prompts[pi], "prompt_index": pi, "sample": si,
                    "seed": seed_for(cfg.seed, STREAM_EVAL, 0, pi, si), "steps": steps, "guidance_scale": guidance,
                    "checkpoint": str(ckpt),
                }) + "\n")
    return index


@hydra.main(config_path=None, config_name="sample", version_base="1.3")
def _main(cfg: SampleConfig) -> None:
    from trainer.config import register

    register()  # the run's config.yaml may use ${sf.root:}
    index = sample(cfg)
    print(f"wrote {index} and the PNGs beside it")


def main() -> None:
    # No Hydra output folder or log file: the outputs are the PNGs and index.jsonl in `out`.
    sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    _main()


if __name__ == "__main__":
    main()
