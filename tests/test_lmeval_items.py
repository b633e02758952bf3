"""lm-eval tasks with one evaluation split: item-level dev/test splits, metric and filter
choice, lower-is-better metrics, groups and generation, on local task files (real lm-eval
runs, no network)."""

import json
import shutil
from pathlib import Path

import pytest

from mergesearch.cli import main
from mergesearch.errors import MergeSearchError
from mergesearch.evaluate import EvalConfig, build_evaluator
from mergesearch.evaluate.reference import hflm_results

from test_zoo_eval import zoo  # noqa: F401  (session fixture)

TEMPLATES = Path(__file__).parent / "lmeval_tasks"
N_DOCS = 160  # per task (tiny: 3)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The task YAMLs under tests/lmeval_tasks with their JSONL data, written from the zoo's
    task generators."""
    from mergesearch.zoo.tasks import write_lmeval_examples
    root = tmp_path_factory.mktemp("lmeval_tasks")
    write_lmeval_examples(root, TEMPLATES, N_DOCS)
    return root


def cfg(task_dir, tasks, **over) -> EvalConfig:
    return EvalConfig(evaluator="lmeval", tasks=tasks, task_dir=str(task_dir), batch_size=32, **over)


@pytest.fixture(scope="module")
def models(zoo):
    from mergesearch.engine.models import load_model
    return {name: load_model(zoo / name) for name in ("base", "ft_add")}


def test_dev_and_test_items_are_disjoint_and_stable(task_dir):
    tasks = ["gen_add", "mc_max", "ppl_add"]
    dev = build_evaluator(cfg(task_dir, tasks, dev_items=40, test_items=70))
    test = build_evaluator(cfg(task_dir, tasks, dev_items=40, test_items=70, split="test"))
    again = build_evaluator(cfg(task_dir, tasks, dev_items=40, test_items=70))
    for t in tasks:
        d, s = set(dev.samples[t]), set(test.samples[t])
        assert len(d) == 40 and len(s) == 70 and not d & s
        assert dev.samples[t] == again.samples[t]  # same items in every process
        assert dev.item_record[t] == {"split": "dev", "source": "an item split of its documents", "count": 40,
                                      "of": N_DOCS, "seed": 0, "sha256": again.item_record[t]["sha256"]}
    # tasks draw different permutations; another seed draws other items
    assert dev.samples["gen_add"] != dev.samples["mc_max"]
    other = build_evaluator(cfg(task_dir, ["gen_add"], dev_items=40, test_items=70, split_seed=1))
    assert other.samples["gen_add"] != dev.samples["gen_add"]
    # fractions, and the default: half dev, the rest test, all items used once
    half = [build_evaluator(cfg(task_dir, ["mc_max"], split=s)).samples["mc_max"] for s in ("dev", "test")]
    assert len(half[0]) == len(half[1]) == N_DOCS // 2 and sorted(half[0] + half[1]) == list(range(N_DOCS))
    frac = build_evaluator(cfg(task_dir, ["mc_max"], dev_fraction=0.25)).samples["mc_max"]
    assert len(frac) == N_DOCS // 4 and set(frac) <= set(half[0]) | set(half[1])
    # limit caps the scored items of a split, within it
    capped = build_evaluator(cfg(task_dir, ["mc_max"], dev_items=40, test_items=70, limit=10)).samples["mc_max"]
    assert len(capped) == 10 and set(capped) <= set(dev.samples["mc_max"])


def test_metric_and_filter_are_the_ones_asked_for(task_dir, models):
    model, tok = models["ft_add"]
    default = build_evaluator(cfg(task_dir, ["gen_add"], dev_items=60, test_items=60))
    assert default.metric["gen_add"] == ("exact_match", "strict-match", True)  # first metric, first filter
    flex = build_evaluator(cfg(task_dir, ["gen_add"], dev_items=60, test_items=60,
                               metrics={"gen_add": "exact_match,flexible-extract"}))
    out = hflm_results(flex.cfg, model, tok)  # lm-eval's own HFLM on the same items
    res = out["results"]["gen_add"]
    assert flex.score(model, tok)["gen_add"] == res["exact_match,flexible-extract"]
    assert default.score(model, tok)["gen_add"] == res["exact_match,strict-match"] == 0.0  # no "####" ever
    assert res["exact_match,flexible-extract"] > 0.5  # ft_add writes the sums
    # only the dev items were scored
    assert out["n-samples"]["gen_add"]["effective"] == 60


def test_every_candidate_sees_the_same_few_shot_examples(task_dir, models):
    ev = build_evaluator(cfg(task_dir, ["mc_max"], dev_items=20, test_items=20, num_fewshot=3))
    model, tok = models["base"]
    prompts = []
    for _ in range(2):  # two candidates: the same requests, built once
        ev.score(model, tok)
        prompts.append(sorted({inst.args[0] for _, _, _, insts in ev.requests(model, tok, "mc_max") for inst in insts}))
    assert len(prompts[0]) == 20 and prompts[0] == prompts[1]
    assert all(p.count("max:") == 4 for p in prompts[0])  # three examples, then the item
    # exactly the prompts lm-eval builds for its own HFLM with the same seed
    ref = hflm_results(ev.cfg, model, tok, log_samples=True)
    assert sorted({a[0] for s in ref["samples"]["mc_max"] for a in s["arguments"]}) == prompts[0]
    other = build_evaluator(cfg(task_dir, ["mc_max"], dev_items=20, test_items=20, num_fewshot=3, fewshot_seed=7))
    assert sorted({i.args[0] for _, _, _, insts in other.requests(model, tok, "mc_max") for i in insts}) != prompts[0]


def test_lower_is_better_metrics_are_maximized(task_dir, models):
    ev = build_evaluator(cfg(task_dir, ["ppl_add"], dev_items=50, test_items=50,
                             metrics={"ppl_add": "word_perplexity"}))
    assert ev.metric["ppl_add"] == ("word_perplexity", "none", False)
    assert ev.directions["ppl_add"]["score"] == "minus the metric (lower is better)"
    scores, ppl = {}, {}
    for name, (model, tok) in models.items():
        ppl[name] = hflm_results(ev.cfg, model, tok)["results"]["ppl_add"]["word_perplexity,none"]
        scores[name] = ev.score(model, tok)["ppl_add"]
        assert scores[name] == pytest.approx(-ppl[name], rel=1e-6) and ppl[name] > 1
    assert ppl["base"] != ppl["ft_add"]
    # the search maximizes the score: the model it prefers is the one of lower perplexity
    assert max(scores, key=scores.get) == min(ppl, key=ppl.get)
    assert build_evaluator(cfg(task_dir, ["ppl_add"], dev_items=50, test_items=50)).metric["ppl_add"][0] == \
        "word_perplexity"


def test_groups_share_their_counts_and_aggregate_like_lm_eval(task_dir, models):
    ev = build_evaluator(cfg(task_dir, ["pair"], dev_items=60, test_items=100))
    rec = ev.item_record["pair"]
    assert rec["count"] == 60 and set(rec["subtasks"]) == {"mc_max", "mc_add"}
    assert {k: r["count"] for k, r in rec["subtasks"].items()} == {"mc_max": 30, "mc_add": 30}
    model, tok = models["ft_add"]
    res = hflm_results(ev.cfg, model, tok)["results"]
    by_size = (res["mc_max"]["acc,none"] * 30 + res["mc_add"]["acc,none"] * 30) / 60
    assert ev.score(model, tok)["pair"] == pytest.approx(res["pair"]["acc,none"]) == pytest.approx(by_size)


def test_dev_from_validation_keeps_the_task_splits(task_dir):
    dev = build_evaluator(cfg(task_dir, ["vt_max"], dev_from="validation"))
    test = build_evaluator(cfg(task_dir, ["vt_max"], dev_from="validation", split="test"))
    assert dev.item_record["vt_max"]["source"] == "its validation split" and len(dev.samples["vt_max"]) == 60
    assert test.item_record["vt_max"]["source"] == "its test split" and len(test.samples["vt_max"]) == N_DOCS - 60
    capped = build_evaluator(cfg(task_dir, ["vt_max"], dev_from="validation", dev_items=20))
    assert capped.samples["vt_max"] == list(range(20))
    with pytest.raises(MergeSearchError, match="dev_from: validation, but lm-eval task 'mc_max' has no validation"):
        build_evaluator(cfg(task_dir, ["mc_max"], dev_from="validation"))


@pytest.mark.parametrize("over,message", [
    ({"metrics": {"gen_add": "bleu"}}, "evaluator: metrics.gen_add: task 'gen_add' has no metric 'bleu' "
                                       "(it has: exact_match)"),
    ({"metrics": {"gen_add": "exact_match,loose"}}, "evaluator: metrics.gen_add: task 'gen_add' has no filter "
                                                    "'loose' (it has: strict-match, flexible-extract)"),
    ({"dev_items": 100, "test_items": 100}, "evaluator: task 'gen_add': dev_items + test_items = 100 + 100 = 200, "
                                            "but the task has only 160 documents"),
])
def test_bad_item_and_metric_settings(task_dir, over, message):
    with pytest.raises(MergeSearchError) as e:
        build_evaluator(cfg(task_dir, ["gen_add"], **over))
    assert str(e.value) == message


def test_a_task_too_small_to_split_is_refused_on_the_command_line(task_dir, zoo, tmp_path, capsys):
    conf = tmp_path / "e.yaml"
    conf.write_text(json.dumps({"evaluator": "lmeval", "tasks": ["tiny"], "task_dir": str(task_dir),
                                "dev_items": 2, "test_items": 2}))
    assert main(["eval", str(zoo / "base"), "--config", str(conf)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: evaluator: task 'tiny': dev_items + test_items = 2 + 2 = 4, but the task has only 3 "
                   "documents")
    conf.write_text(json.dumps({"evaluator": "lmeval", "tasks": ["tiny"], "task_dir": str(task_dir),
                                "dev_fraction": 0.2}))
    assert main(["eval", str(zoo / "base"), "--config", str(conf)]) == 2
    assert "3 documents are too few to split into dev and test items (dev 0, test 3)" in capsys.readouterr().err


@pytest.mark.slow
def test_search_on_a_generation_task_scores_dev_and_exports_on_test(task_dir, zoo, tmp_path, monkeypatch, capsys):
    import yaml
    monkeypatch.chdir(tmp_path)
    space = {"base": str(zoo / "base"), "models": [str(zoo / "ft_add"), str(zoo / "ft_max")],
             "evaluator": {"evaluator": "lmeval", "tasks": ["gen_add", "mc_max", "ppl_add"],
                           "task_dir": str(task_dir), "dev_items": 40, "test_items": 60, "batch_size": 32,
                           "max_gen_toks": 3, "metrics": {"gen_add": "exact_match,flexible-extract",
                                                          "ppl_add": "bits_per_byte"}},
             "methods": ["task_arithmetic"], "parameters": {"weight": {"low": 0.0, "high": 1.0}},
             "sampler": {"name": "random"}, "budget": {"n_trials": 4}, "seed": 2}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(space))
    assert main(["search", str(tmp_path / "s.yaml"), "--run", "gen", "--workers", "2"]) == 0
    scores = json.loads((tmp_path / "results" / "gen" / "scores.json").read_text())
    items = scores["items"]
    for task in ("gen_add", "mc_max", "ppl_add"):
        assert items["dev"][task]["count"] == 40 and items["test"][task]["count"] == 60
        assert items["dev"][task]["sha256"] != items["test"][task]["sha256"]
    assert scores["metrics"]["gen_add"]["filter"] == "flexible-extract"
    assert scores["metrics"]["ppl_add"]["higher_is_better"] is False and scores["test"]["merged"]["ppl_add"] < 0
    capsys.readouterr()
    assert main(["leaderboard", "gen"]) == 0
    assert "dev:ppl_add is minus bits_per_byte (none): lower bits_per_byte is better" in capsys.readouterr().out
    assert scores["dev"]["verified"]  # the exported model re-scores its stored dev score exactly
    # the test score is the one lm-eval gives on exactly the 60 test items
    test_ev = build_evaluator(EvalConfig.model_validate({**space["evaluator"], "split": "test"}))
    from mergesearch.engine.models import load_model
    model, tok = load_model(Path(scores["model"]))
    out = hflm_results(test_ev.cfg, model, tok)
    assert out["n-samples"]["gen_add"]["effective"] == 60
    assert scores["test"]["merged"]["gen_add"] == out["results"]["gen_add"]["exact_match,flexible-extract"]
    shutil.rmtree(tmp_path / "results", ignore_errors=True)
