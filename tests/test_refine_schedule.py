"""Gradient refinement (mergesearch.search.refine) and coarse-to-fine schedules, on the zoo."""

import random
from dataclasses import asdict

import optuna
import pytest
import torch
import yaml

from mergesearch.cli import main
from mergesearch.errors import MergeSearchError
from mergesearch.evaluate import EvalConfig, build_evaluator
from mergesearch.engine.materialize import Materializer
from mergesearch.engine.models import load_model
from mergesearch.recipe import from_dict
from mergesearch.search.refine import build_terms, merged_params, refine, refined_recipe
from mergesearch.search.refine_data import estimate_cost, task_counts
from mergesearch.search.space import SearchSpace
from mergesearch.search.variables import Granularity, make_groups, tensor_groups
from mergesearch.runs.store import leaderboard, load_run

from test_zoo_eval import zoo  # noqa: F401  (session fixture)

TASKS = ["reverse", "shift", "max", "add"]
CFG = dict(top=1, level="layer", n_groups=2, steps=8, lr=0.05, batch_size=8, loss="choice", holdout=0.25,
           eval_every=4, patience=3, average=0.0)


def layer_groups(level="layer", n=2):
    return [asdict(g) for g in make_groups(Granularity(level=level, n_groups=n), 4, "model.layers.")]


def candidate(zoo, method, lam=1.2, **params):
    fts = [str(zoo / f"ft_{t}") for t in TASKS]
    per = {"weight": 1.0, **({"density": 0.5} if method != "task_arithmetic" else {}), **params}
    return from_dict(dict(method=method, base=str(zoo / "base"), parameters={"lambda": lam}, seed=5,
                          models=[{"path": p, "parameters": dict(per, weight=0.6 + 0.2 * i)} for i, p in enumerate(fts)]))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties"])
