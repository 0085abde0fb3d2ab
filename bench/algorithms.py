"""A fair comparison of every algorithm on the digits toy: ``python bench/algorithms.py [--steps N] [--seeds 0 1]``.

Every run gets the same model (the shipped digits toy, LoRA), the same prompts, prompt draw and
seeds, the same sampling budget per iteration (data.prompts_per_step x algorithm.group_size samples)
and the same number of iterations; each algorithm gets only the knobs of its own that its paper
sets (``RUNS`` below: the lr and the algorithm's own keys). The held-out evaluation (deterministic
ODE samples of fixed seeds, eval/accuracy and eval/digit) runs every ``--eval-every`` iterations.

Writes, under ``--out`` (default bench_results/algorithms):
  runs/<name>-seed<s>/          each run's directory (metrics.jsonl, samples, plots)
  table.md, table.json          final scores, score at the equal wall-clock budget (the fastest
                                run's total time), samples and seconds per iteration, diversity
                                and reward-hacking signals
  algorithms.png                eval/accuracy vs generated samples and vs wall-clock seconds
Runs one job at a time (a shared machine would distort the clock); a finished run is reused, so an
interrupted bench continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # trainer.plots, when run as a script

# name -> overrides (besides the common ones). Each algorithm's own knobs for this toy live in
# conf/tuning/toy_digits_<algorithm>.yaml (picked up automatically); the rest is the default job's.
RUNS: dict[str, list[str]] = {
    "grpo": ["algorithm=grpo"],
    # MixGRPO's sliding window: 2 of 8 steps stochastic and trained (Euler outside it, so the evaluation
    # sampler is the same as everyone's; MixGRPO-Flash's dpm2 would change it).
    "grpo_window": ["algorithm=grpo", "sampler.window=sliding", "sampler.window_size=2", "sampler.window_every=5"],
    "grpo_guard": ["algorithm=grpo_guard"],
    "ddpo": ["algorithm=ddpo"],
    "dense_grpo": ["algorithm=dense_grpo"],
    "tp_grpo": ["algorithm=tp_grpo"],
    "dual_grpo": ["algorithm=dual_grpo"],
    "prdp": ["algorithm=prdp"],
    # Forward-process and reward-gradient methods need no log-probs: they roll out with the ODE.
    "nft": ["algorithm=nft", "sampler=ode"],
    "dpo": ["algorithm=dpo", "sampler=ode"],
    "reward_backprop": ["algorithm=reward_backprop", "sampler=ode"],
}
COMMON = ["experiment=toy_digits", "logger=none", "train.progress=false", "train.save_every=0", "train.grid_every=0"]
SCORE = "eval/accuracy"


def run_one(name: str, overrides: list[str], seed: int, steps: int, eval_every: int, out: Path, threads: int) -> Path:
    run_dir = out / "runs" / f"{name}-seed{seed}"
    if (run_dir / "summary.json").is_file():
        return run_dir
    cmd = [sys.executable, "-m", "launch.train", *COMMON, *overrides, f"seed={seed}", f"train.steps={steps}",
           f"train.eval_every={eval_every}", f"run_dir={run_dir}", f"train.num_threads={threads}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    t = time.time()
    print(f"[{name} seed {seed}] {' '.join(cmd[3:])}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        (out / "runs" / f"{name}-seed{seed}.log").write_text(proc.stdout + proc.stderr)
        raise RuntimeError(f"{name} (seed {seed}) failed, see {out / 'runs' / f'{name}-seed{seed}.log'}:\n"
                           f"{proc.stderr[-2000:]}")
    print(f"[{name} seed {seed}] done in {time.time() - t:.0f} s", flush=True)
    return run_dir


def curve(run_dir: Path) -> dict:
    """Eval points (step, samples, seconds, scores) and per-step signals of one run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cfg_samples = None
    seconds, t, points, signals = {0: 0.0}, 0.0, [], {}
    for r in rows:
        if "time/step" in r:
            t += r["time/step"]
            seconds[r["step"]] = t
            cfg_samples = cfg_samples or round(r["throughput/images_per_s"] * r["time/step"])
            for k in ("monitor/diversity_ratio", "monitor/group_std_ratio", "train/kl"):
                if k in r:
                    signals.setdefault(k, []).append(r[k])
    for r in rows:
        if SCORE in r:
            points.append({"step": r["step"], "samples": r["step"] * cfg_samples, "seconds": seconds.get(r["step"], t),
                           "accuracy": r[SCORE], "digit": r.get("eval/digit"),
                           **{k: r[k] for k in r if k.startswith("monitor/drift/") or k == "monitor/gold_gap"}})
    return {"points": points, "signals": signals, "samples_per_step": cfg_samples, "total_seconds": t}


