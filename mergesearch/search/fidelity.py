"""Multi-fidelity scoring: each candidate is scored on growing shares of the dev items
(rungs), and a pruner stops the weak ones after any rung.

The item order is fixed for a run: one seeded permutation per task, so every rung is a
balanced subsample of every task, the same for every trial and every worker. Rung k
scores the items between the previous rung's share and its own, so no item is scored
twice; the worker keeps the candidate materialized between rungs.

After each rung the controller reports to Optuna: for the halving, hyperband and median
pruners the objective of the items so far at ``step = items so far``; for the Wilcoxon
pruner one value per block of ``block`` items of one task (its mean, divided by the
task's reference score when the objective is normalized, times the task's weight), at a
step that names the block, so that trials are compared block by block, paired; for the
improvement pruner (``ImprovementPruner``) the plain mean of each block, likewise paired.
A pruned trial is stored as PRUNED with its partial per-task scores, the items it used
and its cost: the share of the dev items it scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import optuna

from mergesearch.evaluate import items as item_split

# Wilcoxon steps: task k's block b is step k * TASK_STRIDE + b
TASK_STRIDE = 1_000_000
# the pruners whose reports are per block, not the objective so far
BLOCKWISE = ("wilcoxon", "improvement")


@dataclass
class FidelityPlan:
    rungs: list[float]
    order: dict[str, list[int]]  # task -> the item indices in scoring order
    block: int = 8

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.order.values())

    def bounds(self, k: int, task: str) -> tuple[int, int]:
        n = len(self.order[task])
        lo = 0 if k == 0 else math.ceil(self.rungs[k - 1] * n - 1e-9)
        return lo, math.ceil(self.rungs[k] * n - 1e-9)

    def rung_items(self, k: int) -> dict[str, list[int]]:
        """The items rung k scores, per task (disjoint from every other rung's)."""
        out = {}
        for t, order in self.order.items():
            lo, hi = self.bounds(k, t)
            out[t] = order[lo:hi]
        return out

    def items_through(self, k: int) -> int:
        return sum(self.bounds(k, t)[1] for t in self.order)


def plan_for(space, counts: dict[str, int]) -> FidelityPlan:
    f = space.fidelity
    order = {t: item_split.permutation(n, f.seed, f"fidelity:{t}") for t, n in counts.items()}
    return FidelityPlan(list(f.rungs), order, f.pruner.block)


def make_pruner(space, plan: FidelityPlan | None, value_of: Callable[[dict], float] | None = None,
                linear: Callable[[], dict | None] | None = None) -> optuna.pruners.BasePruner:
    """``value_of``: per-task scores -> the value told to the sampler, and ``linear``: its
    coefficients per task when it is a weighted sum (None otherwise), asked at each
    decision (a normalized objective knows its references only once the sources are
    scored): the improvement pruner's objective, the plain mean when not given."""
    if plan is None or space.fidelity.pruner.name == "none":
        return optuna.pruners.NopPruner()
    p = space.fidelity.pruner
    r = plan.rungs
    factor = p.reduction_factor or max(2, round(r[1] / r[0]) if len(r) > 1 else 2)
    first = plan.items_through(0)
    if p.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=factor,
                                                      min_early_stopping_rate=p.min_early_stopping_rate)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=plan.total, reduction_factor=factor)
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=0)
    if p.name == "improvement":
        if value_of is None:
            value_of = lambda s: sum(s.values()) / len(s)  # noqa: E731
            linear = lambda: {t: 1 / len(plan.order) for t in plan.order}  # noqa: E731
        return ImprovementPruner(plan, value_of, p_threshold=p.threshold,
                                 linear=linear)
    return optuna.pruners.WilcoxonPruner(p_threshold=p.threshold, n_startup_steps=0)


