"""The singular-value methods on the zoo (``scripts/bench_quality.py --data-free``).

- **Best of a grid, on test**: each method on a small grid, the best on dev reported on
  test, beside task arithmetic and hand-tuned TIES (deterministic: no seed).
- **A search over [ties, tsv, iso_cts] against TIES alone**: the same space otherwise
  (whole-model weights, density, rank share, common share and lambda; the normalized
  objective; TPE, which a method choice needs), the same budget, ``--seeds`` seeds.
- **The demo space started from the best data-free merge**: search_spaces/demo.yaml with
  CMA-ES's x0 the best grid merge of the best data-free method, projected onto the
  demo's coefficients (mergesearch.search.project), refinement included, against the
  demo as it is.

Writes results/bench_quality_data_free.json and prints the tables for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench_quality import ROOT, cell, curve, grid_best, run_contenders

from mergesearch.engine.checkpoint import Checkpoint
from mergesearch.recipe import from_dict, layer_index
from mergesearch.search.project import projected_x0
from mergesearch.search.space import SearchSpace

LAMBDAS = (0.5, 1.0, 1.5, 2.0, 3.0)


def grids(demo) -> dict[str, dict]:
    fts = list(demo.models)

    def recipe(method, lam, **per_model_and_global):
        per = {k: v for k, v in per_model_and_global.items() if k in ("rank_share", "density")}
        glob = {k: v for k, v in per_model_and_global.items() if k == "common_share"}
        return from_dict(dict(method=method, base=demo.base, parameters={"lambda": lam, **glob},
                              models=[{"path": p, "parameters": {"weight": 1.0, **per}} for p in fts]))

    return {
        "task_arithmetic": {(lam,): recipe("task_arithmetic", lam) for lam in (0.25, 0.5, 0.75, 1.0, 1.5)},
        "tsv": {(lam, rs): recipe("tsv", lam, rank_share=rs) for lam in LAMBDAS for rs in (0.5, 1.0)},
        "iso_c": {(lam,): recipe("iso_c", lam) for lam in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)},
        "iso_cts": {(lam, cs): recipe("iso_cts", lam, common_share=cs) for lam in LAMBDAS for cs in (0.5, 0.8)},
    }


def run(args, demo: SearchSpace, score, results: dict) -> int:
    best_grid = {}
    for method, recipes in grids(demo).items():
        key, s = grid_best(score, recipes)
        best_grid[method] = {"setting": list(key), "n": len(recipes), "recipe": recipes[key].to_dict(), **s}
        print(f"{method}: best of {len(recipes)} on dev {key}: dev {s['dev']['mean']:.3f} test {s['test']['mean']:.3f} "
              f"(normalized {s['test']['normalized']:.3f}, worst task {s['test']['worst']:.3f})", flush=True)
    results["grid"] = best_grid
    new = max(("tsv", "iso_c", "iso_cts"), key=lambda m: best_grid[m]["dev"]["mean"])

    def mixed(seed, methods):
        data = demo.model_dump(mode="json")
        for k in ("schedule", "refine", "scale"):
            data.pop(k, None)
        bounds = {"weight": {"low": 0.0, "high": 1.5}, "density": {"low": 0.1, "high": 1.0},
                  "rank_share": {"low": 0.25, "high": 1.0}, "common_share": {"low": 0.2, "high": 0.95},
                  "lambda": {"low": 0.25, "high": 3.0}}
        keep = {"ties": ("weight", "density", "lambda"), "tsv": ("weight", "rank_share", "lambda"),
                "iso_cts": ("weight", "common_share", "lambda")}
        names = {n for m in methods for n in keep[m]}
        data.update(methods=methods, parameters={k: v for k, v in bounds.items() if k in names},
                    granularity={"level": "model"}, sampler={"name": "tpe"}, seed=seed)
        return SearchSpace.model_validate(data).check(f"data-free search {methods}")

    # the demo started from the best data-free merge (its best grid setting), projected
    # onto the first stage's coefficients
    ref = Checkpoint(demo.base)
    names = [n for n in ref.names() if ref.dtype(n).is_floating_point]
    stage0 = demo.stages()[0][0]
    prefix = next((n[: n.index(f".{layer_index(n)}.") + 1] for n in names if layer_index(n) is not None), "")
    groups = demo.groups(ref.num_layers, prefix, stage0)
    x0, share = projected_x0(demo, best_grid[new]["recipe"], groups, names, ref.num_layers)
    print(f"start point: {new}'s best grid merge, {share:.0%} of its task vector explained by the demo's "
          "first-stage coefficients", flush=True)
    results["start"] = {"method": new, "explained": share, "x0": x0}

    def warm_demo(seed):
        return demo.model_copy(update={"seed": seed, "sampler": demo.sampler.model_copy(update={"x0": x0})})

    spaces = {
        "TIES alone (TPE)": lambda seed: mixed(seed, ["ties"]),
        "[ties, tsv, iso_cts] (TPE)": lambda seed: mixed(seed, ["ties", "tsv", "iso_cts"]),
        "demo.yaml": lambda seed: demo.model_copy(update={"seed": seed}),
        f"demo.yaml started from {new}": warm_demo,
    }
    if args.only:
        spaces = {k: v for k, v in spaces.items() if k in args.only}
    results.update(run_contenders(spaces, args, score))
    hand = results["hand_tuned"]
    print("\n| method | grid (best on dev) | test mean | normalized test mean | test worst task | dev mean |\n"
          "|---|---|---:|---:|---:|---:|")
    print(f"| ties (hand-tuned) | density {hand['density']}, lambda {hand['lambda']:g} (of 12) | "
          f"{hand['test']['mean']:.3f} | {hand['test']['normalized']:.3f} | {hand['test']['worst']:.3f} | "
          f"{hand['dev']['mean']:.3f} |")
    for method, g in best_grid.items():
        print(f"| {method} | {', '.join(f'{v:g}' for v in g['setting'])} (of {g['n']}) | {g['test']['mean']:.3f} | "
              f"{g['test']['normalized']:.3f} | {g['test']['worst']:.3f} | {g['dev']['mean']:.3f} |")
    print("\n| contender | test mean | normalized test mean | test worst task | dev best at 10 | 25 | 50 | 100 "
          "evaluations | winners' methods |\n|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in spaces:
        runs = results[name]
        print(f"| {name} | {cell(runs)} | {cell(runs, key='normalized')} | {cell(runs, key='worst')} | "
              f"{curve(runs)} | {', '.join(str(r['method']) for r in runs)} |")
    out = Path(args.out).with_name("bench_quality_data_free.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


__all__ = ["run", "ROOT"]
