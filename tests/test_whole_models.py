"""Whole tiny models: `mergesearch merge` against mergekit's own merge of the same config."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mergesearch.cli import main
from mergesearch.recipe import Recipe, from_dict, to_mergekit

from conftest import load_weights


def run_mergekit(config: dict, out: Path) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(copy_tokenizer=True, lazy_unpickle=False, quiet=True))
    return load_weights(out)


def recipes(f):
    b, m0, m1, m2 = (str(f[k]) for k in ("base", "ft0", "ft1", "ft2"))
    grad = [0.2, 0.9]
    filt = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0.6, 0.2]}, {"value": 0.5}]
    return {
        "linear": dict(method="linear", base=b, models=[
            {"path": m0, "parameters": {"weight": grad}}, {"path": m1, "parameters": {"weight": filt}},
            {"path": m2, "parameters": {"weight": 0.25}}]),
        "linear_unnormalized": dict(method="linear", base=b, models=[
            {"path": m0, "parameters": {"weight": 0.5}}, {"path": m1, "parameters": {"weight": 0.7}}],
            parameters={"normalize": False}),
        "task_arithmetic": dict(method="task_arithmetic", base=b, models=[
            {"path": m0, "parameters": {"weight": grad}}, {"path": m1, "parameters": {"weight": -0.4}},
            {"path": m2, "parameters": {"weight": filt}}], parameters={"lambda": 0.9}),
        "ties": dict(method="ties", base=b, models=[
            {"path": m0, "parameters": {"weight": 0.5, "density": grad}},
            {"path": m1, "parameters": {"weight": filt, "density": 0.5}},
            {"path": m2, "parameters": {"weight": 0.3, "density": 0.35}}]),
        "breadcrumbs": dict(method="breadcrumbs", base=b, models=[
            {"path": m0, "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.05}},
            {"path": m1, "parameters": {"weight": 0.4, "density": grad}}]),
        "breadcrumbs_ties": dict(method="breadcrumbs_ties", base=b, models=[
            {"path": m0, "parameters": {"weight": 0.5}}, {"path": m1, "parameters": {"weight": 0.4}}],
            parameters={"density": 0.7, "gamma": 0.02}),
        "slerp": dict(method="slerp", base=b, models=[{"path": m0}], parameters={"t": grad}),
        "nuslerp": dict(method="nuslerp", base=b, models=[
            {"path": m0, "parameters": {"weight": 0.3}}, {"path": m1, "parameters": {"weight": 0.8}}]),
        "model_stock": dict(method="model_stock", base=b, models=[{"path": m0}, {"path": m1}, {"path": m2}]),
        "passthrough": dict(method="passthrough", base=b, models=[{"path": m1, "parameters": {"scale": 0.5}}]),
        "multislerp": {"method": "multislerp", "base": b, "models": [
            {"path": m0, "parameters": {"weight": grad}}, {"path": m1, "parameters": {"weight": filt}},
            {"path": m2, "parameters": {"weight": 0.4}}]},
        "multislerp_no_base": {"method": "multislerp", "models": [
            {"path": m0, "parameters": {"weight": 0.3}}, {"path": m1, "parameters": {"weight": 0.6}}],
            "parameters": {"normalize_weights": False, "eps": 1e-6}},
        "karcher": {"method": "karcher", "base": b, "models": [{"path": m0}, {"path": m1}],
                    "parameters": {"max_iter": 20, "tol": 1e-6}},
        "karcher_no_base": {"method": "karcher", "models": [{"path": m0}, {"path": m1}, {"path": m2}]},
        "sce": {"method": "sce", "base": b, "models": [{"path": m0}, {"path": m1}, {"path": m2}],
                "parameters": {"select_topk": [0.3, 1.0]}},
        "ram": {"method": "ram", "base": b, "models": [{"path": m0}, {"path": m1}, {"path": m2}],
                "parameters": {"epsilon": 0.01}},
        "ramplus_tl": {"method": "ramplus_tl", "base": b, "models": [{"path": m0}, {"path": m1}, {"path": m2}],
                       "parameters": {"epsilon": 0.01, "r": 0.5, "alpha": [0.1, 0.6]}},
        "nearswap": {"method": "nearswap", "base": b, "models": [{"path": m2}], "parameters": {"t": [0.002, 0.02]}},
        "arcee_fusion": {"method": "arcee_fusion", "base": b, "models": [{"path": m1}]},
    }


def magnitude_ties_at_threshold(recipe: Recipe) -> list[str]:
    """Tensors where a pruning threshold falls inside a run of equal magnitudes
    (mergekit then keeps an arbitrary member of the run)."""
    from mergesearch.engine.merge import build_inputs, open_plan
    from mergesearch.recipe import layer_position
    if recipe.spec.sparsifier not in ("magnitude", "outliers"):
        return []
    plan = open_plan(recipe)
    hits = []
    for name in plan.ref.names():
        x = build_inputs(plan, name, "cpu")
        _, per_model = recipe.resolve(name, layer_position(name, plan.num_layers))
        for i, p in enumerate(per_model):
            a = x.delta(i).abs().reshape(-1).sort().values
            n = a.numel()
            k = max(1, int(p["density"] * n))
            cuts = [n - k] if recipe.spec.sparsifier == "magnitude" else []
            if recipe.spec.sparsifier == "outliers":
                keep = int(p["density"] * n)
                n_bot = max(0, n - keep - int(p["gamma"] * n))
                cuts = [n_bot, n_bot + keep]
            for c in cuts:
                if 0 < c < n and a[c] == a[c - 1]:
                    hits.append(name)
    return hits


@pytest.mark.parametrize("case", ["linear", "linear_unnormalized", "task_arithmetic", "ties", "breadcrumbs",
                                  "breadcrumbs_ties", "slerp", "nuslerp", "model_stock", "passthrough",
                                  "multislerp", "multislerp_no_base", "karcher", "karcher_no_base", "sce", "ram",
                                  "ramplus_tl", "nearswap", "arcee_fusion"])
def test_merge_matches_mergekit(tmp_path, family, case):
    recipe = from_dict(recipes(family)[case])
    assert magnitude_ties_at_threshold(recipe) == []  # precondition: no tie-breaking differences
    recipe.save(tmp_path / "r.yaml")
    assert main(["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "ours")]) == 0
    ours = load_weights(tmp_path / "ours")
    want = run_mergekit(to_mergekit(recipe), tmp_path / "mk")
    assert set(ours) == set(want) and len(ours) == 39
    worst = max((ours[k] - want[k]).abs().max().item() for k in ours)
    assert worst <= 1e-6, worst
    # the gradient/filter parameters really vary the result across layers
    if case == "ties":
        base = load_weights(family["base"])
        d0 = (ours["model.layers.0.mlp.up_proj.weight"] != base["model.layers.0.mlp.up_proj.weight"]).float().mean()
        d3 = (ours["model.layers.3.mlp.up_proj.weight"] != base["model.layers.3.mlp.up_proj.weight"]).float().mean()
        assert d3 > d0


def test_exported_mergekit_yaml_runs_in_mergekit_yaml(tmp_path, family):
    recipe = from_dict(recipes(family)["ties"])
    recipe.save(tmp_path / "r.yaml")
    assert main(["convert", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "mk.yaml")]) == 0
    exe = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run([str(exe), str(tmp_path / "mk.yaml"), str(tmp_path / "mk_out")], check=True,
                   capture_output=True, timeout=300)
    assert main(["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "ours")]) == 0
    a, b = load_weights(tmp_path / "ours"), load_weights(tmp_path / "mk_out")
    assert set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_merge_takes_mergekit_config_directly(tmp_path, family):
    recipe = from_dict(recipes(family)["task_arithmetic"])
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(to_mergekit(recipe)))
    recipe.save(tmp_path / "r.yaml")
    assert main(["merge", "--mergekit", str(tmp_path / "mk.yml"), "-o", str(tmp_path / "a")]) == 0
    assert main(["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "b")]) == 0
    a, b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mergekit_config_with_parameters_the_method_ignores(tmp_path, family, capsys, caplog):
    """A published-style task_arithmetic config that carries density (and a misspelled
    global) runs as mergekit runs it: same tensors as mergekit-yaml, one warning line;
    --strict refuses it in one line."""
    b, m0, m1 = (str(family[k]) for k in ("base", "ft0", "ft1"))
    config = {"merge_method": "task_arithmetic", "base_model": b, "dtype": "float32",
              "parameters": {"lambda": 0.8, "denisty": 0.5},
              "models": [{"model": m0, "parameters": {"weight": 0.6, "density": 0.5}},
                         {"model": m1, "parameters": {"weight": 0.3, "density": 0.7}}]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
    exe = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run([str(exe), str(tmp_path / "mk.yml"), str(tmp_path / "mk_out")], check=True,
                   capture_output=True, timeout=300)
    capsys.readouterr()
    assert main(["merge", "--mergekit", str(tmp_path / "mk.yml"), "-o", str(tmp_path / "ours")]) == 0
    err = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(err) == 1 and "\n" not in err[0] and "parameters.denisty, models[0].parameters.density, models[1].parameters.density" in err[0]
    a, k = load_weights(tmp_path / "ours"), load_weights(tmp_path / "mk_out")
    assert set(a) == set(k)
    assert max((a[n] - k[n]).abs().max().item() for n in a) <= 1e-6
    assert main(["merge", "--mergekit", str(tmp_path / "mk.yml"), "-o", str(tmp_path / "strict"), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parameters.denisty: not a parameter of 'task_arithmetic'" in err[0]
    assert not (tmp_path / "strict").exists()


def test_output_loads_in_transformers_sharded_bf16(tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    recipe = from_dict(recipes(family)["ties"])
    recipe.save(tmp_path / "r.yaml")
    out = tmp_path / "out"
    assert main(["merge", str(tmp_path / "r.yaml"), "-o", str(out), "--dtype", "bfloat16",
                 "--shard-size", "100KB"]) == 0
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert (out / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ours = load_weights(out)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], ours[k]) for k in ours)
    ids = tok("abc", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, 3, 128)


def test_mergekit_import_export_round_trip(family):
    from mergesearch.recipe import from_mergekit
    for case, data in recipes(family).items():
        r = from_dict(data)
        back = from_mergekit(to_mergekit(r))
        assert back.method == r.method and back.parameters == r.parameters
        if r.spec.uses_base != "no":  # the base travels as base_model (karcher: still one of the points)
            assert back.base == r.base, case
        assert [m.path for m in back.models] == [m.path for m in r.models]
        assert [m.parameters for m in back.models] == [m.parameters for m in r.models]


@pytest.mark.parametrize("method,params", [("karcher", {}), ("nearswap", {"t": 0.01}), ("arcee_fusion", {}),
                                           ("multislerp", {"weight": 0.5}), ("ram", {"epsilon": 0.01})])
def test_mergekit_configs_listing_the_base(tmp_path, family, method, params):
    """Published configs often list the base among the models as well as in base_model:
    mergekit then takes it as the base input once (karcher: as one of the averaged
    points, where it is listed), and so does the import (karcher averages it last, the
    same points in another order: within float rounding)."""
    b, m0, m1 = (str(family[k]) for k in ("base", "ft0", "ft1"))
    two = method in ("nearswap", "arcee_fusion")
    per_model = {"weight": params["weight"]} if "weight" in params else {}
    glob = {k: v for k, v in params.items() if k != "weight"}
    config = {"merge_method": method, "base_model": b, "dtype": "float32",
              "models": [{"model": b}] + [{"model": m, "parameters": dict(per_model)} for m in ([m0] if two else [m0, m1])]}
    if glob:
        config["parameters"] = glob
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
    from mergesearch.recipe import load_mergekit
    recipe = load_mergekit(tmp_path / "mk.yml")
    assert recipe.base == b and [m.path for m in recipe.models] == ([m0] if two else [m0, m1])
    assert main(["merge", "--mergekit", str(tmp_path / "mk.yml"), "-o", str(tmp_path / "ours")]) == 0
    ours, want = load_weights(tmp_path / "ours"), run_mergekit(config, tmp_path / "mk")
    base = load_weights(b)
    assert set(ours) == set(want)
    assert max((ours[k] - want[k]).abs().max().item() for k in ours) <= 1e-6
    assert max((ours[k] - base[k]).abs().max().item() for k in ours) > 1e-4  # not just the base
    # and it exports to a config mergekit runs to the same tensors (base_model, base not listed)
    exported = to_mergekit(recipe)
    assert exported["base_model"] == b and b not in [m["model"] for m in exported["models"]]
    again = run_mergekit(exported, tmp_path / "mk2")
    assert max((ours[k] - again[k]).abs().max().item() for k in ours) <= 1e-6
