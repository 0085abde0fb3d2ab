"""Export a trained checkpoint for diffusers: ``python -m launch.export checkpoint=PATH out=DIR [merge=true]``.

- default: the LoRA weights in diffusers' format (``pytorch_lora_weights.safetensors``), for
  ``<Pipeline>.from_pretrained(BASE).load_lora_weights(DIR)``;
- ``merge=true``: a complete diffusers folder (the base folder's components with the trained
  transformer, LoRA merged in), for ``<Pipeline>.from_pretrained(DIR)``; the only form for a full
  fine-tune.

Both write ``README.md``, a model card: base model, family, fine-tuning mode, rewards, algorithm,
sampler, steps, evaluation before/after (from the run's metrics.jsonl) and the exact resolved config.
The model is rebuilt from the checkpoint's config.yaml by its own adapter (``save_lora`` /
``save_merged``), so every model family exports the same way. The export is written to a hidden
sibling folder first and renamed into place when complete: a stopped export never leaves a folder
that looks whole, and ``overwrite=true`` replaces an old export only once the new one is complete.
The checkpoint's files are checked against their checksums (COMPLETE.json) before they are read.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainer.errors import UserError


@dataclass
class ExportConfig:
    checkpoint: str = MISSING  # a run's checkpoints/step_<N> folder
    out: str = MISSING  # folder to write; refused if it holds anything, unless overwrite=true
    merge: bool = False  # false: LoRA weights (diffusers format); true: a full diffusers folder
    ema: bool = False  # export the EMA of the weights (ema.safetensors: a run with train.ema_decay) instead of the weights
    overwrite: bool = False  # replace a non-empty `out` (only after the new export is complete)
    dtype: Optional[str] = None  # merge=true only: the merged weights' dtype (default: the run's model.dtype)
    device: str = "cpu"  # where the model is rebuilt and merged


ConfigStore.instance().store(name="export", node=ExportConfig)


class ExportError(UserError, ValueError):
    """The export's arguments are wrong (every problem listed, each with its fix)."""


def _problems(cfg: ExportConfig) -> list[str]:
    """Every reason the export cannot run, found before the model loads."""
    from trainer.checkpoint import CONFIG_FILE, EMA_FILE, POLICY_FILE

    p = []
    ckpt = Path(cfg.checkpoint)
    missing = [n for n in (CONFIG_FILE, POLICY_FILE) if not (ckpt / n).is_file()]
    if missing:
        p.append(f"checkpoint={cfg.checkpoint!r} has no {' or '.join(missing)}: pass a run's checkpoints/step_<N> folder")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        p.append(f"out={cfg.out!r} is a file: pass a folder")
    elif out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        p.append(f"out={cfg.out!r} is not empty: pass another folder, or overwrite=true to replace it "
                 "(the old contents are removed only after the new export is complete)")
    # overwrite=true replaces `out` whole: never when that would delete the base model or the run.
    if not missing:
        from omegaconf import OmegaConf

        from trainer.config import register

        register()  # the run's config.yaml may use ${sf.root:}
        model = OmegaConf.load(ckpt / CONFIG_FILE).model
        base = model.get("path")
        if model.get("finetune") == "full" and not cfg.merge:
            p.append("the run fine-tuned every weight (model.finetune=full), so there is no LoRA to export: "
                     "add merge=true for a full diffusers folder")
        protected = {"the base model folder (model.path)": Path(base)} if base else {}
        protected["the checkpoint"] = ckpt
        for what, path in protected.items():
            if path.resolve() == out.resolve() or out.resolve() in path.resolve().parents:
                p.append(f"out={cfg.out!r} holds {what} ({path}): export to another folder")
    if cfg.ema and not (ckpt / EMA_FILE).is_file():
        # Exporting the raw weights under an "EMA" label would be a silent lie.
        p.append(f"ema=true: checkpoint={cfg.checkpoint!r} holds no EMA of the policy ({EMA_FILE}; the run did not set "
                 "train.ema_decay): drop ema=true to export the trained weights")
    if cfg.dtype is not None and not cfg.merge:
        p.append(f"dtype={cfg.dtype} sets the merged weights' dtype and applies only with merge=true "
                 "(LoRA weights are saved as trained); drop dtype or add merge=true")
    return p


