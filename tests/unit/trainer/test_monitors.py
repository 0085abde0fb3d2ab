"""Reward-hacking monitor signals against hand-computed values, and the rules."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.config import MonitorConfig, MonitorRule
from trainer.monitors import HackingMonitor, group_diversity, group_std

PIDS = torch.tensor([0, 0, 1, 1])


def test_group_std_and_diversity_by_hand():
    # groups (0, 2) and (1, 1): population stds 1 and 0 -> mean 0.5
    assert group_std(torch.tensor([0.0, 2.0, 1.0, 1.0]), PIDS) == pytest.approx(0.5)
    # features: group 0 two points 3-4-5 apart, group 1 identical -> (5 + 0) / 2
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0]])
    assert group_diversity(f, PIDS) == pytest.approx(2.5)


def test_gold_gap_is_trained_gain_minus_gold_gain_in_baseline_std_units():
    cfg = MonitorConfig(image_stats=False, diversity=False)
    mon = HackingMonitor(cfg, trained=["jpeg"], gold=["geneval"])
    images = torch.rand(4, 3, 8, 8)
    base = mon.on_eval({"jpeg": torch.tensor([0.0, 2.0, 0.0, 2.0]), "geneval": torch.tensor([1.0, 0.0, 1.0, 0.0])}, images)
    assert base["monitor/gold_gap"] == 0.0
    # jpeg mean 1 -> 3 with baseline std 1: gain 2; geneval mean 0.5 -> 0.25 with baseline std 0.5: gain -0.5
    out = mon.on_eval({"jpeg": torch.full((4,), 3.0), "geneval": torch.tensor([0.5, 0.0, 0.5, 0.0])}, images)
    assert out["monitor/gain/jpeg"] == pytest.approx(2.0, rel=1e-5)
    assert out["monitor/gain/geneval"] == pytest.approx(-0.5, rel=1e-5)
    assert out["monitor/gold_gap"] == pytest.approx(2.5, rel=1e-5)
    fired = mon.check(out)
    assert [f.rule for f in fired] == ["gold_gap"] and "monitor/gold_gap = 2.5" in fired[0].message(7)


def test_image_drift_and_wildcard_abs_rule():
    cfg = MonitorConfig(diversity=False, rules={"drift": MonitorRule("monitor/drift/*", "abs_gt", 3.0, "stop")})
    mon = HackingMonitor(cfg, trained=["r"], gold=[])
    grey = torch.full((4, 3, 8, 8), 0.5)
    grey[:2] += 0.1  # some spread at baseline: brightness 0.6, 0.6, 0.5, 0.5 -> std 0.05
    assert mon.on_eval({"r": torch.zeros(4)}, grey)["monitor/drift/brightness"] == 0.0
    bright = torch.full((4, 3, 8, 8), 0.9)
    out = mon.on_eval({"r": torch.zeros(4)}, bright)
    assert out["monitor/drift/brightness"] == pytest.approx((0.9 - 0.55) / 0.05, rel=1e-3)
    fired = mon.check(out)
    assert fired and fired[0].action == "stop" and fired[0].signal.startswith("monitor/drift/")


def test_collapse_ratios_and_state_round_trip():
    cfg = MonitorConfig(image_stats=False)
    mon = HackingMonitor(cfg, trained=["r"], gold=[])
    imgs = torch.rand(4, 3, 16, 16)
    first = mon.on_train(torch.tensor([0.0, 2.0, 1.0, 3.0]), PIDS, imgs)
    assert first["monitor/group_std_ratio"] == pytest.approx(1.0, rel=1e-4)
    assert first["monitor/diversity_ratio"] == pytest.approx(1.0, rel=1e-4)
    twin = imgs.clone()
    twin[1], twin[3] = twin[0], twin[2]  # every prompt's samples identical: diversity 0
    later = mon.on_train(torch.tensor([1.0, 1.0, 2.0, 2.0]), PIDS, twin)
    assert later["monitor/group_std_ratio"] == pytest.approx(0.0, abs=1e-5) and later["monitor/diversity_ratio"] == 0.0
    assert {f.rule for f in mon.check(later)} == {"group_collapse", "diversity_collapse"}
    restored = HackingMonitor(cfg, trained=["r"], gold=[])
    restored.load_state_dict(mon.state_dict())
    assert restored.on_train(torch.tensor([1.0, 1.0, 2.0, 2.0]), PIDS, twin) == later
    assert not math.isnan(restored.state_dict()["baseline"]["group_std"][0])


def test_rules_from_the_command_line_and_bad_rules_named():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trainer.config import ROOT, ConfigError, register, validate

    register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        ok = OmegaConf.to_object(compose("train", overrides=[
            "+monitor.rules.dark={signal:monitor/drift/brightness,op:lt,threshold:-2,action:stop}"]))
        bad = OmegaConf.to_object(compose("train", overrides=["+monitor.rules.bad={signal:x,opp:lt}",
                                                              "monitor.rules.gold_gap.op=bigger"]))
    validate(ok, 1)
    mon = HackingMonitor(ok.monitor, trained=["r"], gold=[])
    assert [f.rule for f in mon.check({"monitor/drift/brightness": -2.5})] == ["dark"]
    with pytest.raises(ConfigError) as e:
        validate(bad, 1)
    assert "monitor.rules.bad" in str(e.value) and "'opp'" in str(e.value) and "'bigger'" in str(e.value)
