"""The geometry experiment: classic vs curvature-aware merges on the zoo, each method
tuned on dev by the same short search, reported on dev and test.

Models: the optimizer pair (``ft_shift`` trained with AdamW, ``ft_shift_sgd`` with
SGD and momentum, same data order) plus the other task fine-tunes (reverse, max,
add). Tasks: all four. Each method gets its own search (multivariate TPE, the same
budget and seed), one coefficient per model:

- linear, task_arithmetic, ties: the classic methods;
- fisher: diagonal Fisher of each model on its own task's train split;
- preconditioned: Adam's bias-corrected second moments (sqrt: Adam's own
  preconditioner), the SGD model taken as the identity; log-scale weights absorb
  the scale difference between the two kinds of metric;
- gradient_matching: the same Fisher estimates, the base's Fisher over all four
  tasks as H_0, a searched prior delta_0;
- regmean: Gram matrices of each model's linear-layer inputs on its own task.

Writes the table into docs/BENCHMARKS.md between the geometry-table markers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from mergesearch.runs.export import export_run  # noqa: E402
from mergesearch.search.controller import Controller, SearchOptions  # noqa: E402
from mergesearch.search.space import SearchSpace  # noqa: E402
from doc_markers import write_between  # noqa: E402
from mergesearch.zoo.build import ZOO_TASKS, build_zoo  # noqa: E402

BEGIN, END = "<!-- geometry-table:begin -->", "<!-- geometry-table:end -->"
MODELS = ["ft_reverse", "ft_shift", "ft_shift_sgd", "ft_max", "ft_add"]
TASK_OF = {"ft_reverse": "reverse", "ft_shift": "shift", "ft_shift_sgd": "shift", "ft_max": "max", "ft_add": "add"}


def spaces(zoo: Path, n_trials: int) -> dict[str, dict]:
    w01 = {"low": 0.0, "high": 1.0}
    logw = {"low": 1e-4, "high": 1e2, "log": True}  # metrics of different models differ by orders of magnitude
    fisher = {"kind": "fisher", "data": [f"{TASK_OF[m]}:train" for m in MODELS], "n_examples": 256}
    out = {
        "linear": {"methods": ["linear"], "parameters": {"weight": w01}},
        "task_arithmetic": {"methods": ["task_arithmetic"], "parameters": {"weight": {"low": 0.0, "high": 1.5}}},
        "ties": {"methods": ["ties"], "parameters": {"weight": {"low": 0.0, "high": 1.5},
                                                      "density": {"low": 0.1, "high": 1.0}}},
        "fisher": {"methods": ["fisher"], "parameters": {"weight": logw}, "curvature": fisher},
        "preconditioned": {"methods": ["preconditioned"],
                           "parameters": {"weight": logw},
                           "curvature": {"kind": "adam", "identity": [str(zoo / "ft_shift_sgd")]}},
        "gradient_matching": {"methods": ["gradient_matching"],
                              "parameters": {"weight": {"low": 0.0, "high": 1.5},
                                             "prior": {"low": 1e-8, "high": 1e-1, "log": True}},
                              "curvature": {**fisher, "base_data": [f"{t}:train" for t in ZOO_TASKS]}},
        "regmean": {"methods": ["regmean"], "parameters": {"weight": w01, "alpha": {"low": 0.0, "high": 1.0}},
                    "gram": {"data": [f"{TASK_OF[m]}:train" for m in MODELS], "n_examples": 256}},
    }
    common = {"base": str(zoo / "base"), "models": [str(zoo / m) for m in MODELS],
              "evaluator": {"evaluator": "loglik", "tasks": ZOO_TASKS, "task_dir": str(zoo), "split": "dev"},
              "sampler": {"name": "tpe"}, "budget": {"n_trials": n_trials}, "seed": 0, "initial_trials": False}
    return {k: {**common, **v} for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=str(ROOT / "results" / "zoo"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="run these methods only")
    a = ap.parse_args()
    zoo = Path(a.zoo)
    build_zoo(zoo)
    root = ROOT / "results" / "geometry_table"
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    for method, data in spaces(zoo, a.trials).items():
        if a.only and method not in a.only:
            continue
        path = root / f"{method}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        shutil.rmtree(root / method, ignore_errors=True)
        t0 = time.perf_counter()
        space = SearchSpace.load(path)
        summary = Controller(space, SearchOptions(run=method, workers=a.workers, root=root, progress=False),
                             str(path)).run()
        search_s = time.perf_counter() - t0
        res = export_run(method, root=root)
        results[method] = {"dev": res["dev"]["stored"], "test": res["test"]["merged"],
                           "dev_mean": sum(res["dev"]["stored"].values()) / len(ZOO_TASKS),
                           "test_mean": res["test"]["merged_aggregate"], "verified": res["dev"]["verified"],
                           "trials": summary["complete"], "search_s": search_s,
                           "params": res["recipe"]["models"], "globals": res["recipe"]["parameters"]}
        print(f"{method}: dev {results[method]['dev_mean']:.3f} test {results[method]['test_mean']:.3f} "
              f"({summary['complete']} trials, {search_s:.0f}s)", flush=True)
    (root / "geometry_table.json").write_text(json.dumps(results, indent=2))
    if a.only:
        return 0
    lines = ["| method | dev mean | test mean | " + " | ".join(f"test {t}" for t in ZOO_TASKS) + " | search |",
             "|---|---:|---:|" + "---:|" * len(ZOO_TASKS) + "---:|"]
    for m, r in results.items():
        lines.append(f"| {m} | {r['dev_mean']:.3f} | {r['test_mean']:.3f} | "
                     + " | ".join(f"{r['test'][t]:.3f}" for t in ZOO_TASKS) + f" | {r['search_s']:.0f} s |")
    table = "\n".join(lines)
    print(table)
    write_between(Path(a.doc), BEGIN, END, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
