"""Multi-fidelity search: rungs of dev items, Optuna's pruners, budgets in items.
Real Ray local instance, real SQLite store, the zoo."""

import math

import optuna
import pytest
from optuna.trial import TrialState

from mergesearch.cli import main
from mergesearch.search.fidelity import FidelityPlan, plan_for
from mergesearch.search.space import SearchSpace

from test_search import write_space
from test_zoo_eval import zoo  # noqa: F401  (session fixture)

TASKS = ["reverse", "shift", "max", "add"]


def load(tmp_path, run):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'results' / run / 'study.db'}")
    return optuna.load_study(study_name=run, storage=storage).get_trials()


def test_rungs_are_disjoint_stratified_and_fixed(tmp_path, zoo):
    space = SearchSpace.load(write_space(tmp_path, zoo, fidelity={"rungs": [0.125, 0.25, 0.5, 1.0]}))
    counts = {"reverse": 100, "shift": 37, "max": 60, "add": 8}
    plan = plan_for(space, counts)
    again = plan_for(space, dict(counts))  # another worker, another process: the same order
    assert plan.order == again.order
    for t, n in counts.items():
        seen = []
        for k, share in enumerate(plan.rungs):
            part = plan.rung_items(k)[t]
            assert not set(part) & set(seen)  # no item scored twice
            seen += part
            assert len(seen) == math.ceil(share * n - 1e-9)
        assert sorted(seen) == list(range(n))  # every item by the last rung
        assert plan.order[t] != list(range(n)) or n < 3  # a permutation, not the file order
    # every rung draws from every task in proportion
    first = plan.rung_items(0)
    assert {t: len(v) for t, v in first.items()} == {"reverse": 13, "shift": 5, "max": 8, "add": 1}
    assert plan.items_through(0) == 27 and plan.items_through(3) == plan.total == 205
    # another seed, another order
    other = SearchSpace.load(write_space(tmp_path, zoo, fidelity={"rungs": [0.5, 1.0], "seed": 1}))
    assert plan_for(other, counts).order != plan.order


def test_wilcoxon_blocks_pair_the_same_items():
    from mergesearch.search.fidelity import Progress, TASK_STRIDE
    plan = FidelityPlan([0.5, 1.0], {"a": list(range(10)), "b": list(range(4))}, block=3)
    p = Progress(plan)
    p.add({"a": [1, 1, 0, 1, 0], "b": [1, 0]})
    assert p.blocks(0, {}, None) == {0: 2 / 3}  # only the completed block of a
    p.add({"a": [1, 1, 1, 1, 0], "b": [1, 1]})
    assert p.done and p.items == 14 and p.share == 1.0
    got = p.blocks(1, {"b": 2.0}, {"a": 0.5, "b": 1.0})
    assert got == {1: 2 * 2 / 3, 2: 2 * 1.0, 3: 2 * 0.0, TASK_STRIDE: 2 * 2 / 3, TASK_STRIDE + 1: 2 * 1.0}
    assert p.scores() == {"a": 0.7, "b": 0.75}


def _improvement_study(block_a, block_b, finals, value):
    """A study with one complete trial: blocks (its reports, per task) and final scores."""
    from mergesearch.search.fidelity import TASK_STRIDE
    study = optuna.create_study(direction="maximize")
    t = study.ask()
    for j, v in enumerate(block_a):
        t.report(v, j)
    for j, v in enumerate(block_b):
        t.report(v, TASK_STRIDE + j)
    t.set_user_attr("scores", finals)
    study.tell(t, value)
    return study


def _reporting(study, block_a, block_b):
    from mergesearch.search.fidelity import TASK_STRIDE
    t = study.ask()
    for j, v in enumerate(block_a):
        t.report(v, j)
    for j, v in enumerate(block_b):
        t.report(v, TASK_STRIDE + j)
    return study._storage.get_trial(t._trial_id)


