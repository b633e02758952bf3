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
