"""Depth schedules (granularity: {level: depth}): two variables per parameter, the value
at layer l of L being alpha + beta * l / (L - 1), clipped into the parameter's bounds."""

from __future__ import annotations

import optuna
import pytest

from mergesearch.recipe import layer_position
from mergesearch.search.space import SearchSpace
from mergesearch.search.variables import n_variables, recipe_x0, soup_params

from test_zoo_eval import zoo  # noqa: F401  (session fixture)

L = 6
NAMES = ["model.embed_tokens.weight"] + [f"model.layers.{i}.mlp.up_proj.weight" for i in range(L)] + \
        ["model.norm.weight", "lm_head.weight"]


def space(**over) -> SearchSpace:
    data = {"base": "/m/base", "models": ["/m/a", "/m/b"], "evaluator": {"tasks": ["t"]}, "methods": ["ties"],
            "parameters": {"weight": {"low": 0.0, "high": 1.5}, "density": {"low": 0.2, "high": 1.0},
                           "lambda": {"low": 0.5, "high": 3.0}},
            "granularity": {"level": "depth"}, **over}
    return SearchSpace.model_validate(data).check("space.yaml")


def values(recipe, name, model=None, param="weight"):
    glob, per = recipe.resolve(name, layer_position(name, L))
    return glob[param] if model is None else per[model][param]


def test_two_variables_per_parameter_and_model():
    s = space()
    groups = s.groups(L, "model.layers.")
    # weight and density: 2 models x (alpha, beta); lambda: alpha and beta
    assert n_variables(s, groups) == 2 * 2 * 2 + 2
    trial = optuna.trial.FixedTrial({"weight/m0/alpha": 0.2, "weight/m0/beta": 0.9, "weight/m1/alpha": 1.0,
                                     "weight/m1/beta": -0.5, "density/m0/alpha": 0.5, "density/m0/beta": 0.25,
                                     "density/m1/alpha": 0.9, "density/m1/beta": 0.0, "lambda/alpha": 1.0,
                                     "lambda/beta": 1.5})
    r = s.suggest(trial, groups)
    # mergekit's own gradient form where the line stays inside the bounds
    assert r.models[0].parameters["weight"] == [0.2, 1.1]
    assert r.parameters["lambda"] == [1.0, 2.5]
    for i in range(L):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        assert values(r, name, 0) == pytest.approx(0.2 + 0.9 * i / (L - 1))
        assert values(r, name, 1) == pytest.approx(1.0 - 0.5 * i / (L - 1))
        assert values(r, name, 0, "density") == pytest.approx(0.5 + 0.25 * i / (L - 1))
        assert values(r, name, param="lambda") == pytest.approx(1.0 + 1.5 * i / (L - 1))  # LiNeS's own form
    # tensors outside the layers take the first layer's value
    assert values(r, "model.embed_tokens.weight", 0) == pytest.approx(0.2)


def test_a_line_leaving_the_bounds_is_clipped_per_layer():
    s = space()
    groups = s.groups(L, "model.layers.")
    params = {"weight/m0/alpha": 0.9, "weight/m0/beta": 1.2, "weight/m1/alpha": 0.3, "weight/m1/beta": -0.6,
              "density/m0/alpha": 1.0, "density/m0/beta": 0.0, "density/m1/alpha": 1.0, "density/m1/beta": 0.0,
              "lambda/alpha": 1.0, "lambda/beta": 0.0}
    r = s.suggest(optuna.trial.FixedTrial(params), groups)
    w0 = r.models[0].parameters["weight"]
    assert len(w0) == L  # one value per layer
    for i in range(L):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        assert values(r, name, 0) == pytest.approx(min(0.9 + 1.2 * i / (L - 1), 1.5))
        assert values(r, name, 1) == pytest.approx(max(0.3 - 0.6 * i / (L - 1), 0.0))
    # the recipe is a valid mergekit gradient (every value within the parameter's range)
    from mergesearch.recipe import to_mergekit
    assert to_mergekit(r)["models"][0]["parameters"]["weight"] == w0


