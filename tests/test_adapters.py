"""LoRA adapters as fine-tunes: task vectors from factors, equal to PEFT and mergekit,
held as factors in memory and in the plan."""

import json
from pathlib import Path

import pytest
import torch

from mergesearch.engine.adapter import Adapter
from mergesearch.engine.checkpoint import Checkpoint
from mergesearch.engine.materialize import Materializer
from mergesearch.engine.merge import open_plan, stream_merge
from mergesearch.engine.plan import ADAPTER_F32, make_plan, scratch_bytes
from mergesearch.engine.adapter import open_model
from mergesearch.sources import pin
from mergesearch.errors import MergeSearchError
from mergesearch.methods import REGISTRY
from mergesearch.recipe import from_dict
from mergesearch.zoo.synthetic import lora_shapes, llama_config, llama_layout, write_adapter, write_model

from conftest import load_weights
from test_zoo_eval import zoo  # noqa: F401  (session fixture)

# Exact arithmetic: base values are multiples of 2^-10 below 1, factors multiples of 2^-6
# below 1/16 and scaling alpha / r = 2, so every delta is a multiple of 2^-11 and
# base + delta, and (base + delta) - base, are exact in float32. A dense fine-tune made
# as base + delta then holds the same task vector bit for bit as the adapter.
CFG = llama_config(hidden=32, layers=2, intermediate=48, vocab=64, heads=4, dtype="float32")
R, ALPHA = 4, 8
TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")  # k_proj and gate_proj untouched


def _gen(*parts) -> torch.Generator:
    import hashlib
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "little"))


def quant_base(name, shape):
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.round(torch.randn(shape, generator=_gen("base", name)) * 0.1 * 1024).clamp(-900, 900) / 1024


def quant_factor(k):
    return lambda key, shape: torch.randint(-4, 5, shape, generator=_gen("f", k, key)).float() / 64


