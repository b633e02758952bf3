"""The search end to end on the zoo: a real Ray local instance and a real SQLite store."""

import json
import shutil
from pathlib import Path

import optuna
import pytest
import yaml

from mergesearch.cli import main
from mergesearch.search.space import SearchSpace
from mergesearch.search.variables import Granularity, make_groups
from mergesearch.runs.store import counts_toward_budget, leaderboard, load_run

from conftest import own_ray_env
from test_zoo_eval import zoo  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow


def write_space(tmp_path: Path, zoo: Path, **overrides) -> Path:
    data = {
        "base": str(zoo / "base"),
        "models": [str(zoo / f"ft_{t}") for t in ("reverse", "shift", "max", "add")],
        "evaluator": {"tasks": ["reverse", "shift", "max", "add"], "task_dir": str(zoo), "limit": 60},
        "methods": ["ties"],
        "parameters": {"weight": {"low": 0.2, "high": 1.5}, "density": {"low": 0.2, "high": 1.0}},
        "granularity": {"level": "groups", "n_groups": 2},
        "sampler": {"name": "cmaes"},
        "budget": {"n_trials": 8},  # 2 baselines and 6 search trials
        "seed": 3,
    }
    for k, v in overrides.items():
        data[k] = v
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_search_end_to_end(tmp_path, zoo, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, zoo)
    assert main(["search", str(space), "--run", "e2e", "--workers", "2"]) == 0
    run = tmp_path / "results" / "e2e"
    study, storage = load_run("e2e", root=tmp_path / "results") if False else (None, None)
    storage = optuna.storages.RDBStorage(f"sqlite:///{run / 'study.db'}")
    study = optuna.load_study(study_name="e2e", storage=storage)
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:
        ua = t.user_attrs
        assert ua["recipe"]["method"] == "ties" and len(ua["recipe"]["models"]) == 4
        assert set(ua["scores"]) == {"reverse", "shift", "max", "add"}
        assert ua["aggregate"] == pytest.approx(sum(ua["scores"].values()) / 4)
        assert t.value == pytest.approx(ua["aggregate"])
        assert ua["materialize_s"] > 0 and ua["eval_s"] > 0 and ua["worker"] in (0, 1)
        assert ua["scored_on"] == "cpu"
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}  # both workers took trials
    # the per-group coefficients reach the recipe as filters
    w = trials[0].user_attrs["recipe"]["models"][0]["parameters"]["weight"]
    assert [c.get("filter") for c in w][:4] == ["embed_tokens", "lm_head", "model.norm.", "model.layers.0."]
    # baselines are on the leaderboard
    board = leaderboard(study, storage)
    assert len(board) == 8 and set(board["kind"]) == {"search", "uniform average", "task arithmetic 1.0"}
    assert list(board["rank"]) == list(range(1, 9))
    assert board["aggregate"].is_monotonic_decreasing
    # export files and the re-score verification
    for f in ("best_recipe.yaml", "best_mergekit.yaml", "scores.json", "model/model.safetensors", "model/README.md"):
        assert (run / f).exists(), f
    scores = json.loads((run / "scores.json").read_text())
    assert scores["dev"]["verified"] is True
    assert scores["dev"]["rescored"] == scores["dev"]["stored"]
    assert str(scores["trial"]) == str(board.iloc[0]["trial"])
    assert set(scores["test"]["sources"]) == {str(zoo / "base")} | {str(zoo / f"ft_{t}") for t in ("reverse", "shift", "max", "add")}
    assert "dev re-score matches" in capsys.readouterr().out
    assert not list((tmp_path / "results").glob(".*tmp*"))
    # leaderboard command and csv
    assert main(["leaderboard", "e2e", "--top", "3", "--csv", str(tmp_path / "lb.csv"),
                 "--parquet", str(tmp_path / "lb.parquet")]) == 0
    assert len((tmp_path / "lb.csv").read_text().splitlines()) == 9
    import pandas as pd
    pq = pd.read_parquet(tmp_path / "lb.parquet")
    assert len(pq) == 8 and list(pq["rank"]) == list(range(1, 9))
    # a trial scored on a GPU is exported on one, by default: not on a machine without CUDA
    best = max((t for t in trials), key=lambda t: t.value)
    import sqlite3
    with sqlite3.connect(run / "study.db") as db:  # a finished trial's attributes are read-only through Optuna
        assert db.execute("UPDATE trial_user_attributes SET value_json = ? WHERE trial_id = ? AND key = ?",
                          ('"cuda"', best._trial_id, "scored_on")).rowcount == 1
    before = (run / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["export", "e2e", "--trial", str(best.number)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"trial {best.number} was scored on cuda and no CUDA device is visible here" in err[0]
    assert (run / "model" / "model.safetensors").read_bytes() == before  # nothing touched
    assert main(["export", "e2e", "--trial", str(best.number), "--device", "cpu"]) == 0
    assert "dev re-score matches" in capsys.readouterr().out


def test_resume_continues_to_the_new_budget(tmp_path, zoo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, zoo, budget={"n_trials": 4}, initial_trials=False,
                        sampler={"name": "cmaes", "population": 4}, granularity={"level": "model"})
    assert main(["search", str(space), "--run", "r", "--workers", "1", "--no-export"]) == 0
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'results' / 'r' / 'study.db'}")
    first = [t.params for t in optuna.load_study(study_name="r", storage=storage).get_trials()]
    assert len(first) == 4
    assert main(["search", str(space), "--run", "r", "--workers", "1", "--resume", "--n-trials", "10",
                 "--no-export"]) == 0
    study = optuna.load_study(study_name="r", storage=storage)
    trials = study.get_trials()
    assert len(trials) == 10 and all(t.state.name == "COMPLETE" for t in trials)
    assert [t.params for t in trials[:4]] == first  # nothing lost or re-run
    # CMA-ES state carried over: generation numbers continue rather than restart
    gens = [next((v for k, v in t.system_attrs.items() if k.endswith(":generation")), None) for t in trials]
    seen = [g for g in gens if g is not None]
    assert seen == sorted(seen) and seen[-1] >= 1
    # trials 0-1 are drawn independently (CMA-ES learns the space from a finished trial);
    # generation 0 (population 4) was open at the stop, with 2 trials, and goes on after it
    assert gens[:4] == [None, None, 0, 0] and gens[4] == 0


def test_method_choice_space(tmp_path, zoo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, zoo, methods=["ties", "task_arithmetic", "dare_linear"],
                        parameters={"weight": {"low": 0.2, "high": 1.2}, "density": {"low": 0.3, "high": 1.0}},
                        granularity={"level": "model"}, sampler={"name": "cmaes"}, budget={"n_trials": 6},
                        initial_trials=False)
    assert main(["search", str(space), "--run", "mc", "--workers", "2", "--no-export"]) == 0
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'results' / 'mc' / 'study.db'}")
    trials = optuna.load_study(study_name="mc", storage=storage).get_trials()
    assert all("method" in t.params for t in trials)
    for t in trials:
        has_density = any("density" in k for k in t.params)
        assert has_density == (t.params["method"] != "task_arithmetic")