def test_trained_model_is_the_engine_merge_for_any_coefficients(zoo, method):
    """The differentiable merge equals the engine's merge of the refined recipe, at the
    start (multipliers 1) and at random multipliers (sign election recomputed)."""
    r = candidate(zoo, method)
    mat = Materializer(zoo / "base", [m.path for m in r.models], methods=[method])
    groups = layer_groups()
    names = list(mat.names)
    dtypes = {n: torch.float32 for n in names}
    terms, gw, gl = build_terms(mat, r, groups, names, dtypes, "cpu")
    assert len(terms) == len(names) and {t.group for t in terms} == set(range(len(groups)))
    ones_c, ones_s = torch.ones(len(groups), 4), torch.ones(len(groups))
    engine = mat.state_dict(r)
    ours = merged_params(terms, ones_c, ones_s)
    for n in names:
        torch.testing.assert_close(ours[n], engine[n], rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    coef, scale = 0.3 + 1.5 * torch.rand(len(groups), 4, generator=g), 0.5 + torch.rand(len(groups), generator=g)
    ours = merged_params(terms, coef, scale)
    again = mat.state_dict(refined_recipe(r, groups, gw, gl, coef, scale))
    for n in names:
        torch.testing.assert_close(ours[n], again[n], rtol=1e-5, atol=1e-6)
    # it differs from the candidate: the multipliers reached every group
    assert sum(float((again[n] - engine[n]).abs().max()) > 1e-4 for n in names) >= len(names) // 2


def test_tensor_level_gives_every_tensor_its_own_coefficients(zoo):
    """level tensor: one group per tensor (embeddings, lm_head and the final norm first);
    the refined recipe, per tensor, is the differentiable merge; a tensor that is merged
    but not trained keeps the candidate's weight and lambda."""
    r = candidate(zoo, "ties")
    mat = Materializer(zoo / "base", [m.path for m in r.models], methods=["ties"])
    names = list(mat.names)
    groups = [asdict(g) for g in tensor_groups(names)]
    assert [g["name"] for g in groups[:3]] == ["embed", "lm_head", "norm"]
    assert len(groups) == 3 + len([n for n in names if "model.layers." in n])
    assert sum(g["default"] for g in groups) == 1
    trained = [n for n in names if n != "model.layers.2.mlp.up_proj.weight"]
    terms, gw, gl = build_terms(mat, r, groups, trained, {n: torch.float32 for n in names}, "cpu")
    assert sorted({t.group for t in terms}) == [k for k, g in enumerate(groups)
                                                if g["name"] != "model.layers.2.mlp.up_proj.weight"]
    g = torch.Generator().manual_seed(1)
    coef, scale = 0.5 + torch.rand(len(groups), 4, generator=g), 0.5 + torch.rand(len(groups), generator=g)
    skipped = next(k for k, g in enumerate(groups) if g["name"] == "model.layers.2.mlp.up_proj.weight")
    coef[skipped], scale[skipped] = 1.0, 1.0  # what Adam leaves on a group without a gradient
    ours = merged_params(terms, coef, scale)
    out = refined_recipe(r, groups, gw, gl, coef, scale)
    again = mat.state_dict(out)
    engine = mat.state_dict(r)
    for n in trained:
        torch.testing.assert_close(ours[n], again[n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again["model.layers.2.mlp.up_proj.weight"], engine["model.layers.2.mlp.up_proj.weight"],
                               rtol=0, atol=0)
    # every other tensor moved: each has coefficients of its own
    assert all(float((again[n] - engine[n]).abs().max()) > 1e-5 for n in trained if "layernorm" not in n)


def test_refine_improves_held_out_items_counts_cost_and_is_deterministic(zoo):
    r = candidate(zoo, "ties")
    mat = Materializer(zoo / "base", [m.path for m in r.models], methods=["ties"])
    model, tok = load_model(zoo / "base")
    ev = build_evaluator(EvalConfig(tasks=TASKS, task_dir=str(zoo), split="dev", limit=40))
    out, stats = refine(mat, model, tok, ev, r, CFG, layer_groups())
    assert stats["steps"] == 8 and stats["best_step"] in (0, 4, 8)
    assert stats["holdout_after"] >= stats["holdout_before"]
    assert [h["step"] for h in stats["history"]] == [0, 4, 8]
    # cost: 8 steps x 8 items x 4 choices x 3 (forward + backward) and 3 checks of the
    # 40 held-out items (10 per task) x 4 choices, over the 160 items x 4 choices one trial scores
    assert stats["cost"] == pytest.approx((8 * 8 * 4 * 3 + 3 * 40 * 4) / 640)
    assert task_counts(ev) == {t: (40, 160, False) for t in TASKS}
    # the bound: each check holds out up to 10.5 items a task (round(0.25 x 40) = 10)
    assert estimate_cost(CFG, task_counts(ev)) == pytest.approx((8 * 8 * 4 * 3 + 3 * 4 * 10.5 * 4) / 640)
    assert stats["cost"] <= estimate_cost(CFG, task_counts(ev)) + 1e-9
    w = out.models[0].parameters["weight"]
    assert [c.filter for c in w[:4]] == ["embed_tokens", "lm_head", "model.norm.", "model.layers.0."]
    assert out.models[0].parameters["density"] == 0.5
    again, _ = refine(mat, model, tok, ev, r, CFG, layer_groups())
    assert again.to_dict() == out.to_dict()


def test_restarts_hold_out_tiling_folds_and_average_their_coefficients(zoo):
    """refine.restarts 2: the second restart holds out the next share of every task's items
    (disjoint from the first's), each restart's training and checks are counted, and the
    recipe is the mean of the two restarts' kept coefficients; the first restart is the
    refinement with restarts 1."""
    from mergesearch.search.refine_data import Items

    r = candidate(zoo, "ties")
    mat = Materializer(zoo / "base", [m.path for m in r.models], methods=["ties"])
    model, tok = load_model(zoo / "base")
    ev = build_evaluator(EvalConfig(tasks=TASKS, task_dir=str(zoo), split="dev", limit=40))
    items = Items(ev, model, tok, 0.25, 0, "cpu")
    first = {t: {id(x) for x in rows} for t, rows in items.holdout.items()}
    items.fold(1)
    for t, rows in items.holdout.items():
        assert len(rows) == 10 and not first[t] & {id(x) for x in rows}
        assert len(items.train[t]) == 30 and not {id(x) for x in items.train[t]} & {id(x) for x in rows}
    one, _ = refine(mat, model, tok, ev, r, CFG, layer_groups())
    two, stats = refine(mat, model, tok, ev, r, dict(CFG, restarts=2), layer_groups())
    assert len(stats["restarts"]) == 2 and stats["steps"] == 16
    assert stats["cost"] == pytest.approx(2 * (8 * 8 * 4 * 3 + 3 * 40 * 4) / 640)
    assert stats["cost"] <= estimate_cost(dict(CFG, restarts=2), task_counts(ev)) + 1e-9
    assert estimate_cost(dict(CFG, restarts=2), task_counts(ev)) == pytest.approx(2 * estimate_cost(CFG, task_counts(ev)))
    a = [c.value for c in one.models[2].parameters["weight"]]
    mean = [c.value for c in two.models[2].parameters["weight"]]
    b = [2 * m - x for m, x in zip(mean, a)]  # the second restart's coefficients
    assert a != mean and max(abs(x - y) for x, y in zip(a, b)) > 1e-4


def test_entropy_refinement_uses_no_labels(zoo):
    r = candidate(zoo, "task_arithmetic")
    mat = Materializer(zoo / "base", [m.path for m in r.models], methods=["task_arithmetic"])
    model, tok = load_model(zoo / "base")
    cfg = dict(CFG, loss="entropy", steps=12)  # the held-out entropy first rises, then falls below the start
    ev = build_evaluator(EvalConfig(tasks=TASKS, task_dir=str(zoo), split="dev", limit=20))
    a, _ = refine(mat, model, tok, ev, r, cfg, layer_groups("groups"))
    assert_reads_no_label(mat, model, tok, ev, r, cfg, a)


def assert_reads_no_label(mat, model, tok, ev, r, cfg, first) -> None:
    """Scramble every label of ``ev``: the refinement gives ``first`` again, and ``first``
    moved away from the candidate's weights."""
    rng = random.Random(0)
    ev.lm(model, tok)  # the documents, as lm-eval reads them
    for docs in ev._docs.values():
        for doc in docs:
            doc["answer"] = rng.randrange(len(doc["choices"]))
    again, _ = refine(mat, model, tok, ev, r, cfg, layer_groups("groups"))
    w = [c.value for c in first.models[1].parameters["weight"]]
    assert w == [c.value for c in again.models[1].parameters["weight"]] and w != [0.8] * len(w)


def test_distill_refinement_learns_from_the_specialists_without_labels(zoo):
    """loss distill: each task's teacher is the source model surest on its items (here the
    task's own fine-tune), found without labels; the teachers' pass is counted in the cost;
    scrambled labels change nothing, and with distill_mix below 1 they do."""
    # a start that 8 steps can beat on held-out items on every zoo build (at lambda 1.2 the
    # zoo built on an AVX2 CPU holds its start: the held-out loss rises for 8 steps)
    r = candidate(zoo, "task_arithmetic", lam=0.5)
    mat = Materializer(zoo / "base", [m.path for m in r.models], methods=["task_arithmetic"])
    model, tok = load_model(zoo / "base")
    cfg = dict(CFG, loss="distill", steps=8, distill_mix=1.0, teachers="confidence")
    ev = build_evaluator(EvalConfig(tasks=TASKS, task_dir=str(zoo), split="dev", limit=40))
    a, stats = refine(mat, model, tok, ev, r, cfg, layer_groups("groups"))
    assert stats["teachers"] == {"reverse": 0, "shift": 1, "max": 2, "add": 3}
    # 4 teachers x 640 sequences, 8 steps x 8 items x 4 choices x 3, 3 checks of 40 held-out
    # items x 4 choices, over the 160 items x 4 choices one trial scores
    assert stats["steps"] == 8 and stats["best_step"] == 8
    assert stats["history"][-1]["holdout_loss"] < stats["history"][0]["holdout_loss"]
    assert stats["cost"] == pytest.approx((4 * 640 + 8 * 8 * 4 * 3 + 3 * 40 * 4) / 640)
    assert stats["cost"] <= estimate_cost(cfg, task_counts(ev), 4) + 1e-9
    assert estimate_cost(cfg, task_counts(ev), 4) == pytest.approx(estimate_cost(dict(cfg, loss="choice"), task_counts(ev), 4) + 4)
    mixed, _ = refine(mat, model, tok, ev, r, dict(cfg, distill_mix=0.5), layer_groups("groups"))
    assert_reads_no_label(mat, model, tok, ev, r, cfg, a)
    mixed_b, _ = refine(mat, model, tok, ev, r, dict(cfg, distill_mix=0.5), layer_groups("groups"))
    assert mixed.to_dict() != mixed_b.to_dict()


def test_confidence_teacher_of_two_tasks_is_named(zoo, caplog):
    """A source model that is the surest on two tasks teaches both, and the refinement says
    so in one warning (with tasks that share an input format, a specialist can be sure and
    wrong on its partner's items); teachers chosen by accuracy are not warned about. Two
    copies of one fine-tune tie on every task, and the first copy wins both."""
    fts = [str(zoo / "ft_max"), str(zoo / "ft_max")]
    r = from_dict(dict(method="task_arithmetic", base=str(zoo / "base"), parameters={"lambda": 0.5},
                       models=[{"path": p, "parameters": {"weight": 1.0}} for p in fts]))
    mat = Materializer(zoo / "base", fts, methods=["task_arithmetic"])
    model, tok = load_model(zoo / "base")
    ev = build_evaluator(EvalConfig(tasks=["max", "add"], task_dir=str(zoo), split="dev", limit=16))
    cfg = dict(CFG, loss="distill", steps=1, eval_every=1, teachers="confidence")
    with caplog.at_level("WARNING", logger="mergesearch.search.refine"):
        _, stats = refine(mat, model, tok, ev, r, cfg, layer_groups("groups"))
    assert stats["teachers"] == {"max": 0, "add": 0}
    assert [m for m in caplog.messages if "surest" in m] == [
        f"refine: {fts[0]} is the surest source model on tasks max, add, and teaches them all; when tasks share an "
        "input format a model can be sure and wrong (check the teachers, or set refine.teachers: accuracy)"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="mergesearch.search.refine"):
        _, stats = refine(mat, model, tok, ev, r, dict(cfg, teachers="accuracy"), layer_groups("groups"))
    assert stats["teachers"] == {"max": 0, "add": 0} and not [m for m in caplog.messages if "surest" in m]


def test_refine_refuses_a_coarser_level_than_the_candidate(zoo):
    r = candidate(zoo, "ties")
    data = r.to_dict()
    data["models"][0]["parameters"]["weight"] = [{"filter": "model.layers.0.", "value": 0.3}, {"value": 1.0}]
    r = from_dict(data)
    mat = Materializer(zoo / "base", [m.path for m in r.models], methods=["ties"])
    with pytest.raises(MergeSearchError, match="weight varies inside refine group 'L0-1'"):
        build_terms(mat, r, layer_groups("groups"), list(mat.names), {n: torch.float32 for n in mat.names}, "cpu")


def space(**over) -> SearchSpace:
    data = {"base": "/m/base", "models": ["/m/a", "/m/b"], "evaluator": {"tasks": ["t"]}, "methods": ["ties"],
            "parameters": {"weight": {"low": 0.0, "high": 1.0}}, **over}
    return SearchSpace.model_validate(data).check("space.yaml")


@pytest.mark.parametrize("over,message", [
    ({"methods": ["linear"], "refine": {}}, "refine: method linear is not in the task-vector family"),
    ({"refine": {}, "evaluator": {"evaluator": "python", "tasks": ["t"], "function": "m:f"}},
     "refine: the python evaluator has no items to train on"),
    ({"schedule": []}, "schedule: give at least one stage"),
    ({"schedule": ["model", "groups"]}, "schedule[1]: 'groups' is not model, groups:N, depth or layer"),
    ({"schedule": ["model", "layers"]}, "schedule[1]: 'layers' is not model"),
    ({"schedule": ["model@0.7", "layer@0.6"]}, "schedule: shares must lie in (0, 1) and add up to at most 1"),
    ({"schedule": ["model", "layer"], "sampler": {"name": "gp"}}, "schedule: needs the cmaes, tpe or random sampler"),
])
def test_bad_refine_and_schedule_sections(over, message):
    with pytest.raises(MergeSearchError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        space(**over)


def test_schedule_shares():
    s = space(schedule=["model", "groups:2", "layer@0.5"])
    stages = s.stages()
    assert [(g.level, g.n_groups) for g, _ in stages] == [("model", 1), ("groups", 2), ("layer", 1)]
    assert [share for _, share in stages] == [0.25, 0.25, 0.5]
    assert [share for _, share in space(schedule=["model", "layer"]).stages()] == [0.5, 0.5]
    assert s.fingerprint() != space().fingerprint()


@pytest.mark.slow
def test_coarse_to_fine_search_with_refinement(tmp_path, zoo, monkeypatch, capsys, caplog):
    """Two stages (whole models, then 2 layer groups) and a refine stage, with two workers:
    the budget splits as planned, stage 2 starts from stage 1's best, the refined candidate
    is scored like a trial and can be exported."""
    monkeypatch.chdir(tmp_path)
    data = {
        "base": str(zoo / "base"), "models": [str(zoo / f"ft_{t}") for t in TASKS],
        "evaluator": {"tasks": TASKS, "task_dir": str(zoo), "limit": 60},
        "methods": ["ties"], "scale": True,
        "parameters": {"weight": {"low": 0.2, "high": 1.5}, "density": {"low": 0.2, "high": 1.0}},
        "schedule": ["model", "groups:2"],
        "refine": {"steps": 10, "eval_every": 5, "batch_size": 16, "level": "tensor"},
        "sampler": {"name": "cmaes"}, "budget": {"n_trials": 16}, "seed": 3,
    }
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(data))
    caplog.set_level("INFO", logger="mergesearch")
    assert main(["search", str(p), "--run", "c2f", "--workers", "2", "--no-export"]) == 0
    err = caplog.text
    # refine reserve: (10 x 16 x 4 x 3 + 3 x 60 x 4) / 960 = 2.75 -> 3, plus its scoring; the two
    # baselines (uniform average, task arithmetic) count too
    assert "budget: 16 trials: 2 baselines, 10 for the search, 4 kept for refining the best 1 candidate(s)" in err
    # CMA-ES from the centre: the one lever left out gets its hint
    assert "hint: sampler.x0: best_baseline" in err and "hint: refine: " not in err
    assert "hint: refine.rows: true" in err  # a refinement per tensor only
    study, storage = load_run("c2f", root=tmp_path / "results")
    stage1 = study.get_trials()
    stage2 = optuna.load_study(study_name="c2f.stage1", storage=storage)
    assert len(stage1) == 5 and len(stage2.trials) == 5
    assert all(set(t.params) == {"weight/m0", "weight/m1", "weight/m2", "weight/m3", "density/m0", "density/m1",
                                 "density/m2", "density/m3", "lambda"} for t in stage1)
    assert all(len(t.params) == 4 * 2 * 5 + 1 for t in stage2.trials)  # 2 layer groups + embed, lm_head, norm
    # stage 2 starts at stage 1's best (baselines included), broadcast to every group
    board = leaderboard(study, storage)
    first = board[~board["trial"].str.startswith("s1.") & ~board["trial"].str.startswith("r")].iloc[0]
    x0 = stage2.user_attrs["x0"]
    assert stage2.user_attrs["x0_from"] in (str(first["trial"]), first["kind"])
    assert len({v for k, v in x0.items() if k.startswith("weight/m0/")}) == 1
    refined = optuna.load_study(study_name="c2f.refine", storage=storage).trials
    assert len(refined) == 1 and refined[0].state.name == "COMPLETE"
    ua = refined[0].user_attrs
    assert ua["refine"]["steps"] >= 5 and ua["cost"] == pytest.approx(ua["refine"]["cost"] + 1)
    refinable = board[(board["method"] != "linear") & ~board["trial"].str.startswith("r")]
    assert ua["refined_from"] == refinable.iloc[0]["trial"]
    lam = ua["recipe"]["parameters"]["lambda"]  # lambda per tensor: embed, lm_head, norm, then each layer tensor
    assert isinstance(lam, list) and [e["filter"] for e in lam[:3]] == ["model.embed_tokens.weight", "lm_head.weight",
                                                               "model.norm.weight"]
    assert len(lam) == 3 + 4 * 9 + 1  # and the default
    assert "r0" in set(board["trial"]) and any(k.startswith("s1.") for k in board["trial"])
    # the leaderboard shows the refined trial's held-out accuracy, and says why
    r0 = board[board["trial"] == "r0"].iloc[0]
    assert r0["held_out"] == ua["refine"]["holdout_after"]
    assert board[board["trial"] != "r0"]["held_out"].isna().all()
    capsys.readouterr()
    assert main(["leaderboard", "c2f"]) == 0
    out = capsys.readouterr().out
    assert "held_out" in out.splitlines()[1] and "held_out is its accuracy on those it never saw" in out
    assert main(["export", "c2f", "--trial", "r0"]) == 0
    assert "dev re-score matches" in capsys.readouterr().out
    # resuming the finished run runs nothing again: every stage is full, r0 is done
    assert main(["search", str(p), "--run", "c2f", "--workers", "1", "--no-export", "--resume"]) == 0
    study, storage = load_run("c2f", root=tmp_path / "results")
    assert len(study.get_trials()) == 5
    assert len(optuna.load_study(study_name="c2f.stage1", storage=storage).trials) == 5
    assert len(optuna.load_study(study_name="c2f.refine", storage=storage).trials) == 1


def test_example_spaces_load_and_can_scale():
    """Every example search space is valid, and none leaves a normalizing method unable to
    scale the merged task vector."""
    from pathlib import Path
    folder = Path(__file__).resolve().parents[1] / "search_spaces"
    spaces = [p for p in sorted(folder.glob("*.yaml")) if not p.name.startswith("eval_")]
    assert len(spaces) >= 6
    for p in spaces:
        s = SearchSpace.load(p).resolved(p.parent).check(str(p))
        assert s.scale_warning() is None, p.name
    demo = SearchSpace.load(folder / "demo.yaml")
    assert demo.schedule and demo.refine is not None and demo.objective.normalize == "sources"
