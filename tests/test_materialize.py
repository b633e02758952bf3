"""In-memory candidates are bit-equal to the streamed export of the same recipe."""

import pytest
import torch

from mergesearch.errors import MergeSearchError

from mergesearch.cli import main
from mergesearch.engine.materialize import Materializer
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


def _mapped_ranges(path_part: str) -> list[tuple[int, int]]:
    out = []
    for line in open("/proc/self/maps"):
        if path_part in line:
            lo, hi = line.split()[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def test_host_inputs_are_views_of_the_mapped_files(family):
    """Without a budget on the CPU every input stays on the host: zero-copy views into
    the memory-mapped safetensors files (shared through the page cache), nothing per
    element precomputed."""
    m = Materializer(family["base"], [family["ft0"], family["ft1"]], methods=["ties", "task_arithmetic"])
    assert m.placement.resident == [] and m.placement.host == ["base", "m0", "m1"]
    assert m.resident_bytes == 0 and m.stager is None
    name = "model.layers.1.self_attn.q_proj.weight"
    ranges = _mapped_ranges(str(family["ft1"].resolve() / "model.safetensors"))
    ptr = m.slots["m1"][name].data_ptr()
    assert ranges and any(lo <= ptr < hi for lo, hi in ranges)
    floats = sum(t.numel() * t.element_size() for t in m.slots["m1"].values())
    assert m.host_bytes == 3 * floats
    assert m.setup_seconds > 0


def test_budget_decides_what_is_resident(family):
    from mergesearch.engine.plan import make_plan
    models = [str(family[k]) for k in ("ft0", "ft1", "ft2")]
    bw = {"device": 1.0, "link": 1.0, "source": "test"}
    free = make_plan(str(family["base"]), models, ["ties"], budget=None, bandwidth=bw)
    one = free.inputs[0].nbytes  # every input of this family has the same size
    fixed = free.eval_bytes + free.eval_reserve + free.scratch
    for k in range(5):  # room for k inputs beside the evaluation model and the scratch
        p = make_plan(str(family["base"]), models, ["ties"], budget=fixed + k * one, bandwidth=bw)
        assert p.resident == ["base", "m0", "m1", "m2"][:k] and p.device_bytes <= fixed + k * one
        m = Materializer(family["base"], [family[k2] for k2 in ("ft0", "ft1", "ft2")], methods=["ties"],
                         placement=p)
        assert m.resident_bytes == k * one and m.host_bytes == (4 - k) * one
        # resident inputs are private copies on the device, not views of the files
        if k:
            ptr = m.slots["base"]["model.norm.weight"].data_ptr()
            assert not any(lo <= ptr < hi for lo, hi in _mapped_ranges(str(family["base"].resolve())))


def test_materializer_without_a_base_refuses_recipes_with_one(family):
    with pytest.raises(Exception, match="without a base cannot serve ties"):
        Materializer(None, [family["ft0"], family["ft1"]], methods=["linear", "ties"])
    soup = Materializer(None, [family["ft0"], family["ft1"]], methods=["linear"])
    with pytest.raises(Exception, match="holds no base"):
        soup.state_dict(from_dict(dict(method="task_arithmetic", base=str(family["base"]), models=[
            {"path": str(family["ft0"]), "parameters": {"weight": 1.0}}])))


def test_unknown_model_in_recipe(family, mat, other_family):
    from mergesearch.errors import MergeSearchError
    recipe = from_dict(dict(method="linear", base=str(family["base"]),
                            models=[{"path": str(other_family["ft0"]), "parameters": {"weight": 1.0}}]))
    with pytest.raises(MergeSearchError, match="not loaded"):
        mat.state_dict(recipe)


def test_bf16_sources_stay_bf16_and_bit_equal(tmp_path):
    from mergesearch.zoo.synthetic import make_family
    fam = make_family(tmp_path / "bf16", n_models=2, dtype="bfloat16", noise=0.01, init_std=0.1, seed=4)
    m = Materializer(fam["base"], [fam["ft0"], fam["ft1"]], methods=["linear", "ties"])
    assert all(t.dtype == torch.bfloat16 for s in m.slots.values() for t in s.values())  # kept as stored
    for method, params in [("linear", {"weight": 0.5}), ("ties", {"weight": 0.5, "density": 0.4})]:
        recipe = from_dict(dict(method=method, base=str(fam["base"]), models=[
            {"path": str(fam["ft0"]), "parameters": params}, {"path": str(fam["ft1"]), "parameters": params}]))
        recipe.save(tmp_path / f"{method}.yaml")
        assert main(["merge", str(tmp_path / f"{method}.yaml"), "-o", str(tmp_path / method)]) == 0
        exported = load_weights(tmp_path / method)
        mem = m.state_dict(recipe)
        assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], mem[k]) for k in exported)


