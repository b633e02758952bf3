"""Multi-fidelity search on the zoo: does pruning reach the full-fidelity result with
fewer scored items, and without losing on test?

Contenders, each with the same budget in dev items (the items of ``--trials`` full
trials, default 100) and ``--seeds`` seeds (default 3): a full-fidelity search, and one
search per pruner (successive halving, hyperband, median, Wilcoxon) over the rungs
``--rungs`` (default 1/8, 1/4, 1/2, 1 of the dev items). The space: TIES over the four
task fine-tunes, a weight and a density per model and per 2 layer groups, a searched
lambda, the plain mean of the four tasks, TPE (which learns from pruned trials natively).

For each run, at 25%, 50% and 100% of the item budget (trials ordered by when they
finished, each costing the items it scored): the best dev mean so far, and the test mean
of that best-on-dev candidate (scored here, on test items no search saw). Then the items
each pruned run needed to reach the final dev best of the full-fidelity run of its seed,
and the pruner's mistakes: of (up to ``--audit``) trials pruned at the first rung, scored
here on every dev item, the share that would have beaten the best complete trial at the
moment they were pruned; likewise for trials pruned at a later rung. Writes results/bench_fidelity.json and the table between the
markers in docs/BENCHMARKS.md.

    .venv/bin/python scripts/bench_fidelity.py                   # about 30 minutes on 2 cores
    .venv/bin/python scripts/bench_fidelity.py --trials 12 --seeds 1 --pruners successive_halving --no-docs
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from mergesearch.evaluate import EvalConfig, build_evaluator  # noqa: E402
from mergesearch.engine.materialize import Materializer  # noqa: E402
from mergesearch.engine.models import load_model  # noqa: E402
from mergesearch.recipe import from_dict  # noqa: E402
from mergesearch.search.controller import Controller, SearchOptions  # noqa: E402
from mergesearch.search.space import SearchSpace  # noqa: E402
from mergesearch.runs.store import load_run  # noqa: E402
from mergesearch.zoo.build import ZOO_TASKS, build_zoo  # noqa: E402

PRUNERS = ["successive_halving", "hyperband", "median", "wilcoxon", "improvement"]
FRACTIONS = (0.25, 0.5, 1.0)
TARGET_ITEMS = 0.40


def make_space(zoo: Path, seed: int, trials: int, total: int, pruner: str | None, rungs: list[float],
               options: dict | None = None) -> SearchSpace:
    data = {
        "base": str(zoo / "base"), "models": [str(zoo / f"ft_{t}") for t in ZOO_TASKS],
        "evaluator": {"tasks": ZOO_TASKS, "task_dir": str(zoo), "split": "dev"},
        "methods": ["ties"], "scale": {"low": 0.5, "high": 3.0},
        "parameters": {"weight": {"low": 0.0, "high": 1.5}, "density": {"low": 0.1, "high": 1.0}},
        "granularity": {"level": "groups", "n_groups": 2},
        "sampler": {"name": "tpe", "n_startup_trials": 10}, "initial_trials": False, "seed": seed,
        "budget": {"n_trials": trials} if pruner is None else {"items": trials * total},
    }
    if pruner is not None:
        data["fidelity"] = {"rungs": rungs, "pruner": {"name": pruner, **(options or {})}}
    return SearchSpace.model_validate(data).check(f"bench space ({pruner or 'full'})")


def history(study) -> list[dict]:
    """The run's finished trials in the order they finished, with the items spent by then."""
    from optuna.trial import TrialState
    done = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    done.sort(key=lambda t: t.datetime_complete)
    out, spent = [], 0
    for t in done:
        spent += t.user_attrs["items"]
        out.append({"number": t.number, "state": t.state.name, "spent": spent, "items": t.user_attrs["items"],
                    "rungs": t.user_attrs.get("rungs"), "dev": t.user_attrs["aggregate"],
                    "recipe": t.user_attrs["recipe"]})
    return out


