"""Ported recipes (conf/recipes/*.yaml): every row's steerflow value is what its experiment composes to,
and the README's tables are the rendering of those rows (plumbing: the rows are the specification)."""
import pytest

from launch.recipes import ROOT, check, compose_experiment, load_recipes, readme_block, render

RECIPES = load_recipes()


def test_there_are_recipes():
    assert {r["experiment"] for r in RECIPES} >= {"flow_grpo_sd35_geneval", "flow_grpo_sd35_ocr", "flow_grpo_sd35_pickscore"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r["experiment"])
def test_every_row_matches_the_composed_experiment(recipe):
    assert check(recipe, compose_experiment(recipe["experiment"])) == []


def test_a_wrong_row_is_reported():
    recipe = dict(RECIPES[0], rows=[{"ref": "train.beta", "ref_value": 0.04, "key": "algorithm.kl_beta", "value": 0.5}])
    bad = check(recipe, compose_experiment(recipe["experiment"]))
    assert len(bad) == 1 and "algorithm.kl_beta" in bad[0]


def test_readme_tables_are_the_rendered_rows():
    assert readme_block((ROOT / "README.md").read_text()) == render(RECIPES), \
        "README is stale: python -m launch.recipes --write README.md"
