"""Config composition, schema checks and cross-field validation, exercised the way users hit them:
``hydra.compose`` on the shipped ``conf/`` tree, and the real CLI in a subprocess."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from launch.run_dir import default_run_dir
from trainer.config import ConfigError, TrainConfig, register, validate

REPO = Path(__file__).resolve().parents[3]
CONF = REPO / "conf"
EXPERIMENTS = sorted(CONF.glob("experiment/*.yaml"))

register()


def _compose(overrides=(), config_dir=CONF):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose("train", overrides=list(overrides))


# The reward-dict tests below use the shapes experiment's reward names (jpeg trained, shapes monitored).
SHAPES = "experiment=toy_shapes"


def _typed(overrides=(), config_dir=CONF) -> TrainConfig:
    overrides = list(overrides)
    if not any(o.startswith("experiment=") for o in overrides):
        overrides = [SHAPES, *overrides]
    return OmegaConf.to_object(_compose(overrides, config_dir))


def _leaves(node, prefix=""):
    """{dotted key: value} for every leaf of a plain nested dict."""
    out = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        out.update(_leaves(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


# --- the default job ---------------------------------------------------------------------------


def test_default_composes_to_typed_config_and_validates():
    cfg = OmegaConf.to_object(_compose([]))  # the bare default: the digits toy job
    assert isinstance(cfg, TrainConfig)
    assert cfg.exp_name == "toy_digits_grpo"
    assert set(cfg.rewards) == {"digit"} and set(cfg.eval_rewards) == {"accuracy"}
    # The ${sf.root:} resolver points into this source tree, where the toy's assets ship.
    assert Path(cfg.data.prompts).parent.parent == REPO / "models" / "toy"
    assert (Path(cfg.model["path"]) / "model_index.json").is_file()  # the shipped digits base
    validate(cfg, 1)
    shapes = _typed()
    assert set(shapes.rewards) == {"jpeg", "shapes"} and set(shapes.eval_rewards) == {"geneval"}
    validate(shapes, 1)


# --- typos and wrong types fail at compose time, naming the key ------------------------------


@pytest.mark.parametrize("override", ["optimizer.lrr=1", "sampler.noise_levl=0.5", "train.stepz=3", "algorithm.group_sise=4"])
def test_unknown_key_is_a_compose_error_naming_it(override):
    with pytest.raises(HydraException) as info:
        _compose([override])
    assert override.split("=")[0] in str(info.value)


@pytest.mark.parametrize("override", ["train.steps=abc", "sampler.noise_level=high", "train.progress=maybe"])
def test_wrong_type_is_a_compose_error_naming_it(override):
    with pytest.raises(HydraException) as info:
        _compose([override])
    assert override.split("=")[0] in str(info.value)


# --- cross-field validation --------------------------------------------------------------------


def test_batch_sizes_must_divide_evenly_and_the_message_says_the_rule_values_and_fix():
    cfg = _typed(["data.prompts_per_step=3", "algorithm.group_size=3", "train.micro_batch=4", "algorithm.optimizer_steps_per_epoch=1"])
    with pytest.raises(ConfigError) as info:
        validate(cfg, 1)
    assert len(info.value.problems) == 1
    msg = str(info.value)
    for needle in ["data.prompts_per_step (3)", "algorithm.group_size (3)", "world_size (1)", "train.micro_batch (4)", "change"]:
        assert needle in msg, needle
    # 9 samples fit 1 rank x micro-batch 1, but not 2 ranks x 1.
    validate(_typed(["data.prompts_per_step=3", "algorithm.group_size=3", "train.micro_batch=1", "algorithm.optimizer_steps_per_epoch=1"]), 1)
    with pytest.raises(ConfigError, match=r"world_size \(2\)"):
        validate(_typed(["data.prompts_per_step=3", "algorithm.group_size=3", "train.micro_batch=1", "algorithm.optimizer_steps_per_epoch=1"]), 2)


def test_world_size_enters_the_batch_rule():
    cfg = _typed(["data.prompts_per_step=8", "algorithm.group_size=8", "train.micro_batch=16", "algorithm.optimizer_steps_per_epoch=1"])
    validate(cfg, 4)  # 64 = 4 ranks * 16
    with pytest.raises(ConfigError, match=r"world_size \(3\)"):
        validate(cfg, 3)


def test_all_violations_are_reported_at_once():
    overrides = {
        "train.micro_batch=5": "data.prompts_per_step",  # 8 prompts * 1 sample is not a multiple of 5
        "algorithm.group_size=1": "algorithm.group_size",
        "algorithm.std_scope=batch": "algorithm.std_scope",
        "algorithm.timestep_fraction=0": "algorithm.timestep_fraction",
        "sampler.noise_level=0": "sampler.noise_level",
        "sampler.log_prob_reduction=max": "sampler.log_prob_reduction",
        "sampler.window_start=99": "sampler.window_start",
        "sampler.window_size=0": "sampler.window_size",
        "rewards.shapes.weight=heavy": "rewards.shapes.weight",
        "logger.backend=tensorboard": "logger.backend",
        "deepspeed.zero_stage=4": "deepspeed.zero_stage",
        "train.steps=-1": "train.steps",
    }
    with pytest.raises(ConfigError) as info:
        validate(_typed(list(overrides)), 1)
    problems = info.value.problems
    assert len(problems) == len(overrides), problems
    for key in overrides.values():
        assert sum(p.startswith(key + " ") for p in problems) == 1, (key, problems)


# --- rewards are a dict keyed by name (DESIGN: Interfaces) ---------------------------------------


def test_reward_weight_override():
    cfg = _typed(["rewards.shapes.weight=0.5"])
    assert cfg.rewards["shapes"]["weight"] == 0.5
    assert _typed().rewards["shapes"]["weight"] == 0.0  # the default job only monitors it


@pytest.mark.parametrize("removal", ["~reward@rewards.shapes", "~rewards.shapes"])
def test_reward_removal_leaves_rewards_empty_and_validate_says_so(removal):
    cfg = _typed([removal, removal.replace("shapes", "jpeg")])
    assert cfg.rewards == {}
    assert set(cfg.eval_rewards) == {"geneval"}  # only the named entry went
    with pytest.raises(ConfigError) as info:
        validate(cfg, 1)
    assert info.value.problems == [p for p in info.value.problems if "rewards is empty" in p]
    assert len(info.value.problems) == 1


def test_reward_added_by_name_from_the_group():
    cfg = _typed(["+reward@rewards.strict=shapes_correct", "rewards.strict.weight=0.25"])
    assert set(cfg.rewards) == {"shapes", "jpeg", "strict"}
    assert cfg.rewards["strict"]["_target_"] == "rewards.shapes.ShapesReward"
    assert cfg.rewards["strict"]["weight"] == 0.25 and cfg.rewards["jpeg"]["weight"] == 1.0
    validate(cfg, 1)


def test_non_numeric_reward_weight_is_reported():
    with pytest.raises(ConfigError, match=r"rewards\.shapes\.weight"):
        validate(_typed(["rewards.shapes.weight=heavy"]), 1)


# --- experiment files (STYLE rule 8) -------------------------------------------------------------


def _launch_overrides(path: Path) -> list[str]:
    """The overrides of the launch command in the file's leading comment block."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    assert header and header[0] == "@package _global_", f"{path.name}: first line must be '# @package _global_'"
    for line in header:
        m = re.search(r"(?:-m launch\.train|launch/train\.py)\b(.*)", line)
        if m:
            # key=value tokens up to the first that is not one (a trailing remark in prose).
            overrides = []
            for tok in shlex.split(m.group(1)):
                if tok.startswith("-"):
                    continue
                if "=" not in tok:
                    break
                overrides.append(tok)
            return overrides
    raise AssertionError(f"{path.name}: no launch command (python -m launch.train experiment=...) in the leading comments")


