"""The bad-input catalog (docs/ERRORS.md): every row is a case here. Each asserts the
one-line message, exit code 2 and that no output is left behind."""

import re
from pathlib import Path

import pytest
import yaml

from mergesearch.cli import main

from conftest import copy_model, rewrite_tensor
from test_hub_sources import RESOLVED, hub_cache  # noqa: F401  (session fixture: a Hub cache in tmp)
from test_zoo_eval import zoo  # noqa: F401  (session fixture)

DOC = Path(__file__).resolve().parents[1] / "docs" / "ERRORS.md"


def space_dict(zoo: Path, **over) -> dict:
    return {"base": str(zoo / "base"), "models": [str(zoo / "ft_add"), str(zoo / "ft_max")],
            "evaluator": {"tasks": ["add"], "task_dir": str(zoo)}, "methods": ["task_arithmetic"],
            "parameters": {"weight": {"low": 0.0, "high": 1.0}}, "budget": {"n_trials": 4}, **over}


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def recipe(tmp: Path, family, **over) -> Path:
    data = {"method": "task_arithmetic", "base": str(family["base"]),
            "models": [{"path": str(family["ft0"]), "parameters": {"weight": 0.5}},
                       {"path": str(family["ft1"]), "parameters": {"weight": 0.5}}], **over}
    return write(tmp / "r.yaml", data)


# Each case: (id, builder(tmp, family, other, zoo) -> (argv, [paths that must not exist]), [message fragments])
def c_merge_missing(t, f, o, z):
    return ["merge", t / "nope.yaml", "-o", t / "out"], [t / "out"]


def c_merge_yaml(t, f, o, z):
    return ["merge", write(t / "r.yaml", "method: [ties\n"), "-o", t / "out"], [t / "out"]


def c_merge_method(t, f, o, z):
    return ["merge", recipe(t, f, method="frankenmerge"), "-o", t / "out"], [t / "out"]


def c_merge_range(t, f, o, z):
    r = recipe(t, f, method="ties", models=[{"path": str(f["ft0"]), "parameters": {"weight": 1, "density": 1.5}}])
    return ["merge", r, "-o", t / "out"], [t / "out"]


def c_merge_shape(t, f, o, z):
    return ["merge", recipe(t, f, models=[{"path": str(z / "ft_add"), "parameters": {"weight": 1}}]),
            "-o", t / "out"], [t / "out"]


def c_merge_unrelated(t, f, o, z):
    return ["merge", recipe(t, f, models=[{"path": str(o["ft0"]), "parameters": {"weight": 1}}]),
            "-o", t / "out"], [t / "out"]


def c_merge_nan(t, f, o, z):
    bad = copy_model(f["ft1"], t / "nan")
    rewrite_tensor(bad, "model.norm.weight", lambda x: x * float("nan"))
    return ["merge", recipe(t, f, models=[{"path": str(bad), "parameters": {"weight": 1}}]), "-o", t / "out"], \
        [t / "out"]


def c_merge_exists(t, f, o, z):
    (t / "out").mkdir()
    (t / "out" / "keep.txt").write_text("mine")
    return ["merge", recipe(t, f), "-o", t / "out"], []


def c_merge_metric(t, f, o, z):
    r = recipe(t, f, method="fisher", models=[{"path": str(f["ft0"])}])
    return ["merge", r, "-o", t / "out"], [t / "out"]


def c_merge_row_scales(t, f, o, z):
    r = recipe(t, f, models=[{"path": str(f["ft0"]), "parameters": {"weight": 0.5}, "row_scales": "gone.safetensors"},
                             {"path": str(f["ft1"]), "parameters": {"weight": 0.5}}])
    return ["merge", r, "-o", t / "out"], [t / "out"]


def c_search_key(t, f, o, z):
    return ["search", write(t / "s.yaml", space_dict(z, budgett={"n_trials": 2})), "--run", "r"], [t / "results"]


def c_search_budget(t, f, o, z):
    return ["search", write(t / "s.yaml", space_dict(z, budget={"n_trials": 2})), "--run", "r"], [t / "results"]