def export(cfg: ExportConfig) -> Path:
    """Write the export described by ``cfg``; returns the ``out`` folder.

    Raises ValueError listing every problem with the arguments (including a full fine-tune without
    merge=true) before any model loads. Whatever fails later leaves ``out`` as it was.
    """
    from trainer.checkpoint import CONFIG_FILE, POLICY_FILE, check_files

    ckpt = Path(cfg.checkpoint)
    if (ckpt / CONFIG_FILE).is_file() and (ckpt / POLICY_FILE).is_file():
        check_files(ckpt, (CONFIG_FILE, POLICY_FILE))  # before _problems reads config.yaml
    problems = _problems(cfg)
    if problems:
        raise ExportError("cannot export:\n  - " + "\n  - ".join(problems))
    from launch.sample import load_policy, publish, staging
    from trainer.checkpoint import EMA_FILE, load_safetensors

    if cfg.ema:
        check_files(Path(cfg.checkpoint), (EMA_FILE,))
    policy, run_cfg = load_policy(cfg.checkpoint, cfg.device, **({"dtype": cfg.dtype} if cfg.dtype else {}))
    if cfg.ema:
        policy.load_trainable_state_dict(load_safetensors(Path(cfg.checkpoint) / EMA_FILE))
    out = Path(cfg.out).resolve()  # resolved: "." or "dir/" still have a name for the sibling folders
    tmp = staging(out)  # a previous export stopped midway is removed
    try:
        if cfg.merge:
            policy.save_merged(tmp)
        else:
            policy.save_lora(tmp)
        (tmp / "README.md").write_text(model_card(Path(cfg.checkpoint), run_cfg, merge=cfg.merge, out=out, ema=cfg.ema))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out)
    return out


# ------------------------------------------------------------------ model card
def checkpoint_step(ckpt: Path) -> int | None:
    """The training step a checkpoint was saved at (trainer_state.json, else the folder name)."""
    from trainer.checkpoint import STATE_FILE

    if (ckpt / STATE_FILE).is_file():
        return int(json.loads((ckpt / STATE_FILE).read_text())["step"])
    match = re.fullmatch(r"step_(\d+)", ckpt.name)
    return int(match.group(1)) if match else None


