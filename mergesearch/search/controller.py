"""The search controller: Optuna's ask -> dispatch to a Ray worker -> tell, in a loop.

:meth:`Controller.loop` asks for trials ahead of the workers (one per worker), sends
them to the idle workers and tells each result as it arrives, until the phase's trial
budget or the wall-time budget is spent. Everything else lives beside it:

- what is checked and decided before the first trial, and opening the study: :mod:`.setup`;
- the phases that use the loop or the pool (baselines, warm start, the schedule's
  stages, refinement) and the fidelity rungs: :mod:`.phases`;
- what a candidate's scores are worth: :mod:`.objective`;
- the progress line and the report refresh: :mod:`.progress`;
- how a trial becomes a recipe: :mod:`.variables`; where results are kept: :mod:`mergesearch.runs.store`.

Ctrl-C stops it cleanly: no new trials, in-flight trials are abandoned and marked
failed ("interrupted") and queued again, and the store stays consistent. ``resume``
continues the same study, with the sampler's state (CMA-ES generations keep
counting), after marking trials left running by a dead controller as failed.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from mergesearch.runs.optuna_io import batched_params
from mergesearch.runs.records import Job
from mergesearch.runs.store import (
    HEARTBEAT_S, heartbeat, record, record_proposal, records_of, requeue_failed, run_dir, trial_records,
)
from mergesearch.search import setup
from mergesearch.search.fidelity import make_pruner
from mergesearch.search.lifecycle import RunLifecycle
from mergesearch.search.objective import objective_values
from mergesearch.search.phases import search_phases
from mergesearch.search.phases.rungs import Rungs
from mergesearch.search.progress import RunProgress, Tally
from mergesearch.search.samplers import make_sampler
from mergesearch.search.space import SearchSpace
from mergesearch.search.variables import n_variables
from mergesearch.search.workers import Result, Retries, WorkerPool

log = logging.getLogger("mergesearch.search")
TrialState = optuna.trial.TrialState


@dataclass
class SearchOptions:
    run: str
    resume: bool = False
    workers: int = 2
    ray_address: str | None = None
    storage: str | None = None
    n_trials: int | None = None  # overrides the space's budget
    timeout: float | None = None
    root: Path = Path("results")
    progress: bool = True
    device_memory: int | None = None  # bytes; overrides the space's resources.device_memory
    report_every_s: float = 300.0  # refresh results/<run>/report.html during the run this often,
    report_every_trials: int = 25  # or after this many finished trials, whichever comes first


class Controller(RunLifecycle):
    def __init__(self, space: SearchSpace, opts: SearchOptions, space_path: str = "space"):
        self.space = space
        self.opts = opts
        self.space_path = space_path
        self.dir = run_dir(opts.run, opts.root)
        self.timeout = opts.timeout if opts.timeout is not None else space.budget.timeout
        self.interrupted = False
        self.setup: setup.Setup | None = None
        self.storage = None
        self.n_trials: float = 0  # the running phase's budget, in trial-equivalents
        self.groups: list = []  # the running stage's coefficient groups
        self.n_vars = 0
        self.pruner = None
        self.rungs: Rungs | None = None
        self.reference: dict[str, float] | None = None  # the best source's dev score per task
        self.main_study: optuna.Study | None = None
        self.progress = RunProgress(opts.run, opts.storage, opts.root, opts.progress, opts.report_every_s,
                                    opts.report_every_trials)
        self.t_start = time.monotonic()
        self.busy_s = 0.0

    # -- the run's life (RunLifecycle) ------------------------------------------------
    def preflight(self) -> None:
        self.setup = setup.preflight(self.space, self.opts, self.space_path, self.claim)
        self.n_trials = self.setup.n_trials
        self.groups = self.setup.stages[0][0]

    def open_study(self) -> None:
        self.storage_for_study()
        self.n_vars = n_variables(self.space, self.groups)
        self.rungs = Rungs(self) if self.setup.fid is not None else None
        self.pruner = make_pruner(self.space, self.setup.fid, self.rungs and self.rungs.value,
                                  self.rungs and self.rungs.linear)
        self.study = setup.open_study(self.space, self.setup, self.opts, self.storage, self.space_path, self.dir,
                                      make_sampler(self.space, self.n_vars), self.pruner, self.resume_checks)
        self.main_study = self.study

    def make_pool(self, faults: dict) -> WorkerPool:
        methods = sorted(set(self.space.methods) | {"linear", "task_arithmetic"})
        resources = self.space.resources.model_dump()
        if self.opts.device_memory is not None:
            resources["device_memory"] = self.opts.device_memory
        return WorkerPool(self.opts.workers, self.space.base, self.space.models, methods,
                          self.space.scoring().model_dump(), self.space.trial_timeout, faults, self.setup.side,
                          resources=resources, dtype=self.space.dtype)

    def work(self) -> dict:
        try:
            self.t_start = self.progress.t_start = time.monotonic()
            old = signal.signal(signal.SIGINT, self._on_sigint)
            try:
                self.reference = self.study.user_attrs.get("reference")
                for phase in search_phases():
                    if self.interrupted:
                        break
                    phase.run(self)
            finally:
                signal.signal(signal.SIGINT, old)
            self.progress.refresh_report(force=True)
            return self._summary()
        finally:
            self.progress.stop()

    def _on_sigint(self, *_):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        log.warning("interrupt: finishing up (in-flight trials are abandoned); press Ctrl-C again to force")

    def out_of_time(self) -> bool:
        return self.timeout is not None and time.monotonic() - self.t_start >= self.timeout

    # -- what the phases use ------------------------------------------------------------
    def propose(self, study: optuna.Study) -> tuple[optuna.Trial, Job]:
        """Ask the study for a trial, turn it into a recipe and store it."""
        t = study.ask()
        with batched_params(t):
            recipe = self.space.suggest(t, self.groups, self.setup.side)
        job = Job("trial", t.number, recipe.to_dict(), summary=recipe.summary())
        record_proposal(t, job.recipe, job.summary)
        return t, job

    def run_jobs(self, jobs: list[Job]):
        """Run jobs of a phase on the pool (retried when their worker dies); yields each
        final result, until an interrupt."""
        return self.pool.run_batch(jobs, self.space.max_retries, stop=lambda: self.interrupted)

    def abandon(self, study: optuna.Study, trials: list) -> None:
        """After an interrupt: end what is in flight and fail the phase's unfinished trials."""
        self.pool.cancel_all()
        for t in trials:
            record(t, reason="interrupted")
            study.tell(t, state=TrialState.FAIL)

    def finish(self, study: optuna.Study, t: optuna.Trial, res: Result, progress=None) -> dict:
        """Tell and store a trial's result; returns the record's fields it stored. With
        ``progress`` (a multi-fidelity trial) the scores are those of every rung, item by item."""
        if progress is not None and res.ok:
            res = Result(res.job, True, progress.scores(), {"materialize_s": progress.materialize_s,
                                                            "eval_s": progress.eval_s}, res.worker, device=res.device)
        fields = dict(worker=res.worker, timings=res.timings, **({"scored_on": res.device} if res.device else {}))
        if res.ok:
            agg, feasible, value = objective_values(self.space, res.scores, self.reference)
            fields.update(scores=res.scores, aggregate=agg, feasible=feasible, fidelity=1.0)
            if self.setup.n_dev_items:
                fields["items"] = self.setup.n_dev_items
            if progress is not None:
                fields.update(rungs=progress.rung, writes=progress.writes)
            record(t, **fields)
            study.tell(t, value)
            self.busy_s += sum(res.timings.values())
        else:
            fields.update(reason=res.reason, scores=res.scores or None)
            if progress is not None:
                fields.update(items=progress.items, fidelity=progress.share)
            record(t, **fields)
            study.tell(t, state=TrialState.FAIL)
        return fields

    # -- the loop -----------------------------------------------------------------------
    def loop(self) -> None:
        """Ask -> dispatch -> tell on the current study until its budget (``n_trials``,
        in trial-equivalents) or the time budget is spent, or an interrupt."""
        study = self.study
        tally = self.progress.tally = Tally.of(records_of(study))
        queue: list[tuple[optuna.Trial, Job]] = []
        inflight: dict[int, tuple[optuna.Trial, Job]] = {}
        retries = Retries(self.space.max_retries)
        last_report = 0.0
        last_beat = time.monotonic()
        while True:
            if time.monotonic() - last_beat > HEARTBEAT_S:
                heartbeat(self.main_study or study)  # the run's liveness lives on its main study
                last_beat = time.monotonic()
            # in trial-equivalents: a pruned trial frees the rest of its share
            remaining = math.ceil(self.n_trials - tally.spent - len(inflight) - len(queue) - 1e-9)
            if self.interrupted or self.out_of_time():
                break
            self._dispatch(queue, inflight)
            # Ask ahead while the workers run, one trial per pass (between passes the
            # results are collected), so that a worker that finishes gets its next trial
            # at once instead of waiting on the sampler and the storage writes.
            more = len(queue) < self.pool.size and remaining > 0
            if more:
                queue.append(self.propose(study))
                self._dispatch(queue, inflight)
                more = len(queue) < self.pool.size and remaining > 1
            if not inflight and not queue and remaining <= 0:
                break
            done = []
            for res in self.pool.wait(0 if more else 0.5):
                t, job = inflight.pop(res.number)
                if retries.again(res):
                    if self.rungs is not None:
                        self.rungs.restart(res.number)  # it starts again at the first rung
                    queue.insert(0, (t, job))
                    continue
                # a trial's next rung goes to the worker that holds its candidate
                step = self.rungs.on_result(study, t, res) if self.rungs is not None and res.ok else "done"
                if step == "sent":
                    inflight[t.number] = (t, job)
                if step == "done":
                    done.append((t, res, job))
            self._dispatch(queue, inflight)  # freed workers start before the bookkeeping
            for t, res, job in done:
                fields = self.finish(study, t, res, self.rungs.take(res.number) if self.rungs is not None else None)
                tally.add("COMPLETE" if res.ok else "FAIL", fields.get("items"), None,
                          (fields.get("feasible", True), fields.get("aggregate", -1)) if res.ok else None, t.number,
                          job.summary if res.ok else None)
            if time.monotonic() - last_report > (10 if not self.opts.progress else 1):
                self.progress.line(self.n_trials, self.setup.fid.total if self.setup.fid else None)
                last_report = time.monotonic()
                self.progress.refresh_report()
        # stop: abandon what is in flight, never leave a trial RUNNING; the abandoned
        # trials are queued again, so a resumed run runs them first
        for job in self.pool.cancel_all():
            t, _ = inflight.pop(job.number)
            requeue_failed(study, t, "interrupted" if self.interrupted else "abandoned at the time budget")
        for t, _ in queue:
            requeue_failed(study, t, "interrupted before it ran" if self.interrupted else "not run (time budget reached)")
        self.progress.line(self.n_trials, self.setup.fid.total if self.setup.fid else None, final=True)

    def _dispatch(self, queue: list, inflight: dict) -> None:
        while queue and self.pool.idle:
            t, job = queue.pop(0)
            inflight[t.number] = (t, job)
            self.pool.submit(self.rungs.first(job) if self.rungs is not None else job)

    def _summary(self) -> dict:
        records = [r for r in trial_records(self.study, self.storage) if r.study_kind != "baseline"]
        return {"run": self.opts.run, "trials": len(records), "complete": sum(r.complete for r in records),
                "failed": sum(r.state == "FAIL" for r in records),
                "pruned": sum(r.state == "PRUNED" for r in records),
                "items": sum(r.items or 0 for r in records if r.state != "RUNNING"),
                "elapsed_s": time.monotonic() - self.t_start,
                "worker_busy_s": self.busy_s, "interrupted": self.interrupted,
                "replaced_workers": self.pool.replaced}
