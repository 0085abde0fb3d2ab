"""The policy EMA (train.ema_decay): the recurrence by hand, exact swap and restore, state round trip."""

import pytest
import torch

from trainer.ema import PolicyEMA


def _module():
    m = torch.nn.Linear(2, 2)
    m.bias.requires_grad_(False)  # frozen: not averaged
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    return m


def test_update_follows_the_recurrence_and_skips_frozen_weights():
    m = _module()
    ema = PolicyEMA(m, decay=0.75)
    assert set(ema.shadow) == {"weight"}
    with torch.no_grad():
        m.weight.add_(4.0)
    ema.update()  # 0.75 * w0 + 0.25 * (w0 + 4) = w0 + 1
    torch.testing.assert_close(ema.shadow["weight"], torch.tensor([[2.0, 3.0], [4.0, 5.0]]))
    with torch.no_grad():
        m.weight.zero_()
    ema.update()  # 0.75 * (w0 + 1)
    torch.testing.assert_close(ema.shadow["weight"], 0.75 * torch.tensor([[2.0, 3.0], [4.0, 5.0]]))


def test_swapped_in_computes_with_the_ema_and_restores_the_weights_exactly():
    m = _module()
    ema = PolicyEMA(m, decay=0.5)
    trained = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    with torch.no_grad():
        m.weight.copy_(trained)
    x = torch.tensor([[1.0, 1.0]])
    with ema.swapped_in():
        assert torch.equal(m(x).detach(), x @ torch.tensor([[1.0, 2.0], [3.0, 4.0]]).T + m.bias.detach())
    assert torch.equal(m.weight.detach(), trained)
    with pytest.raises(RuntimeError):
        with ema.swapped_in():
            raise RuntimeError("an evaluation failed")
    assert torch.equal(m.weight.detach(), trained)  # restored on the way out of an error too


def test_state_round_trip_and_checks():
    a, b = PolicyEMA(_module(), 0.9), PolicyEMA(_module(), 0.9)
    a.shadow["weight"].mul_(3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.shadow["weight"], a.shadow["weight"])
    with pytest.raises(KeyError, match="missing"):
        a.load_state_dict({})
    with pytest.raises(ValueError, match=r"train.ema_decay \(1.0\) must be in \[0, 1\)"):
        PolicyEMA(_module(), 1.0)


def test_warmup_and_interval_follow_flow_grpo_ema():
    """Ground truth: Flow-GRPO's EMA (decay 0.9, ramp min(0.9, (1+n)/(10+n)), n optimizer steps so far),
    updated every 4th iteration here (2 optimizer steps per iteration), recomputed by hand in float64 on a
    scalar weight that is set to the iteration number before each update."""
    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = PolicyEMA(m, decay=0.9, every=4, warmup=True)
    expected, updated = 0.0, []
    for it in range(1, 41):
        with torch.no_grad():
            m.weight.fill_(float(it))
        n = 2 * it
        if ema.update(it, n):
            d = min(0.9, (1 + n) / (10 + n))
            expected = d * expected + (1 - d) * it
            updated.append(it)
    assert updated == list(range(4, 41, 4))
    assert abs(float(ema.shadow["weight"]) - expected) < 1e-5
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(1000) == 0.9
    plain = PolicyEMA(m, decay=0.9)
    assert plain.decay_at(0) == 0.9  # no ramp unless asked
    with pytest.raises(ValueError, match="train.ema_every"):
        PolicyEMA(m, decay=0.9, every=0)
