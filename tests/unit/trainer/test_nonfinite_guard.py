"""The non-finite guard on a real (one-process, gloo) DeepSpeed engine: a NaN/inf gradient or loss
never reaches the weights or the optimizer state, and training continues afterwards."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from trainer.config import DeepSpeedConfig
from trainer.distributed import init_distributed, shutdown_distributed
from trainer.engine import build_engine, optimizer_step


@pytest.fixture(scope="module")
def world():
    w = init_distributed("cpu", "gloo")
    yield w
    shutdown_distributed()


def _engine(zero_stage: int):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    policy = SimpleNamespace(transformer=net, dtype=torch.float32)
    opt = OmegaConf.create({"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2})
    sched = OmegaConf.create({"_target_": "torch.optim.lr_scheduler.LinearLR", "_partial_": True,
                              "start_factor": 0.5, "total_iters": 4})
    engine, optimizer, guard = build_engine(policy, opt, DeepSpeedConfig(zero_stage=zero_stage), 2, 1, 1, 1.0, sched)
    return engine, optimizer, guard


def _snapshot(engine, optimizer):
    return ({k: v.clone() for k, v in engine.module.state_dict().items()}, copy.deepcopy(optimizer.state_dict()),
            engine.lr_scheduler.state_dict())


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("zero_stage", [0, 2])
@pytest.mark.parametrize("poison", ["gradient", "loss"])
def test_a_non_finite_update_is_skipped_and_training_continues(world, zero_stage, poison):
    engine, optimizer, guard = _engine(zero_stage)
    x = torch.randn(2, 4)

    def step(bad: bool):
        out = engine(x).sum()
        if bad and poison == "gradient":
            out = out * torch.tensor(float("nan"))  # NaN gradients everywhere
        elif bad:
            out = out + torch.tensor(float("inf"))  # a non-finite loss with finite gradients
        if not torch.isfinite(out):
            guard.force_skip = True
        engine.backward(out)
        return optimizer_step(engine, guard)

    _, skipped = step(False)
    assert not skipped
    before = _snapshot(engine, optimizer)
    norm, skipped = step(True)
    assert skipped and norm is not None
    after = _snapshot(engine, optimizer)
    assert _same(before[0], after[0]), "weights changed on a skipped step"
    assert _same(before[1], after[1]), "optimizer state changed on a skipped step"
    assert _same(before[2], after[2]), "the LR schedule advanced on a skipped step"
    _, skipped = step(False)
    assert not skipped and not _same(before[0], _snapshot(engine, optimizer)[0]), "training did not resume"


class _NaNGrad(torch.autograd.Function):
    """Identity forward (a finite loss), NaN backward: the case the loss check cannot see."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_finite_loss_with_a_nan_gradient_is_caught_by_the_gradient_check(world, zero_stage):
    """Only the guard's own gradient check can skip this step: the loss is finite and nothing sets
    force_skip. Mutation-checked: without the guard's isfinite check over the gradients the ZeRO-0 case
    fails (ZeRO-2's own overflow check still catches it)."""
    engine, optimizer, guard = _engine(zero_stage)
    x = torch.randn(2, 4)
    engine.backward(engine(x).sum())
    assert not optimizer_step(engine, guard)[1]
    before = _snapshot(engine, optimizer)
    loss = _NaNGrad.apply(engine(x)).sum()
    assert torch.isfinite(loss) and not guard.force_skip
    engine.backward(loss)
    _, skipped = optimizer_step(engine, guard)
    assert skipped, "a NaN gradient behind a finite loss reached the optimizer"
    after = _snapshot(engine, optimizer)
    assert _same(before[0], after[0]) and _same(before[1], after[1]) and _same(before[2], after[2])
    engine.backward(engine(x).sum())
    assert not optimizer_step(engine, guard)[1]
    assert not _same(before[0], _snapshot(engine, optimizer)[0]), "training did not resume"
