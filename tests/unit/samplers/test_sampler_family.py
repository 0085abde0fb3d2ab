"""The sampler family as the trainer uses it: exact on-policy replay for every sampler and option, reward
guidance (scale 0 is bit-identical to none), partial chains, and the configs (one typed file per sampler,
knobs that do not apply refused, GRPO's own rules in validate())."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from models.sd3 import SD3Policy
from sampler_truth import fit_report, flow_velocity, sample_data
from samplers.cps import CPSSampler
from samplers.dance_sde import DanceSDESampler
from samplers.ddim import DDIMSampler
from samplers.flow_sde import FlowSDESampler
from samplers.guidance import DecodedReward, LatentTarget
from samplers.ode import ODESampler
from trainer.config import ConfigError, register, validate
from trainer.rollout import rollout_chunks

CONF = Path(__file__).resolve().parents[3] / "conf"
PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow square"]


@pytest.fixture(scope="module")
def toy_policy(tiny_toy_dir):
    policy = SD3Policy(str(tiny_toy_dir), finetune="lora", lora_rank=4, lora_alpha=4.0, dtype="float32",
                       max_sequence_length=0, height=16, width=16)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero LoRA B, so the adapters are really in the computation
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return policy


class PromptSigned:
    """A differentiable, prompt-aware image reward: mean brightness for prompts mentioning red, minus it
    for the others (so guidance must push each sample by its own prompt)."""

    differentiable = True

    def __call__(self, images, prompts, metadata=None):
        sign = torch.tensor([1.0 if "red" in p else -1.0 for p in prompts])
        return {"reward": sign * images.flatten(1).mean(1)}


# --------------------------------------------------------------------------------- on-policy replay
SAMPLERS = {
    "flow_sde_random_window": lambda: FlowSDESampler(
        noise_level=0.7, window="random", window_start=0, window_size=2, num_steps=6),
    "flow_sde_decay_dpm2": lambda: FlowSDESampler(
        noise_level=0.9, noise_schedule="decay", noise_decay=0.7, window_start=1, window_size=3, ode_solver="dpm2",
        num_steps=6),
    "dance_sde_sliding": lambda: DanceSDESampler(
        noise_level=0.3, window="sliding", window_size=2, window_every=1, window_stride=2, num_steps=6),
    "cps_sum": lambda: CPSSampler(noise_level=0.5, log_prob_reduction="sum", num_steps=6),
    "flow_sde_guided": lambda: FlowSDESampler(
        noise_level=0.7, window_start=2, window_size=2, reward_guidance=LatentTarget(1.0), reward_guidance_scale=3.0,
        num_steps=6),
    "flow_sde_calibrated": lambda: FlowSDESampler(noise_level=0.7, calibration_rate=0.5, num_steps=6),
    "flow_sde_guided_by_prompt": lambda: FlowSDESampler(
        noise_level=0.7, window_start=1, window_size=3, reward_guidance=DecodedReward(PromptSigned()),
        reward_guidance_scale=5.0, num_steps=6, ode_solver="dpm2"),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_recomputed_log_probs_equal_the_rollout_bitwise(toy_policy, name):
    """What makes the trainer's on-policy ratio exactly 1, for every sampler and option."""
    sampler = SAMPLERS[name]()
    if hasattr(sampler.reward_guidance, "bind"):
        sampler.reward_guidance.bind(toy_policy, PROMPTS)
    if name == "flow_sde_calibrated":
        sampler.calibrate(torch.tensor([0.9, 0.1, 0.6, 0.5, 0.3, 0.8]))  # non-trivial per-step noise
    pids, sids = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 0, 0])
    chunks, images = rollout_chunks(toy_policy, sampler, PROMPTS, pids, sids, seed_parts=(11, 1, 3), num_steps=6,
                                    guidance_scale=4.5, micro_batch=2, height=16, width=16, iteration=3)
    assert images.shape == (4, 3, 16, 16)
    plan_steps = chunks[0].stochastic[0].nonzero().flatten().tolist()
    assert plan_steps and all(c.stochastic[0].nonzero().flatten().tolist() == plan_steps for c in chunks)
    if name == "dance_sde_sliding":
        assert plan_steps == [4, 5]  # iteration 3 -> start min(0 + 2 * 3, 6 - 2)

    def predict(x, sigma, cond):
        return toy_policy.predict(x, sigma, cond, 4.5)

    for traj in chunks:
        cond = toy_policy.encode([PROMPTS[int(p)] for p in traj.prompt_ids])
        for j in plan_steps:
            log_prob, mean, std = sampler.log_prob(predict, traj, j, cond)
            assert log_prob.requires_grad
            assert torch.equal(log_prob.detach(), traj.log_probs[:, j]), (j, (log_prob - traj.log_probs[:, j]).abs().max())
        assert bool((traj.log_probs[:, [j for j in range(6) if j not in plan_steps]] == 0).all())