PLACEMENTS = {  # name -> (inputs resident on the device, stream mode)
    "all-host-view": (0, "view"), "all-host-copy": (0, "copy"), "base+1-resident-copy": (2, "copy"),
    "base+2-resident-view": (3, "view"), "all-resident": (4, "copy")}


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    from mergesearch.zoo.synthetic import make_family
    return make_family(tmp_path_factory.mktemp("bf16fam"), n_models=3, dtype="bfloat16", noise=0.01, init_std=0.1,
                       seed=5)


@pytest.fixture(scope="module")
def bf16_exports(tmp_path_factory, bf16_family):
    """method -> (recipe, exported weights), each written by `mergesearch merge`."""
    out = {}
    root = tmp_path_factory.mktemp("bf16out")
    f = bf16_family
    for method, params in [("task_arithmetic", {"weight": 0.6}), ("ties", {"weight": 0.5, "density": 0.3}),
                           ("dare_ties", {"weight": 0.5, "density": 0.4}),
                           ("breadcrumbs_ties", {"weight": 0.7, "density": 0.5}),
                           ("della", {"weight": 0.5, "density": 0.5}), ("linear", {"weight": 0.3})]:
        recipe = from_dict(dict(method=method, base=str(f["base"]), seed=11, models=[
            {"path": str(f[k]), "parameters": params} for k in ("ft0", "ft1", "ft2")]))
        recipe.save(root / f"{method}.yaml")
        assert main(["merge", str(root / f"{method}.yaml"), "-o", str(root / method)]) == 0
        out[method] = (recipe, load_weights(root / method))
    return out


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_every_placement_is_bit_equal_to_the_export(bf16_family, bf16_exports, placement):
    from mergesearch.engine.plan import make_plan
    f = bf16_family
    models = [str(f[k]) for k in ("ft0", "ft1", "ft2")]
    k, stream = PLACEMENTS[placement]
    bw = {"device": 1.0, "link": 1.0, "source": "test"}
    methods = list(bf16_exports)
    free = make_plan(str(f["base"]), models, methods, bandwidth=bw, stream=stream)
    p = make_plan(str(f["base"]), models, methods, budget=free.budget_for(k), bandwidth=bw, stream=stream)
    if k:  # a byte less and the last of them goes to the host
        assert make_plan(str(f["base"]), models, methods, budget=free.budget_for(k) - 1, bandwidth=bw,
                         stream=stream).resident == p.resident[:-1]
    else:  # a byte less and the evaluation model and scratch no longer fit
        with pytest.raises(MergeSearchError, match=r"^device memory: the evaluation model .* need .* more than"):
            make_plan(str(f["base"]), models, methods, budget=free.budget_for(0) - 1, bandwidth=bw, stream=stream)
    assert len(p.resident) == k and p.stream == stream
    m = Materializer(f["base"], models, methods=methods, placement=p)
    assert (m.stager is not None) == (stream == "copy" and k < 4)
    one = free.inputs[0].nbytes
    for method, (recipe, exported) in bf16_exports.items():
        mem = m.state_dict(recipe)
        assert set(mem) == set(exported)
        for name in exported:
            assert mem[name].dtype == torch.bfloat16 and torch.equal(mem[name], exported[name]), (method, name)
        reads = 3 if recipe.spec.uses_base == "no" else 4
        moved = sum(1 for key in ["base", "m0", "m1", "m2"][k:] if not (key == "base" and reads == 3))
        assert m.last_moved == (moved * one if m.stager is not None else 0), method
    m.close()


