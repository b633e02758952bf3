"""The refinement phase: the best candidates of the task-vector family refined by
gradient descent on their worker (:mod:`mergesearch.search.refine`); each refined
recipe is scored like a trial and stored in the side study ``<run>.refine``, its
per-row multipliers (``refine.rows``) in safetensors files under the run's folder."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from mergesearch.methods.task_arithmetic import TASK_VECTOR_METHODS
from mergesearch.progress import step
from mergesearch.recipe import from_dict
from mergesearch.runs.records import Job
from mergesearch.runs.store import record, recover_stale, study_names, to_record, trial_records
from mergesearch.search.variables import Granularity, layer_prefix, tensor_groups

if TYPE_CHECKING:
    from mergesearch.search.controller import Controller

log = logging.getLogger("mergesearch.search")


class Refinement:
    name = "refinement"

    def run(self, c: "Controller") -> None:
        cfg = c.space.refine
        if cfg is None or c.interrupted:
            return
        name = f"{c.opts.run}.refine"
        if name in study_names(c.storage):
            side = optuna.load_study(study_name=name, storage=c.storage)
            recover_stale(side, requeue=False)  # a refinement cut off by a dead controller runs again
        else:
            side = optuna.create_study(study_name=name, storage=c.storage, directions=c.study.directions)
        done = {r.refined_from for r in (to_record("refine", t) for t in side.get_trials(deepcopy=False)) if r.complete}
        pool = [r for r in trial_records(c.study, c.storage)
                if r.study_kind != "refine" and r.complete and r.method in TASK_VECTOR_METHODS and not r.is_source]
        pool.sort(key=lambda r: (r.feasible, r.value), reverse=True)
        chosen = [r for r in pool[:cfg.top] if r.label not in done]
        if not chosen:
            return
        names = c.setup.tensor_names
        if cfg.level == "tensor":
            groups = tensor_groups(names, c.space.granularity.special)
        else:
            g = Granularity(level=cfg.level, n_groups=cfg.n_groups, special=c.space.granularity.special,
                            modules=c.space.granularity.modules if cfg.modules is None else cfg.modules)
            groups = c.space.groups(c.setup.num_layers, layer_prefix(names), g)
        options = cfg.model_dump()
        memory = getattr(c.setup, "refine_memory", None)
        if memory is not None:  # the sizes the memory plan chose (a smaller batch, checkpointing)
            options = memory.options(options)
        payload = {"options": options, "groups": [asdict(x) for x in groups], "seed": c.space.seed}
        pending = {}
        for src in chosen:
            t = side.ask()
            record(t, recipe=src.recipe, refined_from=src.label, role=f"refine of {src.label}", summary=src.summary,
                   source_aggregate=src.aggregate)
            # its timeout: trial_timeout for each trial-equivalent its reserve allows
            job = Job("refine", t.number, src.recipe, refine=payload, trials=c.setup.refine_reserve / max(cfg.top, 1))
            pending[job.id] = (t, src, job)
        with step(f"search: refining the best candidates, up to {options['steps']} steps each",
                  total=len(chosen), unit="candidates") as line:
            for res in c.run_jobs([job for _, _, job in pending.values()]):
                line.advance()
                t, src, _ = pending.pop(res.job.id)
                stats = res.extra.get("refine")
                if res.ok and "recipe" in res.extra:
                    if res.extra.get("rows"):
                        write_row_scales(c.dir, res.extra["recipe"], res.extra["rows"], f"r{t.number}")
                    refined = from_dict(res.extra["recipe"], "refined recipe")
                    record(t, recipe=res.extra["recipe"], summary=refined.summary(), refine=stats, cost=stats["cost"] + 1.0)
                fields = c.finish(side, t, res)
                if res.ok:
                    log.info("refine: %s %.4f -> r%d %.4f (%d steps, best at step %d, held-out accuracy %.3f -> %.3f, "
                             "%.1f trial-equivalents)", src.label,
                             src.aggregate if src.aggregate is not None else float("nan"), t.number,
                             fields.get("aggregate", float("nan")), stats["steps"], stats["best_step"],
                             stats["holdout_before"], stats["holdout_after"], stats["cost"] + 1.0)
                    mem = stats.get("memory") or {}
                    if mem.get("peak") is not None and mem.get("planned"):  # a CUDA worker measured it
                        log.info("refine: r%d peak %.3f GB beside the model, planned %.3f GB (%.2f of the plan)",
                                 t.number, mem["peak"] / 1e9, mem["planned"] / 1e9, mem["peak"] / mem["planned"])
                else:
                    log.warning("refine: %s failed (%s)", src.label, res.reason)
        c.abandon(side, [t for t, _, _ in pending.values()])


def write_row_scales(run_folder: Path, recipe: dict, rows: list, label: str) -> None:
    """A refinement's per-row multipliers: one safetensors file per model under the
    run's ``row_scales/`` (written whole, then renamed), named in the stored recipe."""
    from safetensors.torch import save

    from mergesearch.fsutil import atomic_file

    for i, tensors in enumerate(rows):
        if not tensors:
            continue
        path = run_folder / "row_scales" / f"{label}-m{i}.safetensors"
        with atomic_file(path, "wb") as f:
            f.write(save({k: v.contiguous() for k, v in tensors.items()}))
        recipe["models"][i]["row_scales"] = str(path.resolve())