def c_search_refine_budget(t, f, o, z):
    return ["search", write(t / "s.yaml", space_dict(z, refine={"steps": 100})), "--run", "r"], [t / "results"]


def c_search_bounds(t, f, o, z):
    return ["search", write(t / "s.yaml", space_dict(z, parameters={"weight": {"low": 1, "high": 0}})),
            "--run", "r"], [t / "results"]


def c_search_resume(t, f, o, z):
    return ["search", write(t / "s.yaml", space_dict(z)), "--run", "r", "--resume"], [t / "results"]


def c_search_curvature(t, f, o, z):
    return ["search", write(t / "s.yaml", space_dict(z, methods=["fisher"])), "--run", "r"], [t / "results"]


def c_search_seed(t, f, o, z):
    return ["search", write(t / "s.yaml", space_dict(z, seed_from="nosoup")), "--run", "r"], [t / "results"]


def c_search_name(t, f, o, z):
    return ["search", write(t / "s.yaml", space_dict(z)), "--run", "a/b"], [t / "results"]


def c_search_storage(t, f, o, z):
    return ["search", write(t / "s.yaml", space_dict(z)), "--run", "r", "--storage",
            f"sqlite:///{t / 'no' / 'x.db'}"], [t / "results", t / "no"]


def c_search_memory(t, f, o, z):
    return ["search", write(t / "s.yaml", space_dict(z)), "--run", "r", "--device-memory", "10kB"], [t / "results"]


def c_search_gpus(t, f, o, z):
    return ["search", write(t / "s.yaml", space_dict(z, resources={"gpus_per_worker": 1.5})), "--run", "r"], \
        [t / "results"]


def c_plan_size(t, f, o, z):
    return ["plan", write(t / "s.yaml", space_dict(z)), "--device-memory", "lots"], [t / "results"]


def evalf(t, z, **over):
    return write(t / "e.yaml", {"tasks": ["add"], "task_dir": str(z), **over})


def c_soup_one(t, f, o, z):
    return ["soup", z / "ft_add", "--eval", evalf(t, z), "--run", "s"], [t / "results"]


def c_soup_unrelated(t, f, o, z):
    return ["soup", f["ft0"], o["ft0"], "--eval", evalf(t, z), "--run", "s"], [t / "results"]


def c_soup_n(t, f, o, z):
    return ["soup", z / "checkpoints" / "add", "--strategy", "last-n", "--eval", evalf(t, z), "--run", "s"], \
        [t / "results"]


def c_soup_split(t, f, o, z):
    return ["soup", z / "checkpoints" / "add", "--eval", evalf(t, z, split="test"), "--run", "s"], [t / "results"]


def c_eval_task(t, f, o, z):
    return ["eval", z / "ft_add", "--tasks", "nosuch", "--task-dir", z, "--out", t / "e.json"], [t / "e.json"]


def c_eval_jsonl(t, f, o, z):
    data = t / "data" / "add"
    data.mkdir(parents=True)
    (data / "dev.jsonl").write_text('{"context": "a", "choices": ["b"], "answer": 0}\n{"context": \n')
    return ["eval", z / "ft_add", "--tasks", "add", "--task-dir", t, "--out", t / "e.json"], [t / "e.json"]


def c_eval_mixed_jsonl(t, f, o, z):
    (t / "m.jsonl").write_text('{"context": "a", "target": "b"}\n{"context": "a", "choices": ["b", "c"], "answer": 0}\n')
    return ["eval", z / "ft_add", "--tasks", t / "m.jsonl", "--out", t / "e.json"], [t / "e.json"]


def c_eval_pair_task(t, f, o, z):
    conf = write(t / "e.yaml", {"tasks": [{"dev": "zoo_add_dev", "test": "nope"}], "task_dir": str(z),
                                "split": "test"})
    return ["eval", z / "ft_add", "--config", conf, "--out", t / "e.json"], [t / "e.json"]


