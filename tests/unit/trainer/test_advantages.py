"""Group-relative advantages against hand-computed values, and across two gloo ranks."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rewards.aggregate import WeightedSum
from trainer.advantages import distributed_advantages, group_advantages
from trainer.distributed import global_nanmean

EPS = 1e-4

# 2 prompts x 3 samples.
#   prompt 0: rewards 1, 2, 3  -> mean 2, centred -1, 0, 1;  population var (1 + 0 + 1) / 3 = 2/3
#   prompt 1: rewards 0, 0, 3  -> mean 1, centred -1, -1, 2; population var (1 + 1 + 4) / 3 = 2
REWARDS = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
PROMPTS = torch.tensor([0, 0, 0, 1, 1, 1])
S0, S1 = math.sqrt(2 / 3) + EPS, math.sqrt(2) + EPS
EXPECTED_GROUP = torch.tensor([-1 / S0, 0.0, 1 / S0, -1 / S1, -1 / S1, 2 / S1])
#   global: batch mean 1.5, squared deviations .25 .25 2.25 2.25 2.25 2.25 -> var 9.5 / 6; centring stays per group
SG = math.sqrt(9.5 / 6) + EPS
EXPECTED_GLOBAL = torch.tensor([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]) / SG


def test_group_scope_matches_hand_computed_values():
    adv = group_advantages(REWARDS, PROMPTS, "group", eps=EPS)
    assert adv.dtype == torch.float32 and adv.shape == (6,)
    # rtol 1e-6 separates std + eps from sqrt(var + eps) (~1e-4 apart) and the unbiased std (~20%).
    torch.testing.assert_close(adv, EXPECTED_GROUP, rtol=1e-6, atol=1e-7)


def test_default_scope_is_group_with_eps_1e_4():
    torch.testing.assert_close(group_advantages(REWARDS, PROMPTS), EXPECTED_GROUP, rtol=1e-6, atol=1e-7)


def test_global_scope_divides_by_the_batch_std():
    adv = group_advantages(REWARDS, PROMPTS, "global", eps=EPS)
    torch.testing.assert_close(adv, EXPECTED_GLOBAL, rtol=1e-6, atol=1e-7)


def test_all_equal_group_gets_zero_and_does_not_disturb_others():
    rewards = torch.tensor([0.7, 0.7, 0.7, 1.0, 2.0, 3.0])
    adv = group_advantages(rewards, PROMPTS, "group", eps=EPS)
    assert torch.equal(adv[:3], torch.zeros(3))
    torch.testing.assert_close(adv[3:], EXPECTED_GROUP[:3], rtol=1e-6, atol=1e-7)


def test_integer_rewards_are_accepted_as_float():
    adv = group_advantages(REWARDS.long(), PROMPTS, eps=EPS)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, EXPECTED_GROUP, rtol=1e-6, atol=1e-7)


def test_interleaved_and_non_contiguous_prompt_ids():
    # Same two groups, samples interleaved, ids 9 and 5 (not 0..n-1, not sorted).
    order = torch.tensor([0, 3, 1, 4, 2, 5])
    ids = torch.tensor([9, 9, 9, 5, 5, 5])[order]
    for scope, expected in [("group", EXPECTED_GROUP), ("global", EXPECTED_GLOBAL)]:
        adv = group_advantages(REWARDS[order], ids, scope, eps=EPS)
        torch.testing.assert_close(adv, expected[order], rtol=1e-6, atol=1e-7)


def test_unknown_std_scope_raises():
    with pytest.raises(ValueError, match="std_scope"):
        group_advantages(REWARDS, PROMPTS, "batch")


def _distributed(rewards, prompt_ids, rank, scope):
    """The trainer's path for one reward: gathered across ranks, weighted sum, this rank's slice."""
    adv, _ = distributed_advantages({"r": rewards}, {"r": 1.0}, set(), prompt_ids, rank, WeightedSum(), scope)
    return adv


def test_distributed_without_a_process_group_is_the_local_computation():
    assert not dist.is_initialized()
    adv = _distributed(REWARDS, PROMPTS, 0, "group")
    torch.testing.assert_close(adv, group_advantages(REWARDS, PROMPTS), rtol=0, atol=0)


# --- two gloo ranks ----------------------------------------------------------------------------------

WORLD = 2
# 3 prompts x 4 samples in a shuffled global order: every prompt's group has samples on both ranks.
GLOBAL_IDS = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2, 1, 0, 2])
GLOBAL_REWARDS = torch.tensor([0.3, 1.0, -2.0, 0.5, 0.3, 4.0, 1.5, 0.0, 0.9, -1.0, 2.5, 0.1])
# global_nanmean inputs per rank: "a" has NaNs on both ranks; "b" is all NaN; "c" has none.
NAN = float("nan")
# "d" exists only on rank 1 and "e" only on rank 0 (a remote reward that failed on one rank): the union is reduced.
NANMEAN_INPUTS = [
    {"a": torch.tensor([1.0, NAN, 3.0]), "b": torch.full((3,), NAN), "c": torch.tensor([1.0, 2.0, 3.0]),
     "e": torch.tensor([2.0, 2.0, 2.0])},
    {"a": torch.tensor([NAN, 5.0, NAN]), "b": torch.full((3,), NAN), "c": torch.tensor([4.0, 5.0, 6.0]),
     "d": torch.tensor([7.0, 8.0, 9.0])},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        n = len(GLOBAL_IDS) // WORLD
        own = slice(rank * n, (rank + 1) * n)
        result = {
            scope: _distributed(GLOBAL_REWARDS[own], GLOBAL_IDS[own], rank, scope)
            for scope in ("group", "global")
        }
        result["nanmean"] = global_nanmean(NANMEAN_INPUTS[rank])
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_groups_spanning_two_ranks_match_the_single_process_result(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for scope in ("group", "global"):
        gathered = torch.cat([r[scope] for r in results])
        expected = group_advantages(GLOBAL_REWARDS, GLOBAL_IDS, scope)
        torch.testing.assert_close(gathered, expected, rtol=0, atol=0)
        # Not what each rank would get from its own half alone (that is the bug this guards).
        n = len(GLOBAL_IDS) // WORLD
        local_only = torch.cat([group_advantages(GLOBAL_REWARDS[i * n:(i + 1) * n], GLOBAL_IDS[i * n:(i + 1) * n], scope) for i in range(WORLD)])
        assert not torch.allclose(gathered, local_only)
    # Mean over every finite value on every rank: a = (1 + 3 + 5) / 3 (a mean of rank means would be 3.5).
    for r in results:
        assert r["nanmean"]["a"] == pytest.approx(3.0)
        assert math.isnan(r["nanmean"]["b"])
        assert r["nanmean"]["c"] == pytest.approx(3.5)
        assert r["nanmean"]["d"] == pytest.approx(8.0) and r["nanmean"]["e"] == pytest.approx(2.0)
        assert set(r["nanmean"]) == {"a", "b", "c", "d", "e"}