def test_improvement_pruner_asks_whether_a_trial_can_still_win():
    from mergesearch.search.fidelity import ImprovementPruner
    plan = FidelityPlan([0.25, 0.5, 1.0], {"a": list(range(32)), "b": list(range(32))}, block=4)
    mean = lambda s: (s["a"] + s["b"]) / 2  # noqa: E731
    closed = ImprovementPruner(plan, mean, 0.05, linear=lambda: {"a": 0.5, "b": 0.5})
    drawn = ImprovementPruner(plan, mean, 0.05)  # the same objective, from draws
    empty = optuna.create_study(direction="maximize")
    assert closed.chance(empty, _reporting(empty, [0.5, 0.5], [0.5, 0.5])) is None  # nothing to beat yet
    best_a, best_b = [1.0, 0.5, 0.75, 0.75], [0.25, 0.5, 0.75, 0.5]
    study = _improvement_study(best_a, best_b, {"a": 0.75, "b": 0.5}, 0.625)
    # the best's own blocks: it ends where the best ends, as likely above as below
    same = _reporting(study, best_a[:2], best_b[:2])
    assert closed.chance(study, same) == 0.5
    assert drawn.chance(study, same) == pytest.approx(0.5, abs=0.03)
    # a quarter of a point behind on the mean of the blocks: the more items scored, the
    # less chance left (at half of the items, half of the result is known)
    behind = [[x - d for x, d in zip(best_a, [0.5, 0, 0.25, 0.25])], [x - d for x, d in zip(best_b, [0, 0.5, 0.25, 0.25])]]
    early = closed.chance(study, _reporting(study, behind[0][:2], behind[1][:2]))
    later = closed.chance(study, _reporting(study, behind[0], behind[1]))
    assert later < early < 0.5 and later < 0.05 < early
    assert drawn.chance(study, _reporting(study, behind[0][:2], behind[1][:2])) == pytest.approx(early, abs=0.03)
    assert not closed.prune(study, _reporting(study, behind[0][:2], behind[1][:2]))
    assert closed.prune(study, _reporting(study, behind[0], behind[1]))
    # paired: blocks that follow the best's ups and downs a little below it are surely
    # behind; the same means without the best's blocks to pair with are not
    close = [[x - 0.125 for x in best_a], [x - 0.125 for x in best_b]]
    paired = closed.chance(study, _reporting(study, *close))
    alone = _improvement_study([], [], {"a": 0.75, "b": 0.5}, 0.625)  # scored in one go: no blocks
    unpaired = closed.chance(alone, _reporting(alone, *close))
    assert paired < 0.01 < unpaired < 0.5
    # one block per task says nothing of the spread: no decision, however far behind
    assert closed.chance(study, _reporting(study, [0.0], [0.0])) is None
    assert not closed.prune(study, _reporting(study, [0.0], [0.0]))
    # a difference without spread (every block the same) still leaves a chance
    flat = closed.chance(study, _reporting(study, [x - 0.03125 for x in best_a], [x - 0.03125 for x in best_b]))
    assert 0 < flat < 0.5


