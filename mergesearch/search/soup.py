"""Model soups (Wortsman et al., 2022): the selection logic.

A soup is a merge like any other: ``linear`` with equal weights over its
ingredients (:func:`soup_recipe`). This module holds the pure parts, which take
a scoring function so they can be tested against scripted scores; running the
candidates on the Ray workers and recording them in the store is the job of the
command that uses them.

Greedy soup: score every ingredient on dev, sort them best first, start the soup
from the best, then go through the rest once, adding an ingredient when the
uniform average of the soup plus it scores **at least as well** as the soup
without it (ties are accepted: an ingredient that does not hurt stays in, which
can only help held-out robustness and never lowers the dev score). By
construction the final dev score is never below the best single ingredient's,
and it takes N - 1 soup evaluations after the N ingredient scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from mergesearch.checkpoint import is_trainer_checkpoint
from mergesearch.errors import MergeSearchError
from mergesearch.recipe import Recipe, from_dict


@dataclass
class SoupStep:
    ingredient: str
    score: float  # dev score of the soup with this ingredient added
    accepted: bool


@dataclass
class SoupResult:
    strategy: str
    members: list[str]
    score: float
    ingredient_scores: dict[str, float]
    steps: list[SoupStep] = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        return len(self.ingredient_scores) + len(self.steps)


def order_ingredients(paths: Sequence[str | Path]) -> list[str]:
    """HF Trainer ``checkpoint-<step>`` folders sorted by step; other paths keep their order."""
    paths = [str(p) for p in paths]
    if paths and all(is_trainer_checkpoint(Path(p)) is not None for p in paths):
        return sorted(paths, key=lambda p: is_trainer_checkpoint(Path(p)))
    return paths


def greedy_soup(ingredients: Sequence[str], score: Callable[[list[str]], float],
                ingredient_scores: dict[str, float] | None = None) -> SoupResult:
    """The greedy soup. ``score(members)`` returns the dev score of the uniform
    average of ``members``; ``ingredient_scores`` may supply the singletons'."""
    if not ingredients:
        raise MergeSearchError("soup: no ingredients")
    singles = dict(ingredient_scores or {})
    for ing in ingredients:
        if ing not in singles:
            singles[ing] = score([ing])
    # best first; equal scores keep the given order (stable sort)
    ranked = sorted(ingredients, key=lambda i: -singles[i])
    members = [ranked[0]]
    current = singles[ranked[0]]
    steps = []
    for ing in ranked[1:]:
        s = score(members + [ing])
        accepted = s >= current
        steps.append(SoupStep(ing, s, accepted))
        if accepted:
            members.append(ing)
            current = s
    return SoupResult("greedy", members, current, singles, steps)


def uniform_soup(ingredients: Sequence[str], score: Callable[[list[str]], float]) -> SoupResult:
    members = list(ingredients)
    return SoupResult("uniform", members, score(members), {})


def last_n_soup(ingredients: Sequence[str], n: int, score: Callable[[list[str]], float]) -> SoupResult:
    """The uniform soup of the last ``n`` ingredients (checkpoints in step order)."""
    if n < 1:
        raise MergeSearchError(f"--n: must be at least 1, got {n}")
    members = order_ingredients(ingredients)[-n:]
    return SoupResult("last-n", members, score(members), {})


def soup_recipe(members: Sequence[str], base: str | None = None, dtype: str | None = None) -> Recipe:
    """The soup as a recipe: linear, equal weights over its members."""
    data = {"method": "linear", "base": base, "models": [{"path": m, "parameters": {"weight": 1.0}} for m in members]}
    if dtype:
        data["dtype"] = dtype
    return from_dict(data, "soup")
