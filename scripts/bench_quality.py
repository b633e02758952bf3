"""Search quality on the zoo: does the search beat what a person or an evolve-style
CMA-ES would find, on test items it never scored?

Contenders, each with the same trial budget (default 100) and 3 seeds:

- **hand-tuned TIES**: the best on dev of a 12-point grid (density 0.3/0.5/0.7 x lambda
  1/1.5/2/3, weight 1), as a person tuning by hand would pick it (no seed: deterministic);
- **evolve-style CMA-ES**: what mergekit-evolve searches: TIES with a weight and a density
  per model, normalized, no lambda, CMA-ES from the centre, the plain mean as objective;
- **mergesearch**: search_spaces/demo.yaml: lambda searched, CMA-ES from the best
  baseline, whole models then 2 layer groups, the normalized objective and gradient
  refinement of the best candidate, its cost taken from the same budget.

For each: the test mean (and worst task) of the best-on-dev candidate, as mean and
standard error over the seeds, and the differences the issue sets as targets: mergesearch
minus hand-tuned (target +0.10) and minus evolve-style (target +0.05). Writes
results/bench_quality.json; docs/BENCHMARKS.md keeps the table.
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
from mergesearch.materialize import Materializer  # noqa: E402
from mergesearch.models import load_model  # noqa: E402
from mergesearch.recipe import from_dict  # noqa: E402
from mergesearch.search.controller import Controller, SearchOptions  # noqa: E402
from mergesearch.space import SearchSpace  # noqa: E402
from mergesearch.store import find_trial, load_run  # noqa: E402
from mergesearch.zoo.build import ZOO_TASKS, build_zoo  # noqa: E402


def evolve_space(demo: SearchSpace, seed: int) -> SearchSpace:
    data = demo.model_dump(mode="json")
    for k in ("schedule", "refine", "scale"):
        data.pop(k, None)
    data.update(parameters={"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.1, "high": 1.0}},
                granularity={"level": "model"}, objective={"kind": "mean"}, sampler={"name": "cmaes"},
                initial_trials=False, seed=seed)
    data["budget"] = {"n_trials": demo.budget.n_trials}
    return SearchSpace.model_validate(data).check("evolve-style space")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--space", default=str(ROOT / "search_spaces" / "demo.yaml"))
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_quality.json"))
    args = ap.parse_args()
    zoo = ROOT / "results" / "zoo"
    build_zoo(zoo)
    demo = SearchSpace.load(args.space).resolved(Path(args.space).parent).check(args.space)
    demo = demo.model_copy(update={"budget": demo.budget.model_copy(update={"n_trials": args.trials,
                                                                           "timeout": None})})
    fts = list(demo.models)
    mat = Materializer(demo.base, fts, methods=["ties", "task_arithmetic", "linear"])
    model, tok = load_model(Path(demo.base))
    evs = {s: build_evaluator(EvalConfig(tasks=ZOO_TASKS, task_dir=str(zoo), split=s)) for s in ("dev", "test")}

    def score(recipe) -> dict:
        mat.write_into(model, recipe)
        out = {}
        for split, ev in evs.items():
            s = ev.score(model, tok)
            out[split] = {"mean": sum(s.values()) / len(s), "worst": min(s.values()), "tasks": s}
        return out

    results: dict = {"trials": args.trials, "seeds": args.seeds}
    # hand-tuned TIES: the best on dev of the grid
    grid = []
    for density in (0.3, 0.5, 0.7):
        for lam in (1.0, 1.5, 2.0, 3.0):
            r = from_dict(dict(method="ties", base=demo.base, parameters={"lambda": lam},
                               models=[{"path": p, "parameters": {"weight": 1.0, "density": density}} for p in fts]))
            grid.append(((density, lam), score(r)))
    (d, lam), hand = max(grid, key=lambda x: x[1]["dev"]["mean"])
    results["hand_tuned"] = {"density": d, "lambda": lam, **hand}
    print(f"hand-tuned TIES (density {d}, lambda {lam:g}): dev {hand['dev']['mean']:.3f} test {hand['test']['mean']:.3f}",
          flush=True)

    spaces = {"evolve-style CMA-ES": lambda seed: evolve_space(demo, seed),
              "mergesearch": lambda seed: demo.model_copy(update={"seed": seed})}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        root = Path(tmp)
        for name, make in spaces.items():
            runs = []
            for seed in range(args.seeds):
                run = f"{name.split()[0].lower()}-{seed}"
                t0 = time.perf_counter()
                summary = Controller(make(seed), SearchOptions(run=run, workers=args.workers, root=root,
                                                               progress=False)).run()
                study, storage = load_run(run, root=root)
                best = find_trial(study, storage, None)
                s = score(from_dict(best.user_attrs["recipe"]))
                runs.append({"seed": seed, "best": best.user_attrs.get("role") or best.user_attrs.get("baseline")
                             or "search", "wall_s": time.perf_counter() - t0, "trials": summary["trials"], **s})
                print(f"{name} seed {seed}: dev {s['dev']['mean']:.3f} test {s['test']['mean']:.3f} "
                      f"(worst task {s['test']['worst']:.3f}; winner: {runs[-1]['best']}; "
                      f"{runs[-1]['wall_s']:.0f}s)", flush=True)
            results[name] = runs

    def stat(runs, split="test", key="mean"):
        v = [r[split][key] for r in runs]
        return statistics.mean(v), (statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else 0.0)

    print("\n| contender | dev mean | test mean | test worst task |\n|---|---|---|---|")
    print(f"| hand-tuned TIES (grid of 12, best on dev) | {hand['dev']['mean']:.3f} | {hand['test']['mean']:.3f} | "
          f"{hand['test']['worst']:.3f} |")
    for name in spaces:
        (dm, ds), (tm, ts), (wm, ws) = stat(results[name], "dev"), stat(results[name]), stat(results[name], "test", "worst")
        print(f"| {name} ({args.seeds} seeds) | {dm:.3f} ± {ds:.3f} | {tm:.3f} ± {ts:.3f} | {wm:.3f} ± {ws:.3f} |")
    ours, evo = stat(results["mergesearch"])[0], stat(results["evolve-style CMA-ES"])[0]
    results["margin_vs_hand_tuned"] = ours - hand["test"]["mean"]
    results["margin_vs_evolve"] = ours - evo
    print(f"\nmergesearch - hand-tuned TIES: {ours - hand['test']['mean']:+.3f} on the test mean (target +0.10)")
    print(f"mergesearch - evolve-style CMA-ES: {ours - evo:+.3f} on the test mean (target +0.05)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