def c_search_refine_untrainable(t, f, o, z):
    data = t / "data" / "sums"
    data.mkdir(parents=True)
    (data / "dev.jsonl").write_text('{"context": "add:1+2=", "target": "3"}\n{"context": "add:2+2=", "target": "4"}\n')
    s = space_dict(z, evaluator={"evaluator": "loglik", "tasks": ["sums"], "task_dir": str(t)},
                   refine={"loss": "entropy"}, budget={"n_trials": 400})
    return ["search", write(t / "s.yaml", s), "--run", "r"], [t / "results" / "r"]


def c_eval_model(t, f, o, z):
    return ["eval", t / "nomodel", "--tasks", "add", "--task-dir", z, "--out", t / "e.json"], [t / "e.json"]


def c_curvature_kind(t, f, o, z):
    return ["curvature", z / "ft_add", "--kind", "hessian", "--data", "add:train", "--task-dir", z,
            "-o", t / "c.safetensors"], [t / "c.safetensors"]


def c_curvature_n(t, f, o, z):
    return ["curvature", z / "ft_add", "--kind", "fisher", "--data", "add:dev", "--task-dir", z,
            "--n-examples", "999", "-o", t / "c.safetensors"], [t / "c.safetensors"]


def c_merge_rank_share(t, f, o, z):
    r = recipe(t, f, method="tsv", models=[{"path": str(f["ft0"]), "parameters": {"rank_share": 1.5}},
                                           {"path": str(f["ft1"])}])
    return ["merge", r, "-o", t / "out"], [t / "out"]


def c_search_refine_memory(t, f, o, z):
    s = space_dict(z, refine={"steps": 10}, budget={"n_trials": 400}, resources={"device_memory": "6MB"})
    return ["search", write(t / "s.yaml", s), "--run", "r"], [t / "results" / "r"]


def c_search_depth_layers(t, f, o, z):
    from mergesearch.zoo.synthetic import make_family
    one = make_family(t / "one", n_models=2, layers=1, noise=0.01, seed=2)
    data = space_dict(z, base=str(one["base"]), models=[str(one["ft0"]), str(one["ft1"])],
                      granularity={"level": "depth"})
    return ["search", write(t / "s.yaml", data), "--run", "r"], [t / "results"]


def c_plan_svd(t, f, o, z):
    from mergesearch.engine.plan import make_plan
    from mergesearch.zoo.synthetic import make_family
    wide = make_family(t / "wide", n_models=2, hidden=32, layers=2, intermediate=64, vocab=4096, noise=0.01, seed=3)
    fts = [str(wide["ft0"]), str(wide["ft1"])]
    fit = make_plan(str(wide["base"]), fts, ["tsv", "linear", "task_arithmetic"], budget=10**9)
    budget = fit.eval_bytes + fit.eval_reserve + 2 * 10**6  # the SVD of the 4096 x 32 embedding needs 4.19 MB
    data = space_dict(z, base=str(wide["base"]), models=fts, methods=["tsv"], parameters={"weight": 1.0})
    return ["plan", write(t / "s.yaml", data), "--device-memory", str(budget)], [t / "results"]


def c_plan_one_gpu(t, f, o, z):
    from mergesearch.zoo.sparse_family import sparse_family
    big = sparse_family(t / "l70", n_models=4)  # Llama-3-70B-shaped sparse shards: headers only
    data = space_dict(z, base=str(big["base"]), models=[str(big[f"ft{i}"]) for i in range(4)], dtype="bfloat16",
                      resources={"eval_memory": "8GB"})
    return ["plan", write(t / "s.yaml", data), "--device-memory", "80GB", "--device", "cuda"], [t / "results"]


def c_plan_sharded(t, f, o, z):
    from mergesearch.zoo.sparse_family import sparse_family
    big = sparse_family(t / "l70", n_models=4)
    data = space_dict(z, base=str(big["base"]), models=[str(big[f"ft{i}"]) for i in range(4)], dtype="bfloat16")
    return ["plan", write(t / "s.yaml", data), "--gpus-per-worker", "2", "--device-memory", "80GB"], [t / "results"]


def c_export_run(t, f, o, z):
    return ["export", "nosuchrun"], [t / "results" / "nosuchrun"]


