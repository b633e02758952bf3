"""A worker over several GPUs (resources.gpus_per_worker >= 2): a 70B family placed on
2 x 80 GB and 4 x 80 GB from the headers of sparse shards, the 1 x 80 GB refusal, a small
family wholly resident, and the run-time path on the CPU (every "GPU" the CPU),
bit-equal to the single-device Materializer."""

import json

import pytest
import torch
import yaml

from mergesearch.cli import main
from mergesearch.engine.device_map import describe_modules, tensor_gpus
from mergesearch.engine.materialize import Materializer
from mergesearch.engine.multi_gpu import make_multi_plan
from mergesearch.engine.plan import GB, make_plan, parse_size, scratch_bytes, slot_bytes
from mergesearch.errors import MergeSearchError
from mergesearch.recipe import from_dict
from mergesearch.zoo.sparse_family import sparse_family

from test_plan import space_file
from test_whole_models import recipes

BW = {"device": 2.0e12, "link": 2.5e10, "source": "test"}
METHODS = ["linear", "task_arithmetic", "ties"]  # what a ties space plans for
# Llama 3 70B in bfloat16: per decoder layer q, k, v, o, gate, up, down and two norms
LAYER = 2 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192)
EMBED = 2 * 128256 * 8192


@pytest.fixture(scope="module")
def llama70b(tmp_path_factory):
    """Base + 4 fine-tunes, Llama-3-70B-shaped, in sparse shards (headers only)."""
    out = tmp_path_factory.mktemp("l70")
    fam = sparse_family(out, n_models=4)
    return fam


def plan70(fam, gpus, reserve=None, **kw):
    return make_multi_plan(str(fam["base"]), [str(fam[f"ft{i}"]) for i in range(4)], METHODS, gpus=gpus,
                           budget=parse_size("80GB"), eval_dtype="bfloat16",
                           eval_reserve=parse_size(reserve) if reserve else None, bandwidth=BW, **kw)


def test_the_sparse_family_is_llama_70b_in_shards_on_no_disk(llama70b):
    from mergesearch.engine.checkpoint import Checkpoint
    c = Checkpoint(llama70b["base"])
    assert sum(c.numel(n) for n in c.names()) == 70_553_706_496
    assert len(list(llama70b["base"].glob("model-*.safetensors"))) == 30
    on_disk = sum(f.stat().st_blocks * 512 for f in llama70b["base"].parent.rglob("*.safetensors"))
    assert on_disk < 5 * 10**6  # 705 GB of tensors, holes all of it


def test_70b_on_two_80gb_gpus(llama70b):
    p = plan70(llama70b, 2, reserve="8GB")
    g0, g1 = p.gpus
    # accelerate's balanced device_map: whole decoder layers, 40 a GPU
    assert g0.layers == list(range(40)) and g1.layers == list(range(40, 80))
    assert g0.modules[0] == "model.embed_tokens" and g1.modules[-3:] == ["model.norm", "model.rotary_emb", "lm_head"]
    assert p.device_map["model.layers.39"] == 0 and p.device_map["model.layers.40"] == 1
    assert g0.eval_bytes == EMBED + 40 * LAYER and g1.eval_bytes == EMBED + 40 * LAYER + 2 * 8192
    assert p.eval_bytes == 2 * 70_553_706_496 and g0.eval_reserve == g1.eval_reserve == 4 * 10**9
    for g in p.gpus:
        assert g.device_bytes <= 80 * GB
        # the MLP matrices and the embedding / lm_head cannot be staged beside the shard:
        # merged on the host in blocks; the attention matrices are merged on the GPU
        assert g.cut == 8192 * 28672 and len(g.host_merged) == 1 + 3 * 40
        assert g.largest == (f"model.layers.{g.layers[0]}.self_attn.q_proj.weight", 8192 * 8192)
        assert g.scratch == scratch_bytes(8192 * 8192, METHODS, 4, 2, "cuda", (8192, 8192))
        assert g.staging == 2 * 5 * slot_bytes(2 * 8192 * 8192)
        assert g.resident == [] and g.host == ["base", "m0", "m1", "m2", "m3"]  # every input streamed
    assert "model.embed_tokens.weight" in g0.host_merged and "lm_head.weight" in g1.host_merged
    assert p.budget_for(0) == max(g.device_bytes for g in p.gpus) and p.budget_for(1) > 80 * GB
    assert p.tensor_device("lm_head.weight") == "cuda:1" and p.merge_device("lm_head.weight") == "cpu"
    assert p.merge_device("model.layers.0.self_attn.k_proj.weight") == "cuda:0"
    assert p.host_scratch == EMBED


