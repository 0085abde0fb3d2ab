"""Start-up prompt checks: which prompts a reward cannot read, and the error for toy-world rewards."""
from __future__ import annotations

from typing import Callable


def unreadable(prompts: list[str], parse: Callable[[str], object]) -> list[str]:
    """The prompts ``parse`` rejects with ValueError, in order."""
    bad = []
    for prompt in prompts:
        try:
            parse(prompt)
        except ValueError:
            bad.append(prompt)
    return bad


def refuse_outside(prompts: list[str], parse: Callable[[str], object], world: str, experiment: str) -> None:
    """Raise ValueError when some of `prompts` do not `parse` (the world's caption grammar), naming the
    first one and the experiment whose prompts the reward was made for."""
    outside = unreadable(prompts, parse)
    if outside:
        raise ValueError(
            f"{len(outside)} of {len(prompts)} prompts are outside the {world} grammar (first: {outside[0]!r}); this "
            f"reward reads the {world} toy's images against its captions: python -m launch.train experiment={experiment}"
        )
