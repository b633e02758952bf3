"""Evaluation speed: mergesearch's engine (lm-eval's requests and metrics, FastLM's
arithmetic) against lm-eval's own HFLM, per candidate, per output type.

Each candidate is a TIES merge of the zoo's four fine-tunes, written into one model in
place; both sides score exactly the same documents with the same prompts, and their scores
are compared (they must be equal: accuracies exactly, perplexities to 1e-6). The HFLM side
is lm-eval's ``evaluate`` with one HFLM kept across candidates, as a user of lm-eval would
run it (lm-eval as shipped: mergesearch's compiled-template cache is switched off for
that side). One-off costs (loading tasks, building and tokenizing the requests) are reported
apart from the per-candidate time, the median over ``--repeats`` candidates.

Targets: at least 3x faster than HFLM on multiple choice, and faster on generation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergesearch.evaluate import EvalConfig, build_evaluator  # noqa: E402
from mergesearch.engine.materialize import Materializer  # noqa: E402
from mergesearch.engine.models import load_model  # noqa: E402
from mergesearch.recipe import from_dict  # noqa: E402
from mergesearch.zoo.build import ZOO_TASKS, build_zoo  # noqa: E402


def setups(zoo: Path, folder: Path) -> dict[str, tuple[str, EvalConfig]]:
    from mergesearch.zoo.tasks import write_lmeval_examples
    write_lmeval_examples(folder, ROOT / "tests" / "lmeval_tasks", 160)
    # a loglikelihood task: the zoo's add items with their answer as the target
    rows = [json.loads(x) for x in (zoo / "data" / "add" / "dev.jsonl").read_text().splitlines()]
    (folder / "target_add.jsonl").write_text("".join(
        json.dumps({"context": r["context"], "target": r["choices"][r["answer"]]}) + "\n" for r in rows))
    lm = dict(evaluator="lmeval", task_dir=str(folder), batch_size=32)
    return {
        "zoo dev (4 tasks x 200)": ("multiple_choice",
                                    EvalConfig(evaluator="lmeval", tasks=ZOO_TASKS, task_dir=str(zoo), batch_size=32)),
        "arc-style mc_add, acc_norm": ("multiple_choice", EvalConfig(**lm, tasks=["mc_add"], dev_items=100,
                                                                     metrics={"mc_add": "acc_norm"})),
        "mmlu-style group, 5-shot": ("multiple_choice", EvalConfig(**lm, tasks=["pair"], dev_items=100,
                                                                   num_fewshot=5)),
        "target (loglikelihood)": ("loglikelihood", EvalConfig(evaluator="loglik", batch_size=32,
                                                               tasks=[str(folder / "target_add.jsonl")])),
        "wikitext-style ppl_add": ("loglikelihood_rolling", EvalConfig(**lm, tasks=["ppl_add"], dev_items=100)),
        "gsm8k-style gen_add": ("generate_until", EvalConfig(**lm, tasks=["gen_add"], dev_items=100, max_gen_toks=3,
                                                             metrics={"gen_add": "exact_match,flexible-extract"})),
    }


import lm_eval.utils as _lm_utils  # noqa: E402

SHIPPED_APPLY_TEMPLATE = _lm_utils.apply_template  # lm-eval as shipped: templates compiled per call


def hflm_runner(cfg: EvalConfig, model, tok):
    """lm-eval's own path, as shipped: one HFLM, ``evaluate`` per candidate (few-shot
    reseeded), without the compiled-template cache mergesearch installs."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from mergesearch.evaluate.lmeval import LmEvalEvaluator
    from mergesearch.evaluate.reference import scores_of
    ev = LmEvalEvaluator(cfg)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.batch_size, device="cpu")

    def run() -> dict[str, float]:
        for leaves in ev.leaves.values():
            for t in leaves:
                t.set_fewshot_seed(seed=cfg.fewshot_seed)
        ours = _lm_utils.apply_template
        _lm_utils.apply_template = SHIPPED_APPLY_TEMPLATE
        try:
            out = evaluate(lm, {"tasks": ev.leaf_tasks, "groups": ev.groups}, samples=ev.samples, bootstrap_iters=0)
        finally:
            _lm_utils.apply_template = ours
        return scores_of(ev, out["results"])
    return run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=str(ROOT / "results" / "zoo"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default=None, help="a substring of the setups to run")
    args = ap.parse_args()
    zoo = Path(args.zoo)
    build_zoo(zoo)
    fts = [str(zoo / f"ft_{t}") for t in ZOO_TASKS]
    mat = Materializer(zoo / "base", fts, methods=["ties"])
    model, tok = load_model(zoo / "base")
    recipes = [from_dict(dict(method="ties", base=str(zoo / "base"), models=[
        {"path": p, "parameters": {"weight": 0.5 + 0.05 * k, "density": 0.5}} for p in fts]))
        for k in range(args.repeats + 1)]
    folder = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    out = {}
    print(f"per candidate: median of {args.repeats} TIES candidates written in place; one-off costs apart")
    print(f"{'setup':<30}{'type':<24}{'ours':>8}{'HFLM':>8}{'ratio':>8}{'ours 1st':>10}{'equal':>7}")
    for label, (kind, cfg) in setups(zoo, folder).items():
        if args.only and args.only not in label:
            continue
        res = {}
        for side in ("ours", "hflm"):
            t0 = time.perf_counter()
            if side == "ours":
                ev = build_evaluator(cfg)
                score = lambda ev=ev: ev.score(model, tok)  # noqa: E731
            else:
                score = hflm_runner(cfg, model, tok)
            load = time.perf_counter() - t0
            mat.write_into(model, recipes[0])
            t0 = time.perf_counter()
            first_scores = score()
            first = time.perf_counter() - t0
            times, all_scores = [], [first_scores]
            for r in recipes[1:]:
                mat.write_into(model, r)
                t0 = time.perf_counter()
                all_scores.append(score())
                times.append(time.perf_counter() - t0)
            res[side] = {"load_s": load, "first_s": first, "per_candidate_s": statistics.median(times),
                         "scores": all_scores}
        equal = all(all(abs(a[t] - b[t]) <= 1e-6 * max(1.0, abs(b[t])) for t in b)
                    for a, b in zip(res["ours"]["scores"], res["hflm"]["scores"]))
        ratio = res["hflm"]["per_candidate_s"] / res["ours"]["per_candidate_s"]
        out[label] = {"type": kind, **res, "speedup": ratio, "equal": equal}
        print(f"{label:<30}{kind:<24}{res['ours']['per_candidate_s']:>7.3f}s{res['hflm']['per_candidate_s']:>7.3f}s"
              f"{ratio:>7.1f}x{res['ours']['first_s']:>9.2f}s{'yes' if equal else 'NO':>7}", flush=True)
    mc = [v["speedup"] for v in out.values() if v["type"] == "multiple_choice"]
    gen = [v["speedup"] for v in out.values() if v["type"] == "generate_until"]
    if mc:
        print(f"multiple choice: {min(mc):.1f}x to {max(mc):.1f}x faster than HFLM (target >= 3x: "
              f"{'met' if min(mc) >= 3 else 'MISSED'})")
    if gen:
        print(f"generation: {min(gen):.1f}x HFLM's speed (target > 1x: {'met' if min(gen) > 1 else 'MISSED'})")
    dest = ROOT / "results" / "bench_eval.json"
    dest.write_text(json.dumps(out, indent=2, default=float))
    print(f"written: {dest}")
    return 0 if all(v["equal"] for v in out.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