def test_there_is_at_least_one_experiment():
    assert EXPERIMENTS, CONF / "experiment"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_launch_command_composes_and_its_values_win(path):
    overrides = _launch_overrides(path)
    assert f"experiment={path.stem}" in overrides, f"{path.name}: the launch command must select experiment={path.stem}"
    dcfg = _compose(overrides)
    cfg = OmegaConf.to_object(dcfg)
    validate(cfg, 1)
    # Every value the experiment sets is what the job gets (nothing later in the defaults list wins).
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw.pop("defaults", None)
    composed = _leaves(OmegaConf.to_container(dcfg, resolve=False))
    cli = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    for key, value in _leaves(raw).items():
        if key not in cli:
            assert composed[key] == value, (key, composed[key], value)


def test_a_new_experiment_file_overrides_top_level_keys(tmp_path):
    # train.yaml's own keys (exp_name, seed) must not beat an experiment's: _self_ precedes experiment.
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "probe.yaml").write_text(
        "# @package _global_\n# python -m launch.train experiment=probe\n"
        "exp_name: probe\nseed: 7\nalgorithm:\n  group_size: 4\n"
    )
    cfg = _typed(["experiment=probe"], conf)
    assert (cfg.exp_name, cfg.seed, cfg.algorithm.group_size) == ("probe", 7, 4)


