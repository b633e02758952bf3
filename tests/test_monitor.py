"""Monitor tasks: scored on the winner and the sources at export, shown in the model card,
the export's table, the leaderboard and the report, never optimized; a floor marks a
candidate infeasible."""

import json
import shutil

import pytest
import yaml

from mergesearch.cli import main
from mergesearch.errors import MergeSearchError
from mergesearch.search.controller import objective_values
from mergesearch.search.space import SearchSpace

from test_zoo_eval import zoo  # noqa: F401  (session fixture)


def space(**over) -> SearchSpace:
    data = {"base": "/m/base", "models": ["/m/a", "/m/b"], "evaluator": {"tasks": ["add", "max"]},
            "methods": ["ties"], "parameters": {"weight": {"low": 0.0, "high": 1.0}}, **over}
    return SearchSpace.model_validate(data).check("space.yaml")


@pytest.mark.parametrize("monitor,message", [
    ({"tasks": ["max"]}, "space.yaml: monitor: task 'max' is also an objective task (a monitor task is never optimized)"),
    ({"tasks": ["reverse"], "floors": {"shift": 0.5}}, "space.yaml: monitor.floors names tasks not in monitor.tasks: "
                                                       "shift"),
])
def test_bad_monitor_sections(monitor, message):
    with pytest.raises(MergeSearchError) as e:
        space(monitor=monitor)
    assert str(e.value) == message
    with pytest.raises(MergeSearchError, match="monitor.floors do not apply to the multi-objective nsga2 sampler"):
        space(monitor={"tasks": ["reverse"], "floors": {"reverse": 0.5}}, sampler={"name": "nsga2"})


def test_a_floored_monitor_task_is_scored_on_every_candidate_outside_the_objective():
    s = space(monitor={"tasks": ["reverse", "shift"], "metrics": {"shift": "acc"}, "floors": {"reverse": 0.6}})
    scoring = s.scoring()
    assert scoring.tasks == ["add", "max", "reverse"] and scoring.monitor == ["reverse"]
    assert space().scoring() == space().evaluator  # no floors: the objective's tasks alone
    # the objective ignores the monitor task; its floor only decides feasibility
    agg, feasible, value = objective_values(s, {"add": 0.8, "max": 0.6, "reverse": 0.7})
    assert (agg, feasible, value) == (pytest.approx(0.7), True, pytest.approx(0.7))
    agg, feasible, value = objective_values(s, {"add": 0.8, "max": 0.6, "reverse": 0.5})
    assert agg == pytest.approx(0.7) and not feasible and value == pytest.approx(0.6)  # 0.7 less the 0.1 shortfall
    assert s.fingerprint() != space().fingerprint()


@pytest.mark.slow
def test_monitor_tasks_end_to_end(zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = {"base": str(zoo / "base"), "models": [str(zoo / "ft_add"), str(zoo / "ft_max")],
            "evaluator": {"tasks": ["add"], "task_dir": str(zoo), "limit": 40},
            "monitor": {"tasks": ["max", "reverse"], "floors": {"max": 1.01}},  # a floor no candidate reaches
            "methods": ["task_arithmetic"], "parameters": {"weight": {"low": 0.0, "high": 1.0}},
            "sampler": {"name": "random"}, "budget": {"n_trials": 5}, "seed": 1}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    assert main(["search", str(tmp_path / "s.yaml"), "--run", "mon", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "monitor (test, never optimized)" in out
    run = tmp_path / "results" / "mon"
    scores = json.loads((run / "scores.json").read_text())
    assert scores["dev"]["verified"] and set(scores["dev"]["stored"]) == {"add", "max"}  # max: scored, floored
    assert set(scores["test"]["merged"]) == {"add"}  # the objective's test table
    mon = scores["monitor"]
    assert set(mon["merged"]) == {"max", "reverse"} and mon["floors"] == {"max": 1.01}
    assert set(mon["sources"]) == {str(zoo / "base"), str(zoo / "ft_add"), str(zoo / "ft_max")}
    assert mon["sources"][str(zoo / "ft_max")]["max"] > mon["sources"][str(zoo / "ft_add")]["max"]
    assert mon["items"]["max"]["split"] == "test"
    import optuna
    trials = [t for t in optuna.load_study(study_name="mon", storage=f"sqlite:///{run / 'study.db'}").trials
              if t.state.name == "COMPLETE" and "scores" in t.user_attrs]
    assert trials and all(t.user_attrs["feasible"] is False for t in trials)  # nobody reaches 1.01 on max
    # the aggregate is the objective's: the monitor task is not in it
    assert all(t.user_attrs["aggregate"] == pytest.approx(t.user_attrs["scores"]["add"]) for t in trials)
    card = (run / "model" / "README.md").read_text()
    assert "## Monitor tasks (test; never optimized)" in card and "| floor | 1.0100 |" in card
    assert main(["leaderboard", "mon"]) == 0
    board = capsys.readouterr().out
    assert "dev:max" in board and "monitor tasks (never optimized; a candidate below a floor is infeasible): " \
        "dev:max >= 1.01" in board and "monitor tasks on test, exported trial" in board
    assert "Monitor tasks (test items; never optimized)" in (run / "report.html").read_text()
    shutil.rmtree(tmp_path / "results", ignore_errors=True)


@pytest.mark.parametrize("evaluator,fingerprint", [
    ({"tasks": ["add", "max"]}, "83467a8a0be4c267"),  # evaluator left out: loglik was the default then
    ({"evaluator": "lmeval", "tasks": ["add"]}, "e510ffc5d26c369f"),
    ({"evaluator": "loglik", "tasks": ["t"], "task_dir": "/z"}, "aa4a598c2b316dd4"),
])
def test_runs_started_before_monitor_tasks_and_task_pairs_still_resume(evaluator, fingerprint):
    """Fingerprints computed by the code of 2026-12-05 before this change (commit 9fada3d):
    the new keys (monitor, pairs, evaluator.monitor) and the new default evaluator leave them."""
    data = {"base": "/m/base", "models": ["/m/a", "/m/b"], "evaluator": evaluator, "methods": ["ties"],
            "parameters": {"weight": {"low": 0.0, "high": 1.0}}}
    assert SearchSpace.model_validate(data).check("s").fingerprint() == fingerprint
