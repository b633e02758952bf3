"""lm-eval's own run of an evaluator's tasks and items, with lm-eval's ``HFLM``: the
yardstick the tests and ``scripts/bench_eval.py`` hold FastLM's scores and speed against.
No search or export uses it."""

from __future__ import annotations

from mergesearch.evaluate.base import EvalConfig


def hflm_results(cfg: EvalConfig, model, tokenizer, log_samples: bool = False) -> dict:
    """``lm_eval.evaluator.evaluate`` with ``HFLM`` on ``model``, over exactly the
    documents and prompts (few-shot seed, chat template) the evaluator of ``cfg`` scores."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from mergesearch.evaluate.lmeval import LmEvalEvaluator

    ev = LmEvalEvaluator(cfg)  # task objects of its own: the evaluator's requests stay untouched
    for leaves in ev.leaves.values():
        for t in leaves:
            if hasattr(t, "set_fewshot_seed"):
                t.set_fewshot_seed(seed=cfg.fewshot_seed)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size,
              device=str(next(model.parameters()).device))
    was_training = model.training
    model.eval()
    try:
        out = evaluate(lm, {"tasks": ev.leaf_tasks, "groups": ev.groups}, samples=ev.samples, bootstrap_iters=0, log_samples=log_samples,
                       apply_chat_template=cfg.apply_chat_template, fewshot_as_multiturn=False,
                       system_instruction=cfg.system_instruction)
    finally:
        if was_training:
            model.train()
    out["mergesearch_names"] = dict(ev.names)
    return out


def scores_of(ev, results: dict) -> dict[str, float]:
    """An lm-eval results dict read as evaluator ``ev`` reads its own scores (the asked
    metric and filter, a group without its own aggregate by size, negated where lower is
    better)."""
    scores = {}
    for task, name in ev.names.items():
        metric, filt, higher = ev.metric[task]
        key = f"{metric},{filt}"
        value = (results.get(name) or {}).get(key)
        if not isinstance(value, (int, float)):  # a group without its own aggregate: by size
            parts = [(results[t.config.task][key], len(ev.samples[t.config.task])) for t in ev.leaves[task]]
            value = sum(v * n for v, n in parts) / max(1, sum(n for _, n in parts))
        scores[task] = float(value) if higher else -float(value)
    return scores


def hflm_scores(cfg: EvalConfig, model, tokenizer) -> dict[str, float]:
    """The scores ``HFLM`` gives, read as the evaluator reads its own."""
    from mergesearch.evaluate.lmeval import LmEvalEvaluator

    return scores_of(LmEvalEvaluator(cfg), hflm_results(cfg, model, tokenizer)["results"])
