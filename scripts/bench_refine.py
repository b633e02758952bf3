"""What a gradient refinement reaches alone, from fixed candidates on the zoo, per loss.

Each run refines one starting merge with ``mergesearch.search.refine`` at demo.yaml's settings
(per tensor, lr 0.1, 32 items a step, at most 240 steps, a check every 10, patience 6,
25% of the dev items held out), then scores the refined recipe on the test items, which
nothing saw. A refinement's holdout seed decides which dev items it holds out and the
order of its batches; each setting runs over the same seeds.

Starts: ``ties`` (the hand-tuned TIES merge: density 0.5, lambda 1.5, weight 1) and ``ta``
(task arithmetic, lambda 1). Losses: any of refine's (``choice``, ``loglik``, ``entropy``,
``distill``); ``--set`` adds options (``distill_mix=0.5``, ``teachers=accuracy``).

    python scripts/bench_refine.py --start ties --loss choice distill entropy --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergesearch.evaluate import EvalConfig, build_evaluator  # noqa: E402
from mergesearch.engine.materialize import Materializer  # noqa: E402
from mergesearch.engine.models import load_model  # noqa: E402
from mergesearch.recipe import from_dict  # noqa: E402
from mergesearch.search.refine import refine  # noqa: E402
from mergesearch.search.schema import RefineConfig  # noqa: E402
from mergesearch.search.variables import tensor_groups  # noqa: E402
from mergesearch.zoo.build import ZOO_TASKS, build_zoo  # noqa: E402

DEMO = dict(level="tensor", steps=240, lr=0.1, batch_size=32, eval_every=10, patience=6)


def start_recipe(kind: str, base: str, fts: list[str]):
    if kind == "ties":
        return from_dict(dict(method="ties", base=base, parameters={"lambda": 1.5},
                              models=[{"path": p, "parameters": {"weight": 1.0, "density": 0.5}} for p in fts]))
    return from_dict(dict(method="task_arithmetic", base=base, parameters={"lambda": 1.0},
                          models=[{"path": p, "parameters": {"weight": 1.0}} for p in fts]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", choices=["ties", "ta"], nargs="+", default=["ties"])
    ap.add_argument("--loss", nargs="+", default=["choice", "distill", "entropy"])
    ap.add_argument("--set", nargs="*", default=[], help="extra refine options, key=value")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_refine.json"))
    args = ap.parse_args()
    zoo = ROOT / "results" / "zoo"
    build_zoo(zoo)
    fts = [str(zoo / f"ft_{t}") for t in ZOO_TASKS]
    base = str(zoo / "base")
    mat = Materializer(base, fts, methods=["ties", "task_arithmetic"])
    model, tok = load_model(Path(base))
    evs = {s: build_evaluator(EvalConfig(tasks=ZOO_TASKS, task_dir=str(zoo), split=s)) for s in ("dev", "test")}
    groups = [asdict(g) for g in tensor_groups([n for n in mat.names if n not in mat.constants])]
    extra = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        default = RefineConfig.model_fields[k].default
        extra[k] = v if isinstance(default, str) else type(default)(v)
    rows = []
    for start in args.start:
        r0 = start_recipe(start, base, fts)
        mat.write_into(model, r0)
        s0 = evs["test"].score(model, tok)
        print(f"start {start}: test {statistics.mean(s0.values()):.4f}", flush=True)
        for loss in args.loss:
            cfg = RefineConfig(**DEMO, loss=loss, **extra).model_dump()
            runs = []
            for seed in args.seeds:
                t0 = time.perf_counter()
                r, stats = refine(mat, model, tok, evs["dev"], r0, cfg, groups, seed=seed)
                wall = time.perf_counter() - t0
                mat.write_into(model, r)
                s = evs["test"].score(model, tok)
                runs.append({"seed": seed, "test": statistics.mean(s.values()), "tasks": s, "steps": stats["steps"],
                             "best_step": stats["best_step"], "holdout": [stats["holdout_before"], stats["holdout_after"]],
                             "teachers": stats.get("teachers"), "cost": stats["cost"], "wall_s": wall})
                print(f"  {loss} {extra or ''} seed {seed}: test {runs[-1]['test']:.4f} "
                      f"(best step {stats['best_step']} of {stats['steps']}, cost {stats['cost']:.1f} trials, "
                      f"{wall:.0f}s)", flush=True)
            mean = statistics.mean(x["test"] for x in runs)
            print(f"{start} {loss} {extra or ''}: test {mean:.4f} ("
                  + ", ".join(f"{x['test']:.3f}" for x in runs) + ")", flush=True)
            rows.append({"start": start, "start_test": statistics.mean(s0.values()), "loss": loss, "options": extra,
                         "mean": mean, "runs": runs})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": DEMO, "seeds": args.seeds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
