"""Sampler name -> configured Optuna sampler.

Categorical variables under CMA-ES: Optuna's CmaEsSampler models only numeric
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

from mergesearch.space import SearchSpace

log = logging.getLogger(__name__)


def make_sampler(space: SearchSpace, n_variables: int) -> optuna.samplers.BaseSampler:
    cfg = space.sampler
    seed = space.seed
    name = cfg.name
    if name == "cmaes" and len(space.methods) > 1:
        log.info("cmaes: the method is a categorical variable; using multivariate TPE for this mixed space")
        name = "tpe"
    startup = cfg.n_startup_trials
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=startup or 0, popsize=cfg.population,
            warn_independent_sampling=False)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          n_startup_trials=startup if startup is not None else 10,
                                          constant_liar=True, warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup if startup is not None else 10)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=cfg.population or 8)
    raise ValueError(name)


def population(space: SearchSpace, workers: int, n_variables: int) -> int:
    """Trials asked per batch: the configured population, CMA-ES's default
    (4 + 3 ln n), or enough to keep every worker busy."""
    import math
    if space.sampler.population:
        return space.sampler.population
    if space.sampler.name == "cmaes" and len(space.methods) == 1:
        return max(workers, 4 + int(3 * math.log(max(n_variables, 1))))
    return max(workers, 1)
