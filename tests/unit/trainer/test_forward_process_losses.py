"""The forward-process algorithms (algorithm=nft, algorithm=dpo): losses against values worked out by hand
on tiny tensors, DiffusionNFT's old policy (EMA schedule, weight swap, state), and config validation."""

import io
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainer.algorithms.dpo import DPO, DPOConfig, dpo_pair_loss, pair_weights, velocity_error
from trainer.algorithms.nft import NFT, NFTConfig, ema_decay, nft_loss, optimality_probability
from trainer.config import ConfigError, register, validate

CONF = Path(__file__).resolve().parents[3] / "conf"
register()

# --- DiffusionNFT's loss ---------------------------------------------------------------------------
# B = 2 samples of 2 elements (shape [2, 1, 1, 2]), beta = 0.5.
#   0: x0 = [1, 0], noise = [0, 2], sigma = 0.5 -> target v = noise - x0 = [-1, 2]; r = 0.75
#      v_theta = [0, 3], v_old = [-1, 1]
#      v+ = 0.5 v_old + 0.5 v_theta = [-0.5, 2];   v+ - v = [0.5, 0]   -> MSE 0.125
#      v- = 1.5 v_old - 0.5 v_theta = [-1.5, 0];   v- - v = [-0.5, -2] -> MSE (0.25 + 4) / 2 = 2.125
#      loss = (0.75 * 0.125 + 0.25 * 2.125) / 0.5 = 1.25
#   1: x0 = [0, 0], noise = [1, 1], sigma = 1 -> v = [1, 1]; v_theta = v_old = v: every error 0; r = 0.2
# mean loss 0.625; pos_err (0.125 + 0) / 2; neg_err 2.125 / 2; old_gap = mean |v_theta - v_old| = (1 + 2) / 4.
# Adaptive weighting measures the error on x0_hat = x_t - sigma v, i.e. -sigma (v_branch - v):
#   0: pos err [-0.25, 0]: mean sq 0.03125 / mean abs 0.125 = 0.25
#      neg err [0.25, 1]:  mean sq 0.53125 / mean abs 0.625 = 0.85
#      loss = (0.75 * 0.25 + 0.25 * 0.85) / 0.5 = 0.8;   1: 0 (the floor keeps 0 / 0 away)  -> mean 0.4
X0 = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)
NOISE = torch.tensor([[0.0, 2.0], [1.0, 1.0]]).reshape(2, 1, 1, 2)
SIGMA = torch.tensor([0.5, 1.0])
V_THETA = torch.tensor([[0.0, 3.0], [1.0, 1.0]]).reshape(2, 1, 1, 2)
V_OLD = torch.tensor([[-1.0, 1.0], [1.0, 1.0]]).reshape(2, 1, 1, 2)
R = torch.tensor([0.75, 0.2])


def test_nft_loss_matches_hand_computed_values():
    loss, stats = nft_loss(V_THETA.clone().requires_grad_(), V_OLD, X0, NOISE, SIGMA, R, beta=0.5, adaptive=False)
    assert loss.item() == pytest.approx(0.625, rel=1e-6)
    assert stats["pos_err"].item() == pytest.approx(0.0625, rel=1e-6)
    assert stats["neg_err"].item() == pytest.approx(1.0625, rel=1e-6)
    assert stats["old_gap"].item() == pytest.approx(0.75, rel=1e-6)
    assert all(not v.requires_grad for v in stats.values())