def interpolate(points: list[dict], seconds: float) -> float:
    """Eval score at a wall-clock budget: the last evaluation reached within it (a step function)."""
    reached = [p for p in points if p["seconds"] <= seconds + 1e-9]
    return reached[-1]["accuracy"] if reached else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", default=None, help="algorithm names (keys of RUNS)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "algorithms")
    args = parser.parse_args()
    names = args.only or list(RUNS)
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        raise SystemExit(f"unknown algorithm run(s) {unknown}; known: {sorted(RUNS)}")
    results: dict[str, list[dict]] = {}
    for name in names:
        for seed in args.seeds:
            run_dir = run_one(name, RUNS[name], seed, args.steps, args.eval_every, args.out, args.threads)
            results.setdefault(name, []).append(curve(run_dir))
    budget = min(c["total_seconds"] for cs in results.values() for c in cs)
    table = []
    for name, cs in results.items():
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731 - a one-line helper
        first = mean([c["points"][0]["accuracy"] for c in cs])
        final = mean([c["points"][-1]["accuracy"] for c in cs])
        div = [c["signals"].get("monitor/diversity_ratio", [float("nan")])[-1] for c in cs]
        drift = [max((abs(v) for k, v in c["points"][-1].items() if k.startswith("monitor/drift/")), default=float("nan"))
                 for c in cs]
        table.append({
            "algorithm": name, "seeds": len(cs), "accuracy_before": first, "accuracy_after": final,
            "accuracy_at_budget": mean([interpolate(c["points"], budget) for c in cs]),
            "digit_after": mean([c["points"][-1]["digit"] for c in cs]),
            "s_per_iteration": mean([c["total_seconds"] for c in cs]) / args.steps,
            "samples": cs[0]["points"][-1]["samples"], "diversity_ratio": mean(div), "max_abs_drift": mean(drift),
            "gold_gap": mean([c["points"][-1].get("monitor/gold_gap", float("nan")) for c in cs]),
        })
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps({"budget_seconds": budget, "rows": table}, indent=1) + "\n")
    header = ("| algorithm | accuracy before -> after | at equal wall clock | P(digit) after | s / iteration | samples "
              "| diversity ratio | max abs drift |\n|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['algorithm']} | {r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f} | {r['accuracy_at_budget']:.3f} "
             f"| {r['digit_after']:.3f} | {r['s_per_iteration']:.2f} | {r['samples']} | {r['diversity_ratio']:.2f} "
             f"| {r['max_abs_drift']:.2f} |" for r in table]
    text = (f"{args.steps} iterations, seeds {args.seeds}, equal wall-clock budget {budget:.0f} s (the fastest run)\n\n"
            + header + "\n".join(lines) + "\n")
    (args.out / "table.md").write_text(text)
    print(text)
    plot(results, args.out / "algorithms.png", budget)
    print(f"wrote {args.out / 'table.md'} and {args.out / 'algorithms.png'}")


def plot(results: dict[str, list[dict]], path: Path, budget: float) -> None:
    """Three panels side by side: score vs samples, score vs seconds (the equal budget marked), diversity."""
    from PIL import Image

    from trainer.plots import plot_series

    def mean_curve(cs: list[dict], x: str) -> list[tuple[float, float]]:
        n = min(len(c["points"]) for c in cs)
        return [(cs[0]["points"][i][x], sum(c["points"][i]["accuracy"] for c in cs) / len(cs)) for i in range(n)]

    panels = [
        plot_series({n: mean_curve(cs, "samples") for n, cs in results.items()}, path.with_suffix(".samples.png"),
                    f"held-out {SCORE} vs generated samples", "generated samples", (560, 420)),
        plot_series({n: mean_curve(cs, "seconds") for n, cs in results.items()}, path.with_suffix(".seconds.png"),
                    f"held-out {SCORE} vs wall clock (line: equal budget)", "seconds (training loop)", (560, 420), budget),
        plot_series({n: list(enumerate(cs[0]["signals"].get("monitor/diversity_ratio", []), 1)) for n, cs in results.items()},
                    path.with_suffix(".diversity.png"), "monitor/diversity_ratio (vs step 1)", "iteration", (560, 420)),
    ]
    images = [Image.open(p) for p in panels if p is not None]
    sheet = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)), "white")
    x = 0
    for im in images:
        sheet.paste(im, (x, 0))
        x += im.width
    sheet.save(path)


if __name__ == "__main__":
    main()
