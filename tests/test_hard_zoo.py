"""The hard benchmark zoo (`mergesearch zoo build --preset hard`), built at a small scale:
its files, its item sets, its lm-eval tasks (seven multiple choice, one generation scored
by exact match) and the build's own accuracy checks against lm-eval's."""

import json
from pathlib import Path

import pytest
import torch

from mergesearch.cli import main
from mergesearch.engine.models import load_model
from mergesearch.evaluate import EvalConfig, build_evaluator
from mergesearch.zoo import hard_tasks as ht
from mergesearch.zoo.build import build_zoo
from mergesearch.zoo.hard import HARD_TASKS, gen_accuracy, greedy, own_accuracy


@pytest.fixture(scope="module")
def hard(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hard") / "zoo_hard"
    build_zoo(out, scale=0.01, preset="hard")
    return out


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_layout_items_and_cache(hard):
    m = json.loads((hard / "manifest.json").read_text())
    assert m["preset"] == "hard" and list(m["tasks"]) == HARD_TASKS == [
        "reverse", "rotate", "shift", "max", "min", "add", "who", "dup"]
    assert [x["name"] for x in m["models"]] == ["base"] + [f"ft_{t}" for t in HARD_TASKS]
    assert m["built_with"] == {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
                               "threads": torch.get_num_threads()}
    assert all((hard / f"ft_{t}" / "exp_avg_sq.safetensors").exists() for t in HARD_TASKS)
    cfg = json.loads((hard / "base" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (128, 5, 320)
    facts = ht.fact_table()
    for task in HARD_TASKS:
        splits = {s: read(hard / "data" / task / f"{s}.jsonl") for s in ("dev", "test", "train")}
        want = (128, 128, 64) if task == "who" else (200, 200, 128)
        assert tuple(len(splits[s]) for s in ("dev", "test", "train")) == want
        contexts = [it["context"] for s in splits.values() for it in s]
        assert len(set(contexts)) == len(contexts)  # the splits are disjoint
        for it in splits["dev"]:
            assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
            if task in ("reverse", "rotate", "shift", "dup"):  # no choice is a prefix of the answer
                assert len({len(c) for c in it["choices"]}) == 1
            assert ("target" in it) == (task == "dup")
    who = [it for s in ("dev", "test", "train") for it in read(hard / "data" / "who" / f"{s}.jsonl")]
    assert all(it["choices"][it["answer"]] == facts[it["context"][4:-1]] for it in who)
    dup = read(hard / "data" / "dup" / "dev.jsonl")
    assert all(it["target"] == "".join(c + c for c in it["context"][4:-1]) for it in dup)
    # the pairs share their input format: the partner's answer is always a wrong choice
    for it in read(hard / "data" / "reverse" / "dev.jsonl"):
        s = it["context"][4:-1]
        assert s[1:] + s[0] in it["choices"] or s[1:] + s[0] == s[::-1]
    for it in read(hard / "data" / "max" / "dev.jsonl"):
        digits = it["context"][4:-1]
        assert min(digits) in it["choices"] or min(digits) == max(digits)
    again = build_zoo(hard, scale=0.01, preset="hard")  # cached: returned at once
    assert again == m


def test_lmeval_tasks_score_what_the_build_measured(hard):
    """Multiple choice through lm-eval equals the build's mc_accuracy item for item; the
    generation task is scored by exact match of the greedy output, as gen_accuracy scores it."""
    model, tok = load_model(hard / "ft_who")
    ev = build_evaluator(EvalConfig(tasks=HARD_TASKS, task_dir=str(hard), split="dev"))
    got = ev.score(model, tok)
    assert ev.output_types()["dup"] == {"generate_until"} and ev.output_types()["who"] == {"multiple_choice"}
    for task in HARD_TASKS:
        items = read(hard / "data" / task / "dev.jsonl")
        assert got[task] == pytest.approx(own_accuracy(model, task, items), abs=1e-9), task
    m = json.loads((hard / "manifest.json").read_text())
    ft = next(x for x in m["models"] if x["name"] == "ft_who")
    assert ft["accuracy"]["dev"] == round(got["who"], 3)
    # exact match: targets set to the model's own greedy outputs all match; one character off, none
    items = read(hard / "data" / "dup" / "dev.jsonl")[:40]
    outs = greedy(model, [it["context"] for it in items])
    assert gen_accuracy(model, [dict(it, target=o) for it, o in zip(items, outs)]) == 1.0
    assert gen_accuracy(model, [dict(it, target=o + "a") for it, o in zip(items, outs)]) == 0.0


def test_unknown_preset_is_one_line(tmp_path, capsys):
    assert main(["zoo", "build", "--preset", "huge", "--out", str(tmp_path / "z")]) != 0
    err = capsys.readouterr().err.strip()
    assert err == "error: zoo build: unknown preset 'huge' (one of: bundled, hard)"
    assert not (tmp_path / "z").exists()