def best_by(hist: list[dict], spent: float) -> dict | None:
    done = [h for h in hist if h["state"] == "COMPLETE" and h["spent"] <= spent + 1e-9]
    return max(done, key=lambda h: h["dev"], default=None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=100, help="the budget: the items of this many full trials")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pruners", default=",".join(PRUNERS))
    ap.add_argument("--rungs", default="0.125,0.25,0.5,1.0")
    ap.add_argument("--audit", type=int, default=12, help="trials pruned at rung 1 scored fully, per run")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_fidelity.json")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--render", type=Path, nargs="+",
                    help="only render the table of these results JSONs (runs of other seeds, concatenated)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:PRUNER:KEY=VALUE,...",
                    help="a pruner with options, e.g. sh4:successive_halving:reduction_factor=4")
    ap.add_argument("--full-from", type=Path, help="reuse the full-fidelity runs of this results JSON")
    args = ap.parse_args()
    if args.render:
        parts = [json.loads(p.read_text()) for p in args.render]
        res = parts[0]
        for other in parts[1:]:
            if (other["trials"], other["rungs"]) != (res["trials"], res["rungs"]):
                ap.error("--render: the files differ in budget or rungs")
            res["runs"] = {k: v + other["runs"][k] for k, v in res["runs"].items() if k in other["runs"]}
        res["seeds"] = len(res["runs"]["full"])
        table = render(res, [p for p in res["runs"] if p != "full"])
        print(table)
        if not args.no_docs:
            from doc_markers import write_between
            write_between(ROOT / "docs" / "BENCHMARKS.md", "<!-- bench_fidelity:begin -->",
                          "<!-- bench_fidelity:end -->", table)
        return 0
    pruners = [p for p in args.pruners.split(",") if p]
    variants = {p: (p, {}) for p in pruners}
    for v in args.variant:
        label, pruner, opts = (v.split(":") + [""])[:3]
        variants[label] = (pruner, {k: float(x) if "." in x else int(x)
                                    for k, x in (kv.split("=") for kv in opts.split(",") if kv)})
    pruners = list(variants)
    rungs = [float(r) for r in args.rungs.split(",")]
    zoo = ROOT / "results" / "zoo"
    build_zoo(zoo)
    fts = [str(zoo / f"ft_{t}") for t in ZOO_TASKS]
    mat = Materializer(str(zoo / "base"), fts, methods=["ties"])
    model, tok = load_model(zoo / "base")
    evs = {s: build_evaluator(EvalConfig(tasks=ZOO_TASKS, task_dir=str(zoo), split=s)) for s in ("dev", "test")}
    total = sum(len(v) for v in evs["dev"].items.values())
    cache: dict[str, dict] = {}

    def score(recipe: dict, split: str) -> float:
        key = json.dumps(recipe, sort_keys=True) + split
        if key not in cache:
            mat.write_into(model, from_dict(recipe))
            s = evs[split].score(model, tok)
            cache[key] = {"mean": sum(s.values()) / len(s), "tasks": s}
        return cache[key]["mean"]

    budget = args.trials * total
    res: dict = {"trials": args.trials, "seeds": args.seeds, "rungs": rungs, "dev_items": total, "budget_items": budget,
                 "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-fidelity-") as tmp:
        if args.full_from:
            full = {r["seed"]: r for r in json.loads(args.full_from.read_text())["runs"]["full"]}
            res["runs"]["full"] = [full[sd] for sd in range(args.first_seed, args.first_seed + args.seeds)]
        for name in ([] if args.full_from else ["full"]) + pruners:
            runs = []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                run = f"{name}-{seed}"
                pruner, options = variants.get(name, (None, {}))
                space = make_space(zoo, seed, args.trials, total, pruner, rungs, options)
                t0 = time.perf_counter()
                Controller(space, SearchOptions(run=run, workers=args.workers, root=Path(tmp), progress=False)).run()
                wall = time.perf_counter() - t0
                study, _ = load_run(run, root=Path(tmp))
                hist = history(study)
                r = {"seed": seed, "wall_s": wall, "spent": hist[-1]["spent"] if hist else 0,
                     "complete": sum(h["state"] == "COMPLETE" for h in hist),
                     "pruned": sum(h["state"] == "PRUNED" for h in hist), "at": {}}
                for f in FRACTIONS:
                    b = best_by(hist, f * budget)
                    r["at"][str(f)] = None if b is None else {"dev": b["dev"], "test": score(b["recipe"], "test"),
                                                              "trial": b["number"]}
                r["history"] = [{k: h[k] for k in ("number", "state", "spent", "items", "rungs", "dev")} for h in hist]
                if name != "full":
                    for key, which in (("audit", lambda k: k == 1), ("audit_late", lambda k: k > 1)):
                        pruned = [h for h in hist if h["state"] == "PRUNED" and which(h["rungs"])]
                        sample = random.Random(seed).sample(pruned, min(args.audit, len(pruned)))
                        wrong = 0
                        for h in sample:
                            kept = best_by(hist, h["spent"])
                            full = score(h["recipe"], "dev")
                            wrong += int(kept is not None and full > kept["dev"])
                        r[key] = {"sampled": len(sample), "of": len(pruned), "would_have_won": wrong}
                runs.append(r)
                at = r["at"]["1.0"] or {}
                print(f"{name:20} seed {seed}: {r['complete']} complete, {r['pruned']} pruned, {r['spent']} items, "
                      f"best dev {at.get('dev', float('nan')):.4f} test {at.get('test', float('nan')):.4f}, "
                      f"{wall:.0f}s" + (f"; audit {r['audit']}" if "audit" in r else ""), flush=True)
            res["runs"][name] = runs
    # items to reach the full-fidelity run's final dev best, seed by seed
    for name in pruners:
        for r, full in zip(res["runs"][name], res["runs"]["full"]):
            goal = full["at"]["1.0"]["dev"]
            hit = next((h["spent"] for h in r["history"] if h["state"] == "COMPLETE" and h["dev"] >= goal - 1e-12), None)
            r["items_to_full_best"] = hit
            r["share_to_full_best"] = None if hit is None else hit / full["spent"]
    table = render(res, pruners)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    if not args.no_docs:
        from doc_markers import write_between
        write_between(ROOT / "docs" / "BENCHMARKS.md", "<!-- bench_fidelity:begin -->", "<!-- bench_fidelity:end -->",
                      table)
    return 0


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    m = statistics.mean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return f"{m:.4f} ± {se:.4f}"


