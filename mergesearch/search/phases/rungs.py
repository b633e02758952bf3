"""The fidelity rungs of the loop: a trial is scored on growing shares of the dev
items, each rung on the worker that holds its candidate, and after each rung the
pruner decides whether it goes on (:mod:`mergesearch.search.fidelity` plans the rungs
and makes the pruners)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import optuna

from mergesearch.runs.records import Job
from mergesearch.runs.store import record
from mergesearch.search.fidelity import Progress
from mergesearch.search.objective import objective_values, pruner_linear, pruner_value

if TYPE_CHECKING:
    from mergesearch.search.controller import Controller


class Rungs:
    def __init__(self, c: "Controller"):
        self.c = c
        self.fid = c.setup.fid
        self.progress: dict[int, Progress] = {}  # trial number -> its rungs so far

    # the pruner's view of the objective (the reference is known only after the baselines)
    def value(self, scores: dict[str, float]) -> float:
        return pruner_value(self.c.space, scores, self.c.reference)

    def linear(self) -> dict[str, float] | None:
        return pruner_linear(self.c.space, self.fid.order, self.c.reference)

    def first(self, job: Job) -> Job:
        """A trial's first rung."""
        self.progress[job.number] = Progress(self.fid)
        return job.next_rung({"k": 0, "items": self.fid.rung_items(0)})

    def restart(self, number: int) -> None:
        """A retried trial starts again at the first rung."""
        self.progress.pop(number, None)

    def take(self, number: int) -> Progress | None:
        return self.progress.pop(number, None)

    def on_result(self, study: optuna.Study, t: optuna.Trial, res) -> str:
        """A rung's result: add it, report it and ask the pruner. Returns "sent" when the
        trial's next rung was sent (to the worker that holds the candidate), "pruned" when
        the trial was pruned (and stored) here, "done" when it has scored every rung
        (the controller's ``finish`` stores it)."""
        c = self.c
        p = self.progress[t.number]
        first = p.rung
        p.add(res.extra.get("item_scores") or {}, res.extra.get("task_scores"))
        p.materialize_s += res.timings.get("materialize_s", 0.0)
        p.eval_s += res.timings.get("eval_s", 0.0)
        p.writes += int(bool(res.extra.get("wrote")))
        p.worker, p.device = res.worker, res.device
        if p.done:
            return "done"
        agg, feasible, value = objective_values(c.space, p.scores(), c.reference)
        pruner = c.space.fidelity.pruner.name
        if pruner == "wilcoxon":
            ref = c.reference if c.space.objective.normalize == "sources" else None
            weights = {**c.space.evaluator.weights, **{x: 0.0 for x in c.space.scoring().monitor}}
            for step, v in p.blocks(first, weights, ref).items():
                t.report(v, step)
        elif pruner == "improvement":  # raw block means: the pruner weighs them
            for step, v in p.blocks(first, {}, None).items():
                t.report(v, step)
        else:
            t.report(value, step=p.items)
        pruned = t.should_prune()
        chance = getattr(c.pruner, "last", {}).pop(t.number, None)  # the improvement pruner's estimate
        if pruned:
            record(t, worker=p.worker, timings={"materialize_s": p.materialize_s, "eval_s": p.eval_s},
                   **({"chance": chance} if chance is not None else {}),
                   **({"scored_on": p.device} if p.device else {}), scores=p.scores(), aggregate=agg,
                   feasible=feasible, items=p.items, fidelity=p.share, rungs=p.rung, cost=p.share, writes=p.writes)
            study.tell(t, state=optuna.trial.TrialState.PRUNED)
            c.progress.tally.add("PRUNED", p.items, p.share, None, t.number)
            c.busy_s += p.materialize_s + p.eval_s
            del self.progress[t.number]
            return "pruned"
        c.pool.submit(res.job.next_rung({"k": p.rung, "items": self.fid.rung_items(p.rung)}), worker=p.worker)
        return "sent"
