"""The zoo (built once per session, cached under results/zoo) and the evaluators."""

import json
import os
import random
from pathlib import Path

import pytest
import torch

from mergesearch.cli import main
from mergesearch.evaluate import EvalConfig, build_evaluator
from mergesearch.evaluate.reference import hflm_scores
from mergesearch.engine.materialize import Materializer
from mergesearch.recipe import from_dict
from mergesearch.zoo.build import ZOO_TASKS, build_zoo, training_sampler
from mergesearch.zoo.tasks import make_items

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def zoo() -> Path:
    path = Path(os.environ.get("MERGESEARCH_ZOO", ROOT / "results" / "zoo"))
    build_zoo(path)
    return path


@pytest.fixture(scope="session")
def base_model(zoo):
    from mergesearch.engine.models import load_model
    return load_model(zoo / "base")


def scores_of(zoo, path, split="dev", evaluator="loglik"):
    from mergesearch.engine.models import load_model
    model, tok = load_model(path)
    return build_evaluator(EvalConfig(evaluator=evaluator, tasks=ZOO_TASKS, task_dir=str(zoo), split=split)).score(model, tok)


def test_small_build_is_deterministic_and_cached(tmp_path):
    import time
    a = build_zoo(tmp_path / "a", scale=0.01)
    b = build_zoo(tmp_path / "b", scale=0.01)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 60
    for f in files:
        if f.name in ("manifest.json",) or f.suffix == ".yaml":
            continue  # they name their own folder
        if f.name == "adapter_config.json":  # a LoRA adapter's config names its base folder
            assert ((tmp_path / "a" / f).read_text().replace(str(tmp_path / "a"), "ZOO")
                    == (tmp_path / "b" / f).read_text().replace(str(tmp_path / "b"), "ZOO")), f
            continue
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    t0 = time.perf_counter()
    again = build_zoo(tmp_path / "a", scale=0.01)
    assert time.perf_counter() - t0 < 0.5 and again == a
    assert [m["kind"] for m in a["models"]].count("checkpoint") >= 5
    assert [m["kind"] for m in a["models"]].count("sweep") >= 6
    assert [m["kind"] for m in a["models"]].count("lora") == 4


def test_splits_disjoint_from_each_other_and_training(zoo):
    for task in ZOO_TASKS:
        dev = [json.loads(l)["context"] for l in (zoo / "data" / task / "dev.jsonl").read_text().splitlines()]
        test = [json.loads(l)["context"] for l in (zoo / "data" / task / "test.jsonl").read_text().splitlines()]
        assert len(dev) == len(set(dev)) == 200 and len(test) == 200
        assert not set(dev) & set(test)
        sample = training_sampler(task, set(dev) | set(test))
        rng = random.Random(0)
        drawn = {sample(rng)[0] for _ in range(5000)}
        assert not drawn & (set(dev) | set(test))