def test_start_point_from_any_recipe_and_the_uniform_soup():
    s = space()
    groups = s.groups(L, "model.layers.")
    params = {"weight/m0/alpha": 0.2, "weight/m0/beta": 0.9, "weight/m1/alpha": 1.0, "weight/m1/beta": -0.5,
              "density/m0/alpha": 0.5, "density/m0/beta": 0.25, "density/m1/alpha": 0.9, "density/m1/beta": 0.0,
              "lambda/alpha": 1.0, "lambda/beta": 1.5}
    r = s.suggest(optuna.trial.FixedTrial(params), groups)
    x0 = recipe_x0(s, r.to_dict(), groups, NAMES, L)
    assert x0 == pytest.approx(params)  # the schedule's own recipe gives back its variables
    # a whole-model recipe starts flat
    flat = r.to_dict()
    for m in flat["models"]:
        m["parameters"] = {"weight": 0.7, "density": 0.6}
    flat["parameters"] = {"lambda": 2.0}
    x0 = recipe_x0(s, flat, groups, NAMES, L)
    assert x0["weight/m1/alpha"] == 0.7 and x0["weight/m1/beta"] == 0.0 and x0["lambda/beta"] == 0.0
    # a uniform soup: flat weights, slope 0
    ta = space(methods=["task_arithmetic"], parameters={"weight": {"low": 0.0, "high": 1.0},
                                                         "lambda": {"low": 0.5, "high": 2.0}})
    soup = soup_params(ta, ["/m/a", "/m/b"], ta.groups(L, "model.layers."))
    assert soup == {"weight/m0/alpha": 0.5, "weight/m0/beta": 0.0, "weight/m1/alpha": 0.5, "weight/m1/beta": 0.0,
                    "lambda/alpha": 1.0, "lambda/beta": 0.0}


def test_depth_in_a_schedule():
    s = space(schedule=["model", "depth", "layer"])
    assert [g.level for g, _ in s.stages()] == ["model", "depth", "layer"]


def test_refinement_starts_from_a_depth_schedule(zoo):
    """A depth-schedule candidate refined per layer: with every multiplier at 1 the
    refinement's merge is the candidate's own, bit for bit up to float32 rounding."""
    from dataclasses import asdict

    import torch

    from mergesearch.engine.materialize import Materializer
    from mergesearch.recipe import from_dict
    from mergesearch.search.refine import build_terms, merged_params, refined_recipe
    from mergesearch.search.variables import Granularity, make_groups
    fts = [str(zoo / f"ft_{t}") for t in ("reverse", "shift", "max", "add")]
    r = from_dict(dict(method="ties", base=str(zoo / "base"), parameters={"lambda": [1.0, 2.0]}, seed=1,
                       models=[{"path": p, "parameters": {"weight": [0.3 + 0.1 * i, 1.2 - 0.1 * i], "density": 0.5}}
                               for i, p in enumerate(fts)]))
    mat = Materializer(zoo / "base", fts, methods=["ties"])
    groups = [asdict(g) for g in make_groups(Granularity(level="layer"), mat.num_layers, "model.layers.")]
    names = list(mat.names)
    terms, gw, gl = build_terms(mat, r, groups, names, {n: torch.float32 for n in names}, "cpu")
    # each layer's group holds the schedule's value at that layer
    k = next(k for k, g in enumerate(groups) if g["name"] == f"L{mat.num_layers - 1}")
    assert gw[(k, 0)] == pytest.approx(1.2) and gl[k] == pytest.approx(2.0)
    coef = torch.ones(len(groups), len(fts))
    scale = torch.ones(len(groups))
    ours = merged_params(terms, coef, scale)
    engine = mat.state_dict(r)
    again = mat.state_dict(refined_recipe(r, groups, gw, gl, coef, scale))
    for n in names:
        torch.testing.assert_close(ours[n], engine[n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(again[n], engine[n], rtol=1e-6, atol=1e-7)
