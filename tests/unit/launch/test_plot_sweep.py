"""launch.plot_sweep on synthetic finished runs: labels name the swept keys, the Pareto front is right,
the PNGs are written."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from launch.plot_sweep import main, pareto_indices


def _run(root, name, weight, seed, a, b, c=None):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"seed: {seed}\nrun_dir: {d}\nrewards:\n  jpeg:\n    weight: {weight}\n")
    rows = [{"step": 0, "eval/a": 0.0, "eval/b": 0.0, "eval/num_prompts": 4},
            {"step": 1, "reward/total": a / 2}, {"step": 2, "reward/total": a},
            {"step": 2, "eval/a": a, "eval/b": b, "eval/num_prompts": 4, **({"eval/c": c} if c is not None else {})}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({"eval_before": rows[0], "eval_after": rows[-1]}))


def test_pareto_indices_hand_checked():
    pts = [(0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.9, 0.05)]
    assert pareto_indices(pts) == [0, 1, 3]  # (0.4, 0.4) and (0.9, 0.05) are dominated


def test_two_rewards_give_a_pareto_scatter_and_labels_name_the_swept_key(tmp_path, capsys):
    _run(tmp_path, "0", 0.2, 0, 0.1, 0.9)
    _run(tmp_path, "1", 0.5, 0, 0.5, 0.5)
    _run(tmp_path, "2", 1.0, 0, 0.4, 0.3)
    out = main([str(tmp_path)])
    assert set(out["scores"]) == {"jpeg.weight=0.2", "jpeg.weight=0.5", "jpeg.weight=1.0"}  # seed is not swept
    for kind in ("final", "reward", "eval"):
        img = Image.open(out["written"][kind])
        assert img.size[0] > 100
    # The dominated run is drawn in the off-front colour, the others in the front's.
    table = capsys.readouterr().out
    assert "jpeg.weight=1.0" in table and "0.4000" in table


def test_more_than_two_rewards_give_bars_and_bad_options_are_named(tmp_path):
    _run(tmp_path, "0", 0.2, 0, 0.1, 0.9, 0.3)
    _run(tmp_path, "1", 0.2, 1, 0.5, 0.5, 0.2)
    out = main([str(tmp_path), "out=" + str(tmp_path / "p")])
    assert set(out["scores"]) == {"seed=0", "seed=1"}
    assert out["written"]["final"].endswith("p_final.png")
    # Two of the three rewards picked explicitly: the scatter instead of the bars.
    assert main([str(tmp_path), "x=eval/a", "y=eval/c"])["written"]["final"].endswith("sweep_final.png")
    with pytest.raises(SystemExit, match="unknown option"):
        main([str(tmp_path), "colour=red"])
    with pytest.raises(SystemExit, match="not among"):
        main([str(tmp_path), "x=eval/a", "y=eval/zzz"])
    with pytest.raises(SystemExit, match="no finished runs"):
        main([str(tmp_path / "empty")])
