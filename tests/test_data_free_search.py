"""The data-free methods inside the search: as method choices, as baselines, and as start
points projected onto a task-vector space's coefficients (mergesearch.search.project)."""

from __future__ import annotations

from dataclasses import asdict

import optuna
import pytest
import yaml

from mergesearch.cli import main
from mergesearch.engine.materialize import Materializer
from mergesearch.recipe import from_dict
from mergesearch.runs.store import leaderboard, load_run
from mergesearch.search.project import fit_task_vectors, projected_x0, start_point
from mergesearch.search.space import SearchSpace
from mergesearch.search.variables import Granularity, make_groups

from test_search import write_space
from test_zoo_eval import zoo  # noqa: F401  (session fixture)

TASKS = ["reverse", "shift", "max", "add"]


def fts(zoo):
    return [str(zoo / f"ft_{t}") for t in TASKS]


def test_fit_recovers_a_task_arithmetic_merge_exactly(zoo):
    """A merge that is a point of the space: per-group weights come back, all of its task vector explained."""
    groups = make_groups(Granularity(level="groups", n_groups=2), 4, "model.layers.")
    gd = [asdict(g) for g in groups]
    weights = [[0.3, 1.1, 0.6, 0.9], [0.5, 0.2, 1.3, 0.7], [0.8, 0.4, 0.1, 1.0], [0.2, 0.9, 0.5, 0.6],
               [1.2, 0.3, 0.7, 0.4]]  # groups: embed, lm_head, norm, L0-1, L2-3
    from mergesearch.search.variables import group_setting
    models = [{"path": p, "parameters": {"weight": group_setting(gd, [w[i] for w in weights])}}
              for i, p in enumerate(fts(zoo))]
    recipe = dict(method="task_arithmetic", base=str(zoo / "base"), models=models, parameters={"lambda": 1.0})
    fit = fit_task_vectors(recipe, groups, 4)
    assert fit.share == pytest.approx(1.0, abs=1e-6)
    for k, g in enumerate(groups):
        assert fit.coef[k] == pytest.approx(weights[k], abs=1e-4), g.name


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_projection_of_a_data_free_merge_is_closer_than_plain_task_arithmetic(zoo, method):
    """Projected onto task arithmetic per layer group, a data-free merge gives a point of
    the space nearer to it than task arithmetic at lambda 1, and the fit says how near."""
    space = SearchSpace.model_validate({
        "base": str(zoo / "base"), "models": fts(zoo), "evaluator": {"tasks": TASKS}, "methods": ["task_arithmetic"],
        "parameters": {"weight": {"low": -1.0, "high": 2.0}}, "granularity": {"level": "groups", "n_groups": 2}})
    groups = space.groups(4, "model.layers.")
    target = dict(method=method, base=str(zoo / "base"), models=[{"path": p} for p in fts(zoo)])
    mat = Materializer(zoo / "base", fts(zoo), methods=[method, "task_arithmetic"])
    names = list(mat.names)
    x0, how = start_point(space, target, groups, names, 4)
    assert "projected onto the task vectors" in how
    assert set(x0) == {f"weight/m{i}/{g.name}" for i in range(4) for g in groups}
    trial = optuna.trial.FixedTrial(x0)
    fitted = mat.state_dict(space.suggest(trial, groups))
    merged = mat.state_dict(from_dict(target))
    plain = mat.state_dict(from_dict(dict(method="task_arithmetic", base=str(zoo / "base"),
                                          models=[{"path": p, "parameters": {"weight": 1.0}} for p in fts(zoo)])))
    from mergesearch.engine.checkpoint import Checkpoint
    ref = Checkpoint(zoo / "base")
    base = {n: ref.get(n).float() for n in names}
    dist = lambda a: sum(float((a[n] - merged[n]).double().square().sum()) for n in names)  # noqa: E731
    total = sum(float((merged[n] - base[n]).double().square().sum()) for n in names)
    assert dist(fitted) < dist(plain)
    _, share = projected_x0(space, target, groups, names, 4)
    assert 0 < share < 1
    # the share is what the fit explains: 1 - residual / total (weights within bounds here)
    assert 1 - dist(fitted) / total == pytest.approx(share, abs=1e-3)


