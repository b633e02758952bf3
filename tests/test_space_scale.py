"""A global scale (lambda) in search spaces: `scale: true`, and the warning for spaces that
cannot scale the merged task vector."""

import optuna
import pytest

from mergesearch.space import Bounds, SearchSpace


def space(**over) -> SearchSpace:
    data = {"base": "/m/base", "models": ["/m/a", "/m/b"], "evaluator": {"tasks": ["t"]}, "methods": ["ties"],
            "parameters": {"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.1, "high": 1.0}}, **over}
    return SearchSpace.model_validate(data).check("space.yaml")


def test_scale_true_adds_lambda_bounds_to_methods_that_have_one():
    s = space(scale=True)
    assert s.parameters["lambda"] == Bounds(low=0.5, high=2.0)
    assert space(scale={"low": 0.8, "high": 3.0}).parameters["lambda"] == Bounds(low=0.8, high=3.0)
    assert space(scale=True, parameters={"weight": 1.0, "lambda": 1.5}).parameters["lambda"] == 1.5  # explicit wins
    assert "lambda" not in space(methods=["linear"], parameters={"weight": {"low": 0, "high": 1}},
                                 scale=True).parameters  # linear has no scale
    # each trial suggests it, and the recipe carries it
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    recipe = s.suggest(study.ask(), s.groups(2, "model.layers."))
    assert 0.5 <= recipe.parameters["lambda"] <= 2.0
    assert s.fingerprint() != space().fingerprint()


@pytest.mark.parametrize("over,warns", [
    ({}, True),  # ties normalizes by default; lambda fixed at 1
    ({"scale": True}, False),
    ({"parameters": {"weight": {"low": 0, "high": 1}, "density": {"low": 0.1, "high": 1}, "lambda": 1.4}}, False),
    ({"methods": ["task_arithmetic"], "parameters": {"weight": {"low": 0, "high": 1}}}, False),  # no normalize
    ({"methods": ["task_arithmetic"], "parameters": {"weight": {"low": 0, "high": 1}, "normalize": True}}, True),
    ({"methods": ["linear"], "parameters": {"weight": {"low": 0, "high": 1}}}, False),  # no lambda at all
])
def test_warning_for_spaces_that_cannot_scale(over, warns):
    w = space(**over).scale_warning()
    assert (w is not None) == warns
    if warns:
        assert "lambda is fixed at 1" in w and "add 'scale: true'" in w