# Hub references and adapters: run with HF_HUB_CACHE the test's cache (<hub>), offline
def hub_recipe(t, model, base="org/base"):
    return write(t / "r.yaml", {"method": "task_arithmetic", "base": base,
                                "models": [{"path": "org/ft-add", "parameters": {"weight": 0.5}},
                                           {"path": model, "parameters": {"weight": 0.5}}]})


def c_hub_revision(t, f, o, z):
    return ["merge", hub_recipe(t, "org/ft-max", base="org/base@nope"), "-o", t / "out"], [t / "out"]


def c_hub_malformed(t, f, o, z):
    return ["merge", hub_recipe(t, "org//x"), "-o", t / "out"], [t / "out"]


def c_hub_empty_revision(t, f, o, z):
    return ["merge", hub_recipe(t, "org/name@"), "-o", t / "out"], [t / "out"]


def c_hub_not_cached(t, f, o, z):
    return ["merge", hub_recipe(t, "org/missing"), "-o", t / "out"], [t / "out"]


def c_hub_incomplete(t, f, o, z):
    return ["merge", hub_recipe(t, "org/partial"), "-o", t / "out"], [t / "out"]


def c_adapter_architecture(t, f, o, z):
    return ["merge", hub_recipe(t, "org/lora-other"), "-o", t / "out"], [t / "out"]


def c_adapter_dora(t, f, o, z):
    return ["merge", hub_recipe(t, "org/lora-dora"), "-o", t / "out"], [t / "out"]


def c_adapter_type(t, f, o, z):
    return ["merge", hub_recipe(t, "org/ia3"), "-o", t / "out"], [t / "out"]


def c_adapter_no_base(t, f, o, z):
    return ["soup", "org/lora", "org/ft-add", "--eval", evalf(t, z), "--run", "s"], [t / "results"]


HUB_CASES = {c_hub_revision, c_hub_malformed, c_hub_empty_revision, c_hub_not_cached, c_hub_incomplete,
             c_adapter_architecture, c_adapter_dora, c_adapter_type, c_adapter_no_base}