def test_70b_on_four_80gb_gpus(llama70b):
    p = plan70(llama70b, 4)  # the default reserve, 20% of the model, fits on 4
    assert [g.layers for g in p.gpus] == [list(range(0, 19)), list(range(19, 40)), list(range(40, 61)),
                                          list(range(61, 80))]
    assert describe_modules(p.gpus[0].modules) == "model.embed_tokens, layers 0-18 (19)"
    assert p.eval_reserve == int(0.2 * p.eval_bytes)
    for g in p.gpus:
        assert g.device_bytes <= 80 * GB and g.host_merged == [] and g.resident == []
    # the embedding and lm_head are merged on their GPUs, staged whole
    assert p.gpus[0].largest == ("model.embed_tokens.weight", 128256 * 8192)
    assert p.gpus[3].largest == ("lm_head.weight", 128256 * 8192)
    assert p.gpus[0].staging == 2 * 5 * slot_bytes(EMBED)
    assert p.moved_per_candidate == p.read_per_candidate == 5 * 2 * 70_553_706_496


def test_70b_refusals(llama70b):
    fts = [str(llama70b[f"ft{i}"]) for i in range(4)]
    with pytest.raises(MergeSearchError) as e:  # one 80 GB GPU
        make_plan(str(llama70b["base"]), fts, METHODS, device="cuda", budget=parse_size("80GB"),
                  eval_dtype="bfloat16", eval_reserve=parse_size("8GB"), bandwidth=BW)
    assert str(e.value) == (
        "device memory: the evaluation model (141.11 GB, bfloat16), its reserve (8.00 GB), the merge scratch "
        "(14.98 GB) and the staging slots (21.01 GB) need 185.10 GB, more than the budget of 80.00 GB (declared); "
        "shard it over GPUs with resources.gpus_per_worker: 2")
    with pytest.raises(MergeSearchError) as e:  # two, with the default reserve of 20%
        plan70(llama70b, 2)
    assert str(e.value) == (
        "device memory: the evaluation model (141.11 GB, bfloat16) and its reserve (28.22 GB) need 169.33 GB, more "
        "than 2 GPUs of 80.00 GB hold (declared); use more GPUs per worker (resources.gpus_per_worker) or declare "
        "the reserve (resources.eval_memory)")
    # a device map that loads one GPU past its budget is refused naming that GPU
    dm = {"model.embed_tokens": 0, **{f"model.layers.{i}": 0 if i < 45 else 1 for i in range(80)},
          "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
    with pytest.raises(MergeSearchError) as e:
        plan70(llama70b, 2, reserve="8GB", device_map=dm)
    assert str(e.value) == (
        "device memory: GPU 0 of 2 holds model.embed_tokens, layers 0-44 (45) of the evaluation model (79.11 GB, "
        "bfloat16) and its share of the reserve (4.00 GB): 83.11 GB, more than its budget of 80.00 GB (declared)")


def test_plan_command_for_70b(tmp_path, llama70b, capsys):
    space = space_file(tmp_path, llama70b, resources={"eval_memory": "8GB"})
    assert main(["plan", space, "--gpus-per-worker", "2", "--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("worker on 2 GPUs: budget 80.00 GB per GPU (declared); evaluation model 141.11 GB")
    assert "  cuda:0: model.embed_tokens, layers 0-39 (40)\n" in out
    assert "  cuda:1: layers 40-79 (40), model.norm, model.rotary_emb, lm_head\n" in out
    assert "host-merged             121 tensors" in out
    assert main(["plan", space, "--gpus-per-worker", "4", "--device-memory", "80GB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [g["layers"][0] for g in data["gpus"]] == [0, 19, 40, 61]
    assert all(g["device_bytes"] <= 80 * 10**9 for g in data["gpus"])
    assert data["device_map"]["lm_head"] == 3 and data["tiers"]["device"] == sum(g["device_bytes"]
                                                                                 for g in data["gpus"])
    # gpus_per_worker read from the space; one GPU: one line, exit 2
    (tmp_path / "two").mkdir()
    two = space_file(tmp_path / "two", llama70b, resources={"eval_memory": "8GB", "gpus_per_worker": 2})
    assert main(["plan", two, "--device-memory", "80GB"]) == 0
    assert "worker on 2 GPUs" in capsys.readouterr().out
    assert main(["plan", space, "--device-memory", "80GB", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: device memory: the evaluation model (141.11 GB")
    assert err.endswith("shard it over GPUs with resources.gpus_per_worker: 2")
    assert main(["plan", space, "--gpus-per-worker", "2", "--device", "cpu"]) == 2
    assert "a worker on 2 GPUs shards over CUDA devices" in capsys.readouterr().err


def test_a_small_family_is_wholly_resident_on_two_gpus(family):
    fts = [str(family[f"ft{i}"]) for i in range(3)]
    p = make_multi_plan(str(family["base"]), fts, METHODS, gpus=2, budget=parse_size("1GB"), bandwidth=BW)
    assert [g.layers for g in p.gpus] == [[0, 1], [2, 3]]
    for g in p.gpus:
        assert g.resident == ["base", "m0", "m1", "m2"] and g.host == [] and g.host_merged == []
        assert g.staging == 0
    assert p.moved_per_candidate == 0
    names = set(p.tensor_gpu)
    assert {n for n, g in p.tensor_gpu.items() if g == 1} >= {"lm_head.weight", "model.norm.weight"}
    assert tensor_gpus(names, p.device_map) == p.tensor_gpu


def test_search_checks_the_sharded_plan_before_ray(tmp_path, family, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fam = {"base": family["base"], "ft0": family["ft0"], "ft1": family["ft1"]}
    space = space_file(tmp_path, fam, dtype=None, resources={"gpus_per_worker": 2})
    assert main(["search", space, "--run", "sharded", "--device-memory", "300kB"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "more than 2 GPUs of 300.00 kB hold (declared)" in err
    assert not (tmp_path / "results" / "sharded").exists()


# Budgets per "GPU" for the tiny family on the CPU: each placement mixes resident inputs,
# inputs staged through each GPU's own slots and tensors merged on the host in blocks.
MIXED = {"base-resident": 1_040_000, "uneven": 860_000}


@pytest.fixture(scope="module")
def single(family):
    return Materializer(family["base"], [family["ft0"], family["ft1"], family["ft2"]])


@pytest.mark.parametrize("budget", list(MIXED.values()), ids=list(MIXED))
def test_sharded_materializer_on_the_cpu_is_bit_equal(family, single, budget):
    fts = [family[f"ft{i}"] for i in range(3)]
    p = make_multi_plan(str(family["base"]), [str(f) for f in fts], METHODS, gpus=2, device="cpu", budget=budget,
                        stream="copy", bandwidth=BW)
    assert p.host_merged and any(g.host for g in p.gpus) and any(g.resident for g in p.gpus)
    m = Materializer(family["base"], fts, placement=p)
    try:
        assert m.stager is None and sorted(m.stagers) == [g.index for g in p.gpus if g.host]
        for k, slots in m.slots.items():  # resident tensors are private copies, the rest views of the mapped file
            for n, t in slots.items():
                assert p.resident_on(k, n) == (t.untyped_storage().nbytes() == t.numel() * t.element_size())
        for case in ("ties", "task_arithmetic", "breadcrumbs", "linear"):
            recipe = from_dict({**recipes(family)[case], "dtype": "float32"})
            got, want = m.state_dict(recipe), single.state_dict(recipe)
            assert set(got) == set(want)
            for n in want:
                assert torch.equal(got[n], want[n]), (case, n)
        dare = from_dict({"method": "dare_ties", "base": str(family["base"]), "seed": 7, "models": [
            {"path": str(fts[0]), "parameters": {"weight": 0.5, "density": 0.6}},
            {"path": str(fts[2]), "parameters": {"weight": 0.4, "density": 0.5}}]})
        got, want = m.state_dict(dare), single.state_dict(dare)
        assert all(torch.equal(got[n], want[n]) for n in want)
        # written into a module in place, host-merged tensors included
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(family["base"])
        ptrs = {n: t.data_ptr() for n, t in model.named_parameters()}
        ties = from_dict(recipes(family)["ties"])
        m.write_into(model, ties)
        want = single.state_dict(ties)
        assert all(t.data_ptr() == ptrs[n] for n, t in model.named_parameters())
        assert all(torch.equal(t, want[n]) for n, t in model.state_dict().items() if n in want)
        assert m.last_moved > 0
    finally:
        m.close()


def test_the_worker_plan_chooses_by_share(family):
    from mergesearch.engine.multi_gpu import MultiPlacement, worker_plan
    from mergesearch.engine.plan import Placement
    fts = [str(family[f"ft{i}"]) for i in range(2)]
    opts = {"budget": parse_size("1GB"), "share": 2.0, "dtype": None, "stream": "auto"}
    side = {"metrics": {}, "grams": {}, "base_metric": None}
    sharded = worker_plan(str(family["base"]), fts, METHODS, "cuda", opts, side)
    assert isinstance(sharded, MultiPlacement) and len(sharded.gpus) == 2
    assert sharded.resident == [f"{k}@cuda:{g}" for g in (0, 1) for k in ("base", "m0", "m1")]
    one = worker_plan(str(family["base"]), fts, METHODS, "cuda", {**opts, "share": 1.0}, side)
    assert isinstance(one, Placement) and one.resident == ["base", "m0", "m1"]
    assert yaml.safe_load(json.dumps(sharded.to_json()))["gpus"][1]["layers"] == [2, 3]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A bfloat16 family whose embedding and lm_head (4096 x 128) are past the blocked
    selection's size (SELECT_BLOCK elements)."""
    from mergesearch.zoo.synthetic import make_family
    return make_family(tmp_path_factory.mktemp("wide"), n_models=2, hidden=128, layers=2, intermediate=256,
                       vocab=4096, heads=4, dtype="bfloat16", noise=0.01, seed=3, init_std=0.1)


def test_host_merged_large_tensors_select_over_the_whole_tensor(wide, tmp_path):
    """The embedding and lm_head merged on the host by the export's path (selections read
    in blocks, thresholds over the whole tensor) give the single-device bits."""
    from mergesearch.methods.selection import SELECT_BLOCK
    fts = [wide["ft0"], wide["ft1"]]
    dm = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1,
          "model.rotary_emb": 1, "lm_head": 1}
    p = make_multi_plan(str(wide["base"]), [str(f) for f in fts], METHODS, gpus=2, device="cpu", budget=4_400_000,
                        stream="copy", bandwidth=BW, device_map=dm)
    assert [g.host_merged for g in p.gpus] == [["model.embed_tokens.weight"], ["lm_head.weight"]]
    assert [g.resident for g in p.gpus] == [["base"], ["base"]] and 4096 * 128 > SELECT_BLOCK
    m = Materializer(wide["base"], fts, placement=p)
    one = Materializer(wide["base"], fts)
    b, m0, m1 = (str(wide[k]) for k in ("base", "ft0", "ft1"))
    try:
        for method, extra in (("ties", {"density": 0.3}), ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}),
                              ("task_arithmetic", {})):
            recipe = from_dict({"method": method, "base": b, "models": [
                {"path": m0, "parameters": {"weight": 0.6, **extra}},
                {"path": m1, "parameters": {"weight": 0.5, **extra}}]})
            got, want = m.state_dict(recipe), one.state_dict(recipe)
            assert all(torch.equal(got[n], want[n]) for n in want), method
    finally:
        m.close()
        one.close()


def test_load_model_with_a_device_map(family):
    """The worker's loading path with a plan's device_map (here every module on the CPU):
    the same weights as a plain load, dispatched by accelerate."""
    from mergesearch.engine.models import load_model
    dm = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(4)}, "model.norm": "cpu",
          "model.rotary_emb": "cpu", "lm_head": "cpu"}
    sharded, _ = load_model(family["base"], device_map=dm)
    plain, _ = load_model(family["base"])
    assert all(p.device.type == "cpu" for p in sharded.parameters())
    got, want = sharded.state_dict(), plain.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.equal(sharded(ids).logits, plain(ids).logits)