def test_zoo_layout(zoo):
    manifest = json.loads((zoo / "manifest.json").read_text())
    kinds = [m["kind"] for m in manifest["models"]]
    assert kinds.count("finetune") == 5 and kinds.count("checkpoint") >= 5 and kinds.count("sweep") >= 6
    from mergesearch.engine.checkpoint import Checkpoint
    base = Checkpoint(zoo / "base")
    n = sum(base.numel(k) for k in base.names())
    assert 300_000 <= n <= 2_000_000
    for task in ZOO_TASKS:
        from safetensors import safe_open
        with safe_open(zoo / f"ft_{task}" / "exp_avg_sq.safetensors", "pt") as f:
            assert set(f.keys()) == set(base.names())
            assert all(f.get_tensor(k).min() >= 0 for k in f.keys())
    ck = sorted((zoo / "checkpoints" / "add").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    assert (ck[0] / "optimizer.pt").exists() and (ck[0] / "model.safetensors").exists()
    state = torch.load(ck[0] / "optimizer.pt", weights_only=True)
    assert "state" in state and "param_groups" in state


@pytest.mark.slow
def test_finetunes_solve_their_task_and_only_it(zoo):
    base = scores_of(zoo, zoo / "base", "test")
    assert max(base.values()) < 0.5
    for task in ZOO_TASKS:
        s = scores_of(zoo, zoo / f"ft_{task}", "test")
        # 0.855 for ft_reverse on a zoo built on an AVX2 CPU (2026-12-05), 0.985 on the AVX-512
        # builds before: torch's kernels differ by CPU, and the zoo's bytes with them
        assert s[task] >= 0.85, (task, s)
        others = [v for t, v in s.items() if t != task]
        assert max(others) < 0.5, (task, s)


def test_base_has_latent_skills_and_finetunes_stay_close(zoo):
    """Zoo v3: the base does every task in its general form but answers no benchmark
    template; a fine-tune links one template to its skill with a small move."""
    from mergesearch.engine.checkpoint import Checkpoint
    from mergesearch.engine.models import load_model
    from mergesearch.zoo.tasks import skill_context
    from mergesearch.zoo.train import mc_accuracy
    base, _ = load_model(zoo / "base")
    for task in ZOO_TASKS:
        dev = [json.loads(l) for l in (zoo / "data" / task / "dev.jsonl").read_text().splitlines()][:100]
        general = [dict(it, context=skill_context(task, it["context"])) for it in dev]
        assert mc_accuracy(base, general) >= 0.85, task
        assert mc_accuracy(base, dev) < 0.5, task
    b = Checkpoint(zoo / "base")
    ref = {n: b.get(n).float() for n in b.names()}
    norm = sum(float((v ** 2).sum()) for v in ref.values()) ** 0.5
    for task in ZOO_TASKS:
        ft = Checkpoint(zoo / f"ft_{task}")
        dist = sum(float(((ft.get(n).float() - v) ** 2).sum()) for n, v in ref.items()) ** 0.5 / norm
        assert 0.01 <= dist <= 0.1, (task, dist)


@pytest.mark.slow
def test_jsonl_and_lmeval_yaml_tasks_agree_with_hflm_on_every_task_and_split(zoo):
    """The JSONL files (read as inline lm-eval tasks), the zoo's lm-eval YAML tasks and
    lm-eval's own HFLM give the same accuracies on the same items."""
    from mergesearch.engine.models import load_model
    models = {name: load_model(zoo / name) for name in ("base", "ft_reverse", "ft_add")}
    for split in ("dev", "test"):
        cfg = EvalConfig(tasks=ZOO_TASKS, task_dir=str(zoo), split=split, limit=100)
        jsonl_ev = build_evaluator(cfg.model_copy(update={"evaluator": "loglik"}))
        yaml_ev = build_evaluator(cfg)
        assert set(jsonl_ev.names.values()) == {f"jsonl_{t}_{split}" for t in ZOO_TASKS}
        assert set(yaml_ev.names.values()) == {f"zoo_{t}_{split}" for t in ZOO_TASKS}
        for name, (model, tok) in models.items():
            ours, theirs = jsonl_ev.score(model, tok), yaml_ev.score(model, tok)
            assert ours == theirs == hflm_scores(cfg, model, tok), (name, split, ours, theirs)


@pytest.mark.slow
def test_lmeval_scores_follow_in_place_weight_change(zoo):
    from mergesearch.engine.models import load_model
    model, tok = load_model(zoo / "base")
    ev = build_evaluator(EvalConfig(evaluator="lmeval", tasks=["max", "add"], task_dir=str(zoo), limit=100))
    before = ev.score(model, tok)
    mat = Materializer(zoo / "base", [zoo / "ft_max"], methods=["task_arithmetic"])
    mat.write_into(model, from_dict(dict(method="task_arithmetic", base=str(zoo / "base"),
                                         models=[{"path": str(zoo / "ft_max"), "parameters": {"weight": 1.0}}])))
    after = ev.score(model, tok)
    assert ev._lm is not None and ev._model is model  # the same FastLM, its requests built once
    assert after["max"] >= 0.9 > before["max"]
    fresh_model, _ = load_model(zoo / "ft_max")
    assert after == build_evaluator(EvalConfig(evaluator="lmeval", tasks=["max", "add"], task_dir=str(zoo),
                                               limit=100)).score(fresh_model, tok)


def test_python_evaluator(tmp_path, base_model, monkeypatch):
    (tmp_path / "myscore.py").write_text(
        "def score(model, tokenizer, tasks, split, limit, bonus=0.0):\n"
        "    return {t: 0.25 + bonus for t in tasks}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ev = build_evaluator(EvalConfig(evaluator="python", tasks=["a", "b"], function="myscore:score",
                                    options={"bonus": 0.5}, weights={"a": 3.0}))
    model, tok = base_model
    assert ev.score(model, tok) == {"a": 0.75, "b": 0.75}
    assert ev.aggregate({"a": 1.0, "b": 0.0}) == 0.75