CASES = [
    ("merge-missing-recipe", c_merge_missing, ["nope.yaml", "no such file"]),
    ("merge-invalid-yaml", c_merge_yaml, ["r.yaml", "invalid YAML"]),
    ("merge-unknown-method", c_merge_method, ["unknown merge method 'frankenmerge'"]),
    ("merge-out-of-range", c_merge_range, ["parameter 'density' = 1.5 is outside its valid range [0.0, 1.0]"]),
    ("merge-shape-mismatch", c_merge_shape, ["ft_add", "shape mismatch for"]),
    ("merge-not-a-finetune", c_merge_unrelated, ["not a fine-tune of", "pass --allow-unrelated"]),
    ("merge-nan-weights", c_merge_nan, ["nan: tensor 'model.norm.weight' contains NaN or Inf"]),
    ("merge-output-exists", c_merge_exists, ["output path exists (pass --force to replace it)"]),
    ("merge-missing-metric", c_merge_metric, ["needs a 'metric' file for method 'fisher'"]),
    ("merge-missing-row-scales", c_merge_row_scales, ["gone.safetensors: models[0].row_scales: no such file"]),
    ("search-unknown-key", c_search_key, ["s.yaml", "budgett"]),
    ("search-reversed-bounds", c_search_bounds, ["s.yaml", "bounds reversed: low 1.0 > high 0.0"]),
    ("search-budget-below-baselines", c_search_budget, ["s.yaml", "budget.n_trials 2 leaves no search trial after 2 baselines; raise"]),
    # 100 steps x 16 items x 3 / 200 items + 21 checks x 0.25 = 29.25 -> 30, plus its scoring
    ("search-budget-below-refine", c_search_refine_budget,
     ["s.yaml", "budget.n_trials 4 leaves no search trial after 2 baselines and 31 trial-equivalents kept for refining; "
                "raise budget.n_trials or lower refine.steps"]),
    ("search-resume-missing", c_search_resume, ["cannot resume, no such run"]),
    ("search-no-curvature", c_search_curvature, ["method 'fisher' needs a 'curvature' section"]),
    ("search-seed-missing", c_search_seed, ["seed_from:", "nosoup"]),
    ("search-bad-run-name", c_search_name, ["--run: 'a/b' must use letters, digits"]),
    ("search-storage-folder", c_search_storage, ["--storage: folder", "does not exist"]),
    ("search-device-memory", c_search_memory, ["device memory: the evaluation model (",
                                               "more than the budget of 10.00 kB (declared)"]),
    ("search-gpu-share", c_search_gpus, ["s.yaml", "gpus_per_worker 1.5: use a fraction below 1 or a whole number"]),
    ("plan-bad-size", c_plan_size, ["--device-memory: cannot parse 'lots'"]),
    ("soup-one-ingredient", c_soup_one, ["soup: needs at least 2 ingredients, got 1"]),
    ("soup-unrelated", c_soup_unrelated, ["does not share a base with", "--allow-unrelated"]),
    ("soup-last-n-without-n", c_soup_n, ["--strategy last-n needs --n K"]),
    ("soup-test-split", c_soup_split, ["split: test: soups select on dev and report on test"]),
    ("eval-missing-task", c_eval_task, ["unknown task 'nosuch': not in lm-eval or", "task file not found (task "
                                        "'nosuch', split 'dev')"]),
    ("eval-malformed-jsonl", c_eval_jsonl, ["dev.jsonl:2: malformed JSON line"]),
    ("eval-missing-model", c_eval_model, ["nomodel: no such file or directory"]),
    ("eval-mixed-jsonl", c_eval_mixed_jsonl, ["m.jsonl: mixes multiple-choice and target items (item 2 differs "
                                              "from item 1)"]),
    ("eval-unknown-pair-task", c_eval_pair_task, ["evaluator: task 'zoo_add': unknown lm-eval task 'nope' (test)"]),
    ("search-refine-untrainable", c_search_refine_untrainable,
     ["s.yaml: refine: no task to train on: task 'sums': its items have no choices for the entropy loss"]),
    ("curvature-unknown-kind", c_curvature_kind, ["--kind: 'hessian' is not one of"]),
    ("curvature-too-many-examples", c_curvature_n, ["--n-examples 999 but the file has 200 items"]),
    ("export-unknown-run", c_export_run, ["nosuchrun: no such run"]),
    ("merge-rank-share-out-of-range", c_merge_rank_share,
     ["r.yaml: models[0].parameters.rank_share: parameter 'rank_share' = 1.5 is outside its valid range [0.0, 1.0]"]),
    ("search-refine-memory", c_search_refine_memory,
     ["s.yaml: refine: even batch 1 (4 sequences x 12 tokens) with gradient checkpointing, nothing held, needs 5.02 MB",
      "more than the device budget of 6.00 MB (declared)"]),
    ("search-depth-without-layers", c_search_depth_layers,
     ["s.yaml: granularity: depth:", "has 1 transformer layer(s); a depth schedule needs at least 2"]),
    ("plan-svd-too-large", c_plan_svd,
     ["device memory: tsv's SVD of model.embed_tokens.weight (4096 x 32, 2 models) needs", "more than the budget of"]),
    ("plan-model-past-one-gpu", c_plan_one_gpu,
     ["device memory: the evaluation model (141.11 GB, bfloat16), its reserve (8.00 GB), the merge scratch "
      "(6.57 GB) and the staging slots (21.01 GB) need 176.69 GB, more than the budget of 80.00 GB (declared); "
      "shard it over GPUs with resources.gpus_per_worker: 2"]),
    ("plan-sharded-too-small", c_plan_sharded,
     ["device memory: the evaluation model (141.11 GB, bfloat16) and its reserve (28.22 GB) need 169.33 GB, more "
      "than 2 GPUs of 80.00 GB hold (declared); use more GPUs per worker (resources.gpus_per_worker) or declare "
      "the reserve (resources.eval_memory)"]),
    ("hub-unknown-revision", c_hub_revision,
     ["r.yaml: org/base@nope: revision 'nope' is not in the Hugging Face cache (", "; cached: main, v1); fetch it "
                                                                                  "online with `hf download org/base "
                                                                                  "--revision nope`"]),
    ("hub-malformed-id", c_hub_malformed,
     ["r.yaml: org//x: malformed Hub ID (expected org/name or org/name@revision, with letters, digits, '-', '_' "
      "and '.')"]),
    ("hub-empty-revision", c_hub_empty_revision,
     ["r.yaml: org/name@: empty Hub revision after '@' (write org/name@REVISION: a branch, tag or commit, or "
      "org/name for main)"]),
    ("hub-not-cached-offline", c_hub_not_cached,
     ["r.yaml: org/missing: not in the Hugging Face cache (", ") and HF_HUB_OFFLINE is set; fetch it online first "
                                                              "with `hf download org/missing`"]),
    ("hub-incomplete-snapshot", c_hub_incomplete,
     ["r.yaml: org/partial: the cached snapshot of org/partial at 'main' is incomplete (1 file(s) are missing "
      "(model.safetensors)); complete it online with `hf download org/partial`"]),
    ("adapter-other-architecture", c_adapter_architecture,
     ["org/lora-other@", ": LoRA factors of 'model.layers.0.mlp.up_proj' ([128, 4] @ [4, 64]) do not make the "
                         "base's 'model.layers.0.mlp.up_proj.weight' [256, 96] (an adapter for another "
                         "architecture?)"]),
    ("adapter-dora", c_adapter_dora,
     ["org/lora-dora@", ": a DoRA adapter (use_dora: true)", "merge it into its base with PEFT (merge_and_unload) "
                                                             "and list the result as a full fine-tune"]),
    ("adapter-not-lora", c_adapter_type,
     ["org/ia3@", "IA3 adapter; only LoRA adapters can be merged", "merge it into its base with PEFT "
                                                                   "(merge_and_unload)"]),
    ("adapter-without-base", c_adapter_no_base,
     ["org/lora@", ": a LoRA adapter needs a base model: give the space or recipe a base (a soup: --base), or write "
                   "BASE+ADAPTER"]),
]