# --- run directories (STYLE rule 9) -----------------------------------------------------------------


def test_run_dir_ignores_override_order():
    a = default_run_dir("exp", ["optimizer.lr=1e-4", "algorithm.kl_beta=0", "+reward@rewards.jpeg=jpeg_compressibility"])
    b = default_run_dir("exp", ["+reward@rewards.jpeg=jpeg_compressibility", "algorithm.kl_beta=0", "optimizer.lr=1e-4"])
    assert a == b
    assert a.parent == Path("runs") and a.name.startswith("exp-")


def test_run_dir_ignores_infra_overrides():
    base = default_run_dir("exp", ["optimizer.lr=1e-4"])
    infra = ["logger=none", "train.progress=false", "train.num_threads=1", "train.device=cpu", "logger.mode=online"]
    assert default_run_dir("exp", ["optimizer.lr=1e-4", *infra]) == base
    assert default_run_dir("exp", [*infra, "optimizer.lr=1e-4"]) == base


def test_run_dir_changes_with_result_changing_overrides_and_name():
    base = default_run_dir("exp", [])
    assert default_run_dir("exp", []) == base  # no clock
    assert default_run_dir("exp", ["optimizer.lr=1e-4"]) != base
    assert default_run_dir("exp", ["optimizer.lr=1e-4"]) != default_run_dir("exp", ["optimizer.lr=3e-4"])
    assert default_run_dir("exp", ["seed=1"]) != base
    assert default_run_dir("exp", ["~reward@rewards.shapes"]) != base
    assert default_run_dir("other", []) != base
    assert default_run_dir("exp", [], root="/tmp/r").parent == Path("/tmp/r")


# --- the real CLI ------------------------------------------------------------------------------------


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_cli_rejects_unknown_key_at_compose_time():
    proc = _cli("-m", "launch.train", "optimizer.lrr=1")
    assert proc.returncode != 0
    assert "optimizer.lrr" in proc.stderr, proc.stderr


@pytest.mark.parametrize("launcher_args", [["--local_rank=0"], ["--local_rank", "0"]])
def test_cli_strips_the_deepspeed_local_rank_argument(launcher_args):
    # Fails on the typo, which Hydra sees only after --local_rank was accepted (stripped).
    proc = _cli("launch/train.py", *launcher_args, "train.stepz=1")
    assert proc.returncode != 0
    assert "train.stepz" in proc.stderr, proc.stderr
    assert "local_rank" not in proc.stderr, proc.stderr


def test_optimizer_steps_must_split_the_micro_batches_evenly():
    cfg = _typed(["data.prompts_per_step=8", "algorithm.group_size=8", "train.micro_batch=16",
                  "algorithm.optimizer_steps_per_epoch=2"])
    validate(cfg, 1)  # 4 micro-batches -> 2 optimizer steps of 2
    validate(cfg, 2)  # 2 per rank -> 2 steps of 1
    with pytest.raises(ConfigError, match=r"algorithm.optimizer_steps_per_epoch \(2\)"):
        validate(cfg, 4)  # 1 micro-batch per rank cannot make 2 optimizer steps


def test_unknown_algorithm_target_and_colliding_reward_names_are_reported():
    with pytest.raises(ConfigError) as info:
        validate(_typed(["algorithm._target_=trainer.algorithms.nope.Nope", "+reward@eval_rewards.jpeg=jpeg_compressibility"]), 1)
    msg = str(info.value)
    assert "algorithm._target_ ('trainer.algorithms.nope.Nope') cannot be imported" in msg
    assert "share the name(s) ['jpeg']" in msg


