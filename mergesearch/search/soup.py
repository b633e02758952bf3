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
and it takes N - 1 soup evaluations after the N ingredient scores. With several
workers the pass speculates along the rejection branch (see :func:`greedy_soup`),
which gives the same soup in fewer rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from mergesearch.engine.checkpoint import is_trainer_checkpoint
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
    wasted: int = 0  # speculative candidates scored but not needed

    @property
    def evaluations(self) -> int:
        return len(self.ingredient_scores) + len(self.steps) + self.wasted


def order_ingredients(paths: Sequence[str | Path]) -> list[str]:
    """HF Trainer ``checkpoint-<step>`` folders sorted by step; other paths keep their order."""
    paths = [str(p) for p in paths]
    if paths and all(is_trainer_checkpoint(Path(p)) is not None for p in paths):
        return sorted(paths, key=lambda p: is_trainer_checkpoint(Path(p)))
    return paths


def greedy_soup(ingredients: Sequence[str], score: Callable[[list[str]], float] | None = None,
                ingredient_scores: dict[str, float] | None = None,
                batch_score: Callable[[list[list[str]]], list[float]] | None = None,
                width: int = 1) -> SoupResult:
    """The greedy soup. ``score(members)`` returns the dev score of the uniform
    average of ``members``; ``ingredient_scores`` may supply the singletons'.

    With ``batch_score`` (scores of several member lists at once, e.g. on parallel
    workers) and ``width`` > 1, the pass speculates: beside the next candidate it
    scores the ``width - 1`` candidates that follow if the earlier ones are all
    rejected. The result is exactly the sequential one; a speculative score is only
    wasted when an earlier candidate of its batch is accepted (``SoupResult.wasted``).
    """
    if not ingredients:
        raise MergeSearchError("soup: no ingredients")
    if score is None and batch_score is None:
        raise ValueError("greedy_soup needs score or batch_score")
    if score is None:
        score = (lambda members: batch_score([members])[0])
    singles = dict(ingredient_scores or {})
    for ing in ingredients:
        if ing not in singles:
            singles[ing] = score([ing])
    # best first; equal scores keep the given order (stable sort)
    ranked = sorted(ingredients, key=lambda i: -singles[i])
    members = [ranked[0]]
    current = singles[ranked[0]]
    steps = []
    wasted = 0
    k = 1
    while k < len(ranked):
        n = max(1, width) if batch_score is not None else 1
        cands = [members + [ranked[j]] for j in range(k, min(k + n, len(ranked)))]
        scores = batch_score(cands) if batch_score is not None else [score(cands[0])]
        for idx, (cand, s) in enumerate(zip(cands, scores)):
            accepted = s >= current
            steps.append(SoupStep(cand[-1], s, accepted))
            k += 1
            if accepted:  # the rest of the batch assumed the old soup
                members.append(cand[-1])
                current = s
                wasted += len(cands) - idx - 1
                break
    return SoupResult("greedy", members, current, singles, steps, wasted)


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
