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
step that names the block, so that trials are compared block by block, paired. A pruned
trial is stored as PRUNED with its partial per-task scores, the items it used and its
cost: the share of the dev items it scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import optuna

from mergesearch.evaluate import items as item_split

# Wilcoxon steps: task k's block b is step k * TASK_STRIDE + b
TASK_STRIDE = 1_000_000


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


def make_pruner(space, plan: FidelityPlan | None) -> optuna.pruners.BasePruner:
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
    return optuna.pruners.WilcoxonPruner(p_threshold=p.p_threshold, n_startup_steps=0)


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

    def add(self, item_scores: dict[str, list[float]]) -> None:
        for t, vals in item_scores.items():
            self.values.setdefault(t, []).extend(float(v) for v in vals)
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