def test_algorithm_knobs_are_typed_per_algorithm():
    """An algorithm's schema is its own: a knob of another algorithm is a compose-time error, not ignored."""
    with pytest.raises(Exception, match="clip_rang"):
        _typed(["algorithm.clip_rang=0.1"])


def test_partial_chains_need_a_clean_source_and_a_clean_source_needs_partial_chains():
    with pytest.raises(ConfigError, match=r"sampler.start_step \(3\) starts partial chains from clean samples"):
        validate(_typed(["sampler.start_step=3", "sampler.window_start=3"]), 1)
    with pytest.raises(ConfigError, match=r"data.clean_source \('base'\) is only read by partial chains"):
        validate(_typed(["data.clean_source=base"]), 1)
    with pytest.raises(ConfigError, match=r"data.clean_source \('dataset'\) must be null or 'base'"):
        validate(_typed(["sampler.start_step=3", "sampler.window_start=3", "data.clean_source=dataset"]), 1)
    validate(_typed(["sampler.start_step=3", "sampler.window_start=3", "data.clean_source=base"]), 1)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "rewards").glob("*.yaml")))
def test_one_override_swaps_the_default_jobs_trained_rewards(preset):
    """`rewards=<preset>` replaces the whole trained set of the default job (digits) with the preset's, and
    the result trains on something (a non-zero weight) and passes validation."""
    cfg = _typed(["experiment=toy_digits", f"rewards={preset}"])
    expected = {"toy_shapes": {"jpeg", "shapes"}}.get(preset, {preset})
    assert set(cfg.rewards) == expected
    assert any(r["weight"] != 0 for r in cfg.rewards.values())
    assert set(cfg.eval_rewards) == {"accuracy"}  # the experiment's held-out eval is kept
    validate(cfg, 1)


def test_the_default_job_scores_with_every_offline_preset():
    """The offline presets score the digits toy's own images and prompts (OCR needs quoted text: its own test)."""
    import torch

    from models.toy.digits import caption
    from rewards.ensemble import RewardEnsemble

    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for preset in ("digit", "jpeg", "jpeg_incompressibility", "brightness", "saturation", "contrast", "high_frequency"):
        cfg = _compose([f"rewards={preset}"])
        result = RewardEnsemble(OmegaConf.to_container(cfg.rewards))(images, [caption(3), caption(7)])
        assert result.total.shape == (2,) and torch.isfinite(result.total).all(), preset


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "rewards").glob("*.yaml")))
def test_every_preset_on_the_default_job_scores_its_prompts_or_names_the_toy_that_fits(preset):
    """Each reward preset either accepts the default job's digit prompts or, for a reward made for another
    toy world, refuses them at start-up naming the one experiment (a single override) where it trains."""
    from rewards.ensemble import RewardEnsemble
    from trainer.prompts import load_prompts

    cfg = _typed(["experiment=toy_digits", f"rewards={preset}"])
    ensemble = RewardEnsemble(cfg.rewards)
    try:
        fits = {"ocr": "toy_text", "shapes": "toy_shapes_geneval", "toy_shapes": "toy_shapes_geneval"}
        if preset in fits:
            with pytest.raises(ValueError, match=f"experiment={fits[preset]}"):
                ensemble.check_prompts(load_prompts(cfg.data.prompts), "data.prompts")
        else:
            ensemble.check_prompts(load_prompts(cfg.data.prompts), "data.prompts")
    finally:
        ensemble.close()


def test_toy_rewards_refuse_another_worlds_captions():
    from rewards.digits import DigitReward
    from rewards.shapes import ShapesReward

    DigitReward().check_prompts(["the digit zero", "the digit nine"])
    ShapesReward().check_prompts(["a red circle", "two blue squares"])
    with pytest.raises(ValueError, match=r"1 of 2 prompts are outside the digits grammar \(first: 'a red circle'\).*"
                                         r"experiment=toy_digits"):
        DigitReward().check_prompts(["the digit zero", "a red circle"])
    with pytest.raises(ValueError, match=r"2 of 2 prompts are outside the shapes grammar.*experiment=toy_shapes_geneval"):
        ShapesReward().check_prompts(["the digit zero", 'a sign that says "cat"'])


