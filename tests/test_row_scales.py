"""Per-row weights (a recipe's ``row_scales``, written by ``refine.rows``): the engine's
merge at a row is the scalar merge with that row's weights, in memory and in the streamed
export alike; bad files get one-line errors; the refinement learns them; and a search
stores, exports and re-scores exactly the weights it scored."""

import json
from dataclasses import asdict

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergesearch.cli import main
from mergesearch.errors import MergeSearchError
from mergesearch.evaluate import EvalConfig, build_evaluator
from mergesearch.engine.materialize import Materializer
from mergesearch.engine.models import load_model
from mergesearch.recipe import Recipe, from_dict, to_mergekit
from mergesearch.search.refine import build_terms, merged_params, refine
from mergesearch.search.variables import tensor_groups

from test_zoo_eval import zoo  # noqa: F401  (session fixture)

TASKS = ["reverse", "shift", "max", "add"]
UP = "model.layers.1.mlp.up_proj.weight"
EMBED = "model.embed_tokens.weight"


def recipe(zoo, method, weights=(1.0, 0.8, 1.2, 0.6), **extra):
    per = {"density": 0.5} if method != "task_arithmetic" else {}
    return from_dict(dict(method=method, base=str(zoo / "base"), parameters={"lambda": 1.3, **extra}, seed=2,
                          models=[{"path": str(zoo / f"ft_{t}"), "parameters": {"weight": w, **per}}
                                  for t, w in zip(TASKS, weights)]))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_a_row_is_the_scalar_merge_with_that_row_s_weights_and_export_equals_memory(zoo, tmp_path, method):
    r = recipe(zoo, method)
    mat = Materializer(zoo / "base", [m.path for m in r.models], methods=[method])
    plain = mat.state_dict(r)
    g = torch.Generator().manual_seed(0)
    rows = {0: {UP: 2 * torch.rand(plain[UP].shape[0], generator=g), EMBED: 2 * torch.rand(plain[EMBED].shape[0],
                                                                                         generator=g)},
            2: {UP: 2 * torch.rand(plain[UP].shape[0], generator=g)}}
    rows[0][UP][3] = 0.0  # a row where model 0 takes no part
    scaled = mat.state_dict(r.with_rows(rows))
    # tensors without row scales are the plain merge, bit for bit
    assert all(torch.equal(scaled[n], plain[n]) for n in plain if n not in (UP, EMBED))
    for k in (0, 3, 7, plain[UP].shape[0] - 1):
        w = [m.parameters["weight"] for m in r.models]
        w[0] *= float(rows[0][UP][k])
        w[2] *= float(rows[2][UP][k])
        one = mat.state_dict(recipe(zoo, method, weights=w))
        # selections (TIES' top-k, DARE's draws) are per tensor and weight-free, so row k of
        # the row-weighted merge is row k of the merge with row k's weights
        torch.testing.assert_close(scaled[UP][k], one[UP][k], rtol=1e-6, atol=1e-7)
    assert not torch.equal(scaled[UP], plain[UP]) and not torch.equal(scaled[EMBED], plain[EMBED])
    # the same from files, by the streamed export of `mergesearch merge`
    for i, t in rows.items():
        save_file(t, str(tmp_path / f"m{i}.safetensors"))
    data = r.to_dict()
    for i in rows:
        data["models"][i]["row_scales"] = f"m{i}.safetensors"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    loaded = Recipe.load(tmp_path / "r.yaml")
    assert loaded.models[0].row_scales == str(tmp_path / "m0.safetensors") and "row scales" in loaded.summary()
    assert main(["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")]) == 0
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(exported[n], scaled[n].to(exported[n].dtype)) for n in scaled if n in exported)