@pytest.mark.parametrize("rungs,msg", [
    ([0.5, 0.25, 1.0], "must increase strictly"),
    ([0.25, 0.5], "must end at 1.0"),
    ([], "at least one share"),
    ([0.0, 1.0], "0.0 is not a share of the dev items"),
])
def test_bad_rungs_get_one_line(tmp_path, zoo, capsys, rungs, msg):
    space = write_space(tmp_path, zoo, fidelity={"rungs": rungs})
    assert main(["search", str(space), "--run", "bad"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0] and "space.yaml" in err[0]
    assert not (tmp_path / "results" / "bad").exists()


def test_fidelity_needs_a_single_objective_and_item_scores(tmp_path, zoo, capsys):
    space = write_space(tmp_path, zoo, fidelity={"rungs": [0.5, 1.0]}, sampler={"name": "nsga2"})
    assert main(["search", str(space), "--run", "bad"]) == 2
    assert "pruning needs a single objective" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("pruner", ["successive_halving", "hyperband", "median", "wilcoxon", "improvement"])
def test_each_pruner_end_to_end_with_two_workers(tmp_path, zoo, monkeypatch, pruner):
    monkeypatch.chdir(tmp_path)
    fid = {"rungs": [0.25, 0.5, 1.0], "pruner": {"name": pruner, "n_startup_trials": 2, "p_threshold": 0.3,
                                                 "block": 4}}
    n = 10 if pruner == "successive_halving" else 6
    space = write_space(tmp_path, zoo, fidelity=fid, sampler={"name": "tpe", "n_startup_trials": 4},
                        budget={"n_trials": n}, initial_trials=False,
                        parameters={"weight": {"low": -1.0, "high": 1.5}, "density": {"low": 0.05, "high": 1.0}})
    assert main(["search", str(space), "--run", "f", "--workers", "2", "--no-export"]) == 0
    trials = load(tmp_path, "f")
    total = 4 * 60  # 60 dev items a task (limit)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert done and len(done) + len(pruned) == len(trials)
    for t in done:
        ua = t.user_attrs
        assert ua["fidelity"] == 1.0 and ua["items"] == total and ua["rungs"] == 3 and ua["writes"] == 1
        assert t.value == pytest.approx(ua["aggregate"])
        assert set(ua["scores"]) == set(TASKS)
    for t in pruned:
        ua = t.user_attrs
        assert ua["items"] in (60, 120) and ua["rungs"] in (1, 2) and ua["writes"] == 1
        assert ua["cost"] == ua["fidelity"] == ua["items"] / total
        assert set(ua["scores"]) == set(TASKS)  # partial scores of every task
        assert all(s * (ua["items"] // 4) == pytest.approx(round(s * (ua["items"] // 4))) for s in ua["scores"].values())
        assert t.intermediate_values
        if pruner == "improvement":  # the plain means of blocks of 4 items, and the chance it was stopped at
            assert all(0 <= v <= 1 and v * 4 == round(v * 4) for v in t.intermediate_values.values())
            assert 0 <= ua["chance"] < 0.3
    # the budget is counted in trial-equivalents: pruned trials cost their share
    spent = len(done) + sum(t.user_attrs["cost"] for t in pruned)
    assert n <= spent < n + 1
    if pruner in ("successive_halving", "improvement"):
        assert pruned  # halving stops some of ten trials; improvement some of six (weights down to -1)
@pytest.mark.slow
def test_items_budget_and_resume_keep_pruned_trials(tmp_path, zoo, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    total = 4 * 60
    space = write_space(tmp_path, zoo, fidelity={"rungs": [0.25, 0.5, 1.0], "pruner": "successive_halving"},
                        sampler={"name": "tpe", "n_startup_trials": 2}, budget={"items": 6 * total},
                        initial_trials=False,
                        parameters={"weight": {"low": -1.0, "high": 1.5}, "density": {"low": 0.05, "high": 1.0}})
    assert main(["search", str(space), "--run", "r", "--workers", "2", "--no-export"]) == 0
    out = capsys.readouterr().out
    first = load(tmp_path, "r")
    spent = sum(t.user_attrs["items"] for t in first)
    assert 6 * total <= spent < 7 * total  # the item budget, overshot by less than one trial
    pruned = {t.number: t.user_attrs for t in first if t.state == TrialState.PRUNED}
    assert pruned and f"{len(pruned)} pruned trials, {spent} dev items scored" in out
    assert main(["search", str(space), "--run", "r", "--workers", "2", "--no-export", "--resume",
                 "--n-trials", "10"]) == 0
    trials = load(tmp_path, "r")
    assert len(trials) > len(first)
    again = {t.number: t.user_attrs for t in trials if t.state == TrialState.PRUNED and t.number in pruned}
    assert again == pruned  # kept as they were
    spent = len([t for t in trials if t.state == TrialState.COMPLETE]) + sum(
        t.user_attrs["cost"] for t in trials if t.state == TrialState.PRUNED)
    assert 10 <= spent < 11
    # the leaderboard counts them, and lists them after the complete trials when asked
    capsys.readouterr()
    assert main(["leaderboard", "r", "--pruned", "--top", "100", "--csv", str(tmp_path / "lb.csv")]) == 0
    out = capsys.readouterr().out
    n_pruned = sum(t.state == TrialState.PRUNED for t in trials)
    n_done = sum(t.state == TrialState.COMPLETE for t in trials)
    assert f"run r: {n_done} complete, {n_pruned} pruned, 0 failed trials; " in out
    import pandas as pd
    lb = pd.read_csv(tmp_path / "lb.csv")
    assert list(lb["state"]) == ["COMPLETE"] * n_done + ["PRUNED"] * n_pruned
    assert (lb["fidelity"][:n_done] == 1.0).all() and (lb["fidelity"][n_done:] < 1.0).all()


def test_pruner_thresholds_default_per_pruner_and_old_runs_still_resume(tmp_path, zoo):
    def space(pruner):
        return SearchSpace.load(write_space(tmp_path, zoo, fidelity={"rungs": [0.5, 1.0], "pruner": pruner}))
    old = space("wilcoxon")
    assert old.fidelity.pruner.p_threshold is None and old.fidelity.pruner.threshold == 0.1
    # when p_threshold was a fixed 0.1, a space without it had the identity of one with
    # 0.1 written out (the same dump), and an explicit value's identity has not changed
    assert old.fingerprint() == space({"name": "wilcoxon", "p_threshold": 0.1}).fingerprint()
    assert space("median").fingerprint() == space({"name": "median", "p_threshold": 0.1}).fingerprint()
    imp = space("improvement")
    assert imp.fidelity.pruner.threshold == 0.05
    assert imp.fingerprint() == space({"name": "improvement", "p_threshold": 0.05}).fingerprint()
    assert imp.fingerprint() != space({"name": "improvement", "p_threshold": 0.1}).fingerprint()
