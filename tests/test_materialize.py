"""In-memory candidates are bit-equal to the streamed export of the same recipe."""

import pytest
import torch

from mergesearch.cli import main
from mergesearch.materialize import Materializer
from mergesearch.recipe import from_dict

from conftest import load_weights
from test_whole_models import recipes


@pytest.fixture(scope="module")
def mat(family):
    return Materializer(family["base"], [family["ft0"], family["ft1"], family["ft2"]])


def random_recipes(f):
    b, m0, m1, m2 = (str(f[k]) for k in ("base", "ft0", "ft1", "ft2"))
    out = {}
    for method in ("dare_ties", "dare_linear", "della", "della_linear"):
        out[method] = dict(method=method, base=b, seed=7, models=[
            {"path": m0, "parameters": {"weight": 0.5, "density": [0.3, 0.7]}},
            {"path": m2, "parameters": {"weight": 0.4, "density": 0.5}}])
    return out




@pytest.mark.parametrize("case", ["linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "slerp",
                                  "nuslerp", "model_stock", "passthrough", "dare_ties", "dare_linear", "della",
                                  "della_linear"])
def test_in_memory_bit_equal_to_export(tmp_path, family, mat, case):
    data = {**recipes(family), **random_recipes(family)}[case]
    recipe = from_dict({**data, "dtype": "float32"})
    recipe.save(tmp_path / "r.yaml")
    assert main(["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")]) == 0
    exported = load_weights(tmp_path / "out")
    in_memory = mat.state_dict(recipe)
    assert set(exported) == set(in_memory)
    for k in exported:
        assert torch.equal(exported[k], in_memory[k]), k


def test_write_into_module_in_place(tmp_path, family, mat):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(family["base"])
    param = model.model.layers[2].mlp.up_proj.weight
    ptr = param.data_ptr()
    recipe = from_dict(recipes(family)["ties"])
    mat.write_into(model, recipe)
    assert param.data_ptr() == ptr  # same storage: written in place
    recipe.save(tmp_path / "r.yaml")
    assert main(["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")]) == 0
    exported = load_weights(tmp_path / "out")
    sd = model.state_dict()
    assert all(torch.equal(sd[k], exported[k]) for k in exported)
    # a second candidate replaces the first
    recipe2 = from_dict(recipes(family)["task_arithmetic"])
    mat.write_into(model, recipe2)
    assert not torch.equal(model.state_dict()["model.layers.2.mlp.up_proj.weight"],
                           exported["model.layers.2.mlp.up_proj.weight"])


def test_precomputed_magnitude_ranks(family, mat):
    name = "model.layers.1.self_attn.q_proj.weight"
    assert mat.ranks is not None and len(mat.ranks[name]) == 3
    d = (mat.tensors[name][1].float() - mat.base[name].float()).abs().reshape(-1)
    r = mat.ranks[name][1].reshape(-1).long()
    assert r.dtype == torch.long and sorted(r.tolist()) == list(range(d.numel()))
    assert torch.equal(d[r.argsort()], d.sort().values)  # rank order is the magnitude order
    assert mat.setup_seconds > 0 and mat.resident_bytes > 0


def test_materializer_keeps_only_what_methods_need(family):
    m = Materializer(family["base"], [family["ft0"], family["ft1"]], methods=["task_arithmetic"])
    assert m.ranks is None and len(m.tensors) == len(m.float_names)
    m2 = Materializer(family["base"], [family["ft0"], family["ft1"]], methods=["ties"])
    # base + 2 float32 models, then one int32 rank per element of each model on top
    assert m2.ranks is not None and m2.resident_bytes == m.resident_bytes // 3 * 5
    with pytest.raises(Exception, match="not among the materializer's methods"):
        m.state_dict(from_dict(dict(method="ties", base=str(family["base"]), models=[
            {"path": str(family["ft0"]), "parameters": {"weight": 1.0, "density": 0.5}}])))


def test_unknown_model_in_recipe(family, mat, other_family):
    from mergesearch.errors import MergeSearchError
    recipe = from_dict(dict(method="linear", base=str(family["base"]),
                            models=[{"path": str(other_family["ft0"]), "parameters": {"weight": 1.0}}]))
    with pytest.raises(MergeSearchError, match="not loaded"):
        mat.state_dict(recipe)


def test_bf16_sources_stay_bf16_and_bit_equal(tmp_path):
    from mergesearch.synthetic import make_family
    fam = make_family(tmp_path / "bf16", n_models=2, dtype="bfloat16", noise=0.01, init_std=0.1, seed=4)
    m = Materializer(fam["base"], [fam["ft0"], fam["ft1"]], methods=["linear", "ties"])
    assert all(t.dtype == torch.bfloat16 for ts in m.tensors.values() for t in ts)  # resident as stored
    for method, params in [("linear", {"weight": 0.5}), ("ties", {"weight": 0.5, "density": 0.4})]:
        recipe = from_dict(dict(method=method, base=str(fam["base"]), models=[
            {"path": str(fam["ft0"]), "parameters": params}, {"path": str(fam["ft1"]), "parameters": params}]))
        recipe.save(tmp_path / f"{method}.yaml")
        assert main(["merge", str(tmp_path / f"{method}.yaml"), "-o", str(tmp_path / method)]) == 0
        exported = load_weights(tmp_path / method)
        mem = m.state_dict(recipe)
        assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], mem[k]) for k in exported)
