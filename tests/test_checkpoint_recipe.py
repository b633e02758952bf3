"""Checkpoint IO and recipe files."""

import json

import pytest
import torch
import yaml

from mergesearch.engine.checkpoint import Checkpoint, read_safetensors_header
from mergesearch.recipe import layer_index
from mergesearch.engine.writer import StreamingWriter
from mergesearch.cli import main
from mergesearch.errors import MergeSearchError
from mergesearch.recipe import Recipe, from_dict, layer_position, resolve_setting, Conditional

from conftest import load_weights


def test_sharded_write_and_lazy_read(tmp_path):
    tensors = {f"t{i}": torch.randn(100, 10 + i) for i in range(6)}
    plan = [(k, tuple(v.shape), torch.float32) for k, v in tensors.items()]
    out = tmp_path / "m"
    with StreamingWriter(out, plan, max_shard_bytes=9000) as w:
        for k, v in tensors.items():
            w.write(k, v)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    # 4000+4400 bytes share a shard; every later tensor would overflow 9000 bytes
    assert files == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in tensors.values())
    c = Checkpoint(out)
    assert c.names() == list(tensors)
    assert c.shape("t3") == (100, 13) and c.dtype("t3") == torch.float32
    assert all(torch.equal(c.get(k), v) for k, v in tensors.items())
    # safetensors' own loader accepts our files
    from safetensors.torch import load_file
    assert torch.equal(load_file(out / files[1])["t2"], tensors["t2"])


