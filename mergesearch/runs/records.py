"""The two records that cross layers: what a worker is asked to do (:class:`Job`) and
what a trial stored (:class:`TrialRecord`).

Only :mod:`mergesearch.runs.store` turns a :class:`TrialRecord` into Optuna's storage
and back (as the user attributes it always used, so studies written before these
classes existed still load). Everyone else — the controller and its phases, the
report, the export, the soup, the leaderboard and the command line — reads and writes
these fields by name, and a misspelt field is an error, not a silent new key.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Literal, Optional

JobKind = Literal["trial", "baseline", "refine", "test"]
_job_ids = itertools.count()


@dataclass
class Job:
    """One thing a worker does: materialize ``recipe`` and score it.

    - ``kind``: ``trial`` (a search or soup trial: the fault hook of the drills applies to
      it by ``number``), ``baseline`` (a baseline or a source model), ``refine`` (the
      recipe is first refined by gradient descent, with ``refine`` = options, groups
      and seed), ``test`` (a final candidate scored on the test split).
    - ``number``: the trial's number in its study, for log lines and the fault hook.
    - ``split``: the evaluation split, when not the configured one.
    - ``rung``: ``{"k": rung, "items": {task: item indices}}`` for a multi-fidelity trial.
    - ``summary``: the recipe in one line, for the progress line and the log.
    - ``trials``: the most the job may cost, in trials (a refinement: its share of the
      refine reserve); the pool gives it ``trial_timeout`` times that.
    - ``id``: unique in this process; the pool's key for the job and its retries.
    """

    kind: JobKind
    number: int
    recipe: dict
    split: Optional[str] = None
    rung: Optional[dict] = None
    refine: Optional[dict] = None
    summary: str = ""  # the recipe in one line, for the progress line and the log
    trials: float = 1.0  # the most the job may cost, in trials: its timeout is trial_timeout times this
    id: int = field(default_factory=lambda: next(_job_ids))

    def next_rung(self, rung: dict) -> "Job":
        """The same trial's next rung (a new job: it goes to the worker that holds the candidate)."""
        return Job(self.kind, self.number, self.recipe, self.split, rung, self.refine, self.summary, self.trials)


TIMINGS = ("materialize_s", "eval_s", "worker_s", "ray_in_s", "ray_out_s", "refine_s")


@dataclass
class TrialRecord:
    """Everything one trial stored, with where it lives.

    ``study_kind`` says which of the run's studies holds it: ``search`` (the main
    study), ``baseline``, ``stage<k>`` (a later schedule stage) or ``refine``; its
    :attr:`label` (``7``, ``b0``, ``s1.4``, ``r0``) names it in the leaderboard and on
    the command line. ``state`` is Optuna's state name (COMPLETE, PRUNED, FAIL, RUNNING,
    WAITING).
    """

    study_kind: str = "search"
    number: int = 0
    state: str = "RUNNING"
    value: Optional[float] = None
    values: Optional[list[float]] = None
    params: dict = field(default_factory=dict)
    started: Optional[datetime] = None
    completed: Optional[datetime] = None
    # what the candidate is, and why it ran
    recipe: Optional[dict] = None
    summary: str = ""
    baseline: Optional[str] = None  # a baseline's name: "uniform average", "source ft_add", "soup <run>"
    role: Optional[str] = None  # "warm start", "stage start", "refine of 7", a soup's "ingredient", ...
    members: Optional[list[str]] = None  # a soup trial's ingredients
    refined_from: Optional[str] = None  # a refinement's source trial (label)
    source_aggregate: Optional[float] = None
    refine: Optional[dict] = None  # a refinement's statistics
    # what it scored
    scores: Optional[dict] = None  # dev score per task
    aggregate: Optional[float] = None
    feasible: bool = True
    items: Optional[int] = None  # dev items scored
    fidelity: Optional[float] = None  # the share of the dev items scored
    rungs: Optional[int] = None
    writes: Optional[int] = None  # candidate materializations (a multi-fidelity trial's rungs share one)
    cost: Optional[float] = None  # trial-equivalents, for a pruned trial or a refinement
    chance: Optional[float] = None  # the improvement pruner's estimate when it stopped the trial
    # where and how long
    worker: Optional[int] = None
    scored_on: Optional[str] = None  # cpu, cuda
    timings: dict = field(default_factory=dict)  # TIMINGS, in seconds
    # why it failed
    reason: Optional[str] = None
    requeued: bool = False  # failed through no fault of its own, and queued again

    @property
    def label(self) -> str:
        if self.study_kind == "search":
            return str(self.number)
        if self.study_kind == "baseline":
            return f"b{self.number}"
        if self.study_kind == "refine":
            return f"r{self.number}"
        return f"s{self.study_kind[5:]}.{self.number}"

    @property
    def is_source(self) -> bool:
        """A source model scored as itself (the references of a normalized objective)."""
        return str(self.baseline or "").startswith("source ")

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE"

    @property
    def rank(self) -> tuple:
        """Feasible first, then by aggregate dev score."""
        return (self.feasible, self.aggregate if self.aggregate is not None else float("-inf"))

    @property
    def method(self) -> Optional[str]:
        return (self.recipe or {}).get("method")

    @property
    def counts_toward_budget(self) -> bool:
        """Finished trials, except failures that were queued again (their retry counts)."""
        if self.state == "FAIL":
            return not self.requeued
        return self.state in ("COMPLETE", "PRUNED")

    @property
    def spent(self) -> float:
        """Trial-equivalents this trial spent: a pruned trial its share of the dev items."""
        return (self.cost if self.cost is not None else 1.0) if self.state == "PRUNED" else 1.0


STORED = tuple(f.name for f in fields(TrialRecord)
               if f.name not in ("study_kind", "number", "state", "value", "values", "params", "started",
                                 "completed", "timings"))