def test_normalizing_space_takes_lambda_from_the_fit(zoo):
    space = SearchSpace.model_validate({
        "base": str(zoo / "base"), "models": fts(zoo), "evaluator": {"tasks": TASKS}, "methods": ["ties"],
        "parameters": {"weight": {"low": 0.0, "high": 1.5}, "density": {"low": 0.1, "high": 1.0},
                       "lambda": {"low": 0.5, "high": 3.0}}, "granularity": {"level": "depth"}})
    groups = space.groups(4, "model.layers.")
    target = dict(method="task_arithmetic", base=str(zoo / "base"), parameters={"lambda": 1.0},
                  models=[{"path": p, "parameters": {"weight": [0.2 * (i + 1), 0.4 * (i + 1)]}}
                          for i, p in enumerate(fts(zoo))])
    x0, share = projected_x0(space, target, groups, list(Materializer(zoo / "base", fts(zoo)).names), 4)
    assert share > 0.99
    # normalize: the weights keep their proportions (1 : 2 : 3 : 4 at every depth), lambda the sums' median
    a = [x0[f"weight/m{i}/alpha"] for i in range(4)]
    assert [v / a[0] for v in a] == pytest.approx([1, 2, 3, 4], rel=1e-3)
    assert x0["lambda/alpha"] == pytest.approx(3.0)  # the median sum, 2 + 4 ... = 3.0, clipped to 3.0
    assert x0["lambda/beta"] == 0.0 and x0["density/m2/alpha"] == 1.0 and x0["density/m2/beta"] == 0.0


def test_search_over_ties_and_the_data_free_methods(tmp_path, zoo, monkeypatch):
    """methods: [ties, tsv, iso_cts] under TPE, a depth schedule: every trial picks a method
    and sets that method's variables only; the data-free methods are scored at their
    defaults among the baselines; the winner exports."""
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, zoo, methods=["ties", "tsv", "iso_cts"],
                        parameters={"weight": {"low": 0.2, "high": 1.5}, "density": {"low": 0.2, "high": 1.0},
                                    "rank_share": {"low": 0.3, "high": 1.0}, "common_share": {"low": 0.2, "high": 0.9},
                                    "lambda": {"low": 0.5, "high": 2.0}},
                        granularity={"level": "depth"}, sampler={"name": "tpe", "n_startup_trials": 3},
                        budget={"n_trials": 10})
    assert main(["search", str(space), "--run", "df", "--workers", "2"]) == 0
    study, storage = load_run("df", root=tmp_path / "results")
    board = leaderboard(study, storage)
    kinds = set(board["kind"])
    assert {"tsv defaults", "iso_cts defaults", "uniform average", "task arithmetic 1.0"} <= kinds
    trials = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(trials) == 10 - 4
    for t in trials:
        m = t.params["method"]
        own = {"tsv": "rank_share", "iso_cts": "common_share", "ties": "density"}[m]
        assert any(k.startswith(own) for k in t.params), t.params
        assert all(k.split("/")[0] in ("method", "weight", "lambda", own) for k in t.params)
        assert "weight/m0/alpha" in t.params and "weight/m0/beta" in t.params
    out = tmp_path / "results" / "df"
    card = (out / "model" / "README.md").read_text()
    best = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert best["method"] in ("ties", "tsv", "iso_cts", "task_arithmetic", "linear")  # a baseline may win
    if best["method"] in ("tsv", "iso_cts"):
        assert "no mergekit equivalent: it needs the singular value decompositions" in card
        assert not (out / "best_mergekit.yaml").exists()
    else:
        assert (out / "best_mergekit.yaml").exists()
    assert (out / "report.html").exists()


def test_baselines_field_and_warm_start_from_a_data_free_merge(tmp_path, zoo, monkeypatch, caplog):
    """baselines: [tsv] in a TIES space: tsv at its defaults is scored beside the other
    baselines; CMA-ES starts from the best of them, projected when it is tsv."""
    import logging
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, zoo, baselines=["tsv", "iso_c"], granularity={"level": "model"}, scale=True,
                        budget={"n_trials": 6}, sampler={"name": "cmaes", "x0": "best_baseline"})
    with caplog.at_level(logging.INFO, logger="mergesearch.search"):
        assert main(["search", str(space), "--run", "ws", "--workers", "1", "--no-export"]) == 0
    study, storage = load_run("ws", root=tmp_path / "results")
    board = leaderboard(study, storage)
    assert {"tsv defaults", "iso_c defaults"} <= set(board["kind"])
    best = study.user_attrs["x0_from"]
    baselines = board[board["trial"].str.startswith("b")]
    assert best == baselines.iloc[0]["kind"]
    first = study.get_trials()[0]
    assert first.user_attrs["role"] == "warm start" and first.params == study.user_attrs["x0"]
    how = "its merge projected onto the task vectors" if best in ("tsv defaults", "iso_c defaults") else "its values"
    assert any(r.getMessage().startswith(f"sampler: CMA-ES starts from the best baseline, {best}: {how}")
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_bad_baselines_entry(tmp_path, zoo):
    from mergesearch.errors import MergeSearchError
    data = {"base": str(zoo / "base"), "models": fts(zoo), "evaluator": {"tasks": TASKS}, "methods": ["ties"],
            "parameters": {"weight": 1.0}}
    with pytest.raises(MergeSearchError, match="baselines: 'slerp' cannot be scored at its defaults on 4 models"):
        SearchSpace.model_validate({**data, "baselines": ["slerp"]}).check("space.yaml")
    with pytest.raises(MergeSearchError, match="unknown merge method 'tsvm'"):
        SearchSpace.model_validate({**data, "baselines": ["tsvm"]}).check("space.yaml")
