"""A global scale (lambda) in search spaces: `scale: true`, and the warning for spaces that
cannot scale the merged task vector."""

import optuna
import pytest

from mergesearch.search.space import Bounds, SearchSpace


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


def test_objectives_that_keep_every_task():
    import math

    from mergesearch.search.controller import objective_values
    scores = {"a": 0.9, "b": 0.3}
    mean = objective_values(space(evaluator={"tasks": ["a", "b"]}), scores)
    assert mean == (pytest.approx(0.6), True, pytest.approx(0.6))
    low = objective_values(space(evaluator={"tasks": ["a", "b"]}, objective={"kind": "min"}), scores)
    assert low[0] == 0.3
    soft = objective_values(space(evaluator={"tasks": ["a", "b"]},
                                  objective={"kind": "softmin", "temperature": 0.1}), scores)[0]
    assert soft == pytest.approx(-0.1 * math.log((math.exp(-9) + math.exp(-3)) / 2)) and 0.3 < soft < 0.6
    # min_task: a floor for every task; the shortfall is subtracted and the trial infeasible
    floor = objective_values(space(evaluator={"tasks": ["a", "b"]}, objective={"min_task": 0.5}), scores)
    assert floor == (pytest.approx(0.6), False, pytest.approx(0.6 - 0.2))
    # normalized by the best source's dev score per task
    norm = space(evaluator={"tasks": ["a", "b"]}, objective={"normalize": "sources"})
    agg, ok, value = objective_values(norm, scores, {"a": 1.0, "b": 0.4})
    assert agg == pytest.approx((0.9 + 0.75) / 2) and ok and value == agg


def test_hints_for_levers_a_space_leaves_out():
    """A space without a warm start or refinement gets a one-line hint for each; a space
    that has them, or cannot use them, gets none."""
    bare = space()  # cmaes from the centre, lm-eval tasks, ties: both levers apply
    hints = bare.lever_hints()
    assert len(hints) == 2 and hints[0].startswith("sampler.x0: best_baseline") and hints[1].startswith("refine:")
    assert space(sampler={"name": "cmaes", "x0": "best_baseline"}, refine={"level": "tensor", "rows": True}
                 ).lever_hints() == []
    assert space(sampler={"name": "tpe"}, refine={"rows": True}).lever_hints() == []  # TPE takes no x0
    (rows,) = space(sampler={"name": "tpe"}, refine={"level": "tensor"}).lever_hints()
    assert rows.startswith("refine.rows: true also learns a weight per model and output row")
    (lm,) = space(sampler={"name": "tpe"}, evaluator={"evaluator": "lmeval", "tasks": ["t"]}).lever_hints()
    assert lm.startswith("refine:")  # lm-eval tasks are refined too
    py = space(sampler={"name": "tpe"}, evaluator={"evaluator": "python", "tasks": ["t"], "function": "m:f"})
    assert py.lever_hints() == []  # a user function has no items to train on
    assert space(sampler={"name": "tpe"}, methods=["linear"], parameters={"weight": {"low": 0, "high": 1}}
                 ).lever_hints() == []  # linear is not in the task-vector family
    assert "\n" not in "".join(hints)
