"""Reliability on the zoo with real processes: kill -9 of the controller and resume,
one controller per run, concurrent searches on one SQLite file, determinism."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from mergesearch.cli import main
from mergesearch.runs.store import counts_toward_budget, load_run

from conftest import own_ray_env
from test_search import write_space
from test_zoo_eval import zoo  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow
EXE = Path(sys.executable).parent / "mergesearch"


def start(tmp_path, *args):
    env = {**own_ray_env(), "CI": "true"}
    return subprocess.Popen([str(EXE), *map(str, args)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def trials(db: Path, run: str) -> list:
    if not db.exists():
        return []
    try:
        st = optuna.storages.RDBStorage(f"sqlite:///{db}")
        return optuna.load_study(study_name=run, storage=st).get_trials()
    except Exception:
        return []


def ray_processes(tmp_path: Path, run: str) -> list[str]:
    """Command lines naming the run's Ray temp dir (reached through a short /tmp link
    when the run folder is deep: Ray's socket paths must stay under 107 bytes)."""
    import hashlib
    real = str((tmp_path / "results" / run / "ray").resolve())
    marks = [real, f"msray-{hashlib.sha1(real.encode()).hexdigest()[:8]}"]
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in ps if any(m in line for m in marks)]


def test_kill_9_the_controller_three_times_then_resume(tmp_path, zoo):
    # a budget the three kills cannot exhaust: a zoo trial takes about 0.1 s, and each kill
    # waits for up to 3 more trials and then up to 1 s
    budget = 60
    space = write_space(tmp_path, zoo, budget={"n_trials": budget}, initial_trials=False,
                        granularity={"level": "model"}, sampler={"name": "tpe"})
    db = tmp_path / "results" / "k" / "study.db"
    rng = random.Random(7)
    snapshots = []
    proc = start(tmp_path, "search", space, "--run", "k", "--workers", "1", "--no-export")
    for kill in range(3):
        before = sum(t.state.name == "COMPLETE" for t in trials(db, "k"))
        target = before + rng.randint(1, 3)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if sum(t.state.name == "COMPLETE" for t in trials(db, "k")) >= target:
                break
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 1.0))  # a random moment: mid-trial, between trials, mid-write
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert ray_processes(tmp_path, "k")  # the check below sees this run's Ray processes
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        snapshots.append({t.number: t.value for t in trials(db, "k") if t.state.name == "COMPLETE"})
        proc = start(tmp_path, "search", space, "--run", "k", "--workers", "1", "--no-export", "--resume")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    final = trials(db, "k")
    done = {t.number: t.value for t in final if t.state.name == "COMPLETE"}
    for snap in snapshots:  # no finished trial is lost or changed
        assert all(done.get(n) == v for n, v in snap.items())
    assert sum(counts_toward_budget(t) for t in final) == budget  # the budget is reached
    assert not [t for t in final if t.state.name in ("RUNNING", "WAITING")]
    stale = [t for t in final if t.state.name == "FAIL"]
    assert stale, "the kills left no trial in flight"
    by_number = {t.number: t for t in final}
    for t in stale:
        assert t.user_attrs["reason"] == "stale: the controller stopped" and t.user_attrs["requeued"] is True
        # its retry ran the same parameters
        retry = [r for r in final if r.system_attrs.get("failed_trial") == t.system_attrs.get("failed_trial", t.number)
                 and t.number in r.system_attrs.get("retry_history", [])]
        assert len(retry) == 1
        # the same parameters; a trial killed between ask() and its first suggestion has
        # none yet, and its retry draws them
        assert retry[0].params == t.params or not t.params
        assert by_number[retry[0].number].state.name in ("COMPLETE", "FAIL")
    # no Ray process of the killed controllers is left behind
    deadline = time.time() + 30
    while ray_processes(tmp_path, "k") and time.time() < deadline:
        time.sleep(0.5)
    assert ray_processes(tmp_path, "k") == []


def test_one_controller_per_run(tmp_path, zoo):
    space = write_space(tmp_path, zoo, budget={"n_trials": 200}, initial_trials=False,
                        granularity={"level": "model"})
    db = tmp_path / "results" / "one" / "study.db"
    proc = start(tmp_path, "search", space, "--run", "one", "--workers", "1", "--no-export")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not [t for t in trials(db, "one") if t.state.name == "COMPLETE"]:
            time.sleep(0.3)
        second = subprocess.run([str(EXE), "search", str(space), "--run", "one", "--resume", "--no-export"],
                                cwd=tmp_path, capture_output=True, text=True, env={**own_ray_env(), "CI": "true"})
        assert second.returncode == 2
        assert second.stderr.strip() == (f"error: results/one: the run is in use by another mergesearch process "
                                         f"(pid {proc.pid}); wait for it to finish or stop it first")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    assert proc.returncode == 130