def test_row_scale_errors_name_the_file(zoo, tmp_path, capsys):
    r = recipe(zoo, "ties")
    mat = Materializer(zoo / "base", [m.path for m in r.models], methods=["ties"])
    data = r.to_dict()
    data["models"][1]["row_scales"] = "missing.safetensors"
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(data))
    assert main(["merge", str(tmp_path / "a.yaml"), "-o", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {tmp_path / 'missing.safetensors'}: models[1].row_scales: no such file"
    assert not (tmp_path / "out").exists()
    save_file({UP: torch.ones(5)}, str(tmp_path / "short.safetensors"))
    data["models"][1]["row_scales"] = "short.safetensors"
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(MergeSearchError, match=r"short\.safetensors: model\.layers\.1\.mlp\.up_proj\.weight: 5 row "
                                               r"scales for a tensor of shape \d+x\d+$"):
        mat.state_dict(Recipe.load(tmp_path / "b.yaml"))
    (tmp_path / "junk.safetensors").write_text("not a safetensors file")
    data["models"][1]["row_scales"] = "junk.safetensors"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(MergeSearchError, match=r"junk\.safetensors: models\[1\]\.row_scales: not a readable "
                                               r"safetensors file"):
        mat.state_dict(Recipe.load(tmp_path / "c.yaml"))
    with pytest.raises(MergeSearchError, match="^recipe: row_scales: method 'linear' is not in the task-vector family"):
        from_dict(dict(method="linear", models=[{"path": str(zoo / "ft_add"), "parameters": {"weight": 1.0},
                                                 "row_scales": "x.safetensors"}]))
    with pytest.raises(MergeSearchError, match=r"^per-row weights \(row_scales\) has no mergekit equivalent"):
        to_mergekit(Recipe.load(tmp_path / "b.yaml"))


def test_refine_rows_learns_per_row_weights_that_the_engine_reproduces(zoo):
    r = recipe(zoo, "ties", **{"lambda": 0.5})  # a start 8 steps beat on every zoo build (1.3: not on AVX2's)
    mat = Materializer(zoo / "base", [m.path for m in r.models], methods=["ties"])
    model, tok = load_model(zoo / "base")
    ev = build_evaluator(EvalConfig(tasks=TASKS, task_dir=str(zoo), split="dev", limit=40))
    groups = [asdict(g) for g in tensor_groups(list(mat.names))]
    cfg = dict(top=1, level="tensor", steps=8, lr=0.05, batch_size=8, loss="choice", holdout=0.25, eval_every=4,
               patience=3, average=0.0, rows=True, row_lr=0.05)
    out, stats = refine(mat, model, tok, ev, r, cfg, groups)
    assert out.has_row_scales and stats["best_step"] in (4, 8)  # the start (all ones) was beaten
    rows = out.row_scales()
    matrices = [n for n, p in model.named_parameters() if p.dim() == 2 and n in mat.names]
    assert all(set(rw) == set(matrices) for rw in rows)
    assert all(rw[n].shape == (dict(model.named_parameters())[n].shape[0],) for rw in rows for n in matrices)
    assert all(float((rw[n] - 1).abs().max()) > 1e-3 for rw in rows for n in matrices if "layers" in n)
    # the differentiable merge of those coefficients is what the engine materializes
    names = list(mat.names)
    terms, gw, gl = build_terms(mat, r, groups, names, {n: torch.float32 for n in names}, "cpu")
    plain = from_dict(out.to_dict())  # the per-tensor part alone: weights and lambda per tensor
    assert not plain.has_row_scales
    engine = mat.state_dict(out)
    ones_c, ones_s = torch.ones(len(groups), 4), torch.ones(len(groups))
    terms2, _, _ = build_terms(mat, plain, groups, names, {n: torch.float32 for n in names}, "cpu")
    ours = merged_params(terms2, ones_c, ones_s, {n: torch.stack([rw[n] for rw in rows]) for n in matrices})
    for n in names:
        torch.testing.assert_close(ours[n], engine[n], rtol=1e-5, atol=1e-6)
    with pytest.raises(MergeSearchError, match="already has row scales"):
        refine(mat, model, tok, ev, out, cfg, groups)


def test_search_with_row_refinement_stores_exports_and_rescores_the_same_weights(tmp_path, zoo, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = {
        "base": str(zoo / "base"), "models": [str(zoo / f"ft_{t}") for t in TASKS],
        "evaluator": {"tasks": TASKS, "task_dir": str(zoo), "limit": 40},
        "methods": ["ties"], "scale": True, "granularity": {"level": "model"},
        "parameters": {"weight": {"low": 0.2, "high": 1.5}, "density": {"low": 0.2, "high": 1.0}},
        "refine": {"steps": 8, "eval_every": 4, "batch_size": 8, "level": "tensor", "rows": True},
        "sampler": {"name": "cmaes", "x0": "best_baseline"}, "budget": {"n_trials": 10}, "seed": 1,
    }
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(data))
    assert main(["search", str(p), "--run", "rows", "--workers", "1", "--no-export"]) == 0
    import optuna

    from mergesearch.runs.store import load_run
    study, storage = load_run("rows", root=tmp_path / "results")
    (t,) = optuna.load_study(study_name="rows.refine", storage=storage).trials
    stored = t.user_attrs["recipe"]
    files = [m.get("row_scales") for m in stored["models"]]
    assert files == [str(tmp_path / "results" / "rows" / "row_scales" / f"r0-m{i}.safetensors") for i in range(4)]
    assert not list((tmp_path / "results" / "rows" / "row_scales").glob(".*"))  # no temp file left
    capsys.readouterr()
    assert main(["export", "rows", "--trial", "r0"]) == 0
    assert "dev re-score matches" in capsys.readouterr().out
    out = tmp_path / "results" / "rows"
    saved = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert [m["row_scales"] for m in saved["models"]] == [f"best_row_scales/m{i}.safetensors" for i in range(4)]
    assert not (out / "best_mergekit.yaml").exists()
    assert "needs per-row weights (row_scales" in (out / "model" / "README.md").read_text()
    scores = json.loads((out / "scores.json").read_text())
    assert scores["dev"]["verified"] is True
    # the exported recipe, merged again from its own folder, gives the exported weights
    assert main(["merge", str(out / "best_recipe.yaml"), "-o", str(tmp_path / "again")]) == 0
    a, b = load_file(str(out / "model" / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
