"""Soups end to end on the zoo's checkpoints and sweep: real Ray workers, a real SQLite store."""

import json
from pathlib import Path

import optuna
import pytest
import yaml

from mergesearch.cli import main
from mergesearch.runs.store import leaderboard, load_run

from test_zoo_eval import zoo  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow
STEPS = [26, 51, 77, 103, 129, 154, 180]


def eval_file(tmp_path: Path, zoo: Path, task: str, **extra) -> Path:
    p = tmp_path / f"eval_{task}.yaml"
    p.write_text(yaml.safe_dump({"evaluator": "loglik", "tasks": [task], "task_dir": str(zoo), **extra}))
    return p


def trials_of(tmp_path: Path, run: str):
    study, storage = load_run(run, root=tmp_path / "results")
    return study, storage, study.get_trials()


def dev_score(zoo: Path, model: Path, task: str) -> float:
    from mergesearch.engine.models import load_model
    from mergesearch.evaluate import EvalConfig, build_evaluator
    m, tok = load_model(model)
    return build_evaluator(EvalConfig(tasks=[task], task_dir=str(zoo))).score(m, tok)[task]


def test_greedy_soup_of_training_checkpoints(tmp_path, zoo, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ev = eval_file(tmp_path, zoo, "add")
    pattern = str(zoo / "checkpoints" / "add" / "checkpoint-*")
    assert main(["soup", "--glob", pattern, "--eval", str(ev), "--base", str(zoo / "base"), "--workers", "2"]) == 0
    run = tmp_path / "results" / "soup-add"  # default name: soup-<folder of the ingredients>
    study, storage, trials = trials_of(tmp_path, "soup-add")
    assert study.user_attrs["kind"] == "soup"
    ingredients = study.user_attrs["soup"]["ingredients"]
    assert [Path(p).name for p in ingredients] == [f"checkpoint-{s}" for s in STEPS]  # sorted by step, not by name
    roles = [t.user_attrs["role"] for t in trials]
    report = json.loads((run / "soup.json").read_text())
    # N ingredients + the uniform soup of all, then N - 1 greedy candidates: O(N), plus the
    # speculative candidates whose score went unused (an earlier one of their batch was accepted)
    assert roles == ["ingredient"] * 7 + ["uniform"] + ["candidate"] * (6 + report["speculative_unused"])
    assert all(t.state.name == "COMPLETE" for t in trials)
    n_scored = 14 + report["speculative_unused"]
    singles = {t.user_attrs["members"][0]: t.value for t in trials if t.user_attrs["role"] == "ingredient"}
    # the stored ingredient scores are the models' own dev scores
    last = str(zoo / "checkpoints" / "add" / "checkpoint-180")
    assert singles[last] == dev_score(zoo, Path(last), "add")
    best = max(singles.values())
    rows = report["rows"]
    assert rows["best ingredient"]["dev"] == best
    assert rows["final soup"]["dev"] >= best  # greedy never loses to its best ingredient on dev
    # the greedy walk: candidates in descending ingredient order, each the soup so far plus one
    ranked = sorted(ingredients, key=lambda p: -singles[p])
    members = [ranked[0]]
    candidates = {tuple(t.user_attrs["members"]): t for t in trials if t.user_attrs["role"] == "candidate"}
    assert len(report["steps"]) == 6
    for step in report["steps"]:
        t = candidates[tuple(members + [step["ingredient"]])]
        assert step["accepted"] == (t.value >= _soup_score(trials, members))
        if step["accepted"]:
            members = members + [step["ingredient"]]
    assert report["members"] == members
    for row in rows.values():  # every reported row has a test score
        assert 0.0 <= row["test"] <= 1.0 and set(row["test_scores"]) == {"add"}
    # the final soup is a linear recipe with equal weights, exported like a search winner
    final = study.user_attrs["final_recipe"]
    assert final["method"] == "linear" and [m["parameters"]["weight"] for m in final["models"]] == [1.0] * len(members)
    scores = json.loads((run / "scores.json").read_text())
    assert scores["trial"] == str(report["final_trial"]) and scores["dev"]["verified"] is True
    assert scores["test"]["merged"]["add"] == pytest.approx(rows["final soup"]["test"])  # workers == export
    for f in ("best_recipe.yaml", "best_mergekit.yaml", "model/model.safetensors", "model/README.md"):
        assert (run / f).exists(), f
    assert yaml.safe_load((run / "best_recipe.yaml").read_text())["method"] == "linear"
    out = capsys.readouterr().out
    assert "final soup" in out and "best ingredient" in out and "uniform soup" in out
    board = leaderboard(study, storage)
    assert len(board) == n_scored and set(board["kind"]) == {"ingredient", "uniform", "candidate"}

    # --resume of a finished run reuses every scored candidate and runs none
    assert main(["soup", "--glob", pattern, "--eval", str(ev), "--base", str(zoo / "base"), "--workers", "1",
                 "--resume", "--no-export"]) == 0
    _, _, again = trials_of(tmp_path, "soup-add")
    assert len(again) == n_scored
    report2 = json.loads((run / "soup.json").read_text())
    assert report2["reused_from_store"] == 14 and report2["members"] == report["members"]
    assert report2["rows"] == report["rows"]

    # export with no --trial picks the final soup, not the best-scoring candidate
    assert main(["export", "soup-add"]) == 0
    assert json.loads((run / "scores.json").read_text())["trial"] == str(report["final_trial"])


def _soup_score(trials, members):
    for t in trials:
        if t.user_attrs["members"] == members:
            return t.value
    raise AssertionError(members)


def test_last_n_and_uniform_soups(tmp_path, zoo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ev = eval_file(tmp_path, zoo, "add")
    # a run folder of checkpoints stands for all of them
    assert main(["soup", str(zoo / "checkpoints" / "add"), "--strategy", "last-n", "--n", "3", "--eval", str(ev),
                 "--run", "last3", "--workers", "2", "--no-export"]) == 0
    study, _, trials = trials_of(tmp_path, "last3")
    assert [t.user_attrs["role"] for t in trials] == ["ingredient"] * 7 + ["uniform", "candidate"]
    assert [Path(p).name for p in trials[-1].user_attrs["members"]] == ["checkpoint-129", "checkpoint-154",
                                                                        "checkpoint-180"]
    assert study.user_attrs["final_trial"] == 8

    rev = eval_file(tmp_path, zoo, "reverse")
    sweep = sorted(str(p) for p in (zoo / "sweep" / "reverse").iterdir())
    assert main(["soup", *sweep, "--strategy", "uniform", "--eval", str(rev), "--run", "uni", "--workers", "2",
                 "--no-export"]) == 0
    study, _, trials = trials_of(tmp_path, "uni")
    assert len(trials) == 7  # the uniform soup is scored once, with the ingredients
    report = json.loads((tmp_path / "results" / "uni" / "soup.json").read_text())
    assert report["members"] == sweep and report["final_trial"] == 6
    assert report["rows"]["final soup"] == report["rows"]["uniform soup"]


def test_failed_ingredient_is_left_out(tmp_path, zoo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MERGESEARCH_FAULT", "raise_eval@6")  # trial 6 is the best checkpoint
    ev = eval_file(tmp_path, zoo, "add")
    assert main(["soup", "--glob", str(zoo / "checkpoints" / "add" / "checkpoint-*"), "--eval", str(ev),
                 "--run", "faulty", "--workers", "2", "--no-export"]) == 0
    study, _, trials = trials_of(tmp_path, "faulty")
    assert trials[6].state.name == "FAIL"
    assert trials[6].user_attrs["reason"] == "RuntimeError: injected fault in evaluate"
    report = json.loads((tmp_path / "results" / "faulty" / "soup.json").read_text())
    left_out = str(zoo / "checkpoints" / "add" / "checkpoint-180")
    assert left_out not in report["members"]
    assert [i["dev"] is None for i in report["ingredients"]] == [False] * 6 + [True]
    assert len([s for s in report["steps"]]) == 5  # greedy over the 6 that scored
    assert report["failed"] == 1
    # a resumed run retries only the failed ingredient (the fault hook is gone now)
    monkeypatch.delenv("MERGESEARCH_FAULT")
    assert main(["soup", "--glob", str(zoo / "checkpoints" / "add" / "checkpoint-*"), "--eval", str(ev),
                 "--run", "faulty", "--workers", "1", "--no-export", "--resume"]) == 0
    report = json.loads((tmp_path / "results" / "faulty" / "soup.json").read_text())
    assert report["failed"] == 0 and report["ingredients"][-1]["dev"] is not None
    assert left_out in report["members"]  # the best checkpoint starts the soup now


def test_soup_seeds_a_search(tmp_path, zoo, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ev = eval_file(tmp_path, zoo, "add")
    cks = [str(zoo / "checkpoints" / "add" / f"checkpoint-{s}") for s in (129, 154, 180)]
    assert main(["soup", *cks, "--eval", str(ev), "--run", "s3", "--workers", "2", "--no-export"]) == 0
    soup = json.loads((tmp_path / "results" / "s3" / "soup.json").read_text())
    space = {
        "base": str(zoo / "base"), "models": cks,
        "evaluator": {"tasks": ["add"], "task_dir": str(zoo)},
        "methods": ["task_arithmetic"],
        "parameters": {"weight": {"low": 0.0, "high": 1.0}, "lambda": {"low": 0.5, "high": 2.0}},
        "sampler": {"name": "tpe"}, "budget": {"n_trials": 3}, "seed": 1, "initial_trials": False,
        "seed_from": "s3",
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    assert main(["search", str(tmp_path / "space.yaml"), "--run", "seeded", "--workers", "2", "--no-export"]) == 0
    study, _ = load_run("seeded", root=tmp_path / "results")
    first = study.trials[0]
    k = len(soup["members"])
    assert first.user_attrs["role"] == "soup s3"
    # task arithmetic with lambda 1 and weight 1/k on the members is exactly their uniform soup
    assert first.params["lambda"] == 1.0
    assert [first.params[f"weight/m{i}"] for i in range(3)] == [1.0 / k if c in soup["members"] else 0.0 for c in cks]
    assert first.user_attrs["aggregate"] == soup["rows"]["final soup"]["dev"]
    assert len(study.trials) == 3
    # a seed must be a finished soup over this space's models
    for seed_from, message in [("seeded", "seed_from: run 'seeded' is not a soup run"),
                               ("s3", "seed_from: soup 's3' uses models not in this space's models: ")]:
        other = {**space, "models": [str(zoo / "ft_add"), str(zoo / "ft_max")], "seed_from": seed_from}
        (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
        assert main(["search", str(tmp_path / "other.yaml"), "--run", "o"]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "results" / "o").exists()


BAD = [
    # (arguments after `soup`, the message, what the eval file holds)
    (["--strategy", "last-n"], "--strategy last-n needs --n K", {}),
    (["--n", "2"], "--n applies to --strategy last-n only (got --strategy greedy)", {}),
    (["--strategy", "best"], "--strategy: 'best' is not one of greedy, uniform, last-n", {}),
    (["--strategy", "last-n", "--n", "9"], "--n: 9 is more than the 7 ingredients", {}),
    ([], "split: test: soups select on dev and report on test; set split: dev", {"split": "test"}),
]


@pytest.mark.parametrize("args,message,extra", BAD, ids=[m[:24] for _, m, _ in BAD])
def test_bad_soup_options(tmp_path, zoo, monkeypatch, capsys, args, message, extra):
    monkeypatch.chdir(tmp_path)
    ev = eval_file(tmp_path, zoo, "add", **extra)
    rc = main(["soup", str(zoo / "checkpoints" / "add"), "--eval", str(ev), "--run", "bad", *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


def test_bad_ingredients_are_refused_before_any_evaluation(tmp_path, zoo, family, other_family, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ev = eval_file(tmp_path, zoo, "add")
    ck = zoo / "checkpoints" / "add"

    def refused(*args) -> str:
        assert main(["soup", *map(str, args), "--eval", str(ev), "--run", "bad"]) == 2
        assert not (tmp_path / "results").exists()
        return capsys.readouterr().err.strip()

    err = refused(ck / "checkpoint-154", family["ft0"])  # another shape
    assert err.startswith(f"error: {family['ft0']}: shape mismatch for ")
    err = refused(family["ft0"], other_family["ft0"])  # same shapes, unrelated weights
    assert err.startswith(f"error: {other_family['ft0']}: does not share a base with {family['ft0']}")
    err = refused(ck / "checkpoint-154", ck / "checkpoint-180", "--base", other_family["base"])
    assert err.startswith(f"error: {ck / 'checkpoint-154'}: shape mismatch for ")
    assert refused(ck / "checkpoint-154", ck / "checkpoint-154") == f"error: {ck / 'checkpoint-154'}: given twice as an ingredient"
    assert refused(ck / "checkpoint-154") == f"error: soup: needs at least 2 ingredients, got 1 ({ck / 'checkpoint-154'})"
    assert refused("--glob", str(tmp_path / "nothing-*")) == f"error: --glob: no folder matches '{tmp_path / 'nothing-*'}'"
    assert refused(ck / "checkpoint-154", tmp_path / "missing") == f"error: {tmp_path / 'missing'}: no such file or directory"


def test_seed_from_errors(tmp_path, zoo, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = {"base": str(zoo / "base"), "models": [str(zoo / "ft_add"), str(zoo / "ft_max")],
            "evaluator": {"tasks": ["add"], "task_dir": str(zoo)}, "methods": ["task_arithmetic"],
            "parameters": {"weight": {"low": 0.0, "high": 1.0}}, "budget": {"n_trials": 2}}
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump({**base, "seed_from": "nope"}))
    assert main(["search", str(p), "--run", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p}: seed_from: ") and "nope" in err and "no such run" in err
    assert not (tmp_path / "results" / "x").exists()
