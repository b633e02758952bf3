"""The objective: what a candidate's per-task dev scores are worth to the sampler.

:func:`objective_values` gives the aggregate (mean, min or softmin of the objective's
tasks, optionally divided by the best source model's score per task), whether the
candidate is feasible (task floors, monitor floors) and the value told to the sampler
(the aggregate less the shortfall of an infeasible candidate, or one value per task
for the multi-objective sampler). The pruners see the same objective through
:func:`pruner_value` and :func:`pruner_linear`.
"""

from __future__ import annotations

import math

from mergesearch.evaluate.base import weighted_mean
from mergesearch.search.space import SearchSpace


def objective_values(space: SearchSpace, scores: dict[str, float],
                     reference: dict[str, float] | None = None) -> tuple[float, bool, list[float] | float]:
    """(aggregate, feasible, value(s) told to the sampler). ``reference``: the best source
    model's dev score per task, for ``objective.normalize: sources``."""
    obj = space.objective
    weights = space.evaluator.weights
    watched = space.monitor.floors if space.monitor is not None else {}
    monitored = {t: scores[t] for t in watched if t in scores}
    scores = {t: v for t, v in scores.items() if t not in watched}  # the objective's tasks only
    s = scores
    if obj.normalize == "sources" and reference:
        s = {t: v / reference[t] if reference.get(t) else v for t, v in scores.items()}
    if obj.kind == "mean":
        agg = weighted_mean(s, weights)
    elif obj.kind == "min":
        agg = min(s.values())
    else:  # softmin: -T log(mean exp(-s/T)), stable around the minimum
        lo, T = min(s.values()), obj.temperature
        agg = lo - T * math.log(sum(math.exp(-(v - lo) / T) for v in s.values()) / len(s))
    floors = {t: obj.min_task for t in scores} if obj.min_task is not None else {}
    floors.update(obj.floors)
    violation = sum(max(0.0, floor - scores[t]) for t, floor in floors.items())
    # a monitor task's floor: never optimized, but a candidate below it is infeasible
    violation += sum(max(0.0, watched[t] - v) for t, v in monitored.items())
    if space.multi_objective:
        return agg, True, [scores[t] for t in space.evaluator.tasks]
    return agg, violation == 0, agg - violation  # infeasible trials are penalized by their shortfall


def pruner_value(space: SearchSpace, scores: dict[str, float], reference: dict[str, float] | None) -> float:
    """The value a trial with these per-task dev scores is told (the improvement pruner's objective)."""
    return objective_values(space, scores, reference)[2]


def pruner_linear(space: SearchSpace, tasks: list[str], reference: dict[str, float] | None) -> dict[str, float] | None:
    """The objective's coefficient per task when it is a weighted sum of the raw scores
    (``tasks``: the tasks the rungs score), else None."""
    obj = space.objective
    if obj.kind != "mean" or obj.floors or obj.min_task is not None or space.scoring().monitor:
        return None
    ref = reference if obj.normalize == "sources" else None
    w = {t: space.evaluator.weights.get(t, 1.0) for t in tasks}
    total = sum(w.values())
    if not total:
        return None
    return {t: w[t] / total / ((ref or {}).get(t) or 1.0) for t in w}
