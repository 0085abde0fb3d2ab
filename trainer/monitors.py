"""Reward-hacking monitors: signals that the trained reward is being gamed, and rules that warn or stop.

Signals (all logged under ``monitor/``):
  gain/<reward>      eval mean change since step 0, in units of the step-0 spread across eval samples
  gold_gap           mean gain of the trained rewards minus mean gain of the gold rewards (held-out
                     rewards not trained on): rising means the trained score outruns what it stands for
  drift/<stat>       eval images' brightness, saturation, contrast, high-frequency share: change since
                     step 0 in step-0 spread units (over-saturation and noise are classic hacks)
  group_std_ratio    within-group spread of the trained reward / its value at the first step: near 0
                     means every sample of a prompt scores alike (collapse; GRPO's signal vanishes)
  diversity_ratio    mean pairwise distance of samples of the same prompt (16x16 pixel features) /
                     its value at the first step (the base model): mode collapse
A rule (``monitor.rules.<name>``: signal, op "gt" "lt" or "abs_gt", threshold, action "warn" or "stop")
fires when its signal crosses the threshold; "warn" prints once and logs ``monitor/fired/<name>``,
"stop" makes the loop save a checkpoint and stop with a message naming the signal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rewards.image_stats import ImageStatistic
from trainer.advantages import group_moments
from trainer.config import rule_from
from trainer.distributed import all_gather_cat, all_reduce_sum

STATS = ("brightness", "saturation", "contrast", "high_frequency")
_EPS = 1e-6


class RewardHackingStop(RuntimeError):
    """A monitor rule with action "stop" fired (raised by the loop after saving a checkpoint)."""


@dataclass
class Fired:
    rule: str
    signal: str
    value: float
    op: str
    threshold: float
    action: str

    def message(self, step: int) -> str:
        op = {"gt": ">", "lt": "<", "abs_gt": "in absolute value >"}[self.op]
        return (f"reward-hacking monitor {self.rule!r} fired at step {step}: {self.signal} = {self.value:.4g} "
                f"{op} {self.threshold:g} (see monitor/* in metrics.jsonl and the sample grids)")


def _global_mean_std(x: torch.Tensor) -> tuple[float, float]:
    """Mean and population std of x over all ranks (NaN entries ignored), float64 sums."""
    x = x.detach().double().cpu().reshape(-1)
    ok = torch.isfinite(x)
    s = all_reduce_sum(torch.stack([torch.where(ok, x, 0.0).sum(), (torch.where(ok, x, 0.0) ** 2).sum(), ok.sum().double()]))
    n = float(s[2])
    if n == 0:
        return float("nan"), float("nan")
    mean = float(s[0]) / n
    return mean, math.sqrt(max(float(s[1]) / n - mean**2, 0.0))


def _features(images: torch.Tensor) -> torch.Tensor:
    """[N, 768]: 16x16 RGB thumbnails, a cheap stand-in for perceptual features that still sees layout and colour.

    Videos [N, F, 3, H, W] give [N, F * 768]: every frame's thumbnail, so motion counts as well.
    """
    x = images.float().cpu()
    return F.adaptive_avg_pool2d(x.reshape(-1, *x.shape[-3:]), 16).reshape(x.shape[0], -1)


def group_diversity(features: torch.Tensor, prompt_ids: torch.Tensor) -> float:
    """Mean pairwise L2 distance between samples of the same prompt, averaged over prompts."""
    dist = torch.cdist(features, features)
    same = (prompt_ids[:, None] == prompt_ids[None, :]) & ~torch.eye(len(prompt_ids), dtype=torch.bool)
    per_row = (dist * same).sum(1) / same.sum(1).clamp(min=1)
    return float(per_row[same.any(1)].mean()) if same.any() else float("nan")


def group_std(rewards: torch.Tensor, prompt_ids: torch.Tensor) -> float:
    """Mean over prompts of the population std of their samples' rewards."""
    return float(group_moments(rewards, prompt_ids)[1].mean())