def _audit(a: list[dict]) -> str:
    if not a:
        return "-"  # not audited (an older results file)
    sampled, wrong = sum(x["sampled"] for x in a), sum(x["would_have_won"] for x in a)
    return f"{wrong}/{sampled}" + (f" ({wrong / sampled * 100:.0f}%)" if sampled else "")


def _mean_cross(runs: list[dict], goal: float, budget: int) -> float | None:
    """The first whole percent of the budget at which the mean over seeds of the best
    complete dev score so far reaches ``goal``."""
    for pct in range(1, 101):
        spent = pct / 100 * budget
        best = [max((h["dev"] for h in r["history"] if h["state"] == "COMPLETE" and h["spent"] <= spent + 1e-9),
                    default=0.0) for r in runs]
        if statistics.mean(best) >= goal - 1e-12:
            return pct / 100
    return None


def _oracle(runs: list[dict], rungs: list[float], se_full: float, k: float) -> tuple[float, list[float]]:
    """A yardstick, not a bound: a pruner with hindsight that keeps a confidence margin. On
    the full searches' own trial sequences, each trial is stopped at the first rung (cost:
    that share of the items) where its *final* dev score is more than ``k`` standard
    errors of that rung's mean (``se_full / sqrt(rung)``) below the best complete score
    so far, and otherwise scored fully. Returns the mean, and per seed, the share of the
    full search's items spent until its final best. (A pruner that stopped every trial but
    the final best at the first rung would need far less; a real search's own sequence of
    trials, and its luck, differ from the full search's.)"""
    shares = []
    for r in runs:
        done = [h for h in r["history"] if h["state"] == "COMPLETE"]
        final = max(h["dev"] for h in done)
        best, cost = None, 0.0
        for h in done:
            stop = next((f for f in rungs[:-1] if best is not None and best - h["dev"] > k * se_full / f ** 0.5), 1.0)
            cost += stop
            best = h["dev"] if best is None else max(best, h["dev"])
            if h["dev"] >= final:
                break
        shares.append(cost / len(done))
    return statistics.mean(shares), shares


