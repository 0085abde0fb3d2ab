"""Ported recipes: ``python -m launch.recipes [--check] [--write README.md]``.

Each ``conf/recipes/<experiment>.yaml`` is the key-by-key port of a published recipe (a reference's
config) to one steerflow experiment: rows of (reference key, reference value, steerflow key, steerflow
value, note), and ``differs`` where steerflow deliberately takes another value (with the reason). The
rows are the single source of the README's "Porting a recipe" tables, and every row's steerflow value
is checked against the experiment as Hydra composes it, so the table, the port and the config cannot
drift apart.

  python -m launch.recipes             print the tables (Markdown)
  python -m launch.recipes --check     exit 1 naming every row whose value is not what the experiment composes
                                       to, and whether README.md's tables are stale
  python -m launch.recipes --write README.md   rewrite the tables between the README's markers
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
BEGIN, END = "<!-- recipes:begin (python -m launch.recipes --write README.md) -->", "<!-- recipes:end -->"
ROW_KEYS = {"ref", "ref_value", "key", "value", "note", "differs"}


def load_recipes(conf: Path = CONF) -> list[dict]:
    """Every conf/recipes/*.yaml as a plain dict, sorted by file name; malformed rows raise naming the file."""
    recipes = []
    for path in sorted((conf / "recipes").glob("*.yaml")):
        r = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        missing = {"experiment", "reference", "rows"} - set(r)
        if missing:
            raise ValueError(f"{path}: missing {sorted(missing)}")
        for i, row in enumerate(r["rows"]):
            if not {"ref", "ref_value", "key", "value"} <= set(row) or set(row) - ROW_KEYS:
                raise ValueError(f"{path}: row {i} ({row.get('ref')!r}) needs ref, ref_value, key, value "
                                 f"(and optionally note, differs); got {sorted(row)}")
        r["path"] = path
        recipes.append(r)
    return recipes


def compose_experiment(name: str, conf: Path = CONF):
    """The experiment's config as ``python -m launch.train experiment=<name>`` composes it (unresolved)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer.config import register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}"])


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def check(recipe: dict, cfg) -> list[str]:
    """Rows whose steerflow value is not what ``cfg`` holds at the row's key."""
    bad = []
    for row in recipe["rows"]:
        got = OmegaConf.select(cfg, row["key"], default="<absent>", throw_on_missing=False)
        got = OmegaConf.to_container(got, resolve=False) if OmegaConf.is_config(got) else got
        if not _same(got, row["value"]):
            bad.append(f"{recipe['path'].name}: {row['key']} is {got!r} in experiment={recipe['experiment']}, "
                       f"the recipe row says {row['value']!r} (ref {row['ref']})")
    return bad


def _cell(v) -> str:
    if isinstance(v, bool):
        v = str(v).lower()
    elif isinstance(v, list):
        v = "[" + ", ".join(map(str, v)) + "]"
    return str(v).replace("|", "\\|")


def render(recipes: list[dict]) -> str:
    """The Markdown tables, one per recipe, in file order."""
    out = []
    for r in recipes:
        out += [f"**`experiment={r['experiment']}`** ← {r['reference']}", "",
                "| reference key | reference value | steerflow key | steerflow value | note |", "|---|---|---|---|---|"]
        for row in r["rows"]:
            note = f"**differs**: {row['differs']}" if "differs" in row else row.get("note", "")
            out.append(f"| `{_cell(row['ref'])}` | {_cell(row['ref_value'])} | `{row['key']}` | {_cell(row['value'])} | "
                       f"{_cell(note)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def readme_block(text: str) -> str | None:
    """The README's current tables (between the markers), or None without markers."""
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.recipes", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify every row against its composed experiment and README.md")
    ap.add_argument("--write", metavar="README", help="rewrite the tables between the markers of this file")
    args = ap.parse_args(argv)
    recipes = load_recipes()
    tables = render(recipes)
    if args.write:
        path = Path(args.write)
        text = path.read_text()
        if readme_block(text) is None:
            print(f"{path} has no {BEGIN!r} ... {END!r} markers: add them where the tables go", file=sys.stderr)
            return 1
        head, rest = text.split(BEGIN, 1)
        path.write_text(head + BEGIN + "\n" + tables + END + rest.split(END, 1)[1])
        print(f"wrote {len(recipes)} recipe tables into {path}")
        return 0
    if args.check:
        bad = [msg for r in recipes for msg in check(r, compose_experiment(r["experiment"]))]
        if readme_block((ROOT / "README.md").read_text()) != tables:
            bad.append("README.md's recipe tables are stale: python -m launch.recipes --write README.md")
        print("\n".join(bad) if bad else f"{len(recipes)} recipes match their experiments and the README")
        return 1 if bad else 0
    print(tables, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