def test_groups_and_module_filters():
    groups = make_groups(Granularity(level="layer", special=True, modules=["attn", "mlp"]), 2, "model.layers.")
    names = [g.name for g in groups]
    assert names == ["embed", "lm_head", "norm", "L0.attn", "L0.mlp", "L1.attn", "L1.mlp"]
    assert groups[4].filters == ["model.layers.0.mlp"] and groups[3].fallback == ["model.layers.0."]


# -- bad input: one line, exit 2, no run folder left -------------------------------

def refused(tmp_path, capsys, args, *expect):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for e in expect:
        assert e in err, err
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())
    return err


def test_bad_spaces(tmp_path, zoo, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    p = write_space(tmp_path, zoo, sampler={"name": "cmaes", "popsize": 4})
    refused(tmp_path, capsys, ["search", str(p)], str(p), "unknown key 'sampler.popsize'")
    p = write_space(tmp_path, zoo, budget={"n_trials": "many"})
    refused(tmp_path, capsys, ["search", str(p)], str(p), "budget.n_trials")
    p = write_space(tmp_path, zoo, parameters={"weight": {"low": 1.0, "high": 0.1}, "density": 0.5})
    refused(tmp_path, capsys, ["search", str(p)], str(p), "bounds reversed")
    p = write_space(tmp_path, zoo, parameters={"weight": 1.0, "t": {"low": 0, "high": 1}})
    refused(tmp_path, capsys, ["search", str(p)], str(p), "parameters.t: not a parameter of ties")
    p = write_space(tmp_path, zoo, evaluator={"tasks": ["nosuch"], "task_dir": str(zoo)})
    refused(tmp_path, capsys, ["search", str(p)], "task file not found")


def test_incompatible_models_refused_before_ray(tmp_path, zoo, monkeypatch, capsys):
    from conftest import copy_model, edit_config
    monkeypatch.chdir(tmp_path)
    bad = copy_model(zoo / "ft_max", tmp_path / "bad")
    edit_config(bad, vocab_size=300)
    p = write_space(tmp_path, zoo, models=[str(zoo / "ft_reverse"), str(bad)])
    refused(tmp_path, capsys, ["search", str(p)], str(bad), "vocab size 300")


def test_resume_problems_and_storage(tmp_path, zoo, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    p = write_space(tmp_path, zoo)
    refused(tmp_path, capsys, ["search", str(p), "--run", "ghost", "--resume"], "cannot resume")
    refused(tmp_path, capsys, ["search", str(p), "--storage", "postgresql://nobody@127.0.0.1:1/none"],
            "cannot open storage")
    # a run whose space changed
    p = write_space(tmp_path, zoo, budget={"n_trials": 2}, initial_trials=False)
    assert main(["search", str(p), "--run", "x", "--workers", "1", "--no-export"]) == 0
    p2 = write_space(tmp_path, zoo, budget={"n_trials": 2}, initial_trials=False, seed=4)
    code = main(["search", str(p2), "--run", "x", "--workers", "1", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "the space changed" in err


def test_worker_faults_fail_their_trials_and_the_search_completes(tmp_path, zoo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MERGESEARCH_FAULT", "raise_eval@1,nan@2,exit@3,oom@4,hang@5,raise_materialize@6,kill@7,inf@8")
    space = write_space(tmp_path, zoo, budget={"n_trials": 11}, initial_trials=False, trial_timeout=4,
                        granularity={"level": "model"})
    assert main(["search", str(space), "--run", "f", "--workers", "2", "--no-export"]) == 0
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'results' / 'f' / 'study.db'}")
    trials = optuna.load_study(study_name="f", storage=storage).get_trials()
    assert len(trials) == 11
    failed = {t.number: t.user_attrs["reason"] for t in trials if t.state.name == "FAIL"}
    assert sorted(failed) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert failed[1] == "RuntimeError: injected fault in evaluate"
    assert failed[2] == "non-finite score for reverse, shift, max, add"
    assert failed[3].startswith("worker died") and failed[3].endswith("replaced")
    assert failed[4] == "oom: injected out-of-memory"  # torch.OutOfMemoryError; the worker recovered
    assert failed[5] == "timeout: no result after 4s (worker replaced)"
    assert failed[6] == "RuntimeError: injected fault in materialize"
    assert failed[7].startswith("worker died") and failed[7].endswith("replaced")
    assert failed[8] == "non-finite score for reverse, shift, max, add"
    assert all(t.state.name == "COMPLETE" for t in trials if t.number not in failed)


def test_worker_setup_does_not_count_against_the_trial_timeout(tmp_path, zoo, monkeypatch):
    """Trial 1 kills its worker (and its retry the replacement). Each replacement loads
    for 4 s + start-up, longer than the 3 s trial timeout; the trials queued on it
    still complete, because a trial's clock starts when its worker is ready."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MERGESEARCH_FAULT", "setup_sleep@4,kill@1")
    space = write_space(tmp_path, zoo, budget={"n_trials": 4}, initial_trials=False, trial_timeout=3,
                        granularity={"level": "model"}, sampler={"name": "random"})
    assert main(["search", str(space), "--run", "s", "--workers", "1", "--no-export"]) == 0
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'results' / 's' / 'study.db'}")
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    states = {t.number: t.state.name for t in trials}
    assert states == {0: "COMPLETE", 1: "FAIL", 2: "COMPLETE", 3: "COMPLETE"}
    assert trials[1].user_attrs["reason"].startswith("worker died")
    assert {t.user_attrs["worker"] for t in trials if t.number in (2, 3)} == {2}  # the second replacement


def test_normalized_objective_scores_the_sources_first(tmp_path, zoo, monkeypatch, capsys):
    """objective.normalize: sources scores each source model first; every task is then
    divided by the best source's dev score, and the leaderboard shows each worst task."""
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, zoo, budget={"n_trials": 6}, initial_trials=False,  # 4 sources, 2 search trials
                        granularity={"level": "model"}, objective={"kind": "mean", "normalize": "sources"})
    assert main(["search", str(space), "--run", "n", "--workers", "1", "--no-export"]) == 0
    study, st = load_run("n", root=tmp_path / "results")
    ref = study.user_attrs["reference"]
    board = leaderboard(study, st)
    sources = board[board["kind"].str.startswith("source ")]
    assert sorted(sources["kind"]) == ["source ft_add", "source ft_max", "source ft_reverse", "source ft_shift"]
    tasks = ["reverse", "shift", "max", "add"]
    assert ref == {t: max(sources[f"dev:{t}"]) for t in tasks}
    for _, row in board.iterrows():
        assert row["aggregate"] == pytest.approx(sum(row[f"dev:{t}"] / ref[t] for t in tasks) / 4)
        assert row["worst"] == min(row[f"dev:{t}"] for t in tasks)
    # each fine-tune is the best source on its own task: its own task counts 1.0
    own = sources.set_index("kind").loc["source ft_add"]
    assert own["dev:add"] == ref["add"]
    capsys.readouterr()
    assert main(["leaderboard", "n"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "run n: 6 complete, 0 pruned, 0 failed trials; 1440 dev items scored" and "worst" in out[1]


def test_cmaes_warm_starts_from_the_best_baseline(tmp_path, zoo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, zoo, budget={"n_trials": 5}, granularity={"level": "model"}, scale=True,
                        sampler={"name": "cmaes", "x0": "best_baseline", "sigma0": 1e-4, "restart": "ipop"})
    assert main(["search", str(space), "--run", "w", "--workers", "1", "--no-export"]) == 0
    study, st = load_run("w", root=tmp_path / "results")
    board = leaderboard(study, st)
    baselines = board[board["trial"].str.startswith("b")]
    best = baselines.iloc[0]["kind"]  # the leaderboard ranks by dev aggregate
    assert study.user_attrs["x0_from"] == best
    x0 = study.user_attrs["x0"]
    # both baselines give every model weight 1 (within the bounds), density 1 (nothing
    # pruned: its default) and lambda 1
    assert x0 == {**{f"weight/m{i}": 1.0 for i in range(4)}, **{f"density/m{i}": 1.0 for i in range(4)},
                  "lambda": 1.0}
    trials = study.get_trials()
    assert trials[0].params == x0 and trials[0].user_attrs["role"] == "warm start"
    assert all(abs(trials[1].params[k] - v) < 0.01 for k, v in x0.items())  # CMA-ES samples around it


def test_more_workers_than_gpus_is_refused_or_shared():
    from mergesearch.errors import MergeSearchError
    from mergesearch.engine.plan import gpu_shares
    assert gpu_shares(2, 0, None) == 0.0  # a CPU cluster
    assert gpu_shares(2, 2, None) == 1.0
    assert gpu_shares(2, 1, None) == 0.5  # two workers share the one GPU
    assert gpu_shares(3, 1, None) == pytest.approx(1 / 3)
    assert gpu_shares(5, 2, None) == pytest.approx(1 / 3)  # 3 + 2 on two GPUs
    assert gpu_shares(4, 2, 0.5) == 0.5 and gpu_shares(2, 4, 2) == 2.0
    with pytest.raises(MergeSearchError, match=r"^--workers 2 with resources.gpus_per_worker 1: the cluster's 1 "
                                               r"GPU\(s\) seat only 1 worker\(s\); use fewer workers or a share such as 0.5$"):
        gpu_shares(2, 1, 1.0)
    with pytest.raises(MergeSearchError, match="seat only 2"):
        gpu_shares(3, 1, 0.4)
    with pytest.raises(MergeSearchError, match="the Ray cluster has no GPU"):
        gpu_shares(1, 0, 0.5)


def test_ctrl_c_stops_cleanly_and_the_run_resumes(tmp_path, zoo):
    import os
    import signal
    import subprocess
    import sys
    import time
    space = write_space(tmp_path, zoo, budget={"n_trials": 200}, initial_trials=False, granularity={"level": "model"})
    exe = Path(sys.executable).parent / "mergesearch"
    env = {**own_ray_env(), "CI": "true"}
    proc = subprocess.Popen([str(exe), "search", str(space), "--run", "c", "--workers", "2", "--no-export"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    db = tmp_path / "results" / "c" / "study.db"
    deadline = time.time() + 240
    done = 0
    while time.time() < deadline and done < 4:
        time.sleep(1)
        if db.exists():
            try:
                st = optuna.storages.RDBStorage(f"sqlite:///{db}")
                done = sum(t.state.name == "COMPLETE" for t in optuna.load_study(study_name="c", storage=st).get_trials())
            except Exception:
                pass
    if done < 4:
        proc.kill()
        raise AssertionError(f"no progress in 240 s:\n{proc.communicate()[0][-3000:]}")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "(interrupted)" in out
    st = optuna.storages.RDBStorage(f"sqlite:///{db}")
    trials = optuna.load_study(study_name="c", storage=st).get_trials()
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states  # nothing left dangling
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert failed, "no trial was in flight at the interrupt"
    for t in failed:  # abandoned, not the trial's fault: queued again with the same parameters
        assert t.user_attrs["reason"] in ("interrupted", "interrupted before it ran") and t.user_attrs["requeued"]
    waiting = [t for t in trials if t.state.name == "WAITING"]
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == sorted(t.number for t in failed)
    assert all(w.params == trials[w.system_attrs["failed_trial"]].params for w in waiting)
    complete = [t.number for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) >= 4
    counted = sum(counts_toward_budget(t) for t in trials)
    assert counted == len(complete)
    proc = subprocess.run([str(exe), "search", str(space), "--run", "c", "--workers", "1", "--resume",
                           "--n-trials", str(counted + len(waiting) + 1), "--no-export"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = optuna.load_study(study_name="c", storage=st).get_trials()
    assert not [t for t in after if t.state.name in ("RUNNING", "WAITING")]
    assert sum(counts_toward_budget(t) for t in after) == counted + len(waiting) + 1
    assert all(after[w.number].state.name == "COMPLETE" for w in waiting)  # the retries ran first
    assert [t.number for t in after if t.state.name == "COMPLETE"][:len(complete)] == complete