def test_writer_refuses_out_of_order_and_leaves_nothing(tmp_path):
    out = tmp_path / "m"
    with pytest.raises(RuntimeError, match="out of plan order"):
        with StreamingWriter(out, [("a", (2,), torch.float32), ("b", (2,), torch.float32)]) as w:
            w.write("b", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []


def test_incomplete_write_leaves_nothing(tmp_path):
    out = tmp_path / "m"
    with pytest.raises(RuntimeError, match="only 1 of 2"):
        with StreamingWriter(out, [("a", (2,), torch.float32), ("b", (2,), torch.float32)]) as w:
            w.write("a", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []


def test_pickle_weights_load_weights_only(tmp_path, family):
    sd = load_weights(family["ft0"])
    folder = tmp_path / "bin"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((family["ft0"] / f).read_bytes())
    torch.save(sd, folder / "pytorch_model.bin")
    c = Checkpoint(folder)
    assert set(c.names()) == set(sd) and torch.equal(c.get("model.norm.weight"), sd["model.norm.weight"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(MergeSearchError, match="cannot load pickle weights safely"):
        Checkpoint(folder)


def test_merge_from_pickle_and_sharded_inputs(tmp_path, family):
    # a .bin fine-tune and a sharded fine-tune merge like their safetensors originals
    sd1 = load_weights(family["ft1"])
    bin_dir = tmp_path / "ft1bin"
    bin_dir.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bin_dir / f).write_bytes((family["ft1"] / f).read_bytes())
    torch.save(sd1, bin_dir / "pytorch_model.bin")
    r1 = from_dict(dict(method="task_arithmetic", base=str(family["base"]), models=[
        {"path": str(family["ft0"]), "parameters": {"weight": 0.5}},
        {"path": str(family["ft1"]), "parameters": {"weight": 0.5}}]))
    r1.save(tmp_path / "a.yaml")
    assert main(["merge", str(tmp_path / "a.yaml"), "-o", str(tmp_path / "sharded"), "--shard-size", "50KB"]) == 0
    r2 = r1.model_copy(update={"models": [r1.models[0].model_copy(update={"path": str(tmp_path / "sharded")}),
                                          r1.models[1].model_copy(update={"path": str(bin_dir)})]})
    r2.save(tmp_path / "b.yaml")
    assert main(["merge", str(tmp_path / "b.yaml"), "-o", str(tmp_path / "out")]) == 0
    got = load_weights(tmp_path / "out")
    a, b, base = load_weights(tmp_path / "sharded"), sd1, load_weights(family["base"])
    for k in got:
        assert torch.allclose(got[k], base[k] + 0.5 * (a[k] - base[k]) + 0.5 * (b[k] - base[k]), atol=1e-6)


def test_header_reader_rejects_garbage(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\xff" * 16)
    with pytest.raises(MergeSearchError, match="corrupt safetensors header"):
        read_safetensors_header(f)


def test_layer_index_and_position():
    assert layer_index("model.layers.7.mlp.up_proj.weight") == 7
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_position("model.layers.3.x", 4) == 1.0
    assert layer_position("model.layers.1.x", 5) == 0.25
    assert layer_position("lm_head.weight", 4) == 0.0


def test_resolve_setting_rules():
    assert resolve_setting([0.0, 1.0], "model.layers.1.x", 0.25) == 0.25
    assert resolve_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    conds = [Conditional(filter="self_attn", value=0.3), Conditional(filter="mlp", value=[0.0, 1.0]),
             Conditional(value=0.9)]
    assert resolve_setting(conds, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.3
    assert resolve_setting(conds, "model.layers.0.mlp.up_proj.weight", 0.5) == 0.5
    assert resolve_setting(conds, "model.embed_tokens.weight", 0.0) == 0.9
    assert resolve_setting([Conditional(filter="mlp", value=1.0)], "lm_head.weight", 0.0) is None


def test_recipe_yaml_round_trip(tmp_path, family):
    data = dict(method="ties", base=str(family["base"]), seed=3, dtype="bfloat16", models=[
        {"path": str(family["ft0"]), "parameters": {"weight": [0.1, 0.5], "density": 0.4}},
        {"path": str(family["ft1"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.7}]}}],
        parameters={"density": 0.6, "lambda": 1.2})
    r = from_dict(data)
    r.save(tmp_path / "r.yaml")
    back = Recipe.load(tmp_path / "r.yaml")
    assert back == r
    g, per_model = back.resolve("model.layers.2.mlp.up_proj.weight", 0.5)
    assert g == {"lambda": 1.2, "normalize": True, "rescale": False, "int8_mask": False}
    assert per_model[0]["weight"] == pytest.approx(0.3) and per_model[0]["density"] == 0.4
    assert per_model[1] == {"weight": 0.2, "density": 0.6}  # global density is the per-model default


def test_compiled_recipe_resolves_every_tensor_once_per_filter_set(family):
    from mergesearch.engine.compiled import CompiledRecipe
    r = from_dict(dict(method="ties", base=str(family["base"]), models=[
        {"path": str(family["ft0"]), "parameters": {"weight": [0.1, 0.5], "density": 0.4}},
        {"path": str(family["ft1"]), "parameters": {"weight": [{"filter": "mlp", "value": [0.2, 0.6]},
                                                              {"filter": "self_attn", "value": 0.3}, {"value": 0.7}]}}],
        parameters={"density": [{"filter": "up_proj", "value": 0.9}, {"value": 0.6}], "lambda": 1.2}))
    names = Checkpoint(family["base"]).names()
    layers = 4
    c = CompiledRecipe(r, names, layers)
    for n in names:
        assert c[n] == r.resolve(n, layer_position(n, layers)), n
    # one resolution per (filters matched, layer position): 3 disjoint filter sets x 4 layers + embeddings etc.
    keys = {(tuple(f in n for f in ("mlp", "self_attn", "up_proj")), layer_position(n, layers)) for n in names}
    assert c.distinct == len(keys) < len(names)
    with pytest.raises(MergeSearchError, match="not a tensor of the compiled recipe"):
        c["model.layers.99.nothing"]
    bad = r.model_copy(update={"method": "slerp"})
    with pytest.raises(MergeSearchError, match="slerp merges exactly 2 models"):
        CompiledRecipe(bad, names, layers)


def test_recipe_relative_paths(tmp_path, family):
    import shutil
    shutil.copytree(family["base"], tmp_path / "zoo" / "base")
    shutil.copytree(family["ft0"], tmp_path / "zoo" / "ft0")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "r.yaml").write_text(yaml.safe_dump(dict(
        method="task_arithmetic", base="../zoo/base", models=[{"path": "../zoo/ft0", "parameters": {"weight": 1.0}}])))
    r = Recipe.load(tmp_path / "cfg" / "r.yaml")
    assert r.base == str((tmp_path / "zoo" / "base").resolve())


def test_recipe_errors_name_key_and_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("method: ties\nmodels: []\n")
    with pytest.raises(MergeSearchError, match=f"{p}: bad value for 'models'"):
        Recipe.load(p)
    p.write_text("method: ties\nbase: b\nmodels: [{path: a, parameters: {weight: 1}}]\nsede: 3\n")
    with pytest.raises(MergeSearchError, match=f"{p}: unknown key 'sede'"):
        Recipe.load(p)
    p.write_text("method: ties\nbase: b\nmodels: [{path: a, parameters: {weight: 1}}]\nparameters: {t: 0.5}\n")
    with pytest.raises(MergeSearchError, match=r"parameters.t: unknown parameter for method 'ties'"):
        Recipe.load(p)
    p.write_text("method: [unclosed\n")
    with pytest.raises(MergeSearchError, match="invalid YAML at line"):
        Recipe.load(p)


def test_methods_command_lists_parameters(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "ties: top-k magnitude pruning" in out
    assert "density (model, float, default 1.0, range [0.0, 1.0])" in out


def test_summary_names_a_value_per_tensor_by_its_count_and_range():
    per_tensor = [{"filter": f"layers.{i}.mlp", "value": 0.25 + 0.125 * i} for i in range(8)] + [{"value": 1.0}]
    r = from_dict({"method": "ties", "base": "/b", "parameters": {"lambda": 1.2},
                   "models": [{"path": "/m/a", "parameters": {"weight": per_tensor,
                                                             "density": [{"filter": "mlp", "value": 0.5},
                                                                         {"value": 0.7}]}}]})
    assert r.summary() == "ties a(weight=[9 values 0.25..1.12],density=[0.5,0.7]) lambda=1.2"
    short = from_dict({"method": "ties", "base": "/b", "models": [{"path": "/m/a", "parameters": {"weight": [0.1, 0.2]}}]})
    assert short.summary() == "ties a(weight=[0.1,0.2])"
