"""The zoo's PEFT LoRA adapters (``lora_<task>/``): small files that PEFT and mergesearch
read alike, searched and souped end to end (a real Ray instance, a real SQLite store)
alone and beside full fine-tunes, exported as full checkpoints."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from mergesearch.cli import main
from mergesearch import sources
from mergesearch.engine.checkpoint import Checkpoint, read_safetensors_header
from mergesearch.runs.store import load_run
from mergesearch.zoo.build import LORA, ZOO_TASKS

from conftest import load_weights
from test_zoo_eval import zoo  # noqa: F401  (session fixture)

ROOT = Path(__file__).resolve().parents[1]


def lora_params(base: Checkpoint, r: int, targets) -> int:
    """LoRA parameters of rank ``r`` on every ``targets`` projection: r x (in + out) each."""
    return sum(r * sum(base.shape(n)) for n in base.names()
               if n.endswith(".weight") and n.split(".")[-2] in targets)


def test_adapters_are_small_and_peft_reads_them_as_we_do(zoo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mergesearch.engine.models import load_model

    manifest = json.loads((zoo / "manifest.json").read_text())
    entries = {m["name"]: m for m in manifest["models"] if m["kind"] == "lora"}
    assert sorted(entries) == sorted(f"lora_{t}" for t in ZOO_TASKS)
    base = Checkpoint(zoo / "base")
    cfg = json.loads((zoo / "base" / "config.json").read_text())
    # 4 layers x r x (4 x (96 + 96) + 3 x (96 + 256)): q, k, v, o, gate, up and down
    expected = cfg["num_hidden_layers"] * 8 * (4 * (96 + 96) + 3 * (96 + 256))
    assert expected == lora_params(base, LORA["r"], LORA["targets"]) == 58_368
    full = (zoo / "ft_add" / "model.safetensors").stat().st_size
    for task in ZOO_TASKS:
        folder = zoo / f"lora_{task}"
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        conf = json.loads((folder / "adapter_config.json").read_text())
        assert (conf["peft_type"], conf["r"], conf["lora_alpha"]) == ("LORA", 8, 16)
        assert conf["target_modules"] == sorted(LORA["targets"])
        assert conf["base_model_name_or_path"] == str(Path(manifest["root"]) / "base")  # where it was built
        header = read_safetensors_header(folder / "adapter_model.safetensors")
        shapes = [v["shape"] for k, v in header.items() if k != "__metadata__"]
        assert len(shapes) == 2 * 7 * cfg["num_hidden_layers"]  # an A and a B per module
        assert sum(s[0] * s[1] for s in shapes) == expected == entries[f"lora_{task}"]["trainable_parameters"]
        size = (folder / "adapter_model.safetensors").stat().st_size
        assert expected * 4 < size < expected * 4 + 16_384  # float32 factors and a header
        assert size < 0.15 * full  # 12% of a full fine-tune's weights: rank 8 of widths 96 and 256
        # the fine-tune the adapter makes, as PEFT merges it and as mergesearch loads BASE+ADAPTER
        ours, _ = load_model(f"{zoo / 'base'}+{folder}")
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo / "base"), folder)
        merged = peft.merge_and_unload().state_dict()
        for n, p in ours.state_dict().items():
            torch.testing.assert_close(p, merged[n], rtol=0, atol=1e-6)
        entry = entries[f"lora_{task}"]
        assert entry["task"] == task and entry["distance"] > 0.01
        assert entry["accuracy"]["test"] >= 0.75, entry  # the numbers per build are in docs/ZOO.md


def _space(tmp_path: Path, zoo: Path, name: str, data: dict) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _check_export(run: Path, zoo: Path, adapters: list[str]) -> dict:
    """The export is a full checkpoint (every tensor of the base, loadable by transformers)
    whose recipe names the adapters as BASE+ADAPTER, and whose weights are the in-memory
    candidate's for that recipe, bit for bit."""
    from transformers import AutoModelForCausalLM

    from mergesearch.engine.materialize import Materializer
    from mergesearch.recipe import from_dict

    base = Checkpoint(zoo / "base")
    exported = load_weights(run / "model")
    assert set(exported) == set(base.names())
    assert all(exported[n].shape == base.shape(n) for n in exported)
    AutoModelForCausalLM.from_pretrained(run / "model")  # loads with no missing or unexpected keys
    data = yaml.safe_load((run / "best_recipe.yaml").read_text())
    recipe = from_dict(data)
    base_ref = str((zoo / "base").resolve())
    assert sources.key(recipe.base) == sources.key(base_ref)
    refs = [m.path for m in recipe.models]
    for ref in refs:
        model, adapter = sources.split(ref)
        if Path(model.text).name == "base":
            assert adapter is not None and sources.key(model.text) == sources.key(base_ref)
            assert Path(adapter.text).resolve() == (zoo / Path(adapter.text).name).resolve()
    assert sorted(sources.short(r) for r in refs if "+" in r) == sorted(f"+{a}" for a in adapters)
    mat = Materializer(recipe.base, refs, methods=[recipe.method])
    in_memory = mat.state_dict(recipe)
    mat.close()
    assert set(in_memory) == set(exported)
    for n in exported:
        assert torch.equal(exported[n], in_memory[n]), n
    changed = [n for n in exported if not torch.equal(exported[n], base.get(n))]
    assert changed
    if all("+" in r for r in refs):  # adapters alone change only the projections they target
        assert all(n.split(".")[-2] in LORA["targets"] for n in changed)
    return data


