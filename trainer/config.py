"""Typed schemas of steerflow's own knobs, registered in Hydra's ConfigStore, and cross-field checks.

``conf/train.yaml`` starts from the ``train_schema`` node below, so a typo in an override or a value
of the wrong type fails at compose time with Hydra's message naming the key. Parts chosen by
``_target_`` (model adapter, optimizer, rewards) are validated by their constructors' signatures.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class

import trainer.algorithms as algorithms_pkg
from trainer.algorithms.base import AlgorithmConfig
from trainer.errors import UserError
from trainer.prompts import DEFAULT_MAX_PROMPT_CHARS, PromptsError, load_prompts
from omegaconf import MISSING, OmegaConf


@dataclass
class SamplerConfig:
    """Knobs every sampler has; alone, the deterministic ``sampler=ode`` (samplers/ode.py).

    Each conf/sampler/<name>.yaml starts from this schema or SDESamplerConfig (its defaults list), so a
    knob that sampler does not have is a compose-time error. Rules between knobs (e.g. noise_decay
    only with noise_schedule=decay) live with the sampler (samplers/schedule.py) and run in validate().
    """

    _target_: str = "samplers.ode.ODESampler"
    num_steps: int = 10  # training rollouts
    eval_num_steps: int = 10  # evaluation (always deterministic)
    guidance_scale: float = 4.5
    ode_solver: str = "euler"  # deterministic steps: "euler" | "dpm2" (DPM-Solver++(2M))
    start_step: int = 0  # partial chains start at sigmas[start_step] from a forward-noised clean sample


@dataclass
class SDESamplerConfig(SamplerConfig):
    """Stochastic samplers (flow_sde, dance_sde, cps, ddim); knobs documented in conf/sampler/flow_sde.yaml."""

    _target_: str = "samplers.flow_sde.FlowSDESampler"
    noise_level: float = 0.7
    noise_schedule: str = "constant"  # "constant" | "decay" | "table"
    noise_decay: Optional[float] = None  # decay only
    noise_table: Optional[List[float]] = None  # table only
    window: str = "fixed"  # "fixed" | "sliding" | "random"
    window_start: int = 0
    window_size: Optional[int] = None
    window_stride: Optional[int] = None  # sliding only
    window_every: Optional[int] = None  # sliding only
    window_start_max: Optional[int] = None  # random only
    log_prob_reduction: str = "mean"
    calibration_rate: Optional[float] = None  # reward-aware per-step noise calibration (null = off)
    calibration_bounds: Optional[List[float]] = None
    reward_guidance: Optional[Any] = None  # a differentiable reward of clean latents (_target_)
    reward_guidance_scale: float = 0.0


@dataclass
class DataConfig:
    """Where prompts come from. ``prompts`` is a text file (one prompt per line) or a built-in set."""

    prompts: str = MISSING
    eval_prompts: str = MISSING
    prompts_per_step: int = 8  # unique prompts per iteration, across all ranks
    eval_size: int = 64  # held-out prompts evaluated (0 = all)
    # Partial chains (sampler.start_step > 0) start from a forward-noised clean sample: "base" = the base
    # (reference) model's deterministic sample of the same prompt (cached; clean_variants per prompt).
    clean_source: Optional[str] = None
    clean_variants: int = 4
    # A longer prompt is refused (text encoders truncate silently: CLIP at 77 tokens, T5 at a few hundred).
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS


@dataclass
class TrainLoopConfig:
    steps: int = 20
    micro_batch: int = 8  # samples per forward/backward (and per rollout chunk)
    eval_every: int = 0  # 0 = only before and after
    eval_batch: int = 32
    save_every: int = 0  # 0 = only at the end (and when a stop signal arrives)
    overlap_rewards: bool = True  # score each rollout chunk in a background thread while the next one samples
    keep_last: int = 2  # complete checkpoints kept (0 = all); older ones are pruned after a new one is complete
    resume: str = "auto"  # "auto": continue from the newest complete checkpoint | "fresh": move the old run aside | a checkpoint folder
    requeue: bool = True  # under SLURM, requeue the job after saving on SIGUSR1/SIGUSR2 (time limit ahead)
    max_consecutive_skips: int = 5  # abort after this many consecutive updates skipped for NaN/inf
    grid_every: int = 5
    ema_decay: Optional[float] = None  # EMA of the trainable weights (e.g. 0.9): evaluated, checkpointed, exportable
    ema_every: int = 1  # update the EMA after every n-th iteration (Flow-GRPO: every 8 optimizer steps = 4 iterations)
    ema_warmup: bool = False  # decay min(ema_decay, (1 + n) / (10 + n)), n = optimizer steps so far (Flow-GRPO, NFT)
    num_threads: int = 0  # torch threads per process on CPU; 0 = cores / local processes
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    progress: bool = True


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # "wandb" | "none"
    mode: str = "offline"  # wandb mode: offline needs no network; "online" to sync
    project: str = "steerflow"
    entity: Optional[str] = None


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "auto"  # "auto": bf16 on GPU, fp32 on CPU | "fp32" | "bf16"
    backend: str = "auto"  # "auto": nccl on GPU, gloo on CPU


@dataclass
class MonitorRule:
    """Fires when ``signal`` (a metric key; a trailing * matches a prefix) ``op`` ``threshold``."""

    signal: str = MISSING
    op: str = "gt"  # "gt" (>) | "lt" (<) | "abs_gt" (|value| >): words, since > and < need quoting on a command line
    threshold: float = 0.0
    action: str = "warn"  # "warn": print once | "stop": save a checkpoint and stop the run


def _default_rules() -> dict:
    # Plain dicts, not MonitorRule nodes: OmegaConf cannot add a dataclass-typed entry from the command
    # line (+monitor.rules.dark={signal:...}); rule_from() checks the keys instead.
    return {
        "gold_gap": {"signal": "monitor/gold_gap", "op": "gt", "threshold": 1.0, "action": "warn"},
        "group_collapse": {"signal": "monitor/group_std_ratio", "op": "lt", "threshold": 0.1, "action": "warn"},
        "diversity_collapse": {"signal": "monitor/diversity_ratio", "op": "lt", "threshold": 0.5, "action": "warn"},
        "image_drift": {"signal": "monitor/drift/*", "op": "abs_gt", "threshold": 3.0, "action": "warn"},
    }


def rule_from(name: str, spec) -> MonitorRule:
    """A MonitorRule from ``monitor.rules.<name>`` (a dict or a MonitorRule); ValueError names bad keys/values."""
    if isinstance(spec, MonitorRule):
        spec = asdict(spec)
    unknown = sorted(set(spec) - {"signal", "op", "threshold", "action"})
    if unknown or "signal" not in spec:
        raise ValueError(f"monitor.rules.{name}: keys are signal (required), op, threshold, action; got unknown "
                         f"{unknown} or no signal")
    rule = MonitorRule(**spec)
    if rule.op not in ("gt", "lt", "abs_gt") or rule.action not in ("warn", "stop"):
        raise ValueError(f"monitor.rules.{name}: op ({rule.op!r}) must be 'gt', 'lt' or 'abs_gt' and action "
                         f"({rule.action!r}) 'warn' or 'stop'")
    return rule


@dataclass
class MonitorConfig:
    """Reward-hacking monitors (trainer/monitors.py)."""

    enabled: bool = True
    gold: Optional[List[str]] = None  # held-out eval_rewards compared with the trained ones; null = all eval_rewards
    image_stats: bool = True  # brightness / saturation / contrast / high-frequency drift of eval images
    diversity: bool = True  # within-prompt sample diversity of training batches
    rules: Dict[str, Any] = field(default_factory=_default_rules)  # name -> {signal, op, threshold, action}


@dataclass
class TrainConfig:
    exp_name: str = "default"
    seed: int = 0
    run_dir: Optional[str] = None  # default: runs/<exp_name>-<hash of result-changing overrides>
    model: Any = MISSING
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # conf/sampler/<name>.yaml picks the schema
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)  # conf/algorithm/<name>.yaml picks the schema
    optimizer: Any = MISSING
    scheduler: Any = None  # torch LR scheduler over the optimizer (_partial_: true), e.g. scheduler=warmup
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    aggregate: Any = MISSING  # how several rewards become one advantage (rewards/aggregate.py)
    rewards: dict = field(default_factory=dict)
    eval_rewards: dict = field(default_factory=dict)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


ROOT = Path(__file__).resolve().parents[1]


def register() -> None:
    """Register the schema and the ``${sf.root:}`` resolver (the steerflow source tree, for shipped assets)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    # Referenced from the defaults list of each conf/sampler/<name>.yaml.
    cs.store(group="sampler", name="schema_ode", node=SamplerConfig)
    cs.store(group="sampler", name="schema_sde", node=SDESamplerConfig)
    # Each algorithm module's SCHEMAS, referenced from the defaults list of conf/algorithm/<name>.yaml.
    for name, node in algorithm_schemas().items():
        cs.store(group="algorithm", name=name, node=node)
    if not OmegaConf.has_resolver("sf.root"):
        OmegaConf.register_new_resolver("sf.root", lambda: str(ROOT))