def test_two_searches_share_one_sqlite_file(tmp_path, zoo):
    space = write_space(tmp_path, zoo, budget={"n_trials": 8}, initial_trials=False, granularity={"level": "model"})
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    procs = [start(tmp_path, "search", space, "--run", name, "--workers", "1", "--storage", url, "--no-export")
             for name in ("a", "b")]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    storage = optuna.storages.RDBStorage(url)
    for name in ("a", "b"):
        ts = optuna.load_study(study_name=name, storage=storage).get_trials()
        assert len(ts) == 8 and all(t.state.name == "COMPLETE" for t in ts)


def test_same_space_seed_and_one_worker_give_the_same_recipes(tmp_path, zoo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for sampler in ("tpe",):
        space = write_space(tmp_path, zoo, budget={"n_trials": 6}, initial_trials=False, sampler={"name": sampler},
                            granularity={"level": "model"})
        seqs = []
        for run in (f"{sampler}1", f"{sampler}2"):
            assert main(["search", str(space), "--run", run, "--workers", "1", "--no-export"]) == 0
            study, _ = load_run(run, root=tmp_path / "results")
            seqs.append([(t.user_attrs["recipe"], t.value) for t in study.get_trials()])
        assert seqs[0] == seqs[1]
        assert len({str(r) for r, _ in seqs[0]}) == 6


def folder_bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_is_atomic_repeatable_and_equal_to_the_scored_candidate(tmp_path, zoo, monkeypatch):
    import json

    import torch

    from mergesearch.engine.checkpoint import Checkpoint
    from mergesearch.engine.models import load_model
    from mergesearch.engine.materialize import Materializer
    from mergesearch.recipe import from_dict

    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, zoo, budget={"n_trials": 3}, initial_trials=False)
    assert main(["search", str(space), "--run", "x", "--workers", "1", "--no-export"]) == 0
    run = tmp_path / "results" / "x"

    def export(**env):
        return subprocess.run([str(EXE), "export", "x"], cwd=tmp_path, capture_output=True, text=True,
                              env={**own_ray_env(), "CI": "true", **env})

    # killed half-way through the tensors, before any export: nothing at the final paths
    p = export(MERGESEARCH_FAULT="export_kill")
    assert p.returncode == -signal.SIGKILL
    assert not (run / "model").exists() and not (run / "scores.json").exists()
    assert not (run / "best_recipe.yaml").exists()
    assert export().returncode == 0
    # the killed export's leftovers are gone (.lock is the run's lock file)
    assert [q.name for q in run.iterdir() if q.name.startswith(".")] == [".lock"]

    def snapshot():
        files = {f: (run / f).read_bytes() for f in ("best_recipe.yaml", "best_mergekit.yaml", "scores.json")}
        return {**{f"model/{k}": v for k, v in folder_bytes(run / "model").items()}, **files}
    first = snapshot()
    assert len(first) >= 8
    # killed again over a finished export: the finished one is untouched
    assert export(MERGESEARCH_FAULT="export_kill").returncode == -signal.SIGKILL
    assert snapshot() == first
    # and exporting again gives the same bytes, scores included
    assert export().returncode == 0
    assert snapshot() == first
    # the exported tensors are bit-equal to the candidate the worker scored (in place)
    scores = json.loads((run / "scores.json").read_text())
    recipe = from_dict(scores["recipe"])
    model, _ = load_model(zoo / "base")
    Materializer(recipe.base, [m.path for m in recipe.models], methods=[recipe.method]).write_into(model, recipe)
    exported = Checkpoint(run / "model")
    params = dict(model.named_parameters())
    assert set(params) == set(exported.names())
    for name, t in params.items():
        assert torch.equal(t.detach(), exported.get(name)), name
    # and the same recipe merged twice gives identical files
    assert main(["merge", str(run / "best_recipe.yaml"), "-o", str(tmp_path / "m1")]) == 0
    assert main(["merge", str(run / "best_recipe.yaml"), "-o", str(tmp_path / "m2")]) == 0
    assert folder_bytes(tmp_path / "m1") == folder_bytes(tmp_path / "m2")
