"""The search phase: the controller's loop, once per schedule stage. The budget left
after the baselines and the refinement reserve is split between the stages by their
shares; each later stage is a study of its own (``<run>.stage<k>``) that starts from the
best trial so far, broadcast onto its finer groups."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import optuna

from mergesearch.runs.store import recover_stale, study_names, trial_records
from mergesearch.search.samplers import make_sampler
from mergesearch.search.setup import check_budget, set_metric_names
from mergesearch.search.project import start_point
from mergesearch.search.variables import n_variables

if TYPE_CHECKING:
    from mergesearch.search.controller import Controller

log = logging.getLogger("mergesearch.search")


class Stages:
    name = "search"

    def run(self, c: "Controller") -> None:
        # every evaluation counts: the baselines (and source models) scored first, the
        # search, and the refinements' trial-equivalents
        side = f"{c.opts.run}.baselines"
        n_base = (len(optuna.load_study(study_name=side, storage=c.storage).trials)
                  if side in study_names(c.storage) else 0)
        total = check_budget(c.space, c.setup, n_base, c.space_path)  # a soup seed the space cannot express counts
        reserve = c.setup.refine_reserve
        if n_base or reserve:
            log.info("budget: %g trials: %d baselines, %g for the search%s", c.setup.n_trials, n_base, total,
                     f", {reserve} kept for refining the best {c.space.refine.top} candidate(s)" if reserve else "")
        stages = c.setup.stages
        shares = [share for _, share in stages]
        budgets = [max(1, int(round(total * sum(shares[:k + 1])))) for k in range(len(shares))]
        budgets = [b - (budgets[k - 1] if k else 0) for k, b in enumerate(budgets)]
        main = c.main_study = c.study
        for k, (groups, _) in enumerate(stages):
            if c.interrupted or c.out_of_time():
                break
            if budgets[k] <= 0:
                continue
            if k > 0:
                self._enter(c, k, groups, main)
            c.n_trials = budgets[k]
            if len(stages) > 1:
                log.info("stage %d/%d: %s, %d trials, %d variables", k + 1, len(stages), c.space.schedule[k],
                         budgets[k], c.n_vars)
            c.loop()
        c.study = main
        c.groups = stages[0][0]

    @staticmethod
    def _enter(c: "Controller", k: int, groups, main) -> None:
        """Switch to stage k's study, starting from the best trial so far."""
        name = f"{c.opts.run}.stage{k}"
        c.groups = groups
        c.n_vars = n_variables(c.space, groups)
        if name in study_names(c.storage):
            study = optuna.load_study(study_name=name, storage=c.storage, pruner=c.pruner)
            x0 = study.user_attrs.get("x0")
            n = recover_stale(study)
            if n:
                log.info("resume: %d trial(s) of stage %d left running by the stopped controller failed and "
                         "queued again", n, k + 1)
        else:
            done = [r for r in trial_records(main, c.storage)
                    if r.complete and r.study_kind != "refine" and not r.is_source]
            study = optuna.create_study(study_name=name, storage=c.storage, directions=main.directions,
                                        pruner=c.pruner)
            from mergesearch.runs.report import metric_names
            set_metric_names(study, metric_names(c.space))
            x0 = None
            if done:
                best = max(done, key=lambda r: (r.feasible, r.value))
                x0, _ = start_point(c.space, best.recipe, groups, c.setup.tensor_names, c.setup.num_layers)
                study.set_user_attr("x0", x0)
                study.set_user_attr("x0_from", best.baseline or f"{best.number}")
                if c.space.sampler.name == "tpe":  # TPE has no start point: the best so far runs first
                    study.enqueue_trial(x0, user_attrs={"role": "stage start"})
        study.set_user_attr("stage", k)
        study.sampler = make_sampler(c.space, c.n_vars, x0=x0)
        c.study = study