@pytest.mark.parametrize("case,build,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, build, fragments, tmp_path, family, other_family, zoo, monkeypatch, capsys, request):
    monkeypatch.chdir(tmp_path)
    if build in HUB_CASES:
        hub = request.getfixturevalue("hub_cache")
        monkeypatch.setenv("HF_HUB_CACHE", str(hub.cache))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        cached = sorted(str(p) for p in hub.cache.rglob("*"))
    argv, absent = build(tmp_path, family, other_family, zoo)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    # progress lines, and each Hub ID's resolution ("org/x: resolved to commit C") are logged before it
    lines = [line for line in err.splitlines() if not line.startswith(("merging", "curvature"))
             and not RESOLVED.fullmatch(line)]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for frag in fragments:
        assert frag in lines[0], lines[0]
    for p in absent:
        assert not Path(p).exists(), p
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before  # nothing written, no temp files
    if case == "merge-output-exists":
        assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    if build in HUB_CASES:  # offline: the cache is read, never written
        assert sorted(str(p) for p in hub.cache.rglob("*")) == cached


def test_the_catalog_documents_every_case():
    catalog = DOC.read_text().split("\n## Bad-input catalog\n")[1].split("\n## ")[0]  # not the usage mistakes
    rows = [line for line in catalog.splitlines() if line.startswith("| `")]
    documented = {re.match(r"\| `([^`]+)`", r).group(1): r for r in rows}
    assert sorted(documented) == sorted(c[0] for c in CASES)
    for case, _, fragments in CASES:
        row = documented[case]
        assert "| 2 |" in row
        for frag in fragments:
            assert frag.replace("|", "\\|") in row, (case, frag)
    assert len(CASES) >= 15


def test_every_handled_input_has_its_test():
    """The "Handled, not refused" rows each name a test of tests/test_hub_sources.py."""
    import test_hub_sources

    section = DOC.read_text().split("\n## Handled, not refused\n")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert {re.match(r"\| `([^`]+)`", r).group(1) for r in rows} == {"adapter-modules-to-save",
                                                                     "hub-unreachable-cached"}
    for row in rows:
        test = re.search(r"\| `(test_\w+)` \|$", row).group(1)
        assert callable(getattr(test_hub_sources, test, None)), test
