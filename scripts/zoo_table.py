"""The zoo table: dev and test accuracy of every zoo model on every task.

Rows: the base, each task fine-tune, the uniform average of the fine-tunes and
task arithmetic at lambda = 1, plus the soup ingredients (checkpoints, sweep).
Writes docs/ZOO.md (between markers) and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergesearch.evaluate import EvalConfig  # noqa: E402
from mergesearch.evaluate.loglik import LoglikEvaluator  # noqa: E402
from mergesearch.materialize import Materializer  # noqa: E402
from mergesearch.recipe import from_dict  # noqa: E402
from doc_markers import write_between  # noqa: E402
from mergesearch.zoo.build import ZOO_TASKS, build_zoo  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=str(ROOT / "results" / "zoo"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "ZOO.md"))
    args = ap.parse_args()
    zoo = Path(args.zoo)
    manifest = build_zoo(zoo)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(zoo / "base")
    model = AutoModelForCausalLM.from_pretrained(zoo / "base").eval()
    evs = {split: LoglikEvaluator(EvalConfig(tasks=ZOO_TASKS, task_dir=str(zoo), split=split))
           for split in ("dev", "test")}
    entries = [m for m in manifest["models"] if m["kind"] != "base"]
    mat = Materializer(zoo / "base", [zoo / m["path"] for m in entries], methods=["linear", "task_arithmetic"])
    fts = [str(zoo / f"ft_{t}") for t in ZOO_TASKS]
    rows = []

    def add_row(label, recipe):
        t0 = time.perf_counter()
        mat.write_into(model, recipe)
        res = {split: ev.score(model, tok) for split, ev in evs.items()}
        rows.append((label, res, time.perf_counter() - t0))

    base_id = dict(method="passthrough", base=str(zoo / "base"), models=[{"path": fts[0], "parameters": {"scale": 1.0}}])
    # the base itself: task arithmetic with zero weight reproduces it exactly
    add_row("base", from_dict(dict(method="task_arithmetic", base=str(zoo / "base"),
                                   models=[{"path": fts[0], "parameters": {"weight": 0.0}}])))
    for m in entries:
        add_row(m["name"], from_dict({**base_id, "models": [{"path": str(zoo / m["path"]), "parameters": {"scale": 1.0}}]}))
    add_row("uniform average (4 fine-tunes)", from_dict(dict(method="linear", base=str(zoo / "base"),
            models=[{"path": p, "parameters": {"weight": 1.0}} for p in fts])))
    add_row("task arithmetic, lambda = 1", from_dict(dict(method="task_arithmetic", base=str(zoo / "base"),
            models=[{"path": p, "parameters": {"weight": 1.0}} for p in fts])))

    head = "| model | " + " | ".join(f"{t} dev | {t} test" for t in ZOO_TASKS) + " | mean dev | mean test |"
    lines = [head, "|" + "---|" * (2 * len(ZOO_TASKS) + 3)]
    for label, res, _ in rows:
        cells = " | ".join(f"{res['dev'][t]:.3f} | {res['test'][t]:.3f}" for t in ZOO_TASKS)
        md, mt = (sum(res[s].values()) / len(ZOO_TASKS) for s in ("dev", "test"))
        lines.append(f"| {label} | {cells} | {md:.3f} | {mt:.3f} |")
    table = "\n".join(lines)
    print(table)
    write_between(Path(args.doc), "<!-- zoo-table -->", "<!-- /zoo-table -->",
                  f"{table}\n\nBuild time as recorded by this build: {manifest.get('build_seconds', '?')} s "
                  "(2-core CPU).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