def test_nft_adaptive_weighting_matches_hand_computed_values():
    loss, _ = nft_loss(V_THETA.clone().requires_grad_(), V_OLD, X0, NOISE, SIGMA, R, beta=0.5, adaptive=True)
    assert loss.item() == pytest.approx(0.4, rel=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_nft_gradient_pulls_towards_positive_and_away_from_negative_samples(adaptive):
    # With the policy equal to the old one, d loss / d v_theta = 2 / (B n) * (2r - 1) * (v_old - v) * w: a
    # sample with r > 1/2 moves towards its flow target, one with r < 1/2 away from it.
    x0, noise, sigma = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2), torch.tensor([0.3, 0.6, 0.9])
    v_old = torch.randn(3, 1, 2, 2)
    r = torch.tensor([1.0, 0.0, 0.5])
    v = v_old.clone().requires_grad_()
    nft_loss(v, v_old, x0, noise, sigma, r, beta=0.3, adaptive=adaptive)[0].backward()
    resid = (v_old - (noise - x0)).flatten(1)
    g = v.grad.flatten(1)
    if not adaptive:
        torch.testing.assert_close(g, 2 / (3 * 4) * (2 * r[:, None] - 1) * resid)
    cos = torch.nn.functional.cosine_similarity(g, resid, dim=1)
    assert cos[0] > 0.999 and cos[1] < -0.999  # gradient descent: r = 1 towards v, r = 0 away from it
    assert g[2].abs().max() < 1e-6  # r = 1/2: the two branches cancel


def test_optimality_probability_clips_the_scaled_advantage():
    r = optimality_probability(torch.tensor([10.0, -2.5, 0.0, 5.0, -7.0]), adv_clip=5.0)
    torch.testing.assert_close(r, torch.tensor([1.0, 0.25, 0.5, 1.0, 0.0]))


# --- DiffusionNFT's old policy ---------------------------------------------------------------------


class _Policy:
    """A stand-in with a ``transformer`` holding two trainable scalars and a frozen one."""

    def __init__(self, a: float, b: float):
        self.transformer = torch.nn.Module()
        self.transformer.a = torch.nn.Parameter(torch.tensor([a]))
        self.transformer.b = torch.nn.Parameter(torch.tensor([b]))
        self.transformer.frozen = torch.nn.Parameter(torch.tensor([7.0]), requires_grad=False)

    def set(self, a: float, b: float) -> None:
        with torch.no_grad():
            self.transformer.a.fill_(a)
            self.transformer.b.fill_(b)


def _nft(**kw) -> NFT:
    return NFT(NFTConfig(**{"ema_ramp": 0.25, "ema_max": 0.5, **kw}))


def test_ema_schedule_and_soft_updates_by_hand():
    assert [ema_decay(0.25, 0.5, i) for i in range(4)] == [0.0, 0.25, 0.5, 0.5]
    nft, pol = _nft(), _Policy(1.0, -1.0)
    # Update 0 (eta 0): the old policy becomes the current one.
    pol.set(2.0, 0.0)
    nft.after_update(pol)
    assert nft.ema["a"].item() == 2.0 and nft.ema["b"].item() == 0.0
    # Update 1 (eta 0.25): 0.25 * 2 + 0.75 * 6 = 5;  0.25 * 0 + 0.75 * 4 = 3
    pol.set(6.0, 4.0)
    nft.after_update(pol)
    assert nft.ema["a"].item() == pytest.approx(5.0) and nft.ema["b"].item() == pytest.approx(3.0)
    # Update 2 (eta 0.5): 0.5 * 5 + 0.5 * 1 = 3
    pol.set(1.0, 1.0)
    nft.after_update(pol)
    assert nft.ema["a"].item() == pytest.approx(3.0) and nft.ema["b"].item() == pytest.approx(2.0)
    assert set(nft.ema) == {"a", "b"}  # frozen weights are not part of the old policy


def test_rollout_swaps_in_the_old_policy_and_restores_the_weights_exactly():
    nft, pol = _nft(), _Policy(1.0, -1.0)
    with nft.rollout_weights(pol):  # a fresh run: the old policy starts as the initial weights
        assert pol.transformer.a.item() == 1.0
    nft.after_update(pol)
    pol.set(0.1, 0.2)
    nft.after_update(pol)  # eta 0.25: a_old = 0.25 * 1 + 0.75 * 0.1
    a_now = pol.transformer.a.detach().clone()
    with nft.rollout_weights(pol):
        assert pol.transformer.a.item() == pytest.approx(0.25 + 0.075)
        assert pol.transformer.frozen.item() == 7.0
    assert torch.equal(pol.transformer.a.detach(), a_now)
    with pytest.raises(RuntimeError), nft.rollout_weights(pol):
        raise RuntimeError("rollout failed")
    assert torch.equal(pol.transformer.a.detach(), a_now)  # restored on errors too


