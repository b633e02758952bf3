"""Greedy-soup selection against scripted scores (no models involved)."""

import pytest

from mergesearch.errors import MergeSearchError
from mergesearch.search.soup import greedy_soup, last_n_soup, order_ingredients, soup_recipe, uniform_soup


def scripted(table):
    """score(members) looks the sorted member set up in ``table``; records every call."""
    calls = []

    def score(members):
        key = frozenset(members)
        calls.append(sorted(members))
        return table[key]
    return score, calls


def test_greedy_adds_helpful_and_skips_harmful():
    score, calls = scripted({
        frozenset("a"): 0.6, frozenset("b"): 0.7, frozenset("c"): 0.5, frozenset("d"): 0.4,
        frozenset("ba"): 0.75, frozenset("bac"): 0.70, frozenset("bad"): 0.80,
    })
    r = greedy_soup(list("abcd"), score)
    assert r.members == ["b", "a", "d"]
    assert r.score == 0.80
    assert [(s.ingredient, s.accepted) for s in r.steps] == [("a", True), ("c", False), ("d", True)]
    assert r.evaluations == 4 + 3 == len(calls)  # N singles + (N - 1) soups


def test_ties_are_accepted():
    score, _ = scripted({frozenset("a"): 0.5, frozenset("b"): 0.5, frozenset("ab"): 0.5})
    r = greedy_soup(["a", "b"], score)
    assert r.members == ["a", "b"] and r.score == 0.5  # equal single scores keep input order too


def test_every_ingredient_worse():
    table = {frozenset("a"): 0.9, frozenset("b"): 0.5, frozenset("c"): 0.4,
             frozenset("ab"): 0.8, frozenset("ac"): 0.7}
    score, _ = scripted(table)
    r = greedy_soup(list("abc"), score)
    assert r.members == ["a"] and r.score == 0.9  # never below the best single ingredient
    assert not any(s.accepted for s in r.steps)


def test_every_ingredient_better():
    table = {frozenset("a"): 0.3, frozenset("b"): 0.2, frozenset("c"): 0.1,
             frozenset("ab"): 0.4, frozenset("abc"): 0.5}
    score, _ = scripted(table)
    r = greedy_soup(list("cab"), score)
    assert r.members == ["a", "b", "c"] and r.score == 0.5


def test_supplied_single_scores_are_not_recomputed():
    score, calls = scripted({frozenset("ab"): 1.0})
    r = greedy_soup(["a", "b"], score, {"a": 0.2, "b": 0.3})
    assert calls == [["a", "b"]] and r.members == ["b", "a"]


def test_uniform_and_last_n_and_checkpoint_order():
    paths = ["run/checkpoint-500", "run/checkpoint-1000", "run/checkpoint-50"]
    assert order_ingredients(paths) == ["run/checkpoint-50", "run/checkpoint-500", "run/checkpoint-1000"]
    assert order_ingredients(["x", "a"]) == ["x", "a"]
    score = lambda members: len(members) / 10  # noqa: E731
    assert last_n_soup(paths, 2, score).members == ["run/checkpoint-500", "run/checkpoint-1000"]
    assert uniform_soup(paths, score).score == 0.3
    with pytest.raises(MergeSearchError, match="at least 1"):
        last_n_soup(paths, 0, score)
    with pytest.raises(MergeSearchError, match="no ingredients"):
        greedy_soup([], score)


def test_soup_recipe_is_an_equal_weight_linear_merge():
    r = soup_recipe(["m1", "m2", "m3"], base="b")
    assert r.method == "linear" and r.base == "b"
    assert [m.parameters["weight"] for m in r.models] == [1.0, 1.0, 1.0]
    assert r.resolve("x", 0.0)[0]["normalize"] is True
