"""Sampler name -> configured Optuna sampler.

Categorical variables under CMA-ES: CMA-ES (mergesearch.search.cma) models only numeric
variables and draws anything else independently, so with the merge method as a
search variable (several ``methods``) the method would be chosen at random and
each method's own parameters would fall out of the shared search space. Such
mixed, conditional spaces therefore use multivariate TPE with grouping
(``multivariate=True, group=True``), which models the method jointly with the
parameters that exist under it. A space with one method keeps CMA-ES.
"""

from __future__ import annotations

import logging

import optuna

from mergesearch.search.fidelity import BLOCKWISE
from mergesearch.search.space import SearchSpace

log = logging.getLogger(__name__)


def make_sampler(space: SearchSpace, n_variables: int, x0: dict | None = None) -> optuna.samplers.BaseSampler:
    """``x0``: CMA-ES's starting point (variable -> value), when the space asks for one."""
    cfg = space.sampler
    seed = space.seed
    name = cfg.name
    if name == "cmaes" and len(space.methods) > 1:
        log.info("cmaes: the method is a categorical variable; using multivariate TPE for this mixed space")
        name = "tpe"
    startup = cfg.n_startup_trials
    if name == "cmaes":
        if x0 is None and isinstance(cfg.x0, dict):
            x0 = cfg.x0
        from mergesearch.search.cma import CmaSampler

        return CmaSampler(
            seed=seed, population=cfg.population, x0=x0, sigma0=cfg.sigma0, restart=cfg.restart,
            separable=cfg.separable, n_startup_trials=startup or 0,
            # a pruned trial's value is its last report: the objective so far, except the
            # Wilcoxon and improvement pruners' per-block reports, which CMA-ES must not take for one
            consider_pruned=space.fidelity is not None and space.fidelity.pruner.name not in BLOCKWISE)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          n_startup_trials=startup if startup is not None else 10,
                                          constant_liar=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup if startup is not None else 10)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=cfg.population or 8)
    raise ValueError(name)


def recipe_x0(space: SearchSpace, recipe: dict, groups, tensor_names: list[str], num_layers: int) -> dict[str, float]:
    """A start point in ``groups``' variables from any recipe (a trial of a coarser stage,
    a baseline): each variable takes the recipe's value at a tensor of its group, else
    the parameter's default, clipped into its bounds. For a recipe of a coarser, nested
    granularity this is the same merge."""
    from dataclasses import asdict

    from mergesearch.methods import REGISTRY
    from mergesearch.recipe import from_dict, layer_position
    from mergesearch.search.refine import group_index
    from mergesearch.search.space import Bounds

    r = from_dict(recipe, "start point")
    spec = REGISTRY[space.methods[0]]
    gd = [asdict(g) for g in groups]
    first: dict[int, str] = {}
    for n in tensor_names:
        first.setdefault(group_index(n, gd), n)
    x0 = {}
    for name, b in space.parameters.items():
        if not isinstance(b, Bounds):
            continue
        p = spec.param(name)
        default = p.default if not p.required else 1.0
        owners = [("", 0)] if p.scope == "global" else [(f"m{i}", i) for i in range(len(space.models))]
        for owner, i in owners:
            for k, g in enumerate(groups if p.scope == "model" else groups[:1]):
                tensor = first.get(k, tensor_names[0])
                glob, per = r.resolve(tensor, layer_position(tensor, num_layers))
                src = glob if p.scope == "global" else (per[i] if i < len(per) else {})
                v = src.get(name, default)
                v = v if isinstance(v, (int, float)) and not isinstance(v, bool) else default
                var = "/".join(x for x in (name, owner, g.name if p.scope == "model" else "") if x)
                x0[var] = min(max(float(v), b.low), b.high)
    return x0
