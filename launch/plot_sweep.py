"""Plot a sweep: ``python -m launch.plot_sweep DIR [x=eval/a y=eval/b out=DIR/sweep]``.

DIR holds finished runs (any folder below it with a summary.json: a Hydra multirun's run dirs or a
``runs/`` folder). Each run is labelled by the config values that differ between the runs (e.g.
``rewards.jpeg.weight=0.5``). Writes:
  <out>_final.png   final evaluation per reward: with two rewards a scatter of every run with the
                    Pareto front drawn through the non-dominated ones (the trade-off at a glance),
                    otherwise one bar group per run
  <out>_reward.png  training reward curves (reward/total), one line per run
  <out>_eval.png    the first evaluation reward's curve, one line per run
and prints a table of the final scores.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFont

from trainer.plots import _COLORS, plot_curves

_NOISE_KEYS = ("run_dir", "exp_name", "logger.", "train.progress", "train.num_threads", "hydra")


def find_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).rglob("summary.json") if (p.parent / "metrics.jsonl").is_file())


def _flat(node, prefix=""):
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def labels(runs: list[Path]) -> dict[Path, str]:
    """Each run's label: the config keys whose values differ between runs (the swept ones)."""
    flats = {r: _flat(OmegaConf.to_container(OmegaConf.load(r / "config.yaml"))) for r in runs}
    keys = sorted({k for f in flats.values() for k in f})
    varying = [k for k in keys if not k.startswith(_NOISE_KEYS) and len({repr(f.get(k)) for f in flats.values()}) > 1]
    return {r: " ".join(f"{k.split('.', 1)[-1] if k.startswith('rewards.') else k}={flats[r].get(k)}" for k in varying)
            or r.name for r in runs}


def final_scores(run: Path) -> dict[str, float]:
    after = json.loads((run / "summary.json").read_text())["eval_after"]
    return {k: v for k, v in after.items() if k.count("/") == 1 and k != "eval/num_prompts" and isinstance(v, (int, float))}


def pareto_indices(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both coordinates (higher is better), sorted by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])


def scatter(points: list[tuple[float, float]], names: list[str], x: str, y: str, path: Path, size=(720, 480)) -> Path:
    w, h = size
    left, right, top, bottom = 70, 20, 30, 50
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    padx, pady = (max(xs) - min(xs)) * 0.1 or 0.05, (max(ys) - min(ys)) * 0.1 or 0.05
    x0, x1, y0, y1 = min(xs) - padx, max(xs) + padx, min(ys) - pady, max(ys) + pady
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=11)

    def px(a, b):
        return left + (a - x0) / (x1 - x0) * (w - left - right), top + (y1 - b) / (y1 - y0) * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline="#888")
    for i in range(5):
        gx, gy = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        d.text((px(gx, y0)[0] - 10, h - bottom + 4), f"{gx:.3g}", fill="black", font=font)
        d.text((4, px(x0, gy)[1] - 6), f"{gy:.3g}", fill="black", font=font)
    d.text((w // 2 - 30, h - 18), x, fill="black", font=font)
    d.text((left, 8), f"final evaluation: {y} vs {x}; line = Pareto front", fill="black", font=font)
    front = pareto_indices(points)
    if len(front) > 1:
        d.line([px(*points[i]) for i in front], fill="#d62728", width=2)
    for i, (a, b) in enumerate(points):
        cx, cy = px(a, b)
        color = "#d62728" if i in front else "#1f77b4"
        d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=color)
        d.text((cx + 6, cy - 6), names[i], fill=color, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def bars(scores: dict[str, dict[str, float]], path: Path, size=(720, 420)) -> Path:
    """One group per run, one bar per reward, each reward scaled to its own min..max over runs."""
    rewards = sorted({k for s in scores.values() for k in s})
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=11)
    top, bottom, left = 40, 60, 10
    group_w = (w - 2 * left) / max(1, len(scores))
    bar_w = group_w * 0.8 / max(1, len(rewards))
    for j, r in enumerate(rewards):
        d.text((left + 150 * j, 8), f"{r}", fill=_COLORS[j % len(_COLORS)], font=font)
    for i, (name, s) in enumerate(scores.items()):
        gx = left + i * group_w + group_w * 0.1
        for j, r in enumerate(rewards):
            vals = [v[r] for v in scores.values() if r in v]
            lo, hi = min(vals), max(vals)
            frac = 0.5 if hi == lo else 0.1 + 0.9 * (s.get(r, lo) - lo) / (hi - lo)
            x = gx + j * bar_w
            d.rectangle([x, h - bottom - frac * (h - top - bottom), x + bar_w - 2, h - bottom], fill=_COLORS[j % len(_COLORS)])
            d.text((x, h - bottom - frac * (h - top - bottom) - 12), f"{s.get(r, float('nan')):.3g}", fill="black", font=font)
        d.text((gx, h - bottom + 6), name[:40], fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def main(argv: list[str]) -> dict:
    if not argv or argv[0].startswith("-"):
        raise SystemExit(__doc__)
    root, opts = Path(argv[0]), dict(a.split("=", 1) for a in argv[1:])
    unknown = set(opts) - {"x", "y", "out"}
    if unknown:
        raise SystemExit(f"unknown option(s) {sorted(unknown)}; use x=eval/<reward> y=eval/<reward> out=<path prefix>")
    runs = find_runs(root)
    if not runs:
        raise SystemExit(f"no finished runs (summary.json + metrics.jsonl) under {root}")
    names = labels(runs)
    scores = {names[r]: final_scores(r) for r in runs}
    out = Path(opts.get("out", root / "sweep"))
    keys = sorted({k for s in scores.values() for k in s})
    written = {}
    x, y = opts.get("x"), opts.get("y")
    if x is None and y is None and len(keys) == 2:
        x, y = keys
    if x and y:
        missing = [k for k in (x, y) if k not in keys]
        if missing:
            raise SystemExit(f"{missing} not among the runs' final evaluations {keys}")
        written["final"] = scatter([(scores[n][x], scores[n][y]) for n in scores], list(scores), x, y,
                                   out.with_name(out.name + "_final.png"))
    else:
        written["final"] = bars(scores, out.with_name(out.name + "_final.png"))
    for kind, key in (("reward", "reward/total"), ("eval", keys[0] if keys else None)):
        rows = []
        for r in runs:
            for line in (r / "metrics.jsonl").read_text().splitlines():
                row = json.loads(line)
                if key in row:
                    rows.append({"step": row["step"], names[r]: row[key]})
        path = plot_curves(rows, [names[r] for r in runs], out.with_name(out.name + f"_{kind}.png"), f"{key} per run")
        if path:
            written[kind] = path
    width = max(len(n) for n in scores)
    print(f"{'run':<{width}}  " + "  ".join(f"{k:>14}" for k in keys))
    for n, s in scores.items():
        print(f"{n:<{width}}  " + "  ".join(f"{s.get(k, float('nan')):>14.4f}" for k in keys))
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return {"runs": [str(r) for r in runs], "scores": scores, "written": {k: str(v) for k, v in written.items()}}


if __name__ == "__main__":
    main(sys.argv[1:])