class HackingMonitor:
    """Computes the signals and applies the rules. State (the baselines) is in ``state_dict()``.

    Args: cfg (MonitorConfig), trained: names of rewards trained on (weight != 0), gold: names of
    held-out rewards to compare them with.
    """

    def __init__(self, cfg, trained: list[str], gold: list[str]):
        self.cfg, self.trained, self.gold = cfg, list(trained), list(gold)
        self.rules = {name: rule_from(name, spec) for name, spec in cfg.rules.items()}
        self.stats = {s: ImageStatistic(statistic=s) for s in STATS} if cfg.image_stats else {}
        self.baseline: dict[str, list[float]] = {}  # signal source -> [mean, std] at step 0 / first step
        self.warned: set[str] = set()

    def state_dict(self) -> dict:
        return {"baseline": dict(self.baseline), "warned": sorted(self.warned)}

    def load_state_dict(self, state: dict) -> None:
        self.baseline = {k: list(v) for k, v in state.get("baseline", {}).items()}
        self.warned = set(state.get("warned", []))

    def _relative(self, key: str, mean: float, std: float) -> float:
        """(mean - baseline mean) / baseline std; the first call sets the baseline."""
        base = self.baseline.setdefault(key, [mean, std])
        return (mean - base[0]) / (base[1] + _EPS)

    def on_eval(self, values: dict[str, torch.Tensor], images: torch.Tensor) -> dict[str, float]:
        """values: eval reward name -> this rank's per-sample scores; images [n_local, 3, H, W] (or videos
        [n_local, F, 3, H, W]: the image statistics are then over all frames). All ranks call it."""
        out = {}
        gains = {}
        for name, v in values.items():
            if name in self.trained or name in self.gold:
                gains[name] = self._relative(f"eval/{name}", *_global_mean_std(v))
                out[f"monitor/gain/{name}"] = gains[name]
        tr = [gains[n] for n in self.trained if n in gains]
        gd = [gains[n] for n in self.gold if n in gains]
        if tr and gd:
            out["monitor/gold_gap"] = sum(tr) / len(tr) - sum(gd) / len(gd)
        frames = images.flatten(0, 1) if images.ndim == 5 else images
        for s, stat in self.stats.items():
            with torch.no_grad():
                out[f"monitor/drift/{s}"] = self._relative(f"stat/{s}", *_global_mean_std(stat.measure(frames.float())))
        return out

    def on_train(self, total: torch.Tensor, prompt_ids: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
        """This rank's trained rewards [n_local], prompt ids, images; groups may span ranks (gathered)."""
        all_r, all_p = all_gather_cat(total.float().cpu()), all_gather_cat(prompt_ids.cpu())
        out = {"monitor/group_std": group_std(all_r, all_p)}
        out["monitor/group_std_ratio"] = out["monitor/group_std"] / (self.baseline.setdefault("group_std", [out["monitor/group_std"], 0])[0] + _EPS)
        if self.cfg.diversity:
            div = group_diversity(all_gather_cat(_features(images)), all_p)
            out["monitor/diversity"] = div
            out["monitor/diversity_ratio"] = div / (self.baseline.setdefault("diversity", [div, 0])[0] + _EPS)
        return out

    def check(self, metrics: dict[str, float]) -> list[Fired]:
        """Rules whose signal is in ``metrics`` and crosses its threshold (warnings print once per rule)."""
        fired = []
        for name, rule in self.rules.items():
            keys = [k for k in metrics if k == rule.signal or (rule.signal.endswith("*") and k.startswith(rule.signal[:-1]))]
            for key in keys:
                v = metrics[key]
                if not isinstance(v, float) or not math.isfinite(v):
                    continue
                hit = {"gt": v > rule.threshold, "lt": v < rule.threshold, "abs_gt": abs(v) > rule.threshold}[rule.op]
                if hit:
                    fired.append(Fired(name, key, v, rule.op, rule.threshold, rule.action))
                    break
        return fired