@pytest.mark.slow
def test_search_over_lora_adapters_and_a_mixed_family(tmp_path, zoo, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # search_spaces/lora.yaml as shipped, on this session's zoo, with a tiny budget
    data = yaml.safe_load((ROOT / "search_spaces" / "lora.yaml").read_text())
    assert data["models"] == [f"../results/zoo/lora_{t}" for t in ZOO_TASKS]
    data.update(base=str(zoo / "base"), models=[str(zoo / f"lora_{t}") for t in ZOO_TASKS],
                budget={"n_trials": 8})  # 4 sources (normalized objective), 2 baselines, 2 search trials
    data["evaluator"].update(task_dir=str(zoo), limit=20)
    space = _space(tmp_path, zoo, "lora", data)
    assert main(["plan", str(space)]) == 0
    out = capsys.readouterr().out
    assert out.count("(LoRA factors)") == 4
    assert main(["search", str(space), "--run", "lora", "--workers", "2"]) == 0
    study, _ = load_run("lora", root=tmp_path / "results")
    trials = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(trials) >= 2
    for t in trials:
        refs = [m["path"] for m in t.user_attrs["recipe"]["models"]]
        assert all(sources.short(r) == f"+lora_{task}" for r, task in zip(refs, ZOO_TASKS))
    run = tmp_path / "results" / "lora"
    _check_export(run, zoo, [f"lora_{t}" for t in ZOO_TASKS])
    scores = json.loads((run / "scores.json").read_text())
    assert scores["dev"]["verified"] is True
    # each adapter, loaded as BASE+ADAPTER for its test scores, solves its own task only
    sources_test = {sources.short(k): v["scores"] for k, v in scores["test"]["sources"].items()}
    assert set(sources_test) == {"base"} | {f"+lora_{t}" for t in ZOO_TASKS}
    for task in ZOO_TASKS:
        own = sources_test[f"+lora_{task}"]
        assert own[task] >= 0.7 and own[task] >= sources_test["base"][task] + 0.3, (task, sources_test)
    card = (run / "model" / "README.md").read_text()
    assert "lora_add" in card

    # a mixed family: two full fine-tunes and two adapters, TIES by layer group
    mixed = _space(tmp_path, zoo, "mixed", {
        "base": str(zoo / "base"),
        "models": [str(zoo / "ft_reverse"), str(zoo / "ft_shift"), str(zoo / "lora_max"), str(zoo / "lora_add")],
        "evaluator": {"tasks": list(ZOO_TASKS), "task_dir": str(zoo), "limit": 20},
        "methods": ["ties"],
        "parameters": {"weight": {"low": 0.2, "high": 1.5}, "density": {"low": 0.2, "high": 1.0}},
        "granularity": {"level": "groups", "n_groups": 2},
        "budget": {"n_trials": 4},  # 2 baselines and 2 search trials
        "seed": 1,
    })
    assert main(["search", str(mixed), "--run", "mixed", "--workers", "2"]) == 0
    study, _ = load_run("mixed", root=tmp_path / "results")
    assert all(t.state.name == "COMPLETE" for t in study.get_trials())
    recipe = _check_export(tmp_path / "results" / "mixed", zoo, ["lora_max", "lora_add"])
    kinds = [("+" in m["path"]) for m in recipe["models"]]
    assert kinds == [False, False, True, True]
    assert json.loads((tmp_path / "results" / "mixed" / "scores.json").read_text())["dev"]["verified"] is True


@pytest.mark.slow
def test_greedy_soup_of_adapters(tmp_path, zoo, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ev = tmp_path / "eval.yaml"
    ev.write_text(yaml.safe_dump({"evaluator": "loglik", "tasks": ["max", "add"], "task_dir": str(zoo),
                                  "limit": 40}))
    ingredients = [str(zoo / f"lora_{t}") for t in ("max", "add", "reverse")]
    assert main(["soup", *ingredients, "--eval", str(ev), "--base", str(zoo / "base"), "--run", "soup-lora",
                 "--workers", "2"]) == 0
    assert "soup run soup-lora: greedy" in capsys.readouterr().out
    run = tmp_path / "results" / "soup-lora"
    report = json.loads((run / "soup.json").read_text())
    assert [sources.short(i["path"]) for i in report["ingredients"]] == ["+lora_max", "+lora_add", "+lora_reverse"]
    assert all(sources.key(sources.split(i["path"])[0].text) == sources.key(str(zoo / "base"))
               for i in report["ingredients"])  # each pinned as BASE+ADAPTER
    assert report["failed"] == 0 and report["members"] and all(i["dev"] is not None for i in report["ingredients"])
    for row in ("best ingredient", "uniform soup", "final soup"):
        r = report["rows"][row]
        assert 0.0 <= r["dev"] <= 1.0 and 0.0 <= r["test"] <= 1.0 and set(r["test_scores"]) == {"max", "add"}
    assert report["rows"]["final soup"]["dev"] >= report["rows"]["best ingredient"]["dev"]
    study, _ = load_run("soup-lora", root=tmp_path / "results")
    final = study.user_attrs["final_recipe"]
    assert final["method"] == "linear" and all("+" in m["path"] for m in final["models"])
    scores = json.loads((run / "scores.json").read_text())
    assert scores["dev"]["verified"] is True
    # the soup's recipe names the adapters' base (its untouched tensors are the base's)
    assert sources.key(final["base"]) == sources.key(str(zoo / "base"))
    _check_export(run, zoo, [sources.short(m)[1:] for m in report["members"]])
