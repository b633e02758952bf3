"""The soup table: best ingredient vs uniform soup vs greedy soup on the zoo's two
model sets, on dev (selected on) and test (never seen by the selection).

- the `reverse` hyperparameter sweep (6 fine-tunes of the base: learning rate,
  steps and seed vary), scored on the reverse task;
- the checkpoints of the `add` fine-tune (steps 26 to 180), scored on add, with
  the last-3 soup as well.

Runs real soups (Ray workers, SQLite store) under results/soup_table/ and writes
the table into docs/BENCHMARKS.md between the soup-table markers.
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

from mergesearch.search.soup_run import SoupOptions, SoupRunner, resolve_ingredients  # noqa: E402
from doc_markers import write_between  # noqa: E402
from mergesearch.zoo.build import build_zoo  # noqa: E402

BEGIN, END = "<!-- soup-table:begin -->", "<!-- soup-table:end -->"


def run_soup(root: Path, zoo: Path, name: str, ingredients: list[str], task: str, strategy: str,
             n: int | None = None, workers: int = 2, speculate: bool = True) -> dict:
    ev = root / f"eval_{task}.yaml"
    ev.write_text(yaml.safe_dump({"evaluator": "loglik", "tasks": [task], "task_dir": str(zoo), "split": "dev"}))
    shutil.rmtree(root / name, ignore_errors=True)
    opts = SoupOptions(run=name, strategy=strategy, n=n, base=str(zoo / "base"), workers=workers, root=root,
                       speculate=speculate)
    t0 = time.perf_counter()
    report = SoupRunner(resolve_ingredients(ingredients), ev, opts).run()
    report["wall_s"] = time.perf_counter() - t0
    return report


def cell(row: dict) -> str:
    return f"{row['dev']:.3f} / {row['test']:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=str(ROOT / "results" / "zoo"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    zoo = Path(a.zoo)
    build_zoo(zoo)
    root = ROOT / "results" / "soup_table"
    root.mkdir(parents=True, exist_ok=True)
    sweep = sorted(str(p) for p in (zoo / "sweep" / "reverse").iterdir())
    ckpts = [str(zoo / "checkpoints" / "add")]
    sets = [
        ("reverse sweep", sweep, "reverse", [("greedy", None), ("sequential", None)]),
        ("add checkpoints", ckpts, "add", [("greedy", None), ("sequential", None), ("last-n", 3)]),
    ]
    lines = [
        "| model set (task) | ingredients | best ingredient | uniform soup | greedy soup (members) | last-3 soup | "
        "evaluations | wall | greedy pass: sequential / speculative |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    results = {}
    for label, ingredients, task, strategies in sets:
        reports = {}
        for strategy, n in strategies:
            name = f"{task}-{strategy}"
            real = "greedy" if strategy == "sequential" else strategy
            reports[strategy] = run_soup(root, zoo, name, ingredients, task, real, n, a.workers,
                                         speculate=strategy != "sequential")
        g = reports["greedy"]["rows"]
        last = reports.get("last-n")
        lines.append(
            f"| {label} ({task}) | {len(reports['greedy']['ingredients'])} | {cell(g['best ingredient'])} | "
            f"{cell(g['uniform soup'])} | {cell(g['final soup'])} ({g['final soup']['members']}) | "
            + (cell(last["rows"]["final soup"]) if last else "-") + " | "
            f"{reports['greedy']['evaluations']} | {reports['greedy']['wall_s']:.0f} s | "
            f"{reports['sequential']['greedy_seconds']:.2f} s / {reports['greedy']['greedy_seconds']:.2f} s "
            f"({reports['sequential']['greedy_seconds'] / reports['greedy']['greedy_seconds']:.2f}x) |")
        assert reports["sequential"]["members"] == reports["greedy"]["members"]  # the same soup
        results[label] = {k: {"rows": r["rows"], "members": r["members"], "steps": r["steps"],
                              "ingredients": r["ingredients"], "wall_s": r["wall_s"]} for k, r in reports.items()}
        for r in reports["greedy"]["steps"]:
            print(f"  {label}: + {Path(r['ingredient']).name}: dev {r['dev']:.3f} "
                  f"{'accepted' if r['accepted'] else 'rejected'}")
    table = "\n".join(lines)
    print(table)
    (root / "soup_table.json").write_text(json.dumps(results, indent=2))
    write_between(Path(a.doc), BEGIN, END, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
