"""Evaluator speed: score one zoo candidate on all dev tasks with each evaluator.

Per candidate = one Materializer write (a TIES merge of the four task fine-tunes)
plus one evaluation. One-off costs (task loading, tokenization, building the
HFLM) are reported separately. Target: <= 2 s per candidate for the fast scorer.

Then lm-eval tasks with one evaluation split, scored on an item subset (100 dev items of
160 documents): the generation task (greedy, 3 new tokens) and the multiple-choice task
through lm-eval, and the same multiple-choice items through the built-in scorer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergesearch.models import load_model  # noqa: E402
from mergesearch.evaluate import EvalConfig, build_evaluator  # noqa: E402
from mergesearch.materialize import Materializer  # noqa: E402
from mergesearch.recipe import from_dict  # noqa: E402
from mergesearch.zoo.build import ZOO_TASKS, build_zoo  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=str(ROOT / "results" / "zoo"))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    zoo = Path(args.zoo)
    build_zoo(zoo)
    fts = [str(zoo / f"ft_{t}") for t in ZOO_TASKS]
    mat = Materializer(zoo / "base", fts, methods=["ties"])
    model, tok = load_model(zoo / "base")
    recipes = [from_dict(dict(method="ties", base=str(zoo / "base"), models=[
        {"path": p, "parameters": {"weight": 0.5 + 0.05 * k, "density": 0.5}} for p in fts])) for k in range(args.repeats + 1)]
    out = {}
    for kind in ("loglik", "lmeval"):
        t0 = time.perf_counter()
        ev = build_evaluator(EvalConfig(evaluator=kind, tasks=ZOO_TASKS, task_dir=str(zoo), split="dev"))
        load = time.perf_counter() - t0
        mat.write_into(model, recipes[0])
        t0 = time.perf_counter()
        ev.score(model, tok)  # first call: tokenization / HFLM set-up
        first = time.perf_counter() - t0
        mats, evals = [], []
        for r in recipes[1:]:
            t0 = time.perf_counter()
            mat.write_into(model, r)
            t1 = time.perf_counter()
            ev.score(model, tok)
            t2 = time.perf_counter()
            mats.append(t1 - t0)
            evals.append(t2 - t1)
        out[kind] = {"task_loading_s": load, "first_call_s": first, "materialize_s": statistics.median(mats),
                     "eval_s": statistics.median(evals),
                     "per_candidate_s": statistics.median(m + e for m, e in zip(mats, evals))}
    items = 4 * 200
    print(f"one zoo candidate (TIES of 4 fine-tunes, {items} dev items x 4 choices), median of {args.repeats}:")
    print(f"{'evaluator':<10}{'task loading':>14}{'first call':>12}{'materialize':>13}{'eval':>8}{'per candidate':>15}")
    for kind, r in out.items():
        print(f"{kind:<10}{r['task_loading_s']:>13.2f}s{r['first_call_s']:>11.2f}s{r['materialize_s']:>12.3f}s"
              f"{r['eval_s']:>7.2f}s{r['per_candidate_s']:>14.2f}s")
    ratio = out["lmeval"]["per_candidate_s"] / out["loglik"]["per_candidate_s"]
    print(f"lm-eval / loglik per candidate: {ratio:.1f}x; target loglik <= 2 s: "
          f"{'met' if out['loglik']['per_candidate_s'] <= 2 else 'MISSED'}")
    out["item_subsets"] = item_subsets(zoo, mat, model, tok, recipes, args.repeats)
    (ROOT / "results" / "bench_eval.json").write_text(json.dumps(out, indent=2))
    return 0


def item_subsets(zoo: Path, mat, model, tok, recipes, repeats: int) -> dict:
    import tempfile

    from mergesearch.zoo.tasks import write_lmeval_examples
    folder = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    files = write_lmeval_examples(folder, ROOT / "tests" / "lmeval_tasks", 160)
    mc = EvalConfig(evaluator="lmeval", tasks=["mc_max"], task_dir=str(folder), dev_items=100, test_items=60)
    # the built-in scorer gets exactly the dev items lm-eval scores
    every = files["loglik_max"].read_text().splitlines()
    same = folder / "loglik_max_dev.jsonl"
    same.write_text("".join(every[i] + "\n" for i in build_evaluator(mc).samples["mc_max"]))
    setups = {
        "generation (lm-eval, gen_add)": EvalConfig(evaluator="lmeval", tasks=["gen_add"], task_dir=str(folder),
                                                   dev_items=100, test_items=60, max_gen_toks=3,
                                                   metrics={"gen_add": "exact_match,flexible-extract"}),
        "multiple choice (lm-eval, mc_max)": mc,
        "multiple choice (built-in, same items)": EvalConfig(evaluator="loglik", tasks=[str(same)]),
    }
    res = {}
    print("\nlm-eval tasks on an item subset (100 dev items), median of", repeats)
    for label, cfg in setups.items():
        t0 = time.perf_counter()
        ev = build_evaluator(cfg)
        load = time.perf_counter() - t0
        mat.write_into(model, recipes[0])
        t0 = time.perf_counter()
        first_scores = ev.score(model, tok)
        first = time.perf_counter() - t0
        evals = []
        for r in recipes[1:]:
            mat.write_into(model, r)
            t0 = time.perf_counter()
            ev.score(model, tok)
            evals.append(time.perf_counter() - t0)
        res[label] = {"task_loading_s": load, "first_call_s": first, "eval_s": statistics.median(evals),
                      "first_scores": first_scores}
        print(f"  {label:<40} loading {load:6.2f}s  first call {first:6.2f}s  per candidate "
              f"{statistics.median(evals):6.2f}s  score {list(first_scores.values())[0]:.3f}")
    return res


if __name__ == "__main__":
    sys.exit(main())
