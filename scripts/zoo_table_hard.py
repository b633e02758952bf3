"""The hard zoo's table: every model and simple merge on every task's test items.

Rows: the base, each fine-tune with its distance from the base, the uniform average, task
arithmetic at lambda = 1 and hand-tuned TIES (the best on dev of the 12-point grid
scripts/bench_quality.py uses). Then the hard zoo's acceptance checks: each fine-tune at
least 0.9 on its own task, the base answering no template, the build inside 15 minutes.
Builds the hard zoo when it is missing (`mergesearch zoo build --preset hard`); writes
docs/ZOO.md between markers and prints the table. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from doc_markers import write_table_and_checks  # noqa: E402
from mergesearch.engine.checkpoint import Checkpoint  # noqa: E402
from mergesearch.engine.materialize import Materializer  # noqa: E402
from mergesearch.engine.models import load_model  # noqa: E402
from mergesearch.evaluate import EvalConfig, build_evaluator  # noqa: E402
from mergesearch.recipe import from_dict  # noqa: E402
from mergesearch.zoo.build import build_zoo  # noqa: E402
from mergesearch.zoo.hard import HARD_TASKS  # noqa: E402


def distances(zoo: Path, names: list[str]) -> dict[str, float]:
    """||theta - theta_base|| / ||theta_base|| over all parameters, per model folder."""
    base = Checkpoint(zoo / "base")
    ref = {n: base.get(n).float() for n in base.names()}
    norm = sum(float(v.pow(2).sum()) for v in ref.values()) ** 0.5
    out = {}
    for name in names:
        ck = Checkpoint(zoo / name)
        out[name] = sum(float((ck.get(n).float() - v).pow(2).sum()) for n, v in ref.items()) ** 0.5 / norm
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=str(ROOT / "results" / "zoo_hard"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "ZOO.md"))
    args = ap.parse_args()
    zoo = Path(args.zoo)
    manifest = build_zoo(zoo, preset="hard")
    fts = [f"ft_{t}" for t in HARD_TASKS]
    mat = Materializer(zoo / "base", [zoo / f for f in fts], methods=["linear", "task_arithmetic", "ties"])
    model, tok = load_model(zoo / "base")
    evs = {s: build_evaluator(EvalConfig(tasks=HARD_TASKS, task_dir=str(zoo), split=s)) for s in ("dev", "test")}

    def scores(method: str, weights: list[float], **params) -> dict:
        per = {k: v for k, v in params.items() if k != "lam"}
        recipe = from_dict(dict(method=method, base=str(zoo / "base"), parameters={"lambda": params.get("lam", 1.0)}
                                if method != "linear" else {},
                                models=[{"path": str(zoo / f), "parameters": {"weight": w, **per}}
                                        for f, w in zip(fts, weights)]))
        mat.write_into(model, recipe)
        return {s: ev.score(model, tok) for s, ev in evs.items()}

    n = len(fts)
    dist = distances(zoo, fts)
    rows = [("base", scores("task_arithmetic", [0.0] * n), None)]
    for i, f in enumerate(fts):
        rows.append((f, scores("task_arithmetic", [1.0 if j == i else 0.0 for j in range(n)]), dist[f]))
    rows.append((f"uniform average ({n} fine-tunes)", scores("linear", [1.0] * n), None))
    rows.append(("task arithmetic, lambda = 1", scores("task_arithmetic", [1.0] * n), None))
    grid = {(d, lam): scores("ties", [1.0] * n, density=d, lam=lam)
            for d in (0.3, 0.5, 0.7) for lam in (1.0, 1.5, 2.0, 3.0)}
    (d, lam), ties = max(grid.items(), key=lambda kv: sum(kv[1]["dev"].values()))
    rows.append((f"hand-tuned TIES (best on dev of 12: density {d}, lambda {lam:g})", ties, None))

    def mean(res, split):
        return sum(res[split].values()) / len(res[split])

    lines = ["| model | distance | " + " | ".join(HARD_TASKS) + " | mean dev | mean test |",
             "|---|" + "---:|" * (len(HARD_TASKS) + 3)]
    for label, res, dst in rows:
        lines.append(f"| {label} | {'' if dst is None else f'{dst:.3f}'} | "
                     + " | ".join(f"{res['test'][t]:.3f}" for t in HARD_TASKS)
                     + f" | {mean(res, 'dev'):.3f} | {mean(res, 'test'):.3f} |")
    table = "\n".join(lines)
    own = {t: rows[1 + i][1]["test"][t] for i, t in enumerate(HARD_TASKS)}
    base = rows[0][1]["test"]
    took = manifest.get("build_seconds")
    checks = [
        (f"each fine-tune scores >= 0.9 on its own task (test): {', '.join(f'{t} {v:.3f}' for t, v in own.items())}",
         min(own.values()) >= 0.9),
        (f"every fine-tune adds at least 0.3 to the base on its own task (test): "
         f"{', '.join(f'{t} {base[t]:.3f} -> {own[t]:.3f}' for t in HARD_TASKS)}",
         all(own[t] - base[t] >= 0.3 for t in HARD_TASKS)),
        (f"the build takes at most 15 minutes on this machine: {took} s", took is not None and took <= 900),
    ]
    return write_table_and_checks(Path(args.doc), "hard-zoo-table", table, checks,
                                  "Acceptance, measured by this build (2-core CPU):")


if __name__ == "__main__":
    sys.exit(main())