class ConfigError(UserError, ValueError):
    """Every cross-field violation at once, each with the values and the fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  - " + "\n  - ".join(problems))


def algorithm_schemas() -> dict[str, type]:
    """``schema_<name>`` -> config dataclass, from ``SCHEMAS`` of every module in trainer/algorithms/."""
    schemas: dict[str, type] = {}
    for info in pkgutil.iter_modules(algorithms_pkg.__path__):
        schemas.update(getattr(importlib.import_module(f"trainer.algorithms.{info.name}"), "SCHEMAS", {}))
    return schemas


def _sampler_problems(s: SamplerConfig, needs_log_probs: bool) -> list[str]:
    """The sampler's own knob rules (asked of its class, without building it) plus what the algorithm needs of it."""
    try:
        sampler_cls = get_class(s._target_)
    except Exception as e:  # noqa: BLE001 - Hydra raises several types for a bad path; report any of them
        return [f"sampler._target_ ({s._target_!r}) cannot be imported: {e}"]
    p = list(sampler_cls.problems({k: v for k, v in asdict(s).items() if k != "_target_"}))
    if not hasattr(s, "noise_level"):
        if not needs_log_probs:
            return p
        return p + [f"sampler ({s._target_}) is deterministic: this algorithm trains the log-probs of stochastic "
                    "steps; pick sampler=flow_sde, dance_sde, cps or ddim"]
    if s.noise_level == 0 and needs_log_probs:
        p.append(f"sampler.noise_level ({s.noise_level}) must be > 0 for this algorithm: with no noise there is no "
                 "log-prob to train")
    if s.noise_schedule == "table" and s.noise_table is not None and len(s.noise_table) != s.num_steps:
        p.append(f"sampler.noise_table has {len(s.noise_table)} entries; it needs one per step (sampler.num_steps="
                 f"{s.num_steps})")
    return p


