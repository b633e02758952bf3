"""Start points from merges the space cannot express: a data-free merge (TSV-M, Iso-C,
Iso-CTS, or any other method) projected onto the space's coefficients.

A space of task-vector methods proposes theta_0 + sum_i c_i Delta_i per coefficient group
(before pruning and sign election). For another merge M, the closest such point on each
group g is the least-squares fit

    c_g = argmin_c sum_{tensors t in g} || sum_i c_i Delta_i,t - (M_t - theta_0,t) ||^2,

solved from the T x T Gram matrix of the task vectors on the group. The fit is made
once, on the controller, reading every tensor of the inputs once; ``share`` reports how
much of M's task vector it explains (1 - residual / total, in squared norm).

The coefficients become the space's variables (:func:`projected_x0`): weights c / lambda
with lambda at 1 where its bounds allow; for a method that normalizes its weights,
lambda takes the median of the groups' sums and the weights keep their proportions;
other per-model parameters (density, ...) take their defaults, clipped into their
bounds. For a depth schedule the per-layer fits are regressed on the depth, l / (L - 1).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from mergesearch.engine.compiled import CompiledRecipe
from mergesearch.engine.merge import build_inputs, open_plan
from mergesearch.methods import REGISTRY, merge_tensor
from mergesearch.methods.task_arithmetic import TASK_VECTOR_METHODS
from mergesearch.recipe import from_dict, layer_index
from mergesearch.search.schema import Bounds, Granularity
from mergesearch.search.variables import Group, group_index, is_depth, make_groups, recipe_x0, var_name

if TYPE_CHECKING:
    from mergesearch.search.space import SearchSpace

log = logging.getLogger("mergesearch.search")


@dataclass
class Fit:
    coef: list[list[float]]  # per group, per model
    share: float  # of the merge's squared task-vector norm the fit explains


def fit_task_vectors(recipe: dict, groups: list[Group], num_layers: int) -> Fit:
    """The least-squares coefficients of ``recipe``'s merge on the task vectors of its own
    models, per group (the recipe's base and models are the space's)."""
    r = from_dict(recipe, "start point")
    plan = open_plan(r)
    names = [n for n in plan.ref.names() if plan.ref.dtype(n).is_floating_point]
    compiled = CompiledRecipe(r, names, num_layers, validate=False)
    gd = [asdict(g) for g in groups]
    n = len(r.models)
    gram = torch.zeros(len(groups), n, n, dtype=torch.float64)
    rhs = torch.zeros(len(groups), n, dtype=torch.float64)
    total = 0.0
    try:
        for name in names:
            x = build_inputs(plan, name, "cpu")
            g, per = compiled[name]
            target = (merge_tensor(compiled.spec, x, g, per).to(torch.float32) - x.base).reshape(-1)
            d = torch.stack([x.delta(i).reshape(-1) for i in range(n)]).to(torch.float64)
            k = group_index(name, gd)
            gram[k] += d @ d.T
            rhs[k] += d @ target.to(torch.float64)
            total += float(target.to(torch.float64).square().sum())
    finally:
        plan.release()
    coef, explained = [], 0.0
    for k in range(len(groups)):
        c = torch.linalg.lstsq(gram[k], rhs[k].unsqueeze(1)).solution.squeeze(1)
        coef.append([float(v) for v in c])
        explained += float(2 * c @ rhs[k] - c @ gram[k] @ c)  # ||t||^2 - ||t - D c||^2
    return Fit(coef, explained / total if total > 0 else 1.0)


def projected_x0(space: SearchSpace, recipe: dict, groups: list[Group], tensor_names: list[str],
                 num_layers: int) -> tuple[dict[str, float], float]:
    """The space's variables closest to ``recipe``'s merge, and the share of its task
    vector they explain."""
    spec = REGISTRY[space.methods[0]]
    prefix = next((n[: n.index(f".{layer_index(n)}.") + 1] for n in tensor_names if layer_index(n) is not None),
                  "model.layers.")
    depth = is_depth(groups)
    fit_groups = make_groups(Granularity(level="layer", special=False), num_layers, prefix) if depth else groups
    fit = fit_task_vectors(recipe, fit_groups, num_layers)
    n = len(space.models)
    params = space.parameters

    def bounds_of(name):
        b = params.get(name)
        return b if isinstance(b, Bounds) else None

    def clip(v, b):
        return v if b is None else min(max(v, b.low), b.high)

    lam_b, w_b = bounds_of("lambda"), bounds_of("weight")
    normalize = spec.param("normalize") is not None and params.get("normalize", spec.param("normalize").default)
    coef = fit.coef
    if normalize:
        sums = [sum(c) for c in coef if sum(c) > 1e-12]
        lam = clip(statistics.median(sums) if sums else 1.0, lam_b)
        top = max((v for c in coef for v in c), default=1.0)
        scale = 1.0 if w_b is None or top <= 0 else min(1.0, w_b.high / top)
        weights = [[v * scale for v in c] for c in coef]
    else:
        lam = 1.0
        if spec.param("lambda") is not None:  # searched: 1 where its bounds allow; fixed: its value
            fixed = params.get("lambda")
            lam = clip(1.0, lam_b) if fixed is None or isinstance(fixed, Bounds) else float(fixed)
        weights = [[v / lam for v in c] for c in coef]
    x0: dict[str, float] = {}
    if w_b is not None:
        for i in range(n):
            if depth:
                ts = [k / (num_layers - 1) for k in range(num_layers)]
                alpha, beta = _line(ts, [weights[k][i] for k in range(num_layers)])
                x0[var_name("weight", f"m{i}", "alpha")] = clip(alpha, w_b)
                span = w_b.high - w_b.low
                x0[var_name("weight", f"m{i}", "beta")] = min(max(beta, -span), span)
            else:
                for k, g in enumerate(groups):
                    x0[var_name("weight", f"m{i}", g.name)] = clip(weights[k][i], w_b)
    for name, b in params.items():
        if not isinstance(b, Bounds) or name == "weight":
            continue
        p = spec.param(name)
        value = lam if name == "lambda" else (p.default if not p.required else b.high)
        value = clip(float(value), b)
        owners = [""] if p.scope == "global" else [f"m{i}" for i in range(n)]
        for owner in owners:
            if depth:
                x0[var_name(name, owner, "alpha")] = value
                x0[var_name(name, owner, "beta")] = 0.0
            elif p.scope == "global":
                x0[var_name(name, owner)] = value
            else:
                for g in groups:
                    x0[var_name(name, owner, g.name)] = value
    return x0, fit.share


def _line(ts: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope of ys on ts."""
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - mt) ** 2 for t in ts)
    slope = sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var > 0 else 0.0
    return my - slope * mt, slope


def start_point(space: SearchSpace, recipe: dict, groups: list[Group], tensor_names: list[str],
                num_layers: int) -> tuple[dict[str, float], str]:
    """A start point in ``groups``' variables from a scored recipe: its own values where
    it is a recipe of the space's method (or a plain average / task arithmetic, which any
    task-vector space reads by name), else its merge projected onto the space's
    coefficients. Also says which."""
    method = recipe.get("method")
    same = method in space.methods or method in ("linear", "task_arithmetic")
    if same or space.methods[0] not in TASK_VECTOR_METHODS:
        return recipe_x0(space, recipe, groups, tensor_names, num_layers), "its values"
    x0, share = projected_x0(space, recipe, groups, tensor_names, num_layers)
    return x0, f"its merge projected onto the task vectors ({share:.0%} of its task vector explained)"
