"""Export a run's best (or a chosen) trial.

Writes into ``results/<run>/``:
- ``best_recipe.yaml`` and ``best_mergekit.yaml``;
- ``model/``: the checkpoint, streamed and written atomically, with a model card
  (``README.md``: sources, recipe, dev and test scores);
- ``scores.json``: the recipe's TEST scores beside each source model's and the
  base's, plus the verification below.

Verification: the exported checkpoint is reloaded with transformers and scored
again on dev; the scores must equal the trial's stored dev scores (the export is
bit-equal to the candidate that was scored), and the result is recorded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
import uuid
from pathlib import Path

from mergesearch.sources import describe, short
from mergesearch.fsutil import atomic_file, replace_dir
from mergesearch.errors import MergeSearchError
from mergesearch.recipe import Recipe, from_dict, has_mergekit_equivalent, save_mergekit, to_mergekit

log = logging.getLogger("mergesearch.runs.export")


def export_run(run: str, trial: str | int | None = None, storage_url: str | None = None,
               root: Path = Path("results"), device: str | None = None) -> dict:
    """Export a trial. ``device``: where the merge runs; by default where the trial was
    scored, since only that device writes exactly the scored weights (DARE draws its
    masks with the device's generator, and fused kernels round differently)."""
    from mergesearch.evaluate import EvalConfig
    from mergesearch.runs.store import find_trial, load_run

    study, storage = load_run(run, storage_url, root)
    t = find_trial(study, storage, trial)
    label = t.label
    recipe = from_dict(t.recipe, f"trial {trial if trial is not None else t.number}")
    device = _export_device(label, t.scored_on or "cpu", device)
    space = study.user_attrs.get("space") or {}
    eval_cfg = EvalConfig.model_validate(space.get("evaluator") or study.user_attrs.get("evaluator"))
    monitor = None
    if space.get("monitor"):
        from mergesearch.evaluate.monitor import MonitorConfig
        monitor = MonitorConfig.model_validate(space["monitor"])
    out = root / run
    out.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(out)
    t0 = time.perf_counter()
    # Everything is staged in a hidden folder and moved into place at the end: a crash
    # at any moment leaves the previous export (or none), never a partial one.
    stage = out / f".export-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        result = _export_staged(run, t, label, recipe, eval_cfg, stage, out, device, monitor,
                                known=study.user_attrs.get("sources") or {})
        replace_dir(stage / "model", out / "model", force=True)
        if (stage / "best_row_scales").exists():  # before the recipe that names them
            replace_dir(stage / "best_row_scales", out / "best_row_scales", force=True)
        else:
            shutil.rmtree(out / "best_row_scales", ignore_errors=True)
        for name in ("best_recipe.yaml", "best_mergekit.yaml", "scores.json"):
            if (stage / name).exists():
                os.replace(stage / name, out / name)
            elif name == "best_mergekit.yaml":  # curvature-based methods exist only here
                (out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    result["seconds"] = time.perf_counter() - t0
    return result


def _export_device(label: str, scored_on: str, device: str | None) -> str:
    import torch
    if device is None:
        if scored_on.startswith("cuda") and not torch.cuda.is_available():
            raise MergeSearchError(
                f"trial {label} was scored on {scored_on} and no CUDA device is visible here; a CPU export would not "
                f"write the scored weights: export on a GPU machine, or pass --device cpu to export (and re-score) "
                f"the CPU's merge")
        return scored_on
    if device.split(":")[0] != scored_on.split(":")[0]:
        log.warning("trial %s was scored on %s; exporting on %s may write different weights (the dev re-score "
                    "below tells)", label, scored_on, device)
    return device


def _clean_leftovers(out: Path) -> None:
    """Staging and temp folders of an export that was killed."""
    for p in out.iterdir():
        if p.is_dir() and (p.name.startswith(".export-") or p.name.startswith(".model.tmp-")
                           or p.name.startswith(".model.old-") or p.name.startswith(".best_row_scales.old-")):
            shutil.rmtree(p, ignore_errors=True)


def _export_staged(run: str, t, label: str, recipe: Recipe, eval_cfg, stage: Path, out: Path, device: str,
                   monitor=None, known: dict | None = None) -> dict:
    """``known``: each input's origin as the run recorded it when the space was pinned
    (the revision asked for is known only there)."""
    from mergesearch.engine.models import load_model
    from mergesearch.evaluate import build_evaluator
    from mergesearch.engine.merge import open_plan, stream_merge
    from mergesearch.progress import step

    saved = recipe
    if recipe.has_row_scales:  # the row scales travel with the recipe, named relative to it
        models = []
        for i, m in enumerate(recipe.models):
            if m.row_scales:
                (stage / "best_row_scales").mkdir(exist_ok=True)
                shutil.copyfile(m.row_scales, stage / "best_row_scales" / f"m{i}.safetensors")
                m = m.model_copy(update={"row_scales": f"best_row_scales/m{i}.safetensors"})
            models.append(m)
        saved = recipe.model_copy(update={"models": models})
    saved.save(stage / "best_recipe.yaml")
    if has_mergekit_equivalent(recipe):
        save_mergekit(recipe, stage / "best_mergekit.yaml")
    dev_stored = t.scores or {}
    model_dir = stage / "model"
    plan = open_plan(recipe)
    kill_at = "export_kill" in (os.environ.get("MERGESEARCH_FAULT") or "")

    def progress(done, total, name):  # the fault hook: die half-way through the tensors
        if kill_at and done * 2 >= total:
            os.kill(os.getpid(), signal.SIGKILL)
    with step(f"export: merging trial {label}", unit="tensors") as line:
        stream_merge(plan, model_dir, device=device,
                     progress=lambda d, n, name: (progress(d, n, name), line.update(completed=d, total=n)))

    dev_cfg = eval_cfg
    if monitor is not None:  # what the trials were scored on: monitor tasks with floors too
        from mergesearch.evaluate.monitor import scoring_config
        dev_cfg = scoring_config(eval_cfg, monitor)
    dev_ev = build_evaluator(dev_cfg.model_copy(update={"split": "dev"}))
    test_ev = build_evaluator(eval_cfg.model_copy(update={"split": "test"}))
    paths = list(dict.fromkeys(([recipe.base] if recipe.base else []) + [m.path for m in recipe.models]))
    with step("export: scoring the merge (dev again, test) and its sources (test)", total=1 + len(paths),
              unit="models") as line:
        model, tok = load_model(model_dir, device=device, trust_remote_code=eval_cfg.trust_remote_code)
        dev_again = dev_ev.score(model, tok)
        verified = dev_again == dev_stored
        test_scores = test_ev.score(model, tok)
        mon_ev = None
        if monitor is not None:  # what the merge forgets outside its objective, on test items
            from mergesearch.evaluate.monitor import monitor_config
            mon_ev = build_evaluator(monitor_config(eval_cfg, monitor, "test"))
            mon_scores = {"merged": mon_ev.score(model, tok), "sources": {}}
        line.advance()
        sources = {}
        for path in paths:
            m, tk = load_model(path, device=device, trust_remote_code=eval_cfg.trust_remote_code)
            sources[path] = test_ev.score(m, tk)
            if mon_ev is not None:
                mon_scores["sources"][path] = mon_ev.score(m, tk)
            line.advance()
    result = {
        "run": run,
        "trial": label,
        "baseline": t.baseline,
        "recipe": recipe.to_dict(),
        "test": {"merged": test_scores, "merged_aggregate": test_ev.aggregate(test_scores),
                 "sources": {p: {"scores": s, "aggregate": test_ev.aggregate(s)} for p, s in sources.items()}},
        "dev": {"stored": dev_stored, "rescored": dev_again, "verified": verified},
        # which documents each split scored (test: never seen by the search), and the metrics
        "items": {"dev": getattr(dev_ev, "item_record", None), "test": getattr(test_ev, "item_record", None)},
        "metrics": getattr(test_ev, "directions", None),
        "model": str(out / "model"),
        # where each input came from: Hub repositories at the commit they resolved to
        "provenance": {p: (known or {}).get(p) or describe(p) for p in paths},
    }
    if mon_ev is not None:
        result["monitor"] = {**mon_scores, "floors": dict(monitor.floors), "items": mon_ev.item_record,
                             "metrics": mon_ev.directions}
    if not verified:
        log.warning("export: re-scored dev %s differs from the stored %s", dev_again, dev_stored)
    with atomic_file(stage / "scores.json") as f:  # no timings: a repeated export writes the same bytes
        json.dump(result, f, indent=2)
    with atomic_file(model_dir / "README.md") as f:
        f.write(model_card(recipe, result, eval_cfg.tasks))
    return result


def _origin(result: dict, ref: str) -> str:
    """', Hub repo X at commit C (asked for as main)' for each Hub part of a reference."""
    parts = []
    for role, info in (result.get("provenance") or {}).get(ref, {}).items():
        if "repo" in info:
            asked = f", asked for as `{info['requested']}`" if info.get("requested") not in (None, info["commit"]) else ""
            parts.append(f"{role} from the Hub: {info['repo']} at commit {info['commit']}{asked}")
    return f" ({'; '.join(parts)})" if parts else ""


def model_card(recipe: Recipe, result: dict, tasks: list[str]) -> str:
    import yaml

    lines = [
        "# Merged model",
        "",
        f"Made by mergesearch from run `{result['run']}`, trial {result['trial']}"
        + (f" ({result['baseline']})" if result.get("baseline") else "") + f": **{recipe.method}**.",
        "",
        "## Sources",
        f"- base: `{recipe.base}`" + _origin(result, recipe.base) if recipe.base else "",
        *[f"- `{m.path}`" + _origin(result, m.path) for m in recipe.models],
        "",
        "## Scores",
        "",
        "| model | " + " | ".join(tasks) + " | mean |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    test = result["test"]
    lines.append("| **merged (test)** | " + " | ".join(f"{test['merged'][t]:.4f}" for t in tasks)
                 + f" | {test['merged_aggregate']:.4f} |")
    for p, s in test["sources"].items():
        lines.append(f"| {short(p)} (test) | " + " | ".join(f"{s['scores'][t]:.4f}" for t in tasks)
                     + f" | {s['aggregate']:.4f} |")
    dev = result["dev"]["stored"]
    if dev:
        lines.append("| merged (dev, searched on) | " + " | ".join(f"{dev[t]:.4f}" for t in tasks) + " | |")
    mon = result.get("monitor")
    if mon:
        mt = list(mon["merged"])
        lines += ["", "## Monitor tasks (test; never optimized)", "",
                  "What the merge keeps outside its objective" + (" (a floor marks a candidate below it infeasible)"
                                                                   if mon["floors"] else "") + ".", "",
                  "| model | " + " | ".join(mt) + " |", "|---|" + "---|" * len(mt),
                  "| **merged** | " + " | ".join(f"{mon['merged'][t]:.4f}" for t in mt) + " |"]
        lines += [f"| {short(p)} | " + " | ".join(f"{s[t]:.4f}" for t in mt) + " |"
                  for p, s in mon["sources"].items()]
        if mon["floors"]:
            lines.append("| floor | " + " | ".join(f"{mon['floors'][t]:.4f}" if t in mon["floors"] else ""
                                                  for t in mt) + " |")
    lines += ["", f"Re-scored on dev after export: {'identical to the search' if result['dev']['verified'] else 'DIFFERENT'}.",
              "", "## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", "",
              "## mergekit", ""]
    if has_mergekit_equivalent(recipe):
        lines += ["```yaml", yaml.safe_dump(to_mergekit(recipe), sort_keys=False).rstrip(), "```", ""]
    else:
        why = ("per-row weights (row_scales, from a refinement with `rows: true`)" if recipe.has_row_scales
               else "the singular value decompositions of its task matrices, which mergekit's methods do not compute"
               if recipe.spec.factors else "per-model metric files")
        lines += [f"This `{recipe.method}` merge has no mergekit equivalent: it needs {why}.", ""]
    return "\n".join(l for l in lines if l is not None)