def check_prediction(policy, sampler) -> None:
    """The policy must predict what the sampler's kernel consumes (velocity or epsilon); a mismatch would
    sample garbage without any error. Raises ValueError naming both and the fix."""
    kernel = getattr(sampler, "kernel", None)
    wanted = getattr(kernel, "prediction", "velocity")  # the ODE sampler integrates velocity
    given = getattr(policy, "prediction", "velocity")
    if wanted != given:
        fix = "sampler=ddim" if given == "epsilon" else "sampler=flow_sde (or dance_sde, cps, ode)"
        raise ValueError(f"the model ({type(policy).__name__}) predicts {given}, but the sampler "
                         f"({type(sampler).__name__}) needs {wanted}: use {fix}")


# Every int/float knob of the typed schema must be > 0, except these, where 0 is legal and means what
# is said (a negative is refused for all). Stricter rules (upper bounds, >= 2, what a knob needs of
# another) live with the knob's owner (the rules below, an algorithm's or a sampler's problems()).
ZERO_MEANS = {
    "seed": "a seed like any other",
    "sampler.guidance_scale": "unconditional predictions",
    "sampler.start_step": "the whole chain",
    "sampler.noise_level": "deterministic sampling",
    "sampler.window_start": "the window starts at the first step",
    "sampler.window_start_max": "a window that starts at the first step",
    "sampler.reward_guidance_scale": "no reward guidance",
    "algorithm.max_grad_norm": "no gradient clipping",
    "algorithm.kl_beta": "no KL penalty",
    "algorithm.process_weight": "outcome advantages only",
    "algorithm.ema_ramp": "the old policy follows the current one",
    "algorithm.ema_max": "the old policy follows the current one",
    "deepspeed.zero_stage": "no ZeRO sharding",
    "data.eval_size": "every held-out prompt",
    "train.steps": "evaluate only",
    "train.eval_every": "evaluate only before and after",
    "train.save_every": "save only at the end",
    "train.keep_last": "keep every checkpoint",
    "train.grid_every": "no training sample grids",
    "train.num_threads": "cores / local processes",
    "train.ema_decay": "an EMA that is the latest weights",
    "train.onpolicy_tolerance": "the on-policy ratio must be exactly 1",
}