def render(res: dict, pruners: list[str]) -> str:
    n = res["seeds"]
    lines = [f"Budget: {res['budget_items']:,} dev items ({res['trials']} full trials of {res['dev_items']} items); "
             f"rungs {', '.join(f'{r:g}' for r in res['rungs'])}; {n} seed(s); mean ± standard error over seeds.", "",
             "| search | trials (complete / pruned) | best dev at 25% | 50% | 100% | test of best-on-dev at 25% | 50% "
             "| 100% | items to the full search's final dev best | pruned at rung 1 that would have won "
             "| pruned later that would have won |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    full_test = [r["at"]["1.0"]["test"] for r in res["runs"]["full"]]
    for name in ["full", *pruners]:
        runs = res["runs"][name]
        cells = []
        for key in ("dev", "test"):
            for f in FRACTIONS:
                cells.append(_ms([r["at"][str(f)][key] for r in runs if r["at"][str(f)]]))
        if name == "full":
            reach, audit, late = "100% (by definition)", "-", "-"
        else:
            shares = [r["share_to_full_best"] for r in runs]
            got = [s for s in shares if s is not None]
            reach = (f"{statistics.mean(got) * 100:.0f}%" if got else "not reached") + \
                    f" ({len(got)}/{len(runs)} seeds: {', '.join('-' if s is None else f'{s * 100:.0f}%' for s in shares)})"
            audit, late = (_audit([r[key] for r in runs if key in r]) for key in ("audit", "audit_late"))
        trials = f"{statistics.mean(r['complete'] for r in runs):.0f} / {statistics.mean(r['pruned'] for r in runs):.0f}"
        lines.append(f"| {name.replace('_', ' ')} | {trials} | " + " | ".join(cells) + f" | {reach} | {audit} | {late} |")
    lines += ["", f"Target: the full search's final dev best reached within {TARGET_ITEMS:.0%} of its items (mean over "
                  f"the seeds, every seed reaching it), with no loss on test: the difference of the test means (pruned "
                  f"minus full) no lower than minus one standard error of that difference. Full search test: "
                  f"{_ms(full_test)}."]
    full = res["runs"]["full"]
    p = statistics.mean(r["at"]["1.0"]["dev"] for r in full)
    se_full = (p * (1 - p) / res["dev_items"]) ** 0.5
    floors = {k: _oracle(full, res["rungs"], se_full, k) for k in (1.0, 2.0)}
    # perfect hindsight: every trial before the final best stopped at the first rung
    perfect = [(i * res["rungs"][0] + 1) / len(d) for d in
               ([h for h in r["history"] if h["state"] == "COMPLETE"] for r in full)
               for i in [next(j for j, h in enumerate(d) if h["dev"] >= max(x["dev"] for x in d))]]
    lines.append(f"- Hindsight with a margin (a yardstick, not a bound): on each full search's own trials, stopping a "
                 f"trial at the first rung where its final dev score ends more than k standard errors of that rung's "
                 f"mean below the best so far (the standard error of one candidate's dev mean: {se_full:.3f} on all "
                 f"{res['dev_items']} items, {se_full / res['rungs'][0] ** 0.5:.3f} on the first rung), and scoring it "
                 f"fully otherwise, reaches the full search's final best with "
                 + "; ".join(f"{m * 100:.0f}% of its items at k = {k:g} ({', '.join(f'{x * 100:.0f}' for x in sh)}%)"
                             for k, (m, sh) in floors.items())
                 + f"; with perfect hindsight (every trial before the final best stopped at the first rung) "
                 f"{min(perfect) * 100:.0f}–{max(perfect) * 100:.0f}% ({statistics.mean(perfect) * 100:.0f}% on the "
                 f"mean). A pruner sees only the scored items, not the final score.")
    for name in pruners:
        runs = res["runs"][name]
        shares = [r["share_to_full_best"] for r in runs]
        tests = [r["at"]["1.0"]["test"] for r in runs]
        var = (lambda v: statistics.variance(v) / len(v) if len(v) > 1 else 0.0)
        se = (var(full_test) + var(tests)) ** 0.5
        diff = statistics.mean(tests) - statistics.mean(full_test)
        reached = all(s is not None for s in shares)
        mean_share = statistics.mean(shares) if reached else None
        met_items = reached and mean_share <= TARGET_ITEMS + 1e-9
        cross = _mean_cross(runs, statistics.mean(r["at"]["1.0"]["dev"] for r in res["runs"]["full"]),
                            res["budget_items"])
        lines.append(f"- {name.replace('_', ' ')}: items {'met' if met_items else 'missed'} ("
                     + (f"{mean_share * 100:.1f}% on the mean" if reached else "not reached on every seed")
                     + f"), test {'met' if diff >= -se else 'missed'} ({diff:+.4f} ± {se:.4f}); the mean over "
                     f"seeds of the best dev so far reaches the full search's mean final best at "
                     + (f"{cross:.0%} of the items" if cross is not None else "no share of the items"))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