def test_state_dict_round_trip_continues_bit_for_bit():
    a, pol = _nft(), _Policy(0.3, 0.7)
    for v in (0.5, 0.9):
        pol.set(v, -v)
        a.after_update(pol)
    b = _nft()
    b.load_state_dict(torch.load(_save(a.state_dict()), weights_only=False))
    for nft in (a, b):
        pol.set(0.123, 0.456)
        nft.after_update(pol)
    assert a.updates == b.updates == 3
    assert all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)


def _save(state) -> io.BytesIO:
    """The state as the checkpoint stores it (torch.save), ready to torch.load."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_load_state_dict_rejects_foreign_state():
    with pytest.raises(ValueError, match="DiffusionNFT"):
        _nft().load_state_dict({"baseline": 1.0})
    nft = _nft()
    nft.load_state_dict({"ema": {"other": torch.zeros(1)}, "updates": 1})
    with pytest.raises(ValueError, match="trainable weights"):
        nft.after_update(_Policy(0.0, 0.0))


# --- DPO's loss ------------------------------------------------------------------------------------
# 5 samples in 2 groups: prompt 0 -> samples 0, 1, 2 (scores 1.0, -1.0, 0.5), prompt 1 -> 3, 4 (scores 0, 0).
# best_worst: the pair (0, 1) in group 0; group 1 is tied: no pair.
# all: (0, 1) gap 2, (0, 2) gap 0.5, (2, 1) gap 1.5; none in group 1.
SCORES = torch.tensor([1.0, -1.0, 0.5, 0.0, 0.0])
PIDS = torch.tensor([0, 0, 0, 1, 1])
# d = e_theta - e_ref per sample; beta = 4, so each pair's loss is softplus(2 (d_w - d_l)):
#   (0, 1): d_w - d_l = -0.1 - 0.2 = -0.3 -> softplus(-0.6);  (0, 2): -0.1 - 0 = -0.1 -> softplus(-0.2)
#   (2, 1): 0 - 0.2 = -0.2 -> softplus(-0.4)
D = torch.tensor([-0.1, 0.2, 0.0, 5.0, -5.0])


def _softplus(x):
    return math.log1p(math.exp(x))


def test_pair_weights_by_hand():
    bw = pair_weights(SCORES, PIDS, "best_worst")
    assert bw.nonzero().tolist() == [[0, 1]] and bw[0, 1] == 1.0
    allw = pair_weights(SCORES, PIDS, "all")
    assert {tuple(ij): allw[tuple(ij)].item() for ij in allw.nonzero().tolist()} == {(0, 1): 2.0, (0, 2): 0.5, (2, 1): 1.5}
    with pytest.raises(ValueError, match="pairs"):
        pair_weights(SCORES, PIDS, "random")


def test_dpo_loss_best_worst_by_hand():
    loss, stats = dpo_pair_loss(D, pair_weights(SCORES, PIDS, "best_worst"), beta=4.0)
    assert loss.item() == pytest.approx(_softplus(-0.6), rel=1e-6)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-(-4.0 / 2) * -0.3))), rel=1e-6)  # -log sigmoid(-beta/2 x)
    assert stats["pair_acc"].item() == 1.0 and stats["margin"].item() == pytest.approx(0.3)
    assert stats["num_pairs"].item() == 1


def test_dpo_loss_all_pairs_weighted_by_gap_by_hand():
    loss, stats = dpo_pair_loss(D, pair_weights(SCORES, PIDS, "all"), beta=4.0)
    want = (2 * _softplus(-0.6) + 0.5 * _softplus(-0.2) + 1.5 * _softplus(-0.4)) / 4.0
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert stats["margin"].item() == pytest.approx((2 * 0.3 + 0.5 * 0.1 + 1.5 * 0.2) / 4.0)


def test_dpo_loss_is_log2_when_policy_equals_reference_and_zero_without_pairs():
    loss, stats = dpo_pair_loss(torch.zeros(5), pair_weights(SCORES, PIDS, "all"), beta=100.0)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-7) and stats["pair_acc"].item() == 0.0
    loss, stats = dpo_pair_loss(D, torch.zeros(5, 5), beta=4.0)
    assert loss.item() == 0.0 and stats["num_pairs"].item() == 0


def test_dpo_gradient_lowers_the_winner_error_and_raises_the_loser_error():
    d = D.clone().requires_grad_()
    dpo_pair_loss(d, pair_weights(SCORES, PIDS, "best_worst"), beta=4.0)[0].backward()
    # d/dd_w softplus(2 (d_w - d_l)) = 2 sigmoid(2 (d_w - d_l)); d/dd_l is its negative; others 0.
    g = 2 / (1 + math.exp(0.6))
    torch.testing.assert_close(d.grad, torch.tensor([g, -g, 0.0, 0.0, 0.0]))


def test_velocity_error_by_hand():
    # v = [0, 3] against noise - x0 = [-1, 2]: ((1)^2 + (1)^2) / 2 = 1
    assert velocity_error(V_THETA[:1], X0[:1], NOISE[:1]).tolist() == [1.0]


# --- config validation ------------------------------------------------------------------------------
# The shapes toy (8 sampling steps), sized like the integration jobs.
BASE = ["experiment=toy_shapes", "data.prompts_per_step=4", "algorithm.group_size=4", "train.micro_batch=8"]


def _typed(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=[*BASE, *overrides]))


def _problems(*overrides, world_size: int = 1) -> list[str]:
    try:
        validate(_typed(*overrides), world_size)
    except ConfigError as e:
        return e.problems
    return []


@pytest.mark.parametrize("algo", ["nft", "dpo"])
@pytest.mark.parametrize("sampler", ["ode", "flow_sde"])
def test_one_override_selects_the_algorithm_with_any_sampler(algo, sampler):
    cfg = _typed(f"algorithm={algo}", f"sampler={sampler}")
    assert isinstance(cfg.algorithm, {"nft": NFTConfig, "dpo": DPOConfig}[algo])
    validate(cfg, 2)  # likelihood-free: a deterministic sampler is fine


def test_nft_reports_every_bad_knob_at_once():
    p = _problems("algorithm=nft", "algorithm.beta=0", "algorithm.timesteps_per_sample=9", "algorithm.ema_max=1.0",
                  "algorithm.std_scope=prompt", "algorithm.adv_clip=0", "deepspeed=zero3")
    text = "\n".join(p)
    for key in ("algorithm.beta", "algorithm.timesteps_per_sample (9)", "sampler.num_steps (8)", "algorithm.ema_max",
                "algorithm.std_scope", "algorithm.adv_clip", "deepspeed=zero2"):
        assert key in text, key
    assert _problems("algorithm=nft", "deepspeed=zero2") == []


def test_nft_rejects_another_algorithms_knob_at_compose_time():
    with pytest.raises(Exception, match="clip_range"):
        _typed("algorithm=nft", "algorithm.clip_range=0.1")


def test_dpo_reports_every_bad_knob_at_once():
    p = _problems("algorithm=dpo", "algorithm.pairs=random", "algorithm.beta=-1", "algorithm.std_scope=prompt",
                  "algorithm.optimizer_steps_per_epoch=2")
    text = "\n".join(p)
    for key in ("algorithm.pairs ('random')", "algorithm.beta (-1", "algorithm.std_scope", "optimizer_steps_per_epoch (2)"):
        assert key in text, key
    assert _problems("algorithm=dpo", "algorithm.pairs=all", "algorithm.inner_epochs=2") == []


def test_dpo_needs_the_reference_and_nft_does_not():
    assert DPO(DPOConfig()).needs_reference() and not NFT(NFTConfig()).needs_reference()
    assert not DPO.needs_log_probs and not NFT.needs_log_probs
    assert NFT(NFTConfig(timesteps_per_sample=3)).micro_steps(4, 0) == 12 and DPO(DPOConfig()).micro_steps(4, 0) == 4
