"""Greedy-soup selection against scripted scores (no models involved)."""

from pathlib import Path

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


# -- seeding a search: the space's parameters that reproduce a soup ---------------------

def soup_space(family, methods, parameters, n_groups=1):
    from mergesearch.search.space import SearchSpace
    return SearchSpace.model_validate({
        "base": str(family["base"]), "models": [str(family[f"ft{i}"]) for i in range(3)],
        "evaluator": {"tasks": ["x"]}, "methods": methods, "parameters": parameters,
        "granularity": {"level": "groups", "n_groups": n_groups, "special": False} if n_groups > 1 else {},
    })


def merged(space, params, groups):
    import optuna
    from mergesearch.engine.materialize import Materializer
    recipe = space.suggest(optuna.trial.FixedTrial(params), groups)
    return Materializer(space.base, space.models, methods=space.methods).state_dict(recipe)


@pytest.mark.parametrize("methods,parameters,expect", [
    (["task_arithmetic"], {"weight": {"low": 0.0, "high": 1.0}}, {"weight/m0": 0.5, "weight/m1": 0.0, "weight/m2": 0.5}),
    (["task_arithmetic"], {"weight": {"low": 0.0, "high": 1.0}, "lambda": {"low": 0.5, "high": 2.0}},
     {"weight/m0": 0.5, "weight/m1": 0.0, "weight/m2": 0.5, "lambda": 1.0}),
    # weights cannot reach 1/2: lambda makes up the difference
    (["task_arithmetic"], {"weight": {"low": 0.0, "high": 0.3}, "lambda": {"low": 1.0, "high": 2.0}},
     {"weight/m0": 0.25, "weight/m1": 0.0, "weight/m2": 0.25, "lambda": 2.0}),
    (["linear"], {"weight": {"low": 0.0, "high": 3.0}}, {"weight/m0": 1.0, "weight/m1": 0.0, "weight/m2": 1.0}),
    (["ties", "task_arithmetic"], {"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.1, "high": 1.0}},
     {"method": "task_arithmetic", "weight/m0": 0.5, "weight/m1": 0.0, "weight/m2": 0.5}),
])
def test_soup_params_reproduce_the_uniform_soup(family, methods, parameters, expect):
    import torch
    from mergesearch.engine.checkpoint import Checkpoint
    space = soup_space(family, methods, parameters)
    groups = space.groups(4, "model.layers.")
    members = [str(family["ft0"]), str(family["ft2"])]
    params = space.soup_params(members, groups)
    assert params == expect
    out = merged(space, params, groups)
    a, b = Checkpoint(family["ft0"]), Checkpoint(family["ft2"])
    for name, t in out.items():
        torch.testing.assert_close(t, (a.get(name) + b.get(name)) / 2, rtol=0, atol=2e-7)


def test_soup_params_per_group_and_refusals(family):
    space = soup_space(family, ["task_arithmetic"], {"weight": {"low": 0.0, "high": 1.0}}, n_groups=2)
    groups = space.groups(4, "model.layers.")
    params = space.soup_params([str(family[f"ft{i}"]) for i in range(3)], groups)
    assert params == {f"weight/m{i}/{g}": pytest.approx(1 / 3) for i in range(3) for g in ("L0-1", "L2-3")}
    assert params["weight/m0/L0-1"] == 1.0 / 3
    members = [str(family["ft0"])]
    # TIES prunes and elects signs: no setting of it is a plain average
    assert soup_space(family, ["ties"], {"weight": {"low": 0.0, "high": 1.0}}).soup_params(members, groups) is None
    # non-members need weight 0 within the bounds
    assert soup_space(family, ["task_arithmetic"], {"weight": {"low": 0.2, "high": 1.0}}).soup_params(members, groups) is None
    # a fixed weight cannot drop the other models
    assert soup_space(family, ["linear"], {"weight": 1.0}).soup_params(members, groups) is None
    assert soup_space(family, ["linear"], {"weight": 1.0}).soup_params(
        [str(family[f"ft{i}"]) for i in range(3)], groups) == {}
    # a model outside the space
    assert soup_space(family, ["linear"], {"weight": {"low": 0.0, "high": 1.0}}).soup_params(
        [str(family["base"])], groups) is None


def test_materializer_without_base_serves_linear_only(family):
    import torch
    from mergesearch.engine.materialize import Materializer
    from mergesearch.engine.merge import open_plan, stream_merge
    from mergesearch.engine.checkpoint import Checkpoint
    from mergesearch.errors import MergeSearchError
    members = [str(family["ft0"]), str(family["ft1"])]
    recipe = soup_recipe(members)
    assert recipe.base is None
    mat = Materializer(None, members, methods=["linear"])
    assert "base" not in mat.slots and mat.base_path is None
    state = mat.state_dict(recipe)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        stream_merge(open_plan(recipe), Path(d) / "out")
        out = Checkpoint(Path(d) / "out")
        for name, t in state.items():
            assert torch.equal(t, out.get(name)), name  # the soup a worker scores is the soup exported
    with pytest.raises(MergeSearchError, match="materializer without a base cannot serve ties"):
        Materializer(None, members, methods=["linear", "ties"])
    with pytest.raises(MergeSearchError, match="holds no base"):
        mat.state_dict(soup_recipe(members, base=str(family["base"])))


@pytest.mark.parametrize("width", [2, 3, 4, 8])
def test_speculative_greedy_gives_the_sequential_soup(width):
    import itertools
    import random
    rng = random.Random(width)
    names = list("abcdefg")
    # scores of every member set: a mix of accepted and rejected steps
    table = {frozenset(c): round(rng.uniform(0.3, 0.9), 3)
             for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)}
    score, _ = scripted(table)
    sequential = greedy_soup(names, score)
    batches = []

    def batch_score(cands):
        batches.append([sorted(c) for c in cands])
        return [table[frozenset(c)] for c in cands]
    fast = greedy_soup(names, ingredient_scores=sequential.ingredient_scores, batch_score=batch_score, width=width)
    assert fast.members == sequential.members and fast.score == sequential.score
    assert fast.steps == sequential.steps
    assert all(len(b) <= width for b in batches)
    assert sum(map(len, batches)) == len(fast.steps) + fast.wasted  # every score either used or counted wasted
    accepted = sum(s.accepted for s in fast.steps)
    assert len(batches) <= len(fast.steps)  # never more rounds than the sequential pass
    assert fast.wasted <= accepted * (width - 1)


def test_speculation_when_every_candidate_is_rejected_takes_n_over_width_rounds():
    names = list("abcdefgh")
    singles = {n: 0.9 - 0.01 * i for i, n in enumerate(names)}
    batches = []

    def batch_score(cands):
        batches.append(len(cands))
        return [0.1] * len(cands)  # every soup is worse than the best ingredient
    r = greedy_soup(names, ingredient_scores=singles, batch_score=batch_score, width=3)
    assert r.members == ["a"] and r.wasted == 0
    assert batches == [3, 3, 1]  # 7 candidates in 3 rounds instead of 7