def dense_delta(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Base tensor name -> (B @ A) * alpha / r, computed here from the adapter file."""
    from safetensors.torch import load_file
    f = load_file(str(adapter_dir / "adapter_model.safetensors"))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    out = {}
    for key in f:
        if key.endswith(".lora_A.weight"):
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            b = f[key.replace("lora_A", "lora_B")]
            out[f"{module}.weight"] = (b.double() @ f[key].double() * cfg["lora_alpha"] / cfg["r"]).float()
    return out


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    """base, adapters a0..a2 and their dense twins d0..d2 (base + delta, exact)."""
    root = tmp_path_factory.mktemp("exact")
    base = root / "base"
    write_model(base, CFG, quant_base, torch.float32)
    out = {"base": base}
    head = torch.round(torch.randn(64, 32, generator=_gen("head")) * 100) / 1024
    for k in range(3):
        extra = {"base_model.model.lm_head.weight": head} if k == 2 else None  # a modules_to_save copy
        a = write_adapter(root / f"a{k}", CFG, str(base), quant_factor(k), r=R, alpha=ALPHA, targets=TARGETS,
                          extra=extra, config={"modules_to_save": ["lm_head"]} if k == 2 else None)
        delta = dense_delta(a)

        def fn(name, shape, delta=delta, k=k):
            if k == 2 and name == "lm_head.weight":
                return head
            b = quant_base(name, shape)
            return b + delta[name] if name in delta else b
        write_model(root / f"d{k}", CFG, fn, torch.float32)
        out[f"a{k}"], out[f"d{k}"] = a, root / f"d{k}"
    return out


def test_adapter_reads_as_its_factors(exact):
    base = Checkpoint(exact["base"])
    a = Adapter(exact["a0"], base)
    assert a.names() == base.names()
    assert sorted(a.factors) == sorted(f"{m}.weight" for m in lora_shapes(CFG, R, TARGETS))
    assert len(a.factors) == 2 * len(TARGETS) and not a.dense
    assert {f.scaling for f in a.factors.values()} == {ALPHA / R}
    # factors only: r x (in + out) float32 values per module
    want = sum(4 * R * (sa[1] + sb[0]) for sa, sb in lora_shapes(CFG, R, TARGETS).values())
    assert sum(a.sizes().values()) == want
    assert a.delta("model.layers.0.self_attn.k_proj.weight") is None  # untouched: zero task vector
    d = Checkpoint(exact["d0"])
    for n in a.names():
        assert torch.equal(a.get(n), d.get(n)), n
    a2 = Adapter(exact["a2"], base)
    assert a2.dense == {"lm_head.weight": "base_model.model.lm_head.weight"}
    assert torch.equal(a2.get("lm_head.weight"), Checkpoint(exact["d2"]).get("lm_head.weight"))


def _recipe(method, base, models, seed=3):
    spec = REGISTRY[method]
    models = models[:spec.max_models] if spec.max_models else models
    models = models[:2] if method == "nuslerp" else models
    per = []
    for i, m in enumerate(models):
        params = {}
        if spec.param("weight") is not None and spec.param("weight").scope == "model":
            params["weight"] = [0.7, 0.4, 0.55][i]
        if spec.param("density") is not None and spec.param("density").scope == "model":
            params["density"] = [0.5, 0.3, 0.8][i]
        per.append({"path": str(m), "parameters": params})
    return from_dict(dict(method=method, base=str(base), models=per, seed=seed,
                          parameters={"nearswap": {"t": 0.01}, "slerp": {"t": 0.4}}.get(method, {})))


ADAPTER_METHODS = sorted(n for n, s in REGISTRY.items() if s.needs_metric != "required" and not s.needs_gram)


@pytest.fixture(scope="module")
def both(exact):
    """One Materializer holding the adapters and their dense twins."""
    mat = Materializer(exact["base"], [exact[k] for k in ("a0", "a1", "a2", "d0", "d1", "d2")],
                       methods=ADAPTER_METHODS)
    yield mat
    mat.close()


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_every_method_merges_adapters_as_their_dense_twins(exact, both, method):
    """The same merge of adapters and of full fine-tunes holding the same task vectors:
    bit for bit, in every method (selections, random masks and SVDs included)."""
    lora = _recipe(method, exact["base"], [exact["a0"], exact["a1"], exact["a2"]])
    dense = _recipe(method, exact["base"], [exact["d0"], exact["d1"], exact["d2"]])
    a, d = both.state_dict(lora), both.state_dict(dense)
    assert set(a) == set(d) and len(a) == len(llama_layout(CFG))
    bad = [n for n in a if not torch.equal(a[n], d[n])]
    assert bad == [], (method, bad[:3])
    base = load_weights(exact["base"])
    assert any(not torch.equal(a[n], base[n]) for n in a)  # the merge did something


@pytest.mark.parametrize("method", ["ties", "dare_ties", "linear", "tsv"])
def test_streamed_export_of_adapters_equals_the_in_memory_candidate(tmp_path, exact, both, method):
    recipe = _recipe(method, exact["base"], [exact["a0"], exact["d1"], exact["a2"]])
    stream_merge(open_plan(recipe), tmp_path / "out")
    out = load_weights(tmp_path / "out")
    mem = both.state_dict(recipe)
    assert set(out) == set(mem) == {n for n, _ in llama_layout(CFG)}
    assert all(torch.equal(out[n], mem[n]) for n in out)


def test_adapter_listed_alone_pins_to_base_plus_adapter(exact):
    base = pin(str(exact["base"]))
    assert pin(str(exact["a0"]), base=base) == f"{exact['base'].resolve()}+{exact['a0'].resolve()}"
    assert pin(str(exact["d0"]), base=base) == str(exact["d0"].resolve())
    with pytest.raises(MergeSearchError, match="a LoRA adapter needs a base model"):
        open_model(str(exact["a0"]))
    with pytest.raises(MergeSearchError, match=r"is not the base of this merge"):
        open_model(f"{exact['d0']}+{exact['a0']}", Checkpoint(exact["base"]))


def test_plan_counts_adapters_as_factors(exact):
    models = [pin(str(exact[k]), base=str(exact["base"])) for k in ("a0", "a1", "d0")]
    p = make_plan(str(exact["base"]), models, ["ties"], budget=10**9)
    factors = sum(4 * R * (sa[1] + sb[0]) for sa, sb in lora_shapes(CFG, R, TARGETS).values())
    full = sum(4 * s[0] * (s[1] if len(s) > 1 else 1) for _, s in llama_layout(CFG))
    assert [(i.key, i.nbytes, i.adapter) for i in p.inputs] == [
        ("base", full, False), ("m0", factors, True), ("m1", factors, True), ("m2", full, False)]
    largest = max(s[0] * (s[1] if len(s) > 1 else 1) for _, s in llama_layout(CFG))  # the embedding: 64 x 32
    factored = 48 * 32  # up_proj and down_proj (the adapters do not touch the embedding)
    assert p.scratch == scratch_bytes(largest, ["ties"], 3, 4, "cpu", (64, 32), adapters=2, adapter_numel=factored) \
        == scratch_bytes(largest, ["ties"], 3, 4, "cpu", (64, 32)) + 2 * ADAPTER_F32 * 4 * factored
    mat = Materializer(str(exact["base"]), models, methods=["ties"], placement=p)
    try:  # what is held is what was planned: the adapters' factors, resident
        assert mat.resident_bytes == sum(i.nbytes for i in p.inputs) == 2 * factors + 2 * full
    finally:
        mat.close()


def _peft_merged(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _peft_adapter(base_dir: Path, out: Path, seed: int, **config) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(**config))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if p.requires_grad:  # lora_B starts at zero: give every factor values
                p.normal_(0, 0.05)
    peft.save_pretrained(str(out))
    return out


PEFT_CASES = {
    "linear": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora_patterns": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj"],
                            rank_pattern={"up_proj": 2}, alpha_pattern={"k_proj": 3}),
    "embedding_and_saved_head": dict(r=3, lora_alpha=6, target_modules=["embed_tokens", "o_proj"],
                                     modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_task_vector_equals_peft_merge_and_unload(tmp_path, exact, case):
    adapter = _peft_adapter(exact["base"], tmp_path / "lora", 0, **PEFT_CASES[case])
    want = _peft_merged(exact["base"], adapter)
    base = load_weights(exact["base"])
    recipe = from_dict(dict(method="task_arithmetic", base=str(exact["base"]),
                            models=[{"path": str(adapter), "parameters": {"weight": 1.0}}],
                            parameters={"lambda": 1.0}))
    mat = Materializer(exact["base"], [adapter], methods=["task_arithmetic"])
    try:
        ours = mat.state_dict(recipe)
    finally:
        mat.close()
    changed = [n for n in ours if not torch.equal(want[n], base[n])]
    assert len(changed) == {"linear": 6, "rslora_patterns": 6, "embedding_and_saved_head": 4}[case]
    for n in ours:  # the task vector: PEFT's merged weights minus the base
        torch.testing.assert_close(ours[n] - base[n], want[n] - base[n], atol=2e-7, rtol=0, msg=n)
    from mergesearch.engine.models import load_model
    model, _ = load_model(f"{exact['base']}+{adapter}")
    for n, v in model.state_dict().items():
        torch.testing.assert_close(v, want[n], atol=2e-7, rtol=0, msg=n)


def test_fan_in_fan_out_adapter_equals_peft(tmp_path):
    """GPT-2's Conv1D layers store [in, out]: PEFT transposes B @ A (fan_in_fan_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "gpt2")
    adapter = _peft_adapter(tmp_path / "gpt2", tmp_path / "lora", 1, r=4, lora_alpha=4,
                            target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    want = _peft_merged(tmp_path / "gpt2", adapter)
    a = Adapter(adapter, Checkpoint(tmp_path / "gpt2"))
    assert len(a.factors) == 4 and all(f.transpose for f in a.factors.values())
    for n in a.factors:
        torch.testing.assert_close(a.get(n), want[n], atol=2e-7, rtol=0)


def test_ties_on_adapters_equals_mergekit_on_base_plus_adapter(tmp_path, exact):
    """mergekit 0.1.5 takes BASE+ADAPTER references: it merges each adapter into its
    base with PEFT, then runs TIES on the dense models. Ours reads the factors."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergesearch.recipe import to_mergekit

    adapters = [_peft_adapter(exact["base"], tmp_path / f"l{k}", 10 + k, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]) for k in range(2)]
    recipe = from_dict(dict(method="ties", base=str(exact["base"]), models=[
        {"path": pin(str(a), base=str(exact["base"].resolve())), "parameters": {"weight": w, "density": d}}
        for a, w, d in zip(adapters, [0.6, 0.5], [0.5, 0.3])]))
    config = to_mergekit(recipe)
    assert config["models"][0]["model"] == f"{exact['base'].resolve()}+{adapters[0].resolve()}"
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mk"),
              options=MergeOptions(lora_merge_cache=str(tmp_path / "cache"), lazy_unpickle=False, quiet=True))
    want = load_weights(tmp_path / "mk")
    stream_merge(open_plan(recipe), tmp_path / "ours")
    ours = load_weights(tmp_path / "ours")
    assert set(ours) == set(want)
    worst = max((ours[n] - want[n]).abs().max().item() for n in ours)
    assert worst <= 1e-6, worst


SCRATCH_SHAPE = dict(hidden=256, layers=2, intermediate=512, vocab=256, heads=4)  # largest: the MLP, 512 x 256


@pytest.fixture(scope="module")
def bf16_adapters(tmp_path_factory):
    from mergesearch.zoo.synthetic import make_family
    d = tmp_path_factory.mktemp("scratch_lora")
    f = make_family(d / "family", n_models=1, dtype="bfloat16", noise=0.002, seed=0, **SCRATCH_SHAPE)
    s = SCRATCH_SHAPE
    cfg = llama_config(s["hidden"], s["layers"], s["intermediate"], s["vocab"], s["heads"], "bfloat16")
    return str(f["base"]), [pin(str(write_adapter(d / f"a{k}", cfg, str(f["base"]), r=8, dtype="bfloat16")),
                                base=str(f["base"])) for k in range(3)] + [str(f["ft0"])]


@pytest.mark.parametrize("method", ["ties", "dare_linear", "linear", "karcher", "tsv"])
def test_plan_scratch_bounds_a_merge_of_adapters(bf16_adapters, method, monkeypatch):
    """Three adapters and a full fine-tune: what one tensor's merge keeps alive, with the
    adapters' deltas made from their factors, stays within the planned scratch."""
    from memtrack import LiveBytes

    from mergesearch.engine.models import load_model
    from mergesearch.methods import kernels
    monkeypatch.setattr(kernels, "_compile_available", lambda: False)
    monkeypatch.setenv("MERGESEARCH_NATIVE", "0")
    base, models = bf16_adapters
    spec = REGISTRY[method]
    recipe = from_dict(dict(method=method, base=base, dtype="bfloat16", seed=0, models=[
        {"path": m, "parameters": {k: v for k, v in (("weight", 0.3 + 0.1 * i), ("density", 0.4))
                                   if spec.param(k) is not None and spec.param(k).scope == "model"}}
        for i, m in enumerate(models)]))
    plan = make_plan(base, models, [method])
    assert sum(i.adapter for i in plan.inputs) == 3 and plan.inputs[1].lowrank_numel == 512 * 256
    mat = Materializer(base, models, methods=[method], check=False, placement=plan)
    model, _ = load_model(base, dtype="bfloat16")
    mat.write_into(model, recipe)
    probe = LiveBytes()
    with probe:
        mat.write_into(model, recipe)
    mat.close()
    largest = 512 * 256 * 4
    assert probe.peak <= plan.scratch, f"{probe.peak / largest:.2f} x the largest, plan {plan.scratch / largest:.2f}"


def test_plan_of_an_8b_family_of_adapters(tmp_path):
    """Llama-3-8B-shaped (sparse files, headers only): four rank-16 adapters on every
    projection are 4 x 84 MB of factors, and all of them sit beside the base on a 48 GB
    device where not one full fine-tune fits."""
    from mergesearch.zoo.synthetic import LLAMA_8B, shaped_family
    s = LLAMA_8B
    fam = shaped_family(tmp_path / "fam", n_models=4)
    cfg = llama_config(s["hidden"], s["layers"], s["intermediate"], s["vocab"], s["heads"], "bfloat16",
                       kv_heads=s["kv_heads"])
    adapters = [pin(str(write_adapter(tmp_path / f"lora{k}", cfg, str(fam["base"]), r=16, dtype="bfloat16",
                                      sparse=True)), base=str(fam["base"])) for k in range(4)]
    per_layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)  # q o, k v, gate up down
    factors = 2 * 32 * per_layer
    budget = 48 * 10**9
    lora = make_plan(str(fam["base"]), adapters, ["ties"], device="cpu", budget=budget)
    assert [i.nbytes for i in lora.inputs[1:]] == [factors] * 4 and factors == 83_886_080
    assert lora.resident == ["base", "m0", "m1", "m2", "m3"] and lora.device_bytes <= budget
    assert "(LoRA factors)" in lora.render()
    full = make_plan(str(fam["base"]), [str(fam[f"ft{k}"]) for k in range(4)], ["ties"], device="cpu",
                     budget=budget)
    assert full.resident == ["base"] and full.host == ["m0", "m1", "m2", "m3"]


def test_refinement_trains_a_mixed_family_of_adapters_and_full_fine_tunes(tmp_path, zoo):
    """Refinement holds the adapters' task vectors like the full fine-tunes': its
    differentiable merge is the engine's merge, before and after training."""
    from dataclasses import asdict

    from mergesearch.engine.models import load_model
    from mergesearch.evaluate import EvalConfig, build_evaluator
    from mergesearch.search.refine import build_terms, merged_params, refine, refined_recipe
    from mergesearch.search.variables import Granularity, make_groups

    cfg = json.loads((zoo / "base" / "config.json").read_text())
    base = str(zoo / "base")
    adapters = [pin(str(write_adapter(tmp_path / f"l{k}", cfg, base, r=4, alpha=8)), base=base) for k in range(2)]
    models = adapters + [str(zoo / "ft_max"), str(zoo / "ft_add")]
    r = from_dict(dict(method="ties", base=base, parameters={"lambda": 1.0}, seed=5, models=[
        {"path": m, "parameters": {"weight": 0.6 + 0.2 * i, "density": 0.5}} for i, m in enumerate(models)]))
    mat = Materializer(base, models, methods=["ties"])
    groups = [asdict(g) for g in make_groups(Granularity(level="layer", n_groups=2), 4, "model.layers.")]
    names = list(mat.names)
    terms, gw, gl = build_terms(mat, r, groups, names, {n: torch.float32 for n in names}, "cpu")
    engine = mat.state_dict(r)
    ours = merged_params(terms, torch.ones(len(groups), 4), torch.ones(len(groups)))
    for n in names:
        torch.testing.assert_close(ours[n], engine[n], rtol=0, atol=1e-6)
    model, tok = load_model(base)
    ev = build_evaluator(EvalConfig(tasks=["reverse", "max"], task_dir=str(zoo), split="dev", limit=16))
    out, stats = refine(mat, model, tok, ev, r, dict(top=1, level="layer", n_groups=2, steps=4, lr=0.05,
                                                   batch_size=4, loss="choice", holdout=0.25, eval_every=2,
                                                   patience=3, average=0.0), groups)
    assert stats["steps"] == 4 and [m.path for m in out.models] == models
    assert out.to_dict() != r.to_dict()  # the weights moved
    mat.close()


def test_a_merge_without_a_base_takes_base_plus_adapter_references(tmp_path, exact):
    """A linear soup of adapters: BASE+ADAPTER names the base their untouched tensors
    come from, though the recipe has none; the same as the soup of their dense twins."""
    refs = [f"{exact['base']}+{exact[k]}" for k in ("a0", "a1")]
    lora = from_dict(dict(method="linear", models=[{"path": r, "parameters": {"weight": 0.5}} for r in refs]))
    dense = from_dict(dict(method="linear", models=[{"path": str(exact[k]), "parameters": {"weight": 0.5}}
                                                   for k in ("d0", "d1")]))
    stream_merge(open_plan(lora), tmp_path / "out")
    out = load_weights(tmp_path / "out")
    mat = Materializer(None, refs + [str(exact["d0"]), str(exact["d1"])], methods=["linear"])
    try:
        mem, want = mat.state_dict(lora), mat.state_dict(dense)
    finally:
        mat.close()
    assert set(out) == set(want) and all(torch.equal(out[n], want[n]) and torch.equal(mem[n], want[n]) for n in out)
    other = write_model(tmp_path / "other", CFG, lambda n, s: quant_base(n, s) * 2, torch.float32) or tmp_path / "other"
    mixed = from_dict(dict(method="linear", models=[{"path": refs[0], "parameters": {"weight": 1.0}},
                                                   {"path": f"{other}+{exact['a1']}", "parameters": {"weight": 1.0}}]))
    with pytest.raises(MergeSearchError, match=r"a1: a LoRA adapter of .*exact0/base, whose weights differ from "
                                               r"the base .*other \(pass --allow-unrelated"):
        open_plan(mixed)
    with pytest.raises(MergeSearchError, match=r"an adapter of another base than .*a merge without a base takes "
                                               r"adapters of one base"):
        open_plan(mixed, allow_unrelated=True, check=False)
