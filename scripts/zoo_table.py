"""The zoo table: dev and test accuracy of every zoo model on every task.

Rows: the base, each task fine-tune (and LoRA adapter) with its distance from the base,
the uniform average of the fine-tunes, task arithmetic at lambda = 1, a hand-tuned TIES merge (the
best on dev of a small grid, as a person tuning by hand would pick it), the soup
ingredients (checkpoints, sweep) and the uniform soup of the sweep. Then the zoo's
acceptance checks. Writes docs/ZOO.md (between markers) and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergesearch.engine.adapter import open_model  # noqa: E402
from mergesearch.engine.checkpoint import Checkpoint  # noqa: E402
from mergesearch.evaluate import EvalConfig  # noqa: E402
from mergesearch.evaluate import build_evaluator  # noqa: E402
from mergesearch.engine.materialize import Materializer  # noqa: E402
from mergesearch.recipe import from_dict  # noqa: E402
from doc_markers import write_table_and_checks  # noqa: E402
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
    evs = {split: build_evaluator(EvalConfig(tasks=ZOO_TASKS, task_dir=str(zoo), split=split))
           for split in ("dev", "test")}
    entries = [m for m in manifest["models"] if m["kind"] != "base"]
    mat = Materializer(zoo / "base", [zoo / m["path"] for m in entries], methods=["linear", "task_arithmetic", "ties"])
    fts = [str(zoo / f"ft_{t}") for t in ZOO_TASKS]
    rows = []

    base_ck = Checkpoint(zoo / "base")
    base_sd = {n: base_ck.get(n).float() for n in base_ck.names()}

    def distance(path):
        ck = open_model(str(path), base_ck)  # a LoRA adapter folder: the fine-tune it makes
        num = sum(float(((ck.get(n).float() - v) ** 2).sum()) for n, v in base_sd.items())
        return (num / sum(float((v ** 2).sum()) for v in base_sd.values())) ** 0.5

    def add_row(label, recipe, path=None, keep=True):
        time.perf_counter()
        mat.write_into(model, recipe)
        res = {split: ev.score(model, tok) for split, ev in evs.items()}
        row = (label, res, distance(path) if path else None)
        if keep:
            rows.append(row)
        return row

    def mean(res, split):
        return sum(res[split].values()) / len(ZOO_TASKS)

    base_id = dict(method="passthrough", base=str(zoo / "base"), models=[{"path": fts[0], "parameters": {"scale": 1.0}}])
    # the base itself: task arithmetic with zero weight reproduces it exactly
    add_row("base", from_dict(dict(method="task_arithmetic", base=str(zoo / "base"),
                                   models=[{"path": fts[0], "parameters": {"weight": 0.0}}])))
    single = {}
    for m in entries:
        single[m["name"]] = add_row(m["name"], from_dict({**base_id, "models": [
            {"path": str(zoo / m["path"]), "parameters": {"scale": 1.0}}]}), path=zoo / m["path"])
    add_row("uniform average (4 fine-tunes)", from_dict(dict(method="linear", base=str(zoo / "base"),
            models=[{"path": p, "parameters": {"weight": 1.0}} for p in fts])))
    add_row("task arithmetic, lambda = 1", from_dict(dict(method="task_arithmetic", base=str(zoo / "base"),
            models=[{"path": p, "parameters": {"weight": 1.0}} for p in fts])))
    grid = []
    for density in (0.3, 0.5, 0.7):
        for lam in (1.0, 1.5, 2.0, 3.0):
            label = f"TIES, density {density}, lambda {lam:g}"
            grid.append(add_row(label, from_dict(dict(method="ties", base=str(zoo / "base"), parameters={"lambda": lam},
                        models=[{"path": p, "parameters": {"weight": 1.0, "density": density}} for p in fts])),
                        keep=False))
    ties = max(grid, key=lambda r: mean(r[1], "dev"))
    rows.append((f"hand-tuned TIES (best on dev of 12: {ties[0][6:]})", ties[1], None))
    sweep = [m for m in entries if m["kind"] == "sweep"]
    soup = add_row("uniform soup of the sweep", from_dict(dict(method="linear", models=[
        {"path": str(zoo / m["path"]), "parameters": {"weight": 1.0}} for m in sweep])))

    head = ("| model | distance | " + " | ".join(f"{t} dev | {t} test" for t in ZOO_TASKS)
            + " | mean dev | mean test |")
    lines = [head, "|" + "---|" * (2 * len(ZOO_TASKS) + 4)]
    for label, res, dist in rows:
        cells = " | ".join(f"{res['dev'][t]:.3f} | {res['test'][t]:.3f}" for t in ZOO_TASKS)
        lines.append(f"| {label} | {'' if dist is None else f'{dist:.3f}'} | {cells} | {mean(res, 'dev'):.3f} | "
                     f"{mean(res, 'test'):.3f} |")
    table = "\n".join(lines)

    # acceptance
    fts_rows = {t: single[f"ft_{t}"] for t in ZOO_TASKS}
    own = {t: fts_rows[t][1]["test"][t] for t in ZOO_TASKS}
    best_ft = max(fts_rows.values(), key=lambda r: mean(r[1], "test"))
    sweep_task = sweep[0]["task"]
    best_sweep = max((single[m["name"]] for m in sweep), key=lambda r: r[1]["test"][sweep_task])
    build_s = manifest.get("build_seconds")
    loras = {m["task"]: single[m["name"]] for m in entries if m["kind"] == "lora"}
    lora_own = {t: r[1]["test"][t] for t, r in loras.items()}
    checks = [
        (f"each task fine-tune scores >= 0.95 on its own task (test): "
         f"{', '.join(f'{t} {v:.3f}' for t, v in own.items())}", min(own.values()) >= 0.95),
        (f"the hand-tuned TIES merge beats the best single fine-tune on the test mean: "
         f"{mean(ties[1], 'test'):.3f} vs {mean(best_ft[1], 'test'):.3f} ({best_ft[0]})",
         mean(ties[1], "test") > mean(best_ft[1], "test")),
        (f"the uniform soup of the {sweep_task} sweep is within 0.02 of its best ingredient on {sweep_task} (test): "
         f"{soup[1]['test'][sweep_task]:.3f} vs {best_sweep[1]['test'][sweep_task]:.3f} ({best_sweep[0]})",
         soup[1]["test"][sweep_task] >= best_sweep[1]["test"][sweep_task] - 0.02),
        (f"task fine-tunes move 0.01-0.1 from the base (relative L2): "
         f"{', '.join(f'{t} {fts_rows[t][2]:.3f}' for t in ZOO_TASKS)}",
         all(0.01 <= fts_rows[t][2] <= 0.1 for t in ZOO_TASKS)),
        (f"the build takes under 5 minutes: {build_s} s", build_s is not None and build_s < 300),
    ]
    if loras:
        checks.insert(1, (f"each LoRA adapter scores >= 0.85 on its own task (test): "
                          f"{', '.join(f'{t} {v:.3f}' for t, v in lora_own.items())}",
                          min(lora_own.values()) >= 0.85))
    return write_table_and_checks(Path(args.doc), "zoo-table", table, checks,
                                  "Acceptance, measured by this build (2-core CPU):")


if __name__ == "__main__":
    sys.exit(main())
