"""Curvature-based methods inside a search on the zoo: a space mixing them with task
arithmetic, metrics computed once and reused by every candidate, exported winners."""

import json
import os
from pathlib import Path

import pytest
import yaml

from mergesearch.cli import main
from mergesearch.runs.store import load_run

from test_zoo_eval import zoo  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow
MODELS = ["ft_shift", "ft_shift_sgd", "ft_max"]


def space(tmp_path, zoo, **over):
    data = {
        "base": str(zoo / "base"), "models": [str(zoo / m) for m in MODELS],
        "evaluator": {"tasks": ["shift", "max"], "task_dir": str(zoo), "limit": 60},
        "methods": ["task_arithmetic", "fisher", "gradient_matching", "regmean"],
        "parameters": {"weight": {"low": 0.1, "high": 1.0}, "prior": {"low": 1e-6, "high": 1e-2, "log": True},
                       "alpha": {"low": 0.5, "high": 1.0}},
        "curvature": {"kind": "empirical_fisher", "data": ["shift:train", "shift:train", "max:train"],
                      "n_examples": 32, "base_data": "shift:train"},
        "gram": {"data": ["shift:train", "shift:train", "max:train"], "n_examples": 32},
        "sampler": {"name": "tpe"}, "budget": {"n_trials": 10}, "seed": 2, "initial_trials": False,
        **over,
    }
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_mixed_geometry_search(tmp_path, zoo, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MERGESEARCH_CACHE", str(cache))
    assert main(["search", str(space(tmp_path, zoo)), "--run", "geo", "--workers", "2"]) == 0
    study, _ = load_run("geo", root=tmp_path / "results")
    trials = study.get_trials()
    assert len(trials) == 10 and all(t.state.name == "COMPLETE" for t in trials)
    methods = {t.user_attrs["recipe"]["method"] for t in trials}
    assert len(methods) >= 3  # the method is a search variable
    files = sorted(p.name for p in (cache / "curvature").glob("*.safetensors"))
    # computed once each: 3 model metrics (shift's file twice: same data, other weights), the base's, 3 Gram sets
    assert len([f for f in files if f.startswith("empirical_fisher-")]) == 4
    assert len([f for f in files if f.startswith("gram-")]) == 3
    for t in trials:
        r = t.user_attrs["recipe"]
        if r["method"] in ("fisher", "gradient_matching"):
            assert all(Path(m["metric"]).parent == cache / "curvature" for m in r["models"])
        if r["method"] == "gradient_matching":
            assert r["base_metric"] and 1e-6 <= r["parameters"]["prior"] <= 1e-2
        if r["method"] == "regmean":
            assert all(m["gram"] for m in r["models"]) and not any(m.get("metric") for m in r["models"])
        if r["method"] == "task_arithmetic":
            assert not any(m.get("metric") or m.get("gram") for m in r["models"])
    run = tmp_path / "results" / "geo"
    scores = json.loads((run / "scores.json").read_text())
    assert scores["dev"]["verified"] is True  # the exported checkpoint is the scored candidate
    best = scores["recipe"]["method"]
    assert (run / "best_mergekit.yaml").exists() == (best == "task_arithmetic")
    # a second search reuses every estimate: nothing new in the cache
    mtimes = {p: os.stat(p).st_mtime_ns for p in (cache / "curvature").glob("*.safetensors")}
    assert main(["search", str(space(tmp_path, zoo, budget={"n_trials": 2})), "--run", "geo2", "--workers", "1",
                 "--no-export"]) == 0
    assert {p: os.stat(p).st_mtime_ns for p in (cache / "curvature").glob("*.safetensors")} == mtimes


def test_preconditioned_with_adam_moments_and_an_sgd_model(tmp_path, zoo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = space(tmp_path, zoo, methods=["preconditioned"],
              parameters={"weight": {"low": 1e-3, "high": 10.0, "log": True}, "power": {"low": 0.5, "high": 1.0}},
              curvature={"kind": "adam", "identity": [str(zoo / "ft_shift_sgd")]}, gram=None,
              budget={"n_trials": 4})
    assert main(["search", str(p), "--run", "pre", "--workers", "2", "--no-export"]) == 0
    study, _ = load_run("pre", root=tmp_path / "results")
    for t in study.get_trials():
        assert t.state.name == "COMPLETE"
        ms = t.user_attrs["recipe"]["models"]
        assert ms[1].get("metric") is None and ms[0]["metric"] and ms[2]["metric"]  # SGD: identity


BAD = [
    ({"curvature": None}, "method 'fisher' needs a 'curvature' section"),
    ({"gram": None}, "method 'regmean' needs a 'gram' section"),
    ({"curvature": {"kind": "fisher"}}, "curvature.data: kind 'fisher' needs data"),
    ({"curvature": {"kind": "fisher", "data": ["shift:train"]}}, "curvature.data: give one entry per model (3)"),
    ({"curvature": {"kind": "files", "files": ["a"]}}, "curvature.files: give one file per model (3)"),
    ({"curvature": {"kind": "adam", "identity": ["/nowhere"]}}, "curvature.identity: /nowhere is not one of the models"),
    ({"curvature": {"kind": "fisher", "data": "nosuch:train"}}, "task file not found (task 'nosuch', split 'train')"),
    ({"curvature": {"kind": "adam"}}, "ft_shift_sgd: no Adam second moments"),
]


@pytest.mark.parametrize("over,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_curvature_sections(tmp_path, zoo, monkeypatch, capsys, over, message):
    monkeypatch.chdir(tmp_path)
    data = {k: v for k, v in over.items() if v is not None}
    p = space(tmp_path, zoo, **data)
    if any(v is None for v in over.values()):
        raw = yaml.safe_load(p.read_text())
        for k, v in over.items():
            if v is None:
                raw.pop(k)
        p.write_text(yaml.safe_dump(raw))
    assert main(["search", str(p), "--run", "bad"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results" / "bad").exists()