def test_ddim_recomputed_log_probs_equal_the_rollout_bitwise():
    from test_ode_pipelines import TinyVPPolicy, build_tiny_ddim

    pipe = build_tiny_ddim(set_alpha_to_one=False)
    policy = TinyVPPolicy(pipe.unet, pipe.scheduler)
    sampler = DDIMSampler(noise_level=1.0, window_start=2, window_size=3, num_steps=6)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x_T = torch.stack([torch.randn(3, 8, 8, generator=g) for g in gens])
    traj = sampler.rollout(policy.predict, x_T, policy.sigmas(6), None, gens, torch.zeros(2, dtype=torch.long), torch.arange(2))
    for j in (2, 3, 4):
        log_prob, _, _ = sampler.log_prob(policy.predict, traj, j, None)
        assert torch.equal(log_prob.detach(), traj.log_probs[:, j])


def test_log_prob_reads_the_noise_level_stored_in_the_trajectory():
    """Recomputation uses the rollout's recorded eta, not the sampler's current (e.g. re-calibrated) one."""
    sampler = FlowSDESampler(noise_level=0.7, calibration_rate=1.0, num_steps=4, log_prob_reduction="sum")
    gens = [torch.Generator().manual_seed(0)]
    traj = sampler.rollout(flow_velocity, torch.randn(1, 2, 16, generator=gens[0]), torch.linspace(1, 0, 5), None, gens,
                           torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    sampler.calibrate(torch.tensor([1.0, 1.0, 1.0, 1.0]))  # the sampler moves on ...
    log_prob, _, _ = sampler.log_prob(flow_velocity, traj, 1, None)
    assert torch.equal(log_prob, traj.log_probs[:, 1])  # ... the stored trajectory still replays exactly
    corrupted = traj[0:1]
    corrupted.noise_levels = corrupted.noise_levels * 1.5
    assert not torch.equal(sampler.log_prob(flow_velocity, corrupted, 1, None)[0], traj.log_probs[:, 1])


# ------------------------------------------------------------------------------------ reward guidance
def _guided(scale, reward, policy):
    sampler = FlowSDESampler(noise_level=0.7, window_start=1, window_size=3, num_steps=5, reward_guidance=reward,
                             reward_guidance_scale=scale)
    chunks, images = rollout_chunks(policy, sampler, PROMPTS, torch.tensor([0, 1]), torch.tensor([0, 0]),
                                    seed_parts=(4, 1, 0), num_steps=5, guidance_scale=4.5, micro_batch=2, height=16, width=16)
    return chunks[0], images


def test_prompt_aware_guidance_pushes_each_sample_by_its_own_prompt(toy_policy):
    """Guidance by a reward of the decoded clean prediction and the sample's prompt: the 'red' prompt's
    sample gets brighter than unguided, the other prompt's darker, from the same noise."""
    plain, plain_images = _guided(0.0, None, toy_policy)
    reward = DecodedReward(PromptSigned())
    with pytest.raises(RuntimeError, match="not bound"):
        _guided(50.0, reward, toy_policy)
    reward.bind(toy_policy, PROMPTS)
    _, guided_images = _guided(2000.0, reward, toy_policy)  # the mean over 768 values: a small gradient each
    brightness = lambda im: im.flatten(1).mean(1)  # noqa: E731
    assert brightness(guided_images)[0] > brightness(plain_images)[0] + 0.02  # PROMPTS[0]: "a red circle"
    assert brightness(guided_images)[1] < brightness(plain_images)[1] - 0.02  # PROMPTS[1]: "two blue squares"


def test_decoded_reward_refuses_a_reward_without_gradients():
    from rewards.digits import DigitReward

    with pytest.raises(ValueError, match="needs a differentiable image reward.*component=prob"):
        DecodedReward(DigitReward(component="correct"))
    assert DecodedReward({"_target_": "rewards.digits.DigitReward", "component": "prob"}, log=True).log


def test_guidance_scale_zero_is_bit_identical_to_no_guidance(toy_policy):
    plain, plain_images = _guided(0.0, None, toy_policy)
    zero, zero_images = _guided(0.0, LatentTarget(1.0), toy_policy)
    for field in ("latents", "log_probs", "pred_x0", "noise_levels", "stochastic"):
        assert torch.equal(getattr(plain, field), getattr(zero, field)), field
    assert torch.equal(plain_images, zero_images)
    # A non-zero scale moves every step toward the reward's optimum (white: pixels 1).
    # (LatentTarget averages over the 768 elements, hence the large scale.)
    guided, guided_images = _guided(1000.0, LatentTarget(1.0), toy_policy)
    assert guided_images.mean() > plain_images.mean() + 0.05, (float(guided_images.mean()), float(plain_images.mean()))


def test_guidance_moves_the_gaussian_mean_by_the_expected_amount():
    """Closed form: with R = -mean((x0 - c)^2), a step adds scale * (sigma_j - sigma_{j+1}) * 2 (c - x0_hat) / numel
    to its mean; with zero velocity (x0_hat = x = 0) one step of 0.25 moves every element by exactly that."""
    x_T = torch.zeros(1, 2, 8)
    sig = torch.tensor([0.5, 0.25])
    c, scale = 3.0, 10.0
    zero_v = lambda x, s, cond: torch.zeros_like(x)  # noqa: E731  (x0_hat = x)
    plain = FlowSDESampler(noise_level=0.0).rollout(zero_v, x_T, sig, None, [torch.Generator()], torch.zeros(1), torch.zeros(1))
    guided = FlowSDESampler(noise_level=0.0, reward_guidance=LatentTarget(c), reward_guidance_scale=scale).rollout(
        zero_v, x_T, sig, None, [torch.Generator()], torch.zeros(1), torch.zeros(1))
    expected = scale * 0.25 * (-2 * (0.0 - c) / 16)
    torch.testing.assert_close(guided.final - plain.final, torch.full_like(x_T, expected))


# -------------------------------------------------------------------------------------- partial chains
def test_partial_chain_from_forward_noised_data_keeps_the_distribution():
    """InstructVideo-style: start at sigma_k from data noised to sigma_k; only steps k.. are run, and the
    samples still follow the data (ground truth: the 2-D mixture)."""
    sigmas = torch.linspace(1.0, 0.0, 101)
    sampler = FlowSDESampler(noise_level=0.7, start_step=60, window_start=60, num_steps=100)
    gens = [torch.Generator().manual_seed(50 + i) for i in range(4)]
    noise = torch.stack([torch.randn(2, 1500, generator=g) for g in gens])
    x0 = sample_data(4, 1500, 9)
    x_start = sampler.start(x0, sigmas, noise)
    torch.testing.assert_close(x_start, (1 - sigmas[60]) * x0 + sigmas[60] * noise)
    traj = sampler.rollout(flow_velocity, x_start, sigmas, None, gens, torch.zeros(4, dtype=torch.long), torch.arange(4))
    assert traj.latents.shape[1] == 41 and torch.equal(traj.sigmas[0], sigmas[60:])
    assert bool(traj.stochastic.all())
    report = fit_report(traj.final)
    assert report["ks_exact"] > 1e-3 and report["mean_err"] < 0.05, report


def test_partial_chain_needs_clean_samples(toy_policy):
    sampler = FlowSDESampler(noise_level=0.7, start_step=2, window_start=2, num_steps=4)
    with pytest.raises(ValueError, match="pass x0"):
        rollout_chunks(toy_policy, sampler, PROMPTS, torch.tensor([0]), torch.tensor([0]), (0, 1, 0), 4, 1.0, 1, 16, 16)
    x0 = torch.zeros(1, *toy_policy.latent_shape(16, 16))
    chunks, _ = rollout_chunks(toy_policy, sampler, PROMPTS, torch.tensor([0]), torch.tensor([0]), (0, 1, 0), 4, 1.0, 1,
                               16, 16, x0=x0)
    assert chunks[0].latents.shape[1] == 3  # steps 2 and 3 of 4


# ------------------------------------------------------------------------------------------- configs
register()
SAMPLER_FILES = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_every_sampler_is_a_documented_config_file():
    assert set(SAMPLER_FILES) == {"flow_sde", "dance_sde", "cps", "ddim", "ode"}
    for name in SAMPLER_FILES:
        text = (CONF / "sampler" / f"{name}.yaml").read_text()
        header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
        assert text.startswith("#") and "20" in header, name  # opens with its paper (authors, year)
        cfg = OmegaConf.to_object(_compose(["experiment=none", f"sampler={name}"]))
        sampler = instantiate(asdict(cfg.sampler))
        assert type(sampler).__module__ == f"samplers.{name}" or name == "ode"
        shared = (CONF / "sampler" / "flow_sde.yaml").read_text() if "conf/sampler/flow_sde.yaml" in header else ""
        for knob in OmegaConf.load(CONF / "sampler" / f"{name}.yaml"):
            if knob not in ("defaults", "_target_"):
                assert knob.split("_")[0] in header or knob in shared, (name, knob)


@pytest.mark.parametrize("override", ["sampler.noise_level=0.5", "sampler.window=sliding"])
def test_noise_knobs_do_not_exist_for_the_ode_sampler(override):
    with pytest.raises(HydraException) as info:
        _compose(["experiment=none", "sampler=ode", override])
    assert override.split("=")[0].split(".")[1] in str(info.value)


def test_typo_in_a_sampler_knob_is_a_compose_error():
    with pytest.raises(HydraException, match="noise_shedule"):
        _compose(["sampler=cps", "sampler.noise_shedule=decay"])


def _problems(overrides, experiment="experiment=toy_shapes"):
    cfg = OmegaConf.to_object(_compose([experiment, *overrides]))
    with pytest.raises(ConfigError) as info:
        validate(cfg, 1)
    return info.value.problems


def test_validate_reports_sampler_rules_and_what_grpo_needs():
    problems = _problems(["sampler.noise_decay=0.5", "sampler.window=random", "sampler.start_step=2",
                          "sampler.window_start=2", "sampler.window_size=2"])
    assert any(p.startswith("sampler.noise_decay (0.5) is only read") for p in problems), problems
    assert any(p.startswith("sampler.start_step (2) starts partial chains from clean samples: set data.clean_source=base") for p in problems), problems
    assert len(problems) == 2, problems
    assert any("is deterministic: this algorithm trains the log-probs" in p for p in _problems(["sampler=ode"], experiment="experiment=none"))
    table = _problems(["sampler.noise_schedule=table", "sampler.noise_table=[1,1,1]"])
    assert table == ["sampler.noise_table has 3 entries; it needs one per step (sampler.num_steps=8)"]
    cps = _problems(["sampler=cps", "sampler.noise_level=1.5"])
    assert cps == ["sampler.noise_level (1.5), times the largest calibration multiplier if calibration is on, must be "
                   "<= 1.0 for CPSSampler"]
    cfg = OmegaConf.to_object(_compose(["experiment=toy_shapes", "sampler=dance_sde", "sampler.window=sliding",
                                        "sampler.window_size=3", "sampler.window_every=5"]))
    validate(cfg, 1)  # a valid MixGRPO-style setting passes


def test_evaluation_sampler_is_the_deterministic_member_of_the_family():
    for sampler in (FlowSDESampler(noise_level=0.7, eval_num_steps=7, ode_solver="dpm2"), CPSSampler(eval_num_steps=7),
                    DDIMSampler(eval_num_steps=7), DanceSDESampler(eval_num_steps=7), ODESampler(eval_num_steps=7)):
        ev = sampler.evaluation()
        assert type(ev) is type(sampler) and ev.num_steps == 7 and ev.ode_solver == sampler.ode_solver
        sig = torch.tensor([0.99, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.0])
        assert not bool(ev.plan(sig).stochastic.any())