def test_ocr_on_the_default_job_is_refused_before_the_model_loads_and_names_the_text_toy(tmp_path):
    """Digit prompts quote no text, so `rewards=ocr` on the default job cannot train: the job stops at
    start-up (before the model is built) and points at experiment=toy_text, whose prompts OCR can score."""
    import torch

    from trainer.distributed import World
    from trainer.loop import train

    cfg = _typed(["experiment=toy_digits", "rewards=ocr", f"run_dir={tmp_path}", "logger=none"])
    with pytest.raises(ValueError, match=r"reward 'ocr' \(rewards.ocr\) cannot score data.prompts=.*digits_train.txt.*"
                                         r"10 of 10 prompts quote no text.*experiment=toy_text"):
        train(cfg, World(0, 1, 0, 1, torch.device("cpu")), tmp_path, "")
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_text_toy_trains_ocr_and_its_prompts_quote_text():
    from rewards.ensemble import RewardEnsemble
    from trainer.prompts import load_prompts

    cfg = _typed(["experiment=toy_text"])
    validate(cfg, 1)
    assert set(cfg.rewards) == {"ocr"} and cfg.rewards["ocr"]["weight"] == 1.0
    assert cfg.algorithm._target_.endswith(".NFT") and cfg.sampler._target_.endswith(".ODESampler")
    assert cfg.algorithm.timesteps_per_sample == 4  # conf/tuning/toy_text_nft.yaml
    grpo = _typed(["experiment=toy_text", "algorithm=grpo", "sampler=flow_sde"])
    validate(grpo, 1)
    assert grpo.algorithm.clip_range == 1.0e-3  # conf/tuning/toy_text_grpo.yaml
    ensemble = RewardEnsemble(cfg.rewards)
    ensemble.check_prompts(load_prompts(cfg.data.prompts), "data.prompts")
    ensemble.check_prompts(load_prompts(cfg.data.eval_prompts), "data.eval_prompts")
    ensemble.close()


def test_a_model_and_a_sampler_that_predict_different_things_are_refused():
    """SD1.x/SDXL predict epsilon; the flow samplers integrate velocity: sampling would silently be wrong."""
    from types import SimpleNamespace

    from samplers.ddim import DDIMSampler
    from samplers.flow_sde import FlowSDESampler
    from samplers.ode import ODESampler
    from trainer.config import check_prediction

    unet, flow = SimpleNamespace(prediction="epsilon"), SimpleNamespace()  # an adapter that says nothing: velocity
    with pytest.raises(ValueError, match="predicts epsilon, but the sampler .*FlowSDESampler.* needs velocity: use sampler=ddim"):
        check_prediction(unet, FlowSDESampler(noise_level=0.7))
    with pytest.raises(ValueError, match="predicts epsilon.*ODESampler"):
        check_prediction(unet, ODESampler())
    with pytest.raises(ValueError, match="predicts velocity, but the sampler .*DDIMSampler.* needs epsilon: use sampler=flow_sde"):
        check_prediction(flow, DDIMSampler(noise_level=1.0))
    check_prediction(unet, DDIMSampler(noise_level=1.0))
    check_prediction(flow, FlowSDESampler(noise_level=0.7))


@pytest.mark.parametrize("algorithm", ["nft", "dpo"])
def test_forward_process_algorithms_refuse_epsilon_models(algorithm):
    """nft and dpo noise clean samples with the rectified-flow process: an SD1.x/SDXL (DDIM) run is refused."""
    with pytest.raises(ConfigError, match=f"algorithm={algorithm} trains flow-matching .* use algorithm=ddpo"):
        validate(_typed([f"algorithm={algorithm}", "sampler=ddim", "sampler.noise_level=1.0"]), 1)


def test_ema_shape_knobs_need_an_ema_and_a_positive_interval():
    with pytest.raises(ConfigError) as info:
        validate(_typed(["train.ema_every=4"]), 1)
    assert any(p.startswith("train.ema_every / train.ema_warmup") for p in info.value.problems)
    with pytest.raises(ConfigError) as info:
        validate(_typed(["train.ema_decay=0.9", "train.ema_every=0"]), 1)
    assert any(p.startswith("train.ema_every (0)") for p in info.value.problems)
    validate(_typed(["train.ema_decay=0.9", "train.ema_every=4", "train.ema_warmup=true"]), 1)
