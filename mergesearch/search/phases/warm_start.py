"""The warm-start phase: ``sampler.x0: best_baseline`` starts CMA-ES from the best
baseline's coefficients, or its merge projected onto the space's coefficients when it is
another kind of merge (mergesearch.search.project); chosen once, stored with the study,
reused on --resume."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mergesearch.runs.store import requeue_failed, trial_records
from mergesearch.search.samplers import make_sampler
from mergesearch.search.project import start_point

if TYPE_CHECKING:
    from mergesearch.search.controller import Controller

log = logging.getLogger("mergesearch.search")


class WarmStart:
    name = "warm start"

    def run(self, c: "Controller") -> None:
        cfg = c.space.sampler
        if cfg.x0 != "best_baseline" or cfg.name != "cmaes" or len(c.space.methods) > 1:
            return
        x0 = c.study.user_attrs.get("x0")
        if x0 is None:
            done = [r for r in trial_records(c.study, c.storage, kinds=("baseline",)) if r.complete]
            if not done:
                log.warning("sampler.x0: best_baseline: no baseline was scored; CMA-ES starts at the centre")
                return
            best = max(done, key=lambda r: (r.feasible, r.value))
            x0, how = start_point(c.space, best.recipe, c.groups, c.setup.tensor_names, c.setup.num_layers)
            c.study.set_user_attr("x0", x0)
            c.study.set_user_attr("x0_from", best.baseline)
            # Optuna's CMA-ES learns the search space from a finished trial, and draws trials
            # independently until then: score the start point itself first
            c.study.enqueue_trial(x0, user_attrs={"role": "warm start"})
            t, job = c.propose(c.study)
            for res in c.run_jobs([job]):
                c.finish(c.study, t, res)
            c.pool.cancel_all()
            if t.number not in {x.number for x in c.study.get_trials(deepcopy=False) if x.state.name != "RUNNING"}:
                requeue_failed(c.study, t, "interrupted")
            log.info("sampler: CMA-ES starts from the best baseline, %s: %s", best.baseline, how)
        c.study.sampler = make_sampler(c.space, c.n_vars, x0=x0)