class ImprovementPruner(optuna.pruners.BasePruner):
    """Prune a trial when the chance that it ends above the best complete trial is below
    ``p_threshold``.

    The trial reports the mean of each block of ``plan.block`` items of one task (steps as
    for Wilcoxon). Per task, the blocks it shares with the best trial give the paired
    difference so far, d, and its spread; the best trial's final score on the task is
    known. The trial's final score on the task is then the best's plus d, up to the items
    not yet scored: their share of the task's items sets the uncertainty (a finite
    population: after half of the items, half of the result is known), the per-item
    variance of the paired difference is estimated per task and drawn towards the pool of
    all tasks, and t-distributed with the pooled degrees of freedom. When the best trial
    reported no blocks (scored in one go), the trial's own block means stand in for the
    paired estimate. The chance is that of ``value_of(final scores) > best value``: in
    closed form for a linear objective (task -> coefficient), else from
    ``draws`` seeded draws (``linear``: a callable, asked at each decision, that returns
    the coefficients or None). Unlike the Wilcoxon test (is the trial worse than the best?),
    this asks whether it can still win: a trial that would only tie the best is stopped
    too, which is where a search spends most of its items."""

    PRIOR_DF = 2.0  # weight of the pooled variance in each task's

    def __init__(self, plan: FidelityPlan, value_of: Callable[[dict], float], p_threshold: float = 0.05,
                 linear: Callable[[], dict | None] | None = None, draws: int = 2000):
        self.plan = plan
        self.tasks = list(plan.order)
        self.value_of = value_of
        self.p_threshold = p_threshold
        self.linear = linear
        self.draws = draws
        # trial number -> the chance of its last decision; the controller takes it (and
        # stores it with a pruned trial)
        self.last: dict[int, float] = {}

    def _blocks(self, values: dict[int, float]) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for step, v in values.items():
            k, j = divmod(int(step), TASK_STRIDE)
            if k < len(self.tasks):
                out.setdefault(self.tasks[k], {})[j] = v
        return out

    def chance(self, study, trial) -> float | None:
        """The chance that ``trial`` ends above the best complete trial, or None when
        there is nothing to compare with yet."""
        try:
            best = study.best_trial
        except ValueError:
            return None
        from mergesearch.runs.store import to_record
        finals = to_record("search", best).scores
        if best.number == trial.number or not finals or best.value is None:
            return None
        mine, theirs = self._blocks(trial.intermediate_values), self._blocks(best.intermediate_values)
        b = self.plan.block
        mean, ss, dof, share = {}, {}, {}, {}
        for t in self.tasks:
            blocks = mine.get(t, {})
            paired = [j for j in blocks if j in theirs.get(t, {})]
            if paired:
                d = [blocks[j] - theirs[t][j] for j in paired]
                mean[t] = finals[t] + sum(d) / len(d)
            elif blocks:
                d = list(blocks.values())
                mean[t] = sum(d) / len(d)
            else:
                return None  # a task not yet scored: no decision
            m = sum(d) / len(d)
            ss[t], dof[t] = b * sum((x - m) ** 2 for x in d), len(d) - 1  # per-item scale
            n_t, N_t = len(d) * b, len(self.plan.order[t])
            share[t] = (N_t - n_t) / (N_t * n_t) if n_t < N_t else 0.0
        pooled_df = sum(dof.values())
        if pooled_df < 1:
            return None  # one block per task: no spread to go by yet
        pooled = sum(ss.values()) / pooled_df
        # an estimate of zero (every block the same) is no proof of no spread: at least
        # the variance of one disagreement among the items scored
        floor = 1.0 / max(1, sum(len(self.plan.order[t]) for t in self.tasks))
        var = {t: max((ss[t] + self.PRIOR_DF * pooled) / (dof[t] + self.PRIOR_DF), floor) * share[t]
               for t in self.tasks}
        df = float(pooled_df)
        target = float(best.value)
        coef = self.linear() if self.linear is not None else None
        if coef is not None:
            mu = sum(coef[t] * mean[t] for t in self.tasks)
            sd = math.sqrt(sum(coef[t] ** 2 * var[t] for t in self.tasks))
            if sd == 0:
                return float(mu > target)
            from scipy.stats import t as student
            return float(student.sf((target - mu) / sd, df))
        rng = np.random.default_rng(trial.number)
        z = rng.standard_normal((self.draws, len(self.tasks))) / np.sqrt(rng.chisquare(df, (self.draws, 1)) / df)
        won = 0
        for row in z:
            final = {t: mean[t] + math.sqrt(var[t]) * row[i] for i, t in enumerate(self.tasks)}
            won += self.value_of(final) > target
        return won / self.draws

    def prune(self, study, trial) -> bool:
        c = self.chance(study, trial)
        if c is None:
            return False
        self.last[trial.number] = c
        return c < self.p_threshold


@dataclass
class Progress:
    """One trial's scores so far, item by item."""

    plan: FidelityPlan
    rung: int = 0  # the next rung to score
    values: dict[str, list[float]] = field(default_factory=dict)  # task -> per item, in plan order
    materialize_s: float = 0.0
    writes: int = 0  # times the candidate was materialized (1 unless its worker was replaced)
    eval_s: float = 0.0
    worker: int | None = None
    device: str | None = None
    so_far: dict[str, float] | None = None

    def add(self, item_scores: dict[str, list[float]], task_scores: dict[str, float] | None = None) -> None:
        """A rung's per-item scores and, where the worker kept the trial's per-document
        metrics, lm-eval's scores over every item so far (else the mean of the items)."""
        for t, vals in item_scores.items():
            self.values.setdefault(t, []).extend(float(v) for v in vals)
        self.so_far = task_scores
        self.rung += 1

    @property
    def items(self) -> int:
        return sum(len(v) for v in self.values.values())

    @property
    def done(self) -> bool:
        return self.rung >= len(self.plan.rungs)

    @property
    def share(self) -> float:
        return self.items / self.plan.total

    def scores(self) -> dict[str, float]:
        if self.so_far is not None:
            return dict(self.so_far)
        return {t: sum(v) / len(v) for t, v in self.values.items() if v}

    def blocks(self, first_rung: int, weights: dict[str, float], reference: dict[str, float] | None
               ) -> dict[int, float]:
        """Wilcoxon values of the blocks completed by the rungs from ``first_rung`` on."""
        out = {}
        b = self.plan.block
        last = self.done
        for k, t in enumerate(self.plan.order):
            vals = self.values.get(t, [])
            before = self.plan.bounds(first_rung - 1, t)[1] if first_rung > 0 else 0
            w = weights.get(t, 1.0) / ((reference or {}).get(t) or 1.0)
            for j in range(before // b, (len(vals) + (b - 1 if last else 0)) // b):
                chunk = vals[j * b:(j + 1) * b]
                if chunk and (len(chunk) == b or last):
                    out[k * TASK_STRIDE + j] = w * sum(chunk) / len(chunk)
        return out
