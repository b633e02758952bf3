"""`make demo`: the main job on the bundled tiny zoo.

1. Build the zoo (cached after the first run).
2. Run a CMA-ES search over search_spaces/demo.yaml with 2 Ray workers: whole-model
   coefficients, then per layer group, then gradient refinement of the best candidate;
   the objective is the normalized mean (each task over its best source model).
3. Export the winner (recipe, mergekit YAML, checkpoint, model card, test scores).
4. Print the top 5 of the leaderboard and the test table, with the two baselines.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergesearch.progress import quiet_libraries, step  # noqa: E402

quiet_libraries()  # before the libraries are imported: no progress bars or warnings of theirs

from mergesearch.cli import main as cli  # noqa: E402
from mergesearch.engine.models import load_model  # noqa: E402
from mergesearch.evaluate import build_evaluator  # noqa: E402
from mergesearch.engine.materialize import Materializer  # noqa: E402
from mergesearch.search.phases.baselines import baseline_recipes  # noqa: E402
from mergesearch.search.space import SearchSpace  # noqa: E402
from mergesearch.zoo.build import build_zoo  # noqa: E402

RUN = "demo"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    t0 = time.perf_counter()
    zoo = ROOT / "results" / "zoo"
    first = not (zoo / "manifest.json").exists()
    print("demo: [1] build a tiny model zoo" + (" (this first run only: about 4 minutes on 2 CPU cores)" if first
                                                 else " (cached)")
          + ", [2] search merges of its fine-tunes, [3] export the best, [4] compare it on test", flush=True)
    manifest = build_zoo(zoo)
    print(f"[1/4] zoo ready: {zoo} ({len(manifest['models'])} models) in {time.perf_counter() - t0:.0f}s", flush=True)
    run_dir = ROOT / "results" / RUN
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo starts its run afresh
    space_file = ROOT / "search_spaces" / "demo.yaml"
    print("[2/4] searching (CMA-ES, 2 Ray workers; objective: mean over tasks of accuracy / best source's "
          "accuracy) ...", flush=True)
    code = cli(["search", str(space_file), "--run", RUN, "--workers", "2"])
    if code != 0:
        return code
    print(f"\n[3/4] exported to {run_dir}; the report: {run_dir / 'report.html'} (open it in a browser)", flush=True)
    print("\n[4/4] leaderboard (top 5, dev):", flush=True)
    cli(["leaderboard", RUN, "--top", "5"])
    scores = json.loads((run_dir / "scores.json").read_text())
    space = SearchSpace.load(space_file)
    test_ev = build_evaluator(space.evaluator.model_copy(update={"split": "test"}))
    mat = Materializer(space.base, space.models, methods=["linear", "task_arithmetic"])
    model, tok = load_model(Path(space.base))
    baselines = {}
    recipes = baseline_recipes(space)
    with step("[4/4] scoring the baselines on test", total=len(recipes), unit="models") as line:
        for name, recipe in recipes.items():
            mat.write_into(model, recipe)
            s = test_ev.score(model, tok)
            baselines[name] = (s, test_ev.aggregate(s))
            line.advance()
    tasks = space.evaluator.tasks
    print(f"\ntest accuracy (never searched on)\n{'model':<24}" + "".join(f"{t:>9}" for t in tasks) + f"{'mean':>9}")
    best = scores["test"]["merged"]
    print(f"{'best merge (trial ' + str(scores['trial']) + ')':<24}" + "".join(f"{best[t]:>9.3f}" for t in tasks)
          + f"{scores['test']['merged_aggregate']:>9.3f}")
    for name, (s, agg) in baselines.items():
        print(f"{name:<24}" + "".join(f"{s[t]:>9.3f}" for t in tasks) + f"{agg:>9.3f}")
    for path, s in scores["test"]["sources"].items():
        print(f"{Path(path).name:<24}" + "".join(f"{s['scores'][t]:>9.3f}" for t in tasks) + f"{s['aggregate']:>9.3f}")
    best_source = max(s["aggregate"] for s in scores["test"]["sources"].values())
    beats = all(scores["test"]["merged_aggregate"] > agg for _, agg in baselines.values())
    beats = beats and scores["test"]["merged_aggregate"] > best_source
    print(f"\nbest merge beats uniform averaging, task arithmetic (lambda = 1) and every single model on test: "
          f"{'yes' if beats else 'NO'}"
          f"; dev re-score after export {'matches' if scores['dev']['verified'] else 'DIFFERS'}"
          f"; demo took {time.perf_counter() - t0:.0f}s")
    return 0 if beats else 1


if __name__ == "__main__":
    sys.exit(main())
