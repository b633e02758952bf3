"""The evaluation engine: lm-eval builds the requests and computes the metrics, FastLM
computes on the in-memory model. Every output type scores exactly as lm-eval's own HFLM
on the same model and items; requests are tokenized once; a shared context is run once;
any subset of items is a rung; JSONL files and dev/test task pairs are lm-eval tasks."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mergesearch.cli import main
from mergesearch.errors import MergeSearchError
from mergesearch.evaluate import EvalConfig, build_evaluator
from mergesearch.evaluate.reference import hflm_results, hflm_scores

from test_zoo_eval import zoo  # noqa: F401  (session fixture)

TEMPLATES = Path(__file__).parent / "lmeval_tasks"
# a chat template in the zoo tokenizer's characters (printable ASCII)
CHAT = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    from mergesearch.zoo.tasks import write_lmeval_examples
    root = tmp_path_factory.mktemp("engine_tasks")
    write_lmeval_examples(root, TEMPLATES, 160)
    return root


@pytest.fixture(scope="module")
def models(zoo):
    from mergesearch.engine.models import load_model
    return {name: load_model(zoo / name) for name in ("base", "ft_add", "ft_max")}


def cfg(task_dir, tasks, **over) -> EvalConfig:
    return EvalConfig.model_validate({"evaluator": "lmeval", "tasks": tasks, "task_dir": str(task_dir),
                                      "batch_size": 16, "dev_items": 48, "test_items": 64, **over})


CASES = {
    "arc-style acc": (["mc_add"], {}),
    "arc-style acc_norm": (["mc_add"], {"metrics": {"mc_add": "acc_norm"}}),
    "hellaswag-style process_docs, acc_norm": (["hs_add"], {"metrics": {"hs_add": "acc_norm"}}),
    "mmlu-style group, 5-shot": (["pair"], {"num_fewshot": 5}),
    "gsm8k-style strict-match": (["gen_add"], {}),
    "gsm8k-style flexible-extract": (["gen_add"], {"metrics": {"gen_add": "exact_match,flexible-extract"}}),
    "wikitext-style word perplexity": (["ppl_add"], {}),
    "wikitext-style bits per byte": (["ppl_add"], {"metrics": {"ppl_add": "bits_per_byte"}}),
    "chat template": (["mc_max", "gen_add"], {"apply_chat_template": True, "system_instruction": "Answer.",
                                              "metrics": {"gen_add": "exact_match,flexible-extract"}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_output_type_scores_as_lm_eval_hflm(task_dir, models, case):
    tasks, over = CASES[case]
    c = cfg(task_dir, tasks, **over)
    ev = build_evaluator(c)
    for name in ("base", "ft_add"):
        model, tok = models[name]
        if c.apply_chat_template:
            tok.chat_template = CHAT
        try:
            ours, theirs = ev.score(model, tok), hflm_scores(c, model, tok)
            ev._model = None  # the next model object builds its own requests
        finally:
            tok.chat_template = None
        for task in tasks:
            metric = ev.metric[task][0]
            if "perplexity" in metric or metric == "bits_per_byte":
                assert ours[task] == pytest.approx(theirs[task], rel=1e-6), (name, task)
            else:
                assert ours[task] == theirs[task], (name, task, ours, theirs)
    if case.startswith("gsm8k-style flexible"):
        assert ours["gen_add"] > 0.5  # ft_add writes the sums: the equality is not of zeros
    if case == "chat template":  # the prompts carry the template and the system instruction
        model, tok = models["base"]
        tok.chat_template = CHAT
        try:
            prompt = build_evaluator(c).requests(model, tok, "mc_max")[0][3][0].args[0]
        finally:
            tok.chat_template = None
        assert prompt.startswith("[system] Answer. [user] max:") and prompt.endswith("[assistant] ")


def test_requests_are_tokenized_once_and_shared_contexts_run_once(task_dir, models):
    from mergesearch.evaluate.fastlm import FastLM
    model, tok = models["ft_add"]
    ev = build_evaluator(cfg(task_dir, ["mc_add", "gen_add", "ppl_add"]))
    first = ev.score(model, tok)
    calls = []
    real = type(tok).__call__, type(tok).encode
    type(tok).__call__ = lambda self, *a, **k: calls.append(a) or real[0](self, *a, **k)
    type(tok).encode = lambda self, *a, **k: calls.append(a) or real[1](self, *a, **k)
    try:
        lm = ev.lm(model, tok)
        before = lm.forward_tokens
        assert ev.score(model, tok) == first
        mc_tokens = lm.forward_tokens - before
    finally:
        type(tok).__call__, type(tok).encode = real
    assert calls == []  # the second candidate never touches the tokenizer
    # multiple choice: the four choices share one copy of the context
    pairs = [i.args for _, _, _, insts in ev.requests(model, tok, "mc_add") for i in insts]
    assert len(pairs) == 4 * 48
    shared, plain = FastLM(model, tok, batch_size=16), FastLM(model, tok, batch_size=16, share_context=False)
    a, b = shared.loglikelihood_pairs(pairs), plain.loglikelihood_pairs(pairs)
    assert [g for _, g in a] == [g for _, g in b]
    assert max(abs(x - y) for (x, _), (y, _) in zip(a, b)) < 1e-4
    assert shared._share and shared.forward_tokens < 0.6 * plain.forward_tokens
    assert mc_tokens > 0


def test_packing_is_switched_off_where_a_model_ignores_4d_masks(task_dir, models, monkeypatch, caplog):
    from mergesearch.evaluate.fastlm import FastLM
    model, tok = models["ft_add"]
    ev = build_evaluator(cfg(task_dir, ["mc_add"]))
    pairs = [i.args for _, _, _, insts in ev.requests(model, tok, "mc_add") for i in insts]
    plain = FastLM(model, tok, batch_size=16, share_context=False).loglikelihood_pairs(pairs)
    real = type(model).forward

    def forward(self, *args, attention_mask=None, **kwargs):  # an attention that drops custom masks
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None
        return real(self, *args, attention_mask=attention_mask, **kwargs)
    monkeypatch.setattr(type(model), "forward", forward)
    lm = FastLM(model, tok, batch_size=16)
    with caplog.at_level("WARNING", logger="mergesearch.evaluate.fastlm"):
        out = lm.loglikelihood_pairs(pairs)
    assert not lm._share and out == plain
    assert "does not honour packed contexts" in caplog.text


def test_any_subset_of_items_is_a_rung_for_every_output_type(task_dir, models):
    model, tok = models["ft_add"]
    tasks = ["pair", "gen_add", "ppl_add"]
    ev = build_evaluator(cfg(task_dir, tasks, metrics={"gen_add": "exact_match,flexible-extract"}))
    full = ev.score(model, tok)
    n = {t: len(ev.items[t]) for t in tasks}
    assert n == {"pair": 48, "gen_add": 48, "ppl_add": 48}
    keep: dict = {}
    halves = [{t: list(range(0, n[t], 2)) for t in tasks}, {t: list(range(1, n[t], 2)) for t in tasks}]
    per_item = {t: [] for t in tasks}
    for half in halves:
        items, so_far = ev.score_subset(model, tok, half, keep=keep)
        for t in tasks:
            assert len(items[t]) == len(half[t])
            per_item[t] += items[t]
    # the two rungs together are the whole task, in lm-eval's own aggregation
    assert so_far["pair"] == pytest.approx(full["pair"]) and so_far["gen_add"] == pytest.approx(full["gen_add"])
    assert so_far["ppl_add"] == pytest.approx(full["ppl_add"], rel=1e-9)
    # a mean metric's per-item scores are the documents' own
    assert sum(per_item["gen_add"]) / 48 == pytest.approx(full["gen_add"])
    assert set(per_item["pair"]) <= {0.0, 1.0} and sum(per_item["pair"]) / 48 == pytest.approx(full["pair"])
    # a perplexity's per-item scores are each document's (minus) perplexity: not averaged into the score
    assert all(v < -1 for v in per_item["ppl_add"])
    assert sum(per_item["ppl_add"]) / 48 != pytest.approx(full["ppl_add"])


def test_jsonl_files_are_read_as_lm_eval_tasks(tmp_path, models):
    model, tok = models["ft_add"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"context": f"add:{a}+{b}=", "target": str(a + b)}) + "\n"
                                              for a in range(6) for b in range(4)))
    c = EvalConfig(evaluator="loglik", tasks=[str(tmp_path / "t.jsonl")], split="dev")
    ev = build_evaluator(c)
    assert ev.output_types() == {str(tmp_path / "t.jsonl"): {"loglikelihood"}}
    assert ev.metric[str(tmp_path / "t.jsonl")] == ("acc", "none", True)  # the target is the greedy continuation
    ours = ev.score(model, tok)
    assert ours == hflm_scores(c, model, tok) and 0 < ours[str(tmp_path / "t.jsonl")] <= 1
    (tmp_path / "m.jsonl").write_text(json.dumps({"context": "a", "target": "b"}) + "\n"
                                      + json.dumps({"context": "a", "choices": ["b", "c"], "answer": 0}) + "\n")
    with pytest.raises(MergeSearchError) as e:
        build_evaluator(EvalConfig(tasks=[str(tmp_path / "m.jsonl")]))
    assert str(e.value) == f"{tmp_path / 'm.jsonl'}: mixes multiple-choice and target items (item 2 differs from item 1)"


def test_dev_and_test_as_two_lm_eval_tasks(task_dir, models):
    pair = {"dev": "mt_dev", "test": "mt_test"}
    dev = build_evaluator(EvalConfig.model_validate({"tasks": [pair], "task_dir": str(task_dir)}))
    test = build_evaluator(EvalConfig.model_validate({"tasks": [pair], "task_dir": str(task_dir), "split": "test"}))
    assert dev.tasks == test.tasks == ["mt"] and dev.names == {"mt": "mt_dev"} and test.names == {"mt": "mt_test"}
    assert dev.item_record["mt"]["source"] == "its dev task" and dev.item_record["mt"]["count"] == 60
    assert test.item_record["mt"]["count"] == 100  # no split imposed: every document of each task
    named = EvalConfig.model_validate({"tasks": [{**pair, "name": "maxi"}, "gen_add"], "task_dir": str(task_dir)})
    assert named.tasks == ["maxi", "gen_add"] and named.pairs == {"maxi": pair}
    model, tok = models["ft_max"]
    assert dev.score(model, tok) == hflm_scores(dev.cfg, model, tok)
    with pytest.raises(MergeSearchError, match="evaluator: task 'mt': unknown lm-eval task 'nope' \\(test\\)"):
        build_evaluator(EvalConfig.model_validate({"tasks": [{"dev": "mt_dev", "test": "nope"}],
                                                   "task_dir": str(task_dir), "split": "test"}))
    with pytest.raises(ValueError, match="dev and test are the same task 'mt_dev'"):
        EvalConfig.model_validate({"tasks": [{"dev": "mt_dev", "test": "mt_dev"}]})


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["choice", "distill"])
def test_a_generation_task_is_refined_on_gold_targets_and_by_distillation(task_dir, zoo, loss):
    from mergesearch.engine.materialize import Materializer
    from mergesearch.engine.models import load_model
    from mergesearch.recipe import from_dict
    from mergesearch.search.refine import refine
    model, tok = load_model(zoo / "base")
    mat = Materializer(zoo / "base", [zoo / "ft_add", zoo / "ft_max"], methods=["task_arithmetic"])
    recipe = from_dict({"method": "task_arithmetic", "base": str(zoo / "base"),
                        "models": [{"path": str(zoo / "ft_add"), "parameters": {"weight": 0.3}},
                                   {"path": str(zoo / "ft_max"), "parameters": {"weight": 0.3}}]})
    ev = build_evaluator(cfg(task_dir, ["gen_add"], dev_items=64, metrics={"gen_add": "exact_match,flexible-extract"}))
    opts = {"steps": 40, "lr": 0.1, "batch_size": 16, "loss": loss, "holdout": 0.25, "eval_every": 5, "patience": 4,
            "average": 0.5, "rows": False, "teachers": "confidence", "distill_mix": 1.0}
    groups = [{"name": "", "filters": [], "fallback": [], "default": True}]
    mat.write_into(model, recipe)
    before = ev.score(model, tok)["gen_add"]
    refined, stats = refine(mat, model, tok, ev, recipe, opts, groups, seed=0)
    assert stats["holdout_loss_after"] < stats["holdout_loss_before"]
    if loss == "distill":
        assert stats["teachers"] == {"gen_add": 0}  # ft_add is surest of its own sums
    # the cost, in trials of 64 generations: under distill each item also trains and is
    # checked on its teacher's output (2 sequences), and the 2 teachers score every item
    seqs = 2 if loss == "distill" else 1
    teachers = 2 * 64 if loss == "distill" else 0
    assert stats["cost"] == pytest.approx((teachers + stats["steps"] * 16 * seqs * 3 + len(stats["history"]) * 16 * seqs) / 64)
    from mergesearch.search.refine_data import estimate_cost, task_counts
    assert task_counts(ev) == {"gen_add": (64, 64, True)}
    bound = estimate_cost(opts, task_counts(ev), 2)
    assert stats["cost"] <= bound + 1e-9
    # 40 steps of 16 items, 9 checks of round(0.25 x 64) = 16 items (bounded by 16.5)
    assert bound == pytest.approx((40 * 16 * seqs * 3 + 9 * 16.5 * seqs + teachers) / 64)
    mat.write_into(model, refined)
    after = build_evaluator(ev.cfg).score(model, tok)["gen_add"]
    assert after >= before + 0.3, (before, after)  # measured: 0.016 -> 0.97 (gold), 0.98 (distill)


def test_a_task_a_refinement_cannot_train_on_is_named(task_dir):
    from mergesearch.search.refine_data import untrainable
    ev = build_evaluator(cfg(task_dir, ["gen_add", "mc_add", "ppl_add"]))
    assert untrainable(ev.output_types(), {"loss": "entropy"}) == {
        "gen_add": "generation has no choice distribution for the entropy loss (use distill: the teachers' own "
                   "outputs, or choice: the gold targets)"}
    assert untrainable(ev.output_types(), {"loss": "distill"}) == {}


@pytest.mark.slow
def test_search_with_pruning_and_refinement_on_every_output_type(task_dir, zoo, tmp_path, monkeypatch, capsys):
    """The recommended levers (fidelity rungs, refinement) on lm-eval tasks of every output
    type, two workers, then export: the dev re-score matches and test items are disjoint."""
    import yaml
    monkeypatch.chdir(tmp_path)
    ev = {"evaluator": "lmeval", "tasks": ["hs_add", "pair", "gen_add", "ppl_add"],
          "task_dir": str(task_dir), "dev_items": 24, "test_items": 40, "batch_size": 32, "max_gen_toks": 3,
          "num_fewshot": 0, "metrics": {"hs_add": "acc_norm",
                                        "gen_add": "exact_match,flexible-extract", "ppl_add": "bits_per_byte"}}
    space = {"base": str(zoo / "base"), "models": [str(zoo / "ft_add"), str(zoo / "ft_max")], "evaluator": ev,
             "methods": ["ties"], "scale": True, "parameters": {"weight": {"low": 0.0, "high": 1.0}, "density": 0.8},
             "sampler": {"name": "tpe", "n_startup_trials": 3},
             "fidelity": {"rungs": [0.5, 1.0]},  # the default pruner
             # the README's refinement: per tensor and per row, distilled from the sources (generation
             # from the teachers' own outputs, perplexity on the text itself)
             "refine": {"top": 1, "level": "tensor", "rows": True, "loss": "distill", "steps": 6, "eval_every": 3,
                        "batch_size": 8},
             "budget": {"n_trials": 40}, "seed": 3}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(space))
    assert main(["search", str(tmp_path / "s.yaml"), "--run", "all", "--workers", "2"]) == 0
    run = tmp_path / "results" / "all"
    scores = json.loads((run / "scores.json").read_text())
    assert scores["dev"]["verified"]  # the exported weights re-score their stored dev scores
    for task in ev["tasks"]:
        d, t = scores["items"]["dev"][task], scores["items"]["test"][task]
        assert d["count"] == 24 and t["count"] == 40
        for rd, rt in ([(d, t)] if "sha256" in d else zip(d["subtasks"].values(), t["subtasks"].values())):
            assert rd["sha256"] != rt["sha256"]
    # the test documents are disjoint from the dev documents, as lm-eval numbers them
    dev_ev = build_evaluator(EvalConfig.model_validate(ev))
    test_ev = build_evaluator(EvalConfig.model_validate({**ev, "split": "test"}))
    for leaf, chosen in dev_ev.samples.items():
        assert not set(chosen) & set(test_ev.samples[leaf])
    import optuna
    storage = f"sqlite:///{run / 'study.db'}"
    trials = optuna.load_study(study_name="all", storage=storage).trials
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED")}
    assert states["COMPLETE"] >= 3
    refined = optuna.load_study(study_name="all.refine", storage=storage).trials
    assert len(refined) == 1 and refined[0].user_attrs["refine"]["holdout_loss_before"] > 0
    assert set(refined[0].user_attrs["refine"]["teachers"]) == set(ev["tasks"])  # every type has its teacher
    shutil.rmtree(tmp_path / "results", ignore_errors=True)


@pytest.mark.slow
def test_search_with_a_chat_template_prunes_refines_and_exports(task_dir, zoo, tmp_path, monkeypatch):
    """Models whose tokenizer carries a chat template: every prompt (multiple choice and
    generation) is a chat, in the search, its rungs, its refinement and the export."""
    import yaml
    from transformers import AutoTokenizer

    from conftest import copy_model
    family = {}
    for name in ("base", "ft_add", "ft_max"):
        family[name] = copy_model(zoo / name, tmp_path / "chat" / name)
        tok = AutoTokenizer.from_pretrained(family[name])
        tok.chat_template = CHAT
        tok.save_pretrained(family[name])
    monkeypatch.chdir(tmp_path)
    ev = {"tasks": ["mc_max", "gen_add"], "task_dir": str(task_dir), "dev_items": 24, "test_items": 32,
          "apply_chat_template": True, "system_instruction": "Answer.", "max_gen_toks": 3,
          "metrics": {"gen_add": "exact_match,flexible-extract"}}
    space = {"base": str(family["base"]), "models": [str(family["ft_add"]), str(family["ft_max"])], "evaluator": ev,
             "methods": ["task_arithmetic"], "parameters": {"weight": {"low": 0.0, "high": 1.0}},
             "sampler": {"name": "random"}, "fidelity": {"rungs": [0.5, 1.0]},
             "refine": {"top": 1, "level": "groups", "n_groups": 1, "steps": 4, "eval_every": 2, "batch_size": 8},
             "budget": {"n_trials": 24}, "seed": 0}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(space))
    assert main(["search", str(tmp_path / "s.yaml"), "--run", "chat", "--workers", "2"]) == 0
    scores = json.loads((tmp_path / "results" / "chat" / "scores.json").read_text())
    assert scores["dev"]["verified"]
    # the exported model's test scores are lm-eval's (HFLM, chat template applied) on the test items
    from mergesearch.engine.models import load_model
    model, tok = load_model(Path(scores["model"]))
    assert tok.chat_template == CHAT
    test_cfg = EvalConfig.model_validate({**ev, "split": "test"})
    assert scores["test"]["merged"] == hflm_scores(test_cfg, model, tok)
    shutil.rmtree(tmp_path / "results", ignore_errors=True)