def numeric_knobs(node, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of every int/float field of a typed config dataclass (nested ones too);
    None values (optional knobs left off) and bools are skipped."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out.update(numeric_knobs(value, f"{prefix}{f.name}."))
            continue
        kind = hints[f.name]
        kinds = [k for k in typing.get_args(kind) if k is not type(None)] if typing.get_args(kind) else [kind]
        if kinds in ([int], [float]) and value is not None:
            out[prefix + f.name] = value
    return out


def _range_problems(cfg: TrainConfig) -> list[str]:
    p = []
    for key, value in numeric_knobs(cfg).items():
        zero = ZERO_MEANS.get(key)
        if value < 0 or (value == 0 and zero is None):
            p.append(f"{key} ({value}) must be {'>= 0' if zero else '> 0'}" + (f" (0: {zero})" if zero else ""))
    return p


def _optimizer_problems(opt) -> list[str]:
    """The optimizer is a free-form ``_target_`` node (no schema): check the knobs every torch optimizer reads."""
    if not isinstance(opt, dict):
        return []
    p = []

    def number(key, value, ok, rule):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            p.append(f"optimizer.{key} ({value!r}) must be a number {rule}")
        elif not ok(value):
            p.append(f"optimizer.{key} ({value}) must be {rule}")

    if "lr" in opt:
        number("lr", opt["lr"], lambda v: v > 0, "> 0 (e.g. optimizer.lr=1e-4)")
    if "weight_decay" in opt:
        number("weight_decay", opt["weight_decay"], lambda v: v >= 0, ">= 0 (0: no decay)")
    if "eps" in opt:
        number("eps", opt["eps"], lambda v: v > 0, "> 0")
    if "betas" in opt:
        betas = opt["betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            p.append(f"optimizer.betas ({betas!r}) must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        else:
            for i, b in enumerate(betas):
                number(f"betas[{i}]", b, lambda v: 0 <= v < 1, "in [0, 1)")
    return p


def _path_problems(cfg: TrainConfig) -> list[str]:
    """Files and folders the run reads, checked before anything loads."""
    p = []
    d = cfg.data
    counts = {}
    for key, path in (("data.prompts", d.prompts), ("data.eval_prompts", d.eval_prompts)):
        try:
            counts[key] = len(load_prompts(path, key, max(d.max_prompt_chars, 1)))
        except PromptsError as e:
            p.append(str(e))
    if "data.prompts" in counts and 0 < counts["data.prompts"] < d.prompts_per_step:
        p.append(f"data.prompts_per_step ({d.prompts_per_step}) exceeds the {counts['data.prompts']} prompts in "
                 f"data.prompts={d.prompts!r}; lower it or add prompts")
    model_path = cfg.model.get("path") if isinstance(cfg.model, dict) else None
    if isinstance(model_path, str) and not Path(model_path).expanduser().is_dir():
        p.append(f"model.path={model_path!r} is not a folder: give the local diffusers folder of the base model")
    return p


def _checked(rules, *args, excused: bool) -> list[str]:
    """``rules(*args)``; when some knob is already out of range (``excused``), a rule that cannot even
    run on such values is skipped (the range problem says what to fix), otherwise its error stands."""
    try:
        return list(rules(*args))
    except Exception:
        if excused:
            return []
        raise


def validate(cfg: TrainConfig, world_size: int, files: bool = False) -> None:
    """Check every numeric knob and the rules that span fields, before any heavy work (the model, the
    run directory); with ``files`` (launch.train) also the files the run reads (prompts: readable
    UTF-8 text, not empty, no line over data.max_prompt_chars; model.path a folder). Raises
    ConfigError listing all violations at once."""
    ranged = _range_problems(cfg) + _optimizer_problems(cfg.optimizer)
    p = _checked(_cross_field_problems, cfg, world_size, excused=bool(ranged))
    p += _path_problems(cfg) if files else []
    # A knob out of range is reported once: by its owner's more precise rule when it has one.
    owned = [q for q in ranged if not any(x.startswith(q.split(" (", 1)[0] + " (") for x in p)]
    if owned or p:
        raise ConfigError(owned + p)


def _cross_field_problems(cfg: TrainConfig, world_size: int) -> list[str]:
    p: list[str] = []
    a, t, d, s = cfg.algorithm, cfg.train, cfg.data, cfg.sampler
    total = d.prompts_per_step * a.group_size
    if world_size * t.micro_batch <= 0 or a.optimizer_steps_per_epoch <= 0:
        pass  # reported by the range rules; the divisibility below needs them positive
    elif total % (world_size * t.micro_batch):
        p.append(
            f"data.prompts_per_step ({d.prompts_per_step}) * algorithm.group_size ({a.group_size}) = {total} must be "
            f"divisible by world_size ({world_size}) * train.micro_batch ({t.micro_batch}); change one of them"
        )
    elif (total // (world_size * t.micro_batch)) % a.optimizer_steps_per_epoch:
        p.append(
            f"each rank's {total // (world_size * t.micro_batch)} micro-batches (data.prompts_per_step * algorithm.group_size"
            f" / (world_size * train.micro_batch)) must split evenly into algorithm.optimizer_steps_per_epoch "
            f"({a.optimizer_steps_per_epoch}); change one of them"
        )
    if a.optimizer_steps_per_epoch < 1 or a.inner_epochs < 1:
        p.append(
            f"algorithm.optimizer_steps_per_epoch ({a.optimizer_steps_per_epoch}) and algorithm.inner_epochs "
            f"({a.inner_epochs}) must be >= 1"
        )
    if a.group_size < 2:
        p.append(f"algorithm.group_size ({a.group_size}) must be >= 2: a group of one has no relative advantage")
    try:
        algorithm_cls = get_class(a._target_)
    except Exception as e:  # noqa: BLE001 - Hydra raises several types for a bad path; report any of them
        p.append(f"algorithm._target_ ({a._target_!r}) cannot be imported: {e}")
    else:
        if not isinstance(a, algorithm_cls.Config):
            p.append(f"algorithm ({a._target_}) needs its own schema ({algorithm_cls.Config.__name__}): pick it with "
                     "algorithm=<name>, not by overriding algorithm._target_")
        else:
            p.extend(_checked(algorithm_cls.problems, a, cfg, world_size, excused=bool(_range_problems(cfg))))
        p.extend(_checked(_sampler_problems, s, algorithm_cls.needs_log_probs, excused=bool(_range_problems(cfg))))
    if s.start_step > 0 and d.clean_source is None:
        p.append(f"sampler.start_step ({s.start_step}) starts partial chains from clean samples: set data.clean_source=base "
                 "(the base model's own samples of each prompt), or use start_step 0")
    if d.clean_source is not None and s.start_step == 0:
        p.append(f"data.clean_source ({d.clean_source!r}) is only read by partial chains: set sampler.start_step > 0, "
                 "or remove data.clean_source")
    if d.clean_source not in (None, "base"):
        p.append(f"data.clean_source ({d.clean_source!r}) must be null or 'base'")
    if d.clean_variants < 1:
        p.append(f"data.clean_variants ({d.clean_variants}) must be >= 1")
    shared = sorted(set(cfg.rewards) & set(cfg.eval_rewards))
    if shared:
        p.append(f"rewards and eval_rewards share the name(s) {shared}: their eval/<name> metrics would collide; rename one")
    if not cfg.rewards:
        p.append("rewards is empty: add one, e.g. +reward@rewards.shapes=shapes")
    for name, r in {**cfg.rewards, **cfg.eval_rewards}.items():
        if not isinstance(r, dict) or "_target_" not in r:
            p.append(f"rewards.{name} needs a _target_ (got {r!r})")
    for name, r in cfg.rewards.items():
        if isinstance(r, dict) and not isinstance(r.get("weight", 1.0), (int, float)):
            p.append(f"rewards.{name}.weight must be a number, got {r.get('weight')!r}")
        if isinstance(r, dict) and r.get("role", "reward") not in ("reward", "regularizer"):
            p.append(f"rewards.{name}.role ({r.get('role')!r}) must be 'reward' or 'regularizer'")
    if cfg.logger.backend not in ("wandb", "none"):
        p.append(f"logger.backend ({cfg.logger.backend!r}) must be 'wandb' or 'none'")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        p.append(f"deepspeed.zero_stage ({cfg.deepspeed.zero_stage}) must be 0, 1, 2 or 3")
    if t.steps < 0:
        p.append(f"train.steps ({t.steps}) must be >= 0")
    if t.keep_last < 0 or t.save_every < 0:
        p.append(f"train.keep_last ({t.keep_last}) and train.save_every ({t.save_every}) must be >= 0")
    if t.ema_decay is not None and not 0 <= t.ema_decay < 1:
        p.append(f"train.ema_decay ({t.ema_decay}) must be in [0, 1) (or null: no EMA)")
    if t.ema_every < 1:
        p.append(f"train.ema_every ({t.ema_every}) must be >= 1 (iterations between EMA updates)")
    if t.ema_decay is None and (t.ema_every != 1 or t.ema_warmup):
        p.append("train.ema_every / train.ema_warmup shape the EMA, but train.ema_decay is null (no EMA): set "
                 "train.ema_decay (e.g. 0.9) or drop them")
    if t.ema_decay is not None and cfg.deepspeed.zero_stage == 3:
        p.append("train.ema_decay needs whole weights on every rank; ZeRO-3 shards them: use deepspeed=zero2 or drop the EMA")
    if t.max_consecutive_skips < 1:
        p.append(f"train.max_consecutive_skips ({t.max_consecutive_skips}) must be >= 1")
    if t.resume not in ("auto", "fresh") and not (Path(t.resume) / "COMPLETE.json").is_file():
        p.append(f"train.resume ({t.resume!r}) must be 'auto', 'fresh' or a complete checkpoint folder (with COMPLETE.json)")
    if cfg.rewards and all(isinstance(r, dict) and r.get("weight", 1.0) == 0 for r in cfg.rewards.values()):
        p.append("every reward in rewards has weight 0 (monitors only): give at least one a non-zero weight to train on")
    for name, rule in cfg.monitor.rules.items():
        try:
            rule_from(name, rule)
        except (ValueError, TypeError) as e:
            p.append(str(e))
    pairwise = sorted(n for n, r in cfg.rewards.items() if isinstance(r, dict) and str(r.get("_target_", "")).endswith("WinRate"))
    if pairwise and a.group_size > 0 and (total // world_size) % a.group_size:
        p.append(f"rewards {pairwise} compare samples within a group, so each rank must hold whole groups: "
                 f"data.prompts_per_step ({d.prompts_per_step}) must be divisible by world_size ({world_size})")
    unknown_gold = sorted(set(cfg.monitor.gold or []) - set(cfg.eval_rewards))
    if unknown_gold:
        p.append(f"monitor.gold names {unknown_gold} that are not in eval_rewards ({sorted(cfg.eval_rewards)}); "
                 "add them to eval_rewards or fix the names")
    return p