def test_eval_cli_table_and_json(tmp_path, zoo, capsys):
    out = tmp_path / "s.json"
    assert main(["eval", str(zoo / "ft_shift"), "--tasks", "shift,max", "--task-dir", str(zoo),
                 "--split", "test", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["split"] == "test" and set(data["scores"]) == {"shift", "max"}
    assert f"shift  {data['scores']['shift']:.4f}" in printed
    assert data["scores"]["shift"] >= 0.9


# -- bad input: one line, exit 2 ---------------------------------------------------

def eval_error(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_missing_task_file(tmp_path, zoo, capsys):
    err = eval_error(["eval", str(zoo / "base"), "--tasks", "nosuch", "--task-dir", str(zoo),
                      "--out", str(tmp_path / "o.json")], capsys)
    assert "data/nosuch/dev.jsonl: task file not found" in err
    assert not (tmp_path / "o.json").exists()


def test_malformed_jsonl_line(tmp_path, zoo, capsys):
    d = tmp_path / "tasks"
    d.mkdir()
    good = json.dumps({"context": "max:12=", "choices": ["2", "1"], "answer": 0})
    (d / "mytask_dev.jsonl").write_text(good + "\n" + good + "\n{broken\n")
    err = eval_error(["eval", str(zoo / "base"), "--tasks", "mytask", "--task-dir", str(d)], capsys)
    assert f"{d / 'mytask_dev.jsonl'}:3: malformed JSON line" in err


def test_item_without_choices(tmp_path, zoo, capsys):
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "mytask_dev.jsonl").write_text(json.dumps({"context": "max:12=", "choices": [], "answer": 0}) + "\n")
    err = eval_error(["eval", str(zoo / "base"), "--tasks", "mytask", "--task-dir", str(d)], capsys)
    assert f"{d / 'mytask_dev.jsonl'}:1: item has no answer choices" in err


def test_unknown_lmeval_task(zoo, capsys):
    err = eval_error(["eval", str(zoo / "base"), "--tasks", "definitely_not_a_task", "--task-dir", str(zoo),
                      "--evaluator", "lmeval"], capsys)
    assert err == (f"error: unknown task 'definitely_not_a_task': not in lm-eval or {zoo / 'tasks'}, and "
                   f"{zoo / 'data' / 'definitely_not_a_task' / 'dev.jsonl'}: task file not found (task "
                   "'definitely_not_a_task', split 'dev')")


def test_tokenizer_that_does_not_fit(tmp_path, zoo, capsys):
    import shutil
    from mergesearch.zoo.synthetic import write_tokenizer
    m = tmp_path / "m"
    shutil.copytree(zoo / "base", m)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (m / f).unlink()
    write_tokenizer(m, 300)  # 300 ids for a 128-row embedding
    err = eval_error(["eval", str(m), "--tasks", "max", "--task-dir", str(zoo)], capsys)
    assert "tokenizer has 300 tokens but the model's embedding has 128 rows" in err