@pytest.mark.parametrize("sources,recipe_dtype", [("float32", "bfloat16"), ("bfloat16", None),
                                                  ("float32", "float16")])
def test_scored_weights_equal_the_exported_checkpoint(tmp_path, sources, recipe_dtype):
    """The evaluation model is loaded in the recipe's dtype (else the sources'), and the
    weights written into it are the exported tensors, bit for bit."""
    from mergesearch.engine.models import load_model
    from mergesearch.zoo.synthetic import make_family
    fam = make_family(tmp_path / "fam", n_models=2, dtype=sources, noise=0.01, init_std=0.1, seed=6)
    data = dict(method="ties", base=str(fam["base"]), models=[
        {"path": str(fam["ft0"]), "parameters": {"weight": 0.7, "density": 0.4}},
        {"path": str(fam["ft1"]), "parameters": {"weight": 0.5, "density": 0.6}}])
    if recipe_dtype:
        data["dtype"] = recipe_dtype
    recipe = from_dict(data)
    recipe.save(tmp_path / "r.yaml")
    assert main(["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")]) == 0
    exported = load_weights(tmp_path / "out")
    want = getattr(torch, recipe_dtype or sources)
    model, _ = load_model(fam["base"], dtype=recipe_dtype)
    assert all(p.dtype == want for p in model.parameters())
    Materializer(fam["base"], [fam["ft0"], fam["ft1"]], methods=["ties"]).write_into(model, recipe)
    scored = model.state_dict()
    assert set(exported) <= set(scored)
    for name, t in exported.items():
        assert t.dtype == want and torch.equal(scored[name], t), name


def test_write_into_refuses_a_model_in_another_dtype(family):
    from mergesearch.errors import MergeSearchError
    from mergesearch.engine.models import load_model
    recipe = from_dict({**recipes(family)["ties"], "dtype": "bfloat16"})
    model, _ = load_model(family["base"])  # float32, as stored
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeSearchError, match="export writes torch.bfloat16"):
        Materializer(family["base"], [family["ft0"], family["ft1"], family["ft2"]]).write_into(model, recipe)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any write


@pytest.mark.parametrize("native_kernels", ["1", "0"])
def test_large_tensors_take_the_fast_paths_in_every_placement(tmp_path, native_kernels, monkeypatch):
    """Tensors of 2**20+ elements run the native kernels (or, with them off, the compiled
    kernel) and the radix select; mapped, staged and resident inputs all give the
    exported bytes."""
    monkeypatch.setenv("MERGESEARCH_NATIVE", native_kernels)
    from mergesearch.methods.selection import RADIX_MIN_NUMEL
    from mergesearch.engine.plan import make_plan
    from mergesearch.zoo.synthetic import make_family
    fam = make_family(tmp_path / "fam", n_models=2, hidden=256, layers=1, intermediate=256, vocab=4096,
                      dtype="bfloat16", noise=0.01, init_std=0.1, seed=8)
    models = [str(fam["ft0"]), str(fam["ft1"])]
    bw = {"device": 1.0, "link": 1.0, "source": "test"}
    recipe = from_dict(dict(method="ties", base=str(fam["base"]), models=[
        {"path": m, "parameters": {"weight": 0.6, "density": 0.3}} for m in models]))
    recipe.save(tmp_path / "r.yaml")
    assert main(["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")]) == 0
    exported = load_weights(tmp_path / "out")
    assert exported["model.embed_tokens.weight"].numel() >= RADIX_MIN_NUMEL
    for k, stream in [(0, "view"), (0, "copy"), (1, "copy"), (3, "view")]:
        free = make_plan(str(fam["base"]), models, ["ties"], bandwidth=bw, stream=stream)
        p = make_plan(str(fam["base"]), models, ["ties"], budget=free.budget_for(k), bandwidth=bw, stream=stream)
        mem = Materializer(fam["base"], models, methods=["ties"], placement=p).state_dict(recipe)
        assert all(torch.equal(mem[n], exported[n]) for n in exported), (k, stream)
