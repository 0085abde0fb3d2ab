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
