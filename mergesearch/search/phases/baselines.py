"""The baselines phase: each source model as itself (the references of
``objective.normalize: sources``, scored first), then the baselines (uniform average,
task arithmetic at lambda 1, the listed singular-value methods at their defaults, a seeding
soup the space cannot express), in the side
study ``<run>.baselines`` so the sampler only ever models its own proposals."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from mergesearch.errors import MergeSearchError
from mergesearch.methods import REGISTRY
from mergesearch.progress import step
from mergesearch.recipe import Recipe, from_dict
from mergesearch.runs.records import Job
from mergesearch.runs.store import record, study_names
from mergesearch.search.space import SearchSpace

if TYPE_CHECKING:
    from mergesearch.search.controller import Controller

log = logging.getLogger("mergesearch.search")


def source_recipes(space: SearchSpace) -> dict[str, Recipe]:
    """Each source model as a recipe (itself, exactly): the references of a normalized objective."""
    return {f"source {Path(m).name}": from_dict(dict(method="linear", models=[{"path": m, "parameters": {"weight": 1.0}}],
                                                     seed=space.seed, **({"dtype": space.dtype} if space.dtype else {})))
            for m in space.models}


def baseline_recipes(space: SearchSpace) -> dict[str, Recipe]:
    """The uniform average and task arithmetic at lambda 1; and at its defaults each
    singular-value method the space searches (tsv, iso_c, iso_cts) and each method of
    ``baselines``, so that ``sampler.x0: best_baseline`` can start from the best of them."""
    models_1 = [{"path": m, "parameters": {"weight": 1.0}} for m in space.models]
    dtype = {"dtype": space.dtype} if space.dtype else {}
    out = {
        "uniform average": from_dict(dict(method="linear", base=space.base, models=models_1, seed=space.seed, **dtype)),
        "task arithmetic 1.0": from_dict(dict(method="task_arithmetic", base=space.base, models=models_1,
                                              seed=space.seed, **dtype)),
    }
    listed = [m for m in space.methods if REGISTRY[m].factors is not None] + list(space.baselines)
    for method in dict.fromkeys(listed):
        if f"{method} defaults" not in out:
            out[f"{method} defaults"] = from_dict(dict(method=method, base=space.base, models=models_1,
                                                       seed=space.seed, **dtype))
    return out


class Baselines:
    name = "baselines"

    def run(self, c: "Controller") -> None:
        space = c.space
        if not (space.initial_trials or c.setup.seed_baseline or space.objective.normalize == "sources"):
            return
        side_name = f"{c.opts.run}.baselines"
        if side_name in study_names(c.storage):
            return
        side = optuna.create_study(study_name=side_name, storage=c.storage, directions=c.study.directions)
        todo = dict(baseline_recipes(space)) if space.initial_trials else {}
        if c.setup.seed_baseline:
            todo[f"soup {space.seed_from}"] = c.setup.seed_recipe
        sources = source_recipes(space) if space.objective.normalize == "sources" else {}
        pending = {}
        for name, recipe in {**sources, **todo}.items():
            t = side.ask()
            record(t, recipe=recipe.to_dict(), baseline=name, summary=recipe.summary())
            job = Job("baseline", t.number, recipe.to_dict())
            pending[job.id] = (t, name, job)
        batches = [[v for v in pending.values() if v[1] in sources], [v for v in pending.values() if v[1] not in sources]]
        for k, batch in enumerate(batches):
            held = []
            with step(f"search: scoring the {'source models' if k == 0 else 'baselines'}", total=len(batch),
                      unit="models") as line:
                for res in c.run_jobs([job for _, _, job in batch]):
                    line.advance()
                    if k == 0:
                        held.append(res)
                    else:
                        self._finish(c, side, pending.pop(res.job.id), res)
            if k == 0 and sources:  # the references first: the sources' own scores are normalized too
                c.reference = self._reference(c, [r for r in held if r.ok])
                for res in held:
                    self._finish(c, side, pending.pop(res.job.id), res)
        c.abandon(side, [t for t, _, _ in pending.values()])  # only after an interrupt is anything left

    @staticmethod
    def _finish(c: "Controller", side, entry, res) -> None:
        t, name, _ = entry
        fields = c.finish(side, t, res)
        log.info("baseline %s: %s", name, f"{fields['aggregate']:.4f}" if res.ok else f"failed ({res.reason})")

    @staticmethod
    def _reference(c: "Controller", results: list) -> dict[str, float]:
        """The best source model's dev score per task (stored with the study for --resume)."""
        if not results:
            raise MergeSearchError("objective.normalize: sources: no source model could be scored")
        ref = {task: max(r.scores[task] for r in results) for task in c.space.evaluator.tasks}
        c.study.set_user_attr("reference", ref)
        log.info("objective: each task is divided by the best source's dev score: %s",
                 ", ".join(f"{t} {v:.4f}" for t, v in ref.items()))
        return ref
