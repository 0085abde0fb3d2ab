"""A monitor rule with action "stop" ends a real job with a message naming the signal, after saving."""
from __future__ import annotations

import json
import sys

from jobs import SMALL, job_env, run
from trainer.checkpoint import complete_checkpoints


def test_a_stop_rule_saves_and_stops_the_run_naming_the_signal(tmp_path):
    # abs_gt 0 fires at the first evaluation after training: any change of the trained reward against
    # the gold one (geneval) is a non-zero gap, which proves the signal flows into the rule.
    proc = run([sys.executable, "-m", "launch.train", f"run_dir={tmp_path}", *SMALL, "train.steps=3",
                "train.eval_every=1", "monitor.rules.gold_gap.op=abs_gt", "monitor.rules.gold_gap.threshold=0",
                "monitor.rules.gold_gap.action=stop"], env=job_env(), expect=1)
    assert "reward-hacking monitor 'gold_gap' fired at step 1: monitor/gold_gap" in proc.stderr
    assert [c.name for c in complete_checkpoints(tmp_path)] == ["step_000001"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r][0]
    assert {"monitor/group_std_ratio", "monitor/diversity_ratio"} <= set(train)
    evals = [r for r in rows if "eval/num_prompts" in r]
    assert evals[0]["monitor/gold_gap"] == 0.0 and evals[1]["monitor/gold_gap"] != 0.0
    assert {"monitor/drift/brightness", "monitor/drift/high_frequency", "monitor/gain/geneval"} <= set(evals[1])
