"""Search benchmark on the zoo.

1. Throughput: trials per hour with 1 and 2 Ray workers on the same space, and the
   time split (materialize, evaluate, everything else = controller overhead: asking,
   telling, storage, scheduling, idle workers).
2. Sample efficiency: the best dev score after 10, 25, 50 and 100 trials for cmaes,
   tpe and random, and the test score of that best-on-dev candidate.

Prints tables and writes results/bench_search.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from mergesearch.engine.models import load_model  # noqa: E402
from mergesearch.evaluate import build_evaluator  # noqa: E402
from mergesearch.engine.materialize import Materializer  # noqa: E402
from mergesearch.recipe import from_dict  # noqa: E402
from mergesearch.search.controller import Controller, SearchOptions  # noqa: E402
from mergesearch.search.space import SearchSpace  # noqa: E402
from mergesearch.zoo.build import build_zoo  # noqa: E402


def run(space: SearchSpace, name: str, workers: int, n: int, root: Path) -> tuple[dict, list]:
    opts = SearchOptions(run=name, workers=workers, n_trials=n, root=root, progress=False)
    t0 = time.perf_counter()
    summary = Controller(space, opts).run()
    wall = time.perf_counter() - t0
    storage = optuna.storages.RDBStorage(f"sqlite:///{root / name / 'study.db'}")
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    return {**summary, "wall_s": wall}, trials


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--space", default=str(ROOT / "search_spaces" / "demo.yaml"))
    ap.add_argument("--throughput-trials", type=int, default=24)
    ap.add_argument("--efficiency-trials", type=int, default=100)
    ap.add_argument("--samplers", default="cmaes,tpe,random")
    ap.add_argument("--skip-efficiency", action="store_true", help="throughput only")
    args = ap.parse_args()
    build_zoo(ROOT / "results" / "zoo")
    base_space = SearchSpace.load(args.space)
    # one stage, no refinement: the loop alone (a schedule splits the trials across studies,
    # and a refinement is one long job)
    base_space = base_space.model_copy(update={"initial_trials": False, "schedule": None, "refine": None,
                                               "budget": base_space.budget.model_copy(update={"timeout": None})})
    root = Path(tempfile.mkdtemp(prefix="bench_search_", dir=ROOT / "results"))
    out: dict = {"throughput": {}, "efficiency": {}}
    try:
        print(f"throughput: {args.throughput_trials} trials of {Path(args.space).name} per run")
        print(f"{'workers':>8}{'trials/h':>10}{'wall':>9}{'materialize':>13}{'evaluate':>10}{'overhead':>10}")
        for w in (1, 2):
            s, trials = run(base_space, f"tp{w}", w, args.throughput_trials, root)
            ok = [t for t in trials if t.state.name == "COMPLETE"]
            # the run's own clock: from the first trial start to the last trial end
            span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
            mat = sum(t.user_attrs["materialize_s"] for t in ok)
            ev = sum(t.user_attrs["eval_s"] for t in ok)
            busy = sum(t.user_attrs.get("worker_s", 0.0) for t in ok)
            capacity = span * w
            overhead = 1 - (mat + ev) / capacity
            out["throughput"][w] = {"trials": len(ok), "span_s": span, "trials_per_hour": len(ok) / span * 3600,
                                    "materialize_s": mat, "eval_s": ev, "overhead_frac": overhead,
                                    "startup_s": s["wall_s"] - span,
                                    # inside the actor's run() but neither materializing nor evaluating
                                    "in_worker_other_frac": (busy - mat - ev) / capacity,
                                    # between runs: Ray calls, the controller's ask/tell/store, waiting
                                    "between_runs_frac": 1 - busy / capacity,
                                    # of which the Ray calls' latency, each way
                                    "ray_in_frac": sum(t.user_attrs.get("ray_in_s", 0.0) for t in ok) / capacity,
                                    "ray_out_frac": sum(t.user_attrs.get("ray_out_s", 0.0) for t in ok) / capacity}
            r = out["throughput"][w]
            print(f"{w:>8}{r['trials_per_hour']:>10.0f}{span:>8.1f}s{mat / capacity:>12.1%}{ev / capacity:>10.1%}"
                  f"{overhead:>10.1%}   (in the worker {r['in_worker_other_frac']:.1%}, between runs "
                  f"{r['between_runs_frac']:.1%}: Ray call in {r['ray_in_frac']:.1%}, result back "
                  f"{r['ray_out_frac']:.1%}, the rest waiting on the controller)")
        speedup = out["throughput"][2]["trials_per_hour"] / out["throughput"][1]["trials_per_hour"]
        out["throughput"]["speedup_2_vs_1"] = speedup
        print(f"2 workers / 1 worker: {speedup:.2f}x (target >= 1.6x)")

        if args.skip_efficiency:
            return 0
        mat = Materializer(base_space.base, base_space.models, methods=base_space.methods)
        model, tok = load_model(Path(base_space.base))
        test_ev = build_evaluator(base_space.evaluator.model_copy(update={"split": "test"}))
        checkpoints = [c for c in (10, 25, 50, 100) if c <= args.efficiency_trials]
        print(f"\nsample efficiency (best dev after N trials; test score of that candidate), "
              f"{len(base_space.models)} models, 2 workers")
        print(f"{'sampler':<8}" + "".join(f"{'N=' + str(c):>16}" for c in checkpoints))
        for name in args.samplers.split(","):
            sp = base_space.model_copy(update={"sampler": base_space.sampler.model_copy(update={"name": name})})
            _, trials = run(sp, f"eff_{name}", 2, args.efficiency_trials, root)
            trials = sorted(trials, key=lambda t: t.number)
            row = {}
            for c in checkpoints:
                done = [t for t in trials[:c] if t.state.name == "COMPLETE"]
                best = max(done, key=lambda t: t.user_attrs["aggregate"])
                mat.write_into(model, from_dict(best.user_attrs["recipe"]))
                test = test_ev.aggregate(test_ev.score(model, tok))
                row[c] = {"dev": best.user_attrs["aggregate"], "test": test, "trial": best.number}
            out["efficiency"][name] = row
            print(f"{name:<8}" + "".join(f"{row[c]['dev']:>8.3f} / {row[c]['test']:.3f}" for c in checkpoints))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        (ROOT / "results" / "bench_search.json").write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