def eval_scores(ckpt: Path, step: int | None) -> tuple[dict, dict, str]:
    """(scores at step 0, scores at ``step``, where they came from) from the run's metrics.jsonl.

    The run directory is the checkpoint's grandparent (``run/checkpoints/step_<N>``). Empty dicts
    when the run's metrics are not there (a checkpoint copied on its own).
    """
    metrics = ckpt.resolve().parent.parent / "metrics.jsonl"
    if not metrics.is_file():
        return {}, {}, f"no metrics.jsonl beside the checkpoint ({metrics})"
    evals = {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "eval/num_prompts" in row:
            # metrics.jsonl writes NaN/inf as strings (JSON has none).
            evals[row["step"]] = {k: float(v) if isinstance(v, str) else v for k, v in row.items() if k.startswith("eval/")}
    return evals.get(0, {}), evals.get(step, {}), str(metrics)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _knobs(node: dict, skip: tuple[str, ...] = ()) -> str:
    """``key=value`` pairs of a config section, for one table cell."""
    return "; ".join(f"{k}={_fmt(v)}" for k, v in node.items()
                     if k not in skip and v is not None and not isinstance(v, dict)) or "-"


def _short(target: str) -> str:
    return target.rsplit(".", 1)[-1] if target else "?"


def model_card(ckpt: Path, run_cfg, merge: bool, out: Path, ema: bool = False) -> str:
    """The README.md of an export (Markdown with Hugging Face model-card front matter)."""
    from omegaconf import OmegaConf

    from trainer.checkpoint import CONFIG_FILE

    cfg = OmegaConf.to_container(run_cfg, resolve=True)
    decay = (cfg.get("train") or {}).get("ema_decay")
    if ema:
        ema_line = f"exported: these are the EMA of the trained weights (train.ema_decay={decay})"
    elif decay is not None:
        ema_line = f"kept in training (train.ema_decay={decay}) but not exported here: these are the raw trained weights (ema=true exports the EMA)"
    else:
        ema_line = "not enabled (train.ema_decay was not set: these are the trained weights)"
    model, sampler, algo = cfg.get("model", {}), cfg.get("sampler", {}), cfg.get("algorithm", {})
    base = str(model.get("path", "?"))
    index_file = Path(base) / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    pipeline = index.get("_class_name", "DiffusionPipeline")
    # Required components the folder leaves out ([null, null], e.g. the toys' VAE and T5): diffusers
    # loads such a folder only when they are passed as None explicitly (optional ones it skips itself).
    import diffusers

    optional = set(getattr(getattr(diffusers, pipeline, None), "_optional_components", []))
    absent = "".join(f", {k}=None" for k, v in index.items()
                     if not k.startswith("_") and k not in optional and isinstance(v, list) and v[0] is None)
    algo_name = algo.get("name") or _short(algo.get("_target_", "")).lower()
    finetune = model.get("finetune", "?")
    if finetune == "lora":
        mode = f"LoRA rank {model.get('lora_rank')}, alpha {model.get('lora_alpha')} on {_fmt(model.get('lora_targets', []))}"
    else:
        mode = f"{finetune} (every weight of the denoiser)"
    form = "the trained network with the LoRA merged in, in a full diffusers folder" if merge and finetune == "lora" else (
        "full diffusers folder" if merge else "LoRA weights, diffusers format (pytorch_lora_weights.safetensors)")
    step = checkpoint_step(ckpt)
    total = cfg.get("train", {}).get("steps")
    before, after, source = eval_scores(ckpt, step)
    rewards = cfg.get("rewards", {}) or {}
    eval_rewards = cfg.get("eval_rewards", {}) or {}

    lines = [
        "---",
        f"base_model: {base}",
        "library_name: diffusers",
        f"tags: [steerflow, {algo_name}, {'lora' if finetune == 'lora' and not merge else 'full-weights'}]",
        "---",
        "",
        f"# {cfg.get('exp_name', 'steerflow run')}: {algo_name} fine-tune of `{Path(base).name}`",
        "",
        f"Exported by steerflow (`python -m launch.export`) from checkpoint `{ckpt}`.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` ({pipeline}) |",
        f"| family (adapter) | `{model.get('_target_', '?')}` |",
        f"| fine-tuning | {mode} |",
        f"| model settings | {_knobs(model, skip=('_target_', 'path', 'finetune', 'lora_rank', 'lora_alpha', 'lora_targets'))} |",
        f"| this export | {form} |",
        f"| EMA | {ema_line} |",
        f"| algorithm | `{algo_name}`: {_knobs(algo, skip=('_target_', 'name'))} |",
        *([f"| aggregation | `{_short(cfg['aggregate']['_target_'])}` |"] if (cfg.get("aggregate") or {}).get("_target_") else []),
        f"| sampler | `{_short(sampler.get('_target_', ''))}`: {_knobs(sampler, skip=('_target_',))} |",
        f"| optimizer | `{_short((cfg.get('optimizer') or {}).get('_target_', ''))}`: {_knobs(cfg.get('optimizer') or {}, skip=('_target_', '_partial_'))} |",
        f"| steps | {step} of train.steps={total}, {cfg.get('data', {}).get('prompts_per_step')} prompts x "
        f"{algo.get('group_size', '?')} samples per step, seed {cfg.get('seed')} |",
        "",
        "## Rewards",
        "",
        "| reward | weight | class | settings |",
        "|---|---|---|---|",
        *(f"| {name} (trained) | {_fmt(r.get('weight', 1.0))} | `{r.get('_target_', '?')}` | "
          f"{_knobs(r, skip=('_target_', 'weight'))} |" for name, r in rewards.items()),
        *(f"| {name} (evaluation) | {_fmt(r.get('weight', 1.0))} | `{r.get('_target_', '?')}` | "
          f"{_knobs(r, skip=('_target_', 'weight'))} |" for name, r in eval_rewards.items()),
        "",
        "A weight of 0 is a reward logged but not trained on.",
        "",
        "## Evaluation (held-out prompts, deterministic sampler)",
        "",
    ]
    # One row per evaluation reward; their components (eval/<name>/<part>) stay in metrics.jsonl.
    keys = sorted(k for k in {*before, *after} if k.count("/") == 1 and k != "eval/num_prompts")
    if keys:
        prompts = after.get("eval/num_prompts", before.get("eval/num_prompts", "?"))
        lines += [f"{prompts} prompts, from `{source}` (components there too).", "",
                  f"| metric | before (step 0) | after (step {step}) |",
                  "|---|---|---|"]
        lines += [f"| {k} | {_fmt(before.get(k, '-'))} | {_fmt(after.get(k, '-'))} |" for k in keys]
    else:
        lines += [f"Not available: {source}." if not before and not after else f"No evaluation at step {step} in `{source}`."]
    steps = sampler.get("eval_num_steps", sampler.get("num_steps"))
    guidance = sampler.get("guidance_scale")
    load = (f'pipe = {pipeline}.from_pretrained("{out}"{absent})' if merge else
            f'pipe = {pipeline}.from_pretrained("{base}"{absent})\npipe.load_lora_weights("{out}")')
    lines += [
        "",
        "## Use",
        "",
        "```python",
        f"from diffusers import {pipeline}",
        "",
        load,
        f'image = pipe("a prompt", num_inference_steps={steps}, guidance_scale={guidance}).images[0]',
        "```",
        "",
        f"Trained with {sampler.get('num_steps')} sampling steps and evaluated with {steps}, guidance {guidance}, at "
        f"{model.get('height', '?')}x{model.get('width', '?')} pixels.",
        "",
        "## Training config (resolved, as the run saved it)",
        "",
        "```yaml",
        (ckpt / CONFIG_FILE).read_text().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


@hydra.main(config_path=None, config_name="export", version_base="1.3")
def _main(cfg: ExportConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from trainer.errors import reporting_user_errors

    with reporting_user_errors(verbose=bool(HydraConfig.get().verbose)):
        out = export(cfg)
    kind = "full diffusers folder" if cfg.merge else "LoRA weights"
    print(f"wrote {kind} and README.md to {out}")


def main() -> None:
    # No Hydra output folder or log file: the outputs are the files in `out`.
    sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    _main()


if __name__ == "__main__":
    main()
