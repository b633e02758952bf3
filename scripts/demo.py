"""`make demo`: build the tiny zoo, merge its task fine-tunes, score the merges.

Until the search lands, this shows the pipeline end to end on real fine-tunes:
1. `mergesearch zoo build` (cached after the first run);
2. `mergesearch merge` of the four task fine-tunes with several methods;
3. the mergekit YAML export of one recipe;
4. dev and test accuracy of every merge next to the fine-tunes (loglik scorer).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergesearch.cli import load_model, main as cli  # noqa: E402
from mergesearch.evaluate import EvalConfig, build_evaluator  # noqa: E402
from mergesearch.recipe import from_dict  # noqa: E402
from mergesearch.zoo.build import ZOO_TASKS, build_zoo  # noqa: E402


def main() -> int:
    zoo = ROOT / "results" / "zoo"
    t0 = time.perf_counter()
    manifest = build_zoo(zoo)
    print(f"zoo: {zoo} ({len(manifest['models'])} models, tasks {', '.join(ZOO_TASKS)}; "
          f"ready in {time.perf_counter() - t0:.0f}s)")
    base = str(zoo / "base")
    fts = [str(zoo / f"ft_{t}") for t in ZOO_TASKS]
    recipes = {
        "uniform average": dict(method="linear", models=[{"path": p, "parameters": {"weight": 1.0}} for p in fts]),
        "task arithmetic 1.0": dict(method="task_arithmetic", models=[{"path": p, "parameters": {"weight": 1.0}} for p in fts]),
        "task arithmetic 0.5": dict(method="task_arithmetic", models=[{"path": p, "parameters": {"weight": 0.5}} for p in fts]),
        "ties": dict(method="ties", models=[{"path": p, "parameters": {"weight": 1.0, "density": 0.3}} for p in fts]),
        "dare_ties": dict(method="dare_ties", models=[{"path": p, "parameters": {"weight": 1.0, "density": 0.5}} for p in fts]),
        "breadcrumbs_ties": dict(method="breadcrumbs_ties", models=[{"path": p, "parameters": {"weight": 0.8}} for p in fts],
                                 parameters={"density": 0.4, "gamma": 0.01}),
    }
    out_root = ROOT / "results" / "demo"
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir(parents=True)
    evs = {s: build_evaluator(EvalConfig(tasks=ZOO_TASKS, task_dir=str(zoo), split=s)) for s in ("dev", "test")}
    rows = []
    for name in ["base"] + [f"ft_{t}" for t in ZOO_TASKS]:
        model, tok = load_model(zoo / name)
        rows.append((name, {s: ev.score(model, tok) for s, ev in evs.items()}))
    for label, body in recipes.items():
        slug = label.replace(" ", "_").replace(".", "")
        recipe = from_dict({"base": base, "seed": 0, **body})
        recipe.save(out_root / f"{slug}.yaml")
        if cli(["merge", str(out_root / f"{slug}.yaml"), "-o", str(out_root / slug)]) != 0:
            return 1
        model, tok = load_model(out_root / slug)
        rows.append((label, {s: ev.score(model, tok) for s, ev in evs.items()}))
    cli(["convert", str(out_root / "ties.yaml"), "-o", str(out_root / "ties_mergekit.yaml")])
    print(f"\n{'model':<22}" + "".join(f"{t:>9}" for t in ZOO_TASKS) + f"{'mean':>9}   (test accuracy; dev mean)")
    for name, res in rows:
        test = res["test"]
        print(f"{name:<22}" + "".join(f"{test[t]:>9.3f}" for t in ZOO_TASKS)
              + f"{sum(test.values()) / len(test):>9.3f}   ({sum(res['dev'].values()) / len(test):.3f})")
    print(f"\nrecipes, merged models and a mergekit YAML are under {out_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
