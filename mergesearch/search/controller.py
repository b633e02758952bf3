"""The search controller: Optuna ask/tell over a Ray worker pool.

It asks for trials ahead of the workers (one per worker), sends them to the idle
workers and tells each result as it arrives. It stops at the trial budget or the wall-time
budget; Ctrl-C stops it cleanly: no new trials, in-flight trials are abandoned
and marked failed ("interrupted"), and the store stays consistent. ``resume``
continues the same study, with the sampler's state (CMA-ES generations keep
counting), after marking trials left running by a dead controller as failed.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from mergesearch.errors import MergeSearchError
from mergesearch.evaluate.base import weighted_mean
from mergesearch.recipe import Recipe, from_dict
from mergesearch.search.lifecycle import RunLifecycle
from mergesearch.search.samplers import make_sampler
from mergesearch.search.space import SearchSpace, layer_prefix
from mergesearch.runs.store import (
    HEARTBEAT_S, batched_params, counts_toward_budget, heartbeat, record, recover_stale, requeue_failed, run_dir,
    study_names,
)
from mergesearch.search.workers import Retries, WorkerPool

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


def objective_values(space: SearchSpace, scores: dict[str, float],
                     reference: dict[str, float] | None = None) -> tuple[float, bool, list[float] | float]:
    """(aggregate, feasible, value(s) told to the sampler). ``reference``: the best source
    model's dev score per task, for ``objective.normalize: sources``."""
    obj = space.objective
    weights = space.evaluator.weights
    watched = space.monitor.floors if space.monitor is not None else {}
    monitored = {t: scores[t] for t in watched if t in scores}
    scores = {t: v for t, v in scores.items() if t not in watched}  # the objective's tasks only
    s = scores
    if obj.normalize == "sources" and reference:
        s = {t: v / reference[t] if reference.get(t) else v for t, v in scores.items()}
    if obj.kind == "mean":
        agg = weighted_mean(s, weights)
    elif obj.kind == "min":
        agg = min(s.values())
    else:  # softmin: -T log(mean exp(-s/T)), stable around the minimum
        lo, T = min(s.values()), obj.temperature
        agg = lo - T * math.log(sum(math.exp(-(v - lo) / T) for v in s.values()) / len(s))
    floors = {t: obj.min_task for t in scores} if obj.min_task is not None else {}
    floors.update(obj.floors)
    violation = sum(max(0.0, floor - scores[t]) for t, floor in floors.items())
    # a monitor task's floor: never optimized, but a candidate below it is infeasible
    violation += sum(max(0.0, watched[t] - v) for t, v in monitored.items())
    if space.multi_objective:
        return agg, True, [scores[t] for t in space.evaluator.tasks]
    return agg, violation == 0, agg - violation  # infeasible trials are penalized by their shortfall


def source_recipes(space: SearchSpace) -> dict[str, Recipe]:
    """Each source model as a recipe (itself, exactly): the references of a normalized objective."""
    return {f"source {Path(m).name}": from_dict(dict(method="linear", models=[{"path": m, "parameters": {"weight": 1.0}}],
                                                     seed=space.seed, **({"dtype": space.dtype} if space.dtype else {})))
            for m in space.models}


def baseline_recipes(space: SearchSpace) -> dict[str, Recipe]:
    models_1 = [{"path": m, "parameters": {"weight": 1.0}} for m in space.models]
    out = {
        "uniform average": from_dict(dict(method="linear", base=space.base, models=models_1, seed=space.seed,
                                          **({"dtype": space.dtype} if space.dtype else {}))),
        "task arithmetic 1.0": from_dict(dict(method="task_arithmetic", base=space.base, models=models_1,
                                              seed=space.seed, **({"dtype": space.dtype} if space.dtype else {}))),
    }
    return out


class Controller(RunLifecycle):
    def __init__(self, space: SearchSpace, opts: SearchOptions, space_path: str = "space"):
        self.space = space
        self.opts = opts
        self.space_path = space_path
        self.dir = run_dir(opts.run, opts.root)
        self.n_trials = opts.n_trials or space.budget.n_trials
        self.timeout = opts.timeout if opts.timeout is not None else space.budget.timeout
        self.interrupted = False

    # -- checks before anything is created ------------------------------------------
    def preflight(self):
        from mergesearch.engine.checkpoint import Checkpoint
        from mergesearch.engine.compat import check_compatible
        from mergesearch.evaluate import build_evaluator

        base = Checkpoint(self.space.base)
        models = [Checkpoint(m) for m in self.space.models]
        check_compatible(base, models)
        # task files, task names, metrics and item splits are valid (monitor tasks with floors included)
        ev = build_evaluator(self.space.scoring())
        if self.space.monitor is not None and not self.space.monitor.floors:  # scored at export only: valid now
            from mergesearch.search.space import monitor_config
            build_evaluator(monitor_config(self.space.evaluator, self.space.monitor, "test"))
        self.directions = getattr(ev, "directions", None)
        self.num_layers = base.num_layers
        self.tensor_names = base.names()
        prefix = layer_prefix(self.tensor_names)
        self.stages = [(self.space.groups(self.num_layers, prefix, g), share)
                       for g, share in self.space.stages(self.space_path)]
        self._check_nesting()
        self.groups = self.stages[0][0]
        self.fid = None
        self.n_dev_items = sum(len(v) for v in ev.items.values()) if hasattr(ev, "items") else None
        if self.space.fidelity is not None:
            from mergesearch.search.fidelity import plan_for
            self.fid = plan_for(self.space, {t: len(v) for t, v in ev.items.items()})
        if self.space.budget.items is not None and not self.opts.n_trials:
            if not self.n_dev_items:
                raise MergeSearchError(f"{self.space_path}: budget.items: the '{self.space.evaluator.evaluator}' "
                                       "evaluator does not count its items; give budget.n_trials")
            self.n_trials = self.space.budget.items / self.n_dev_items  # in trial-equivalents
        if self.space.refine is not None:  # a task the refinement cannot train on: one line, before any work
            from mergesearch.search.refine import untrainable
            skip = untrainable(ev.output_types(), self.space.refine.model_dump())
            if len(skip) == len(ev.tasks):
                raise MergeSearchError(f"{self.space_path}: refine: no task to train on: "
                                       + "; ".join(f"task '{t}': {w}" for t, w in skip.items()))
            for t, why in skip.items():
                log.warning("refine: task '%s' is scored but not trained on: %s", t, why)
        self.refine_reserve = self._refine_reserve(ev)
        self.seed_recipe = self._seed_recipe() if self.space.seed_from else None
        self._check_budget(self._n_baselines())
        self.side = None
        self.placement = self._plan(quiet=True)  # refuse a budget that cannot fit before anything is created
        self.claim()
        from mergesearch.search.side_inputs import resolve_side_inputs
        self.side = resolve_side_inputs(self.space)  # computed once (cached on disk), before any worker starts
        self.placement = self._plan()
        warning = self.space.scale_warning()
        if warning:
            log.warning("%s: %s", self.space_path, warning)
        for hint in self.space.lever_hints():
            log.info("hint: %s", hint)

    def _check_nesting(self) -> None:
        """Each schedule stage must refine the one before it: every group of a stage lies
        inside one group of the previous stage, so the previous best is a point of it."""
        from dataclasses import asdict

        from mergesearch.search.refine import group_index
        for k in range(1, len(self.stages)):
            coarse = [asdict(g) for g in self.stages[k - 1][0]]
            for g in self.stages[k][0]:
                owners = {group_index(f, coarse) for f in g.filters + g.fallback}
                if len(owners) > 1:
                    raise MergeSearchError(
                        f"{self.space_path}: schedule[{k}]: '{self.space.schedule[k]}' does not refine "
                        f"'{self.space.schedule[k - 1]}' (its group {g.name} spans several groups of the previous "
                        "stage); use group counts that divide each other")

    def _refine_reserve(self, ev) -> int:
        """Trials of the budget kept for the refine stage: for each refined candidate, the
        most its refinement can cost (in trial-equivalents) plus its scoring."""
        cfg = self.space.refine
        if cfg is None:
            return 0
        from mergesearch.search.refine import estimate_cost
        n_items = sum(len(v) for v in ev.items.values())
        n_seqs = sum(ev.request_counts().values())
        per = math.ceil(estimate_cost(cfg.model_dump(), n_items, n_seqs, len(self.space.models)) - 1e-9) + 1
        return cfg.top * per

    def _n_baselines(self) -> int:
        """The baselines this run scores before the search (the budget counts them)."""
        n = len(baseline_recipes(self.space)) if self.space.initial_trials else 0
        return n + (len(self.space.models) if self.space.objective.normalize == "sources" else 0)

    def _check_budget(self, n_base: int) -> float:
        """The trials left for the search once ``n_base`` baselines and the refine reserve
        are counted (every evaluation counts); refused when none is left."""
        total = self.n_trials - self.refine_reserve - n_base
        if total < 1:
            raise MergeSearchError(
                f"{self.space_path}: budget.n_trials {self.n_trials:g} leaves no search trial after {n_base} baselines"
                + (f" and {self.refine_reserve} trial-equivalents kept for refining" if self.refine_reserve else "")
                + "; raise budget.n_trials" + (" or lower refine.steps" if self.refine_reserve else "")
                + " (every evaluation counts, baselines included)")
        return total

    def _plan(self, quiet: bool = False):
        """The workers' placement, refused here (before Ray starts) when the evaluation
        model and the scratch cannot fit; planned again once the side files are known.
        Each worker plans again on its own device."""
        import torch

        from mergesearch.engine.plan import space_plan
        r = self.space.resources
        budget = self.opts.device_memory
        if torch.cuda.is_available():
            device = "cuda"
        elif self.opts.ray_address and (r.gpus_per_worker or 0) > 0:
            if budget is None and r.device_memory is None:
                log.info("placement: planned by each worker on its GPU (declare resources.device_memory to check "
                         "it here)")
                return None
            device = "cuda"
        else:
            device = "cpu"
        p = space_plan(self.space, device=device, budget=budget, side=self.side)
        if not quiet:
                log.info("placement: device %s (%s), host %s (%s)", ", ".join(p.resident) or "-",
                     _gb(p.device_bytes), ", ".join(p.host) or "-", _gb(p.host_bytes))
        return p

    def _resources(self) -> dict:
        r = self.space.resources.model_dump()
        if self.opts.device_memory is not None:
            r["device_memory"] = self.opts.device_memory
        return r

    def _seed_recipe(self) -> Recipe:
        """The final recipe of the soup run named by ``seed_from``; its members must be
        among the space's models."""
        from mergesearch.runs.store import load_run

        name = self.space.seed_from
        try:
            soup, _ = load_run(name, self.opts.storage, self.opts.root)
        except MergeSearchError as e:
            raise MergeSearchError(f"{self.space_path}: seed_from: {e}") from None
        if soup.user_attrs.get("kind") != "soup":
            raise MergeSearchError(f"{self.space_path}: seed_from: run '{name}' is not a soup run")
        final = soup.user_attrs.get("final_recipe")
        if final is None:
            raise MergeSearchError(f"{self.space_path}: seed_from: soup run '{name}' has not finished")
        recipe = from_dict(final, f"soup run {name}")
        ours = {str(Path(m).resolve()) for m in self.space.models}
        extra = [m.path for m in recipe.models if str(Path(m.path).resolve()) not in ours]
        if extra:
            raise MergeSearchError(f"{self.space_path}: seed_from: soup '{name}' uses models not in this space's "
                                   f"models: {', '.join(extra[:3])}")
        return recipe

    def open_study(self):
        self.storage_for_study()
        n_vars = self._n_variables()
        self.n_vars = n_vars
        sampler = make_sampler(self.space, n_vars)
        from mergesearch.search.fidelity import make_pruner
        self.pruner = make_pruner(self.space, self.fid, self._pruner_value, self._pruner_linear)
        self.progress = {}
        directions = ["maximize"] * (len(self.space.evaluator.tasks) if self.space.multi_objective else 1)
        if self.opts.resume:
            study = optuna.load_study(study_name=self.opts.run, storage=self.storage, sampler=sampler,
                                      pruner=self.pruner)
            if study.user_attrs.get("space_fingerprint") != self.space.fingerprint():
                raise MergeSearchError(f"{self.space_path}: the space changed since run '{self.opts.run}' started; "
                                       "start a new run instead of --resume")
            n = self.resume_checks(study)
            if n:
                log.info("resume: %d trial(s) left running by the stopped controller failed and queued again", n)
        else:
            study = optuna.create_study(study_name=self.opts.run, storage=self.storage, sampler=sampler,
                                        directions=directions, pruner=self.pruner)
            _set_metric_names(study, self.space)
            study.set_user_attr("space", self.space.model_dump(mode="json"))
            study.set_user_attr("space_fingerprint", self.space.fingerprint())
            study.set_user_attr("kind", "search")
            if self.directions:  # which metric each task's score is, and how it is maximized
                study.set_user_attr("metrics", self.directions)
            if self.seed_recipe is not None:
                params = self.space.soup_params([m.path for m in self.seed_recipe.models], self.groups)
                if params is not None:  # the sampler sees it as one of its own trials
                    study.enqueue_trial(params, user_attrs={"role": f"soup {self.space.seed_from}"})
                    self.seed_baseline = False
                    log.info("seed: the soup of run '%s' is the first trial", self.space.seed_from)
                else:  # not expressible in this space: run it beside the baselines
                    self.seed_baseline = True
            (self.dir / "space.yaml").write_text(_yaml(self.space.model_dump(mode="json"))) if self.dir.exists() else None
        self.study = study

    def _n_variables(self) -> int:
        from mergesearch.search.space import Bounds
        n = 0
        for name, b in self.space.parameters.items():
            if isinstance(b, Bounds):
                scope = next(s.param(name).scope for s in map(_spec, self.space.methods) if s.param(name))
                per = len(self.space.models) if scope == "model" else 1
                n += per * (len(self.groups) if scope == "model" else 1)
        return n + (1 if len(self.space.methods) > 1 else 0)

    # -- the loop -----------------------------------------------------------------------
    def make_pool(self, faults: dict) -> WorkerPool:
        methods = sorted(set(self.space.methods) | {"linear", "task_arithmetic"})
        return WorkerPool(self.opts.workers, self.space.base, self.space.models, methods,
                          self.space.scoring().model_dump(), self.space.trial_timeout, faults, self.side,
                          resources=self._resources(), dtype=self.space.dtype)

    def work(self) -> dict:
        try:
            self.t_start = time.monotonic()
            self.busy_s = 0.0
            old = signal.signal(signal.SIGINT, self._on_sigint)
            try:
                self.reference = self.study.user_attrs.get("reference")
                if (self.space.initial_trials or getattr(self, "seed_baseline", False)
                        or self.space.objective.normalize == "sources"):
                    self._baselines()
                self._warm_start()
                self._search_stages()
                if self.space.refine is not None and not self.interrupted:
                    self._refine_stage()
            finally:
                signal.signal(signal.SIGINT, old)
            self._refresh_report(force=True)
            return self._summary()
        finally:
            if getattr(self, "_live", None) is not None:
                self._live.stop()

    def _on_sigint(self, *_):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        log.warning("interrupt: finishing up (in-flight trials are abandoned); press Ctrl-C again to force")

    def _baselines(self) -> None:
        side_name = f"{self.opts.run}.baselines"
        if side_name in study_names(self.storage):
            return
        side = optuna.create_study(study_name=side_name, storage=self.storage,
                                   directions=self.study.directions)
        todo = dict(baseline_recipes(self.space)) if self.space.initial_trials else {}
        if getattr(self, "seed_baseline", False):
            todo[f"soup {self.space.seed_from}"] = self.seed_recipe
        sources = source_recipes(self.space) if self.space.objective.normalize == "sources" else {}
        pending = {}  # pool numbers are negative: never a search trial's
        for name, recipe in {**sources, **todo}.items():
            t = side.ask()
            record(t, {"recipe": recipe.to_dict(), "baseline": name, "summary": recipe.summary()})
            pending[-1 - t.number] = (t, name)
        batches = [{n: v for n, v in pending.items() if v[1] in sources},
                   {n: v for n, v in pending.items() if v[1] not in sources}]
        for k, batch in enumerate(batches):
            jobs = {n: (t.user_attrs["recipe"], None) for n, (t, _) in batch.items()}
            held = []
            for res in self.pool.run_batch(jobs, self.space.max_retries, stop=lambda: self.interrupted):
                if k == 0:
                    held.append(res)
                else:
                    self._finish_baseline(side, pending.pop(res.number), res)
            if k == 0 and sources:  # the references first: the sources' own scores are normalized too
                self.reference = self._reference([r for r in held if r.ok])
                for res in held:
                    self._finish_baseline(side, pending.pop(res.number), res)
        self.pool.cancel_all()  # only after an interrupt is anything still in flight
        for t, _ in pending.values():
            record(t, {"reason": "interrupted"})
            side.tell(t, state=TrialState.FAIL)

    def _warm_start(self) -> None:
        """``sampler.x0: best_baseline``: CMA-ES starts from the best baseline's
        coefficients (chosen once, stored with the study, reused on --resume)."""
        cfg = self.space.sampler
        if cfg.x0 != "best_baseline" or cfg.name != "cmaes" or len(self.space.methods) > 1:
            return
        from mergesearch.search.samplers import recipe_x0
        x0 = self.study.user_attrs.get("x0")
        if x0 is None:
            side_name = f"{self.opts.run}.baselines"
            done = []
            if side_name in study_names(self.storage):
                side = optuna.load_study(study_name=side_name, storage=self.storage)
                done = [t for t in side.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
            if not done:
                log.warning("sampler.x0: best_baseline: no baseline was scored; CMA-ES starts at the centre")
                return
            best = max(done, key=lambda t: (t.user_attrs.get("feasible", True), t.value))
            x0 = recipe_x0(self.space, best.user_attrs["recipe"], self.groups, self.tensor_names, self.num_layers)
            self.study.set_user_attr("x0", x0)
            self.study.set_user_attr("x0_from", best.user_attrs.get("baseline"))
            # Optuna's CMA-ES learns the search space from a finished trial, and draws trials
            # independently until then: score the start point itself first
            self.study.enqueue_trial(x0, user_attrs={"role": "warm start"})
            t = self.study.ask()
            with batched_params(t):
                recipe = self.space.suggest(t, self.groups, self.side)
            record(t, {"recipe": recipe.to_dict(), "summary": recipe.summary()})
            for res in self.pool.run_batch({t.number: (t.user_attrs["recipe"], None)}, self.space.max_retries,
                                           stop=lambda: self.interrupted):
                self._finish(self.study, t, res)
            self.pool.cancel_all()
            if t.number not in {x.number for x in self.study.get_trials(deepcopy=False)
                                if x.state != TrialState.RUNNING}:
                requeue_failed(self.study, self.study._storage.get_trial(t._trial_id), "interrupted")
            log.info("sampler: CMA-ES starts from the best baseline, %s", best.user_attrs.get("baseline"))
        self.study.sampler = make_sampler(self.space, self.n_vars, x0=x0)

    def _search_stages(self) -> None:
        """The search loop, once per schedule stage; the budget left after the refine
        reserve is split between the stages by their shares."""
        # every evaluation counts: the baselines (and source models) scored first, the
        # search, and the refinements' trial-equivalents
        side = f"{self.opts.run}.baselines"
        n_base = (len(optuna.load_study(study_name=side, storage=self.storage).trials)
                  if side in study_names(self.storage) else 0)
        total = self._check_budget(n_base)  # a soup seed the space cannot express is one more baseline
        if n_base or self.refine_reserve:
            log.info("budget: %g trials: %d baselines, %g for the search%s", self.n_trials, n_base, total,
                     f", {self.refine_reserve} kept for refining the best {self.space.refine.top} candidate(s)"
                     if self.refine_reserve else "")
        shares = [share for _, share in self.stages]
        budgets = [max(1, int(round(total * sum(shares[:k + 1])))) for k in range(len(shares))]
        budgets = [b - (budgets[k - 1] if k else 0) for k, b in enumerate(budgets)]
        main = self.main_study = self.study
        for k, (groups, _) in enumerate(self.stages):
            if self.interrupted or (self.timeout is not None and time.monotonic() - self.t_start >= self.timeout):
                break
            if budgets[k] <= 0:
                continue
            if k > 0:
                self._enter_stage(k, groups, main)
            self.n_trials = budgets[k]
            if len(self.stages) > 1:
                log.info("stage %d/%d: %s, %d trials, %d variables", k + 1, len(self.stages),
                         self.space.schedule[k], budgets[k], self.n_vars)
            self._loop()
        self.study = main
        self.groups = self.stages[0][0]

    def _enter_stage(self, k: int, groups, main) -> None:
        """Switch to stage k's study (``<run>.stage<k>``), starting from the best trial
        so far, broadcast onto this stage's finer groups."""
        from mergesearch.search.samplers import recipe_x0
        from mergesearch.runs.store import all_trials

        name = f"{self.opts.run}.stage{k}"
        self.groups = groups
        self.n_vars = self._n_variables()
        if name in study_names(self.storage):
            study = optuna.load_study(study_name=name, storage=self.storage, pruner=self.pruner)
            x0 = study.user_attrs.get("x0")
            n = recover_stale(study)
            if n:
                log.info("resume: %d trial(s) of stage %d left running by the stopped controller failed and "
                         "queued again", n, k + 1)
        else:
            done = [t for kind, t in all_trials(main, self.storage)
                    if t.state == TrialState.COMPLETE and kind != "refine"
                    and not str(t.user_attrs.get("baseline", "")).startswith("source ")]
            study = optuna.create_study(study_name=name, storage=self.storage, directions=main.directions,
                                        pruner=self.pruner)
            _set_metric_names(study, self.space)
            x0 = None
            if done:
                best = max(done, key=lambda t: (t.user_attrs.get("feasible", True), t.value))
                x0 = recipe_x0(self.space, best.user_attrs["recipe"], groups, self.tensor_names, self.num_layers)
                study.set_user_attr("x0", x0)
                study.set_user_attr("x0_from", best.user_attrs.get("baseline") or f"{best.number}")
                if self.space.sampler.name == "tpe":  # TPE has no start point: the best so far runs first
                    study.enqueue_trial(x0, user_attrs={"role": "stage start"})
        study.set_user_attr("stage", k)
        study.sampler = make_sampler(self.space, self.n_vars, x0=x0)
        self.study = study

    def _refine_stage(self) -> None:
        """Refine the best candidates by gradient descent on their worker (mergesearch.search.refine);
        each refined recipe is scored like a trial and stored in ``<run>.refine``."""
        from dataclasses import asdict

        from mergesearch.methods.task_arithmetic import TASK_VECTOR_METHODS
        from mergesearch.search.space import Granularity, tensor_groups
        from mergesearch.runs.store import all_trials, trial_label

        cfg = self.space.refine
        name = f"{self.opts.run}.refine"
        if name in study_names(self.storage):
            side = optuna.load_study(study_name=name, storage=self.storage)
            recover_stale(side, requeue=False)  # a refinement cut off by a dead controller runs again
        else:
            side = optuna.create_study(study_name=name, storage=self.storage, directions=self.study.directions)
        done = {t.user_attrs.get("refined_from") for t in side.get_trials(deepcopy=False)
                if t.state == TrialState.COMPLETE}
        pool = [(trial_label(kind, t), t) for kind, t in all_trials(self.study, self.storage)
                if kind != "refine" and t.state == TrialState.COMPLETE
                and (t.user_attrs.get("recipe") or {}).get("method") in TASK_VECTOR_METHODS
                and not str(t.user_attrs.get("baseline", "")).startswith("source ")]
        pool.sort(key=lambda lt: (lt[1].user_attrs.get("feasible", True), lt[1].value), reverse=True)
        chosen = [(label, t) for label, t in pool[:cfg.top] if label not in done]
        if not chosen:
            return
        if cfg.level == "tensor":
            groups = tensor_groups(self.tensor_names, self.space.granularity.special)
        else:
            g = Granularity(level=cfg.level, n_groups=cfg.n_groups, special=self.space.granularity.special,
                            modules=self.space.granularity.modules if cfg.modules is None else cfg.modules)
            groups = self.space.groups(self.num_layers, layer_prefix(self.tensor_names), g)
        payload = {"options": cfg.model_dump(), "groups": [asdict(x) for x in groups], "seed": self.space.seed}
        jobs, pending = {}, {}
        for label, src in chosen:
            t = side.ask()
            record(t, {"recipe": src.user_attrs["recipe"], "refined_from": label, "role": f"refine of {label}",
                       "summary": src.user_attrs.get("summary", ""), "source_aggregate": src.user_attrs.get("aggregate")})
            number = -1_000_000 - t.number  # never a search or baseline number
            jobs[number] = (src.user_attrs["recipe"], None, payload)
            pending[number] = (t, label, src)
        for res in self.pool.run_batch(jobs, self.space.max_retries, stop=lambda: self.interrupted):
            t, label, src = pending.pop(res.number)
            stats = res.extra.get("refine")
            if res.ok and "recipe" in res.extra:
                from mergesearch.recipe import from_dict
                if res.extra.get("rows"):
                    self._write_row_scales(res.extra["recipe"], res.extra["rows"], f"r{t.number}")
                refined = from_dict(res.extra["recipe"], "refined recipe")
                record(t, {"recipe": res.extra["recipe"], "summary": refined.summary(), "refine": stats,
                           "cost": stats["cost"] + 1.0})
            self._finish(side, t, res)
            if res.ok:
                log.info("refine: %s %.4f -> r%d %.4f (%d steps, best at step %d, held-out accuracy %.3f -> %.3f, "
                         "%.1f trial-equivalents)", label, src.user_attrs.get("aggregate", float("nan")), t.number,
                         t.user_attrs.get("aggregate", float("nan")), stats["steps"], stats["best_step"],
                         stats["holdout_before"], stats["holdout_after"], stats["cost"] + 1.0)
            else:
                log.warning("refine: %s failed (%s)", label, res.reason)
        self.pool.cancel_all()
        for t, _, _ in pending.values():
            record(t, {"reason": "interrupted"})
            side.tell(t, state=TrialState.FAIL)

    def _write_row_scales(self, recipe: dict, rows: list, label: str) -> None:
        """A refinement's per-row multipliers: one safetensors file per model under the
        run's ``row_scales/`` (written whole, then renamed), named in the stored recipe."""
        from safetensors.torch import save

        from mergesearch.fsutil import atomic_file

        for i, tensors in enumerate(rows):
            if not tensors:
                continue
            path = self.dir / "row_scales" / f"{label}-m{i}.safetensors"
            with atomic_file(path, "wb") as f:
                f.write(save({k: v.contiguous() for k, v in tensors.items()}))
            recipe["models"][i]["row_scales"] = str(path.resolve())

    def _finish_baseline(self, side, entry, res) -> None:
        t, name = entry
        self._finish(side, t, res)
        log.info("baseline %s: %s", name, f"{t.user_attrs.get('aggregate', float('nan')):.4f}"
                 if res.ok else f"failed ({res.reason})")

    def _reference(self, results: list) -> dict[str, float]:
        """The best source model's dev score per task (stored with the study for --resume)."""
        if not results:
            raise MergeSearchError("objective.normalize: sources: no source model could be scored")
        ref = {task: max(r.scores[task] for r in results) for task in self.space.evaluator.tasks}
        self.study.set_user_attr("reference", ref)
        log.info("objective: each task is divided by the best source's dev score: %s",
                 ", ".join(f"{t} {v:.4f}" for t, v in ref.items()))
        return ref

    def _loop(self) -> None:
        study = self.study
        self._tally_reset()
        queue: list[optuna.Trial] = []
        inflight: dict[int, optuna.Trial] = {}
        retries = Retries(self.space.max_retries)
        last_report = 0.0
        last_beat = time.monotonic()
        while True:
            if time.monotonic() - last_beat > HEARTBEAT_S:
                heartbeat(getattr(self, "main_study", study))  # the run's liveness lives on its main study
                last_beat = time.monotonic()
            finished = self._count_finished()
            out_of_time = self.timeout is not None and time.monotonic() - self.t_start >= self.timeout
            # in trial-equivalents: a pruned trial frees the rest of its share
            remaining = math.ceil(self.n_trials - finished - len(inflight) - len(queue) - 1e-9)
            if self.interrupted or out_of_time:
                break
            self._dispatch(queue, inflight)
            # Ask ahead while the workers run, one trial per pass (between passes the
            # results are collected), so that a worker that finishes gets its next trial
            # at once instead of waiting on the sampler and the storage writes.
            more = len(queue) < self.pool.size and remaining > 0
            if more:
                t = study.ask()
                with batched_params(t):
                    recipe = self.space.suggest(t, self.groups, self.side)
                fresh = {"recipe": recipe.to_dict(), "summary": recipe.summary()}
                if "reason" in t.user_attrs:  # a retry carries its failed original's attributes
                    fresh.update(reason=None, requeued=False)
                record(t, fresh)
                queue.append(t)
                self._dispatch(queue, inflight)
                more = len(queue) < self.pool.size and remaining > 1
            if not inflight and not queue and remaining <= 0:
                break
            done = []
            for res in self.pool.wait(0 if more else 0.5):
                t = inflight.pop(res.number)
                if retries.again(res):
                    self.progress.pop(res.number, None)  # it starts again at the first rung
                    queue.insert(0, t)
                    continue
                # a trial's next rung goes to the worker that holds its candidate
                step = self._next_rung(study, t, res) if self.fid is not None and res.ok else "done"
                if step == "sent":
                    inflight[t.number] = t
                if step == "done":
                    done.append((t, res))
            self._dispatch(queue, inflight)  # freed workers start before the bookkeeping
            for t, res in done:
                payload = self._finish(study, t, res, self.progress.pop(res.number, None))
                self._tally_add(TrialState.COMPLETE if res.ok else TrialState.FAIL, payload, t.number,
                                summary=t.user_attrs.get("summary") if res.ok else None)
            if time.monotonic() - last_report > (10 if not self.opts.progress else 1):
                self._report()
                last_report = time.monotonic()
                self._refresh_report()
        # stop: abandon what is in flight, never leave a trial RUNNING; the abandoned
        # trials are queued again, so a resumed run runs them first
        for number in self.pool.cancel_all():
            t = inflight.pop(number)
            requeue_failed(study, study._storage.get_trial(t._trial_id),
                           "interrupted" if self.interrupted else "abandoned at the time budget")
        for t in queue:
            requeue_failed(study, study._storage.get_trial(t._trial_id),
                           "interrupted before it ran" if self.interrupted else "not run (time budget reached)")
        self._report(final=True)

    def _dispatch(self, queue: list, inflight: dict) -> None:
        while queue and self.pool.idle:
            t = queue.pop(0)
            inflight[t.number] = t
            if self.fid is not None:
                from mergesearch.search.fidelity import Progress
                self.progress[t.number] = Progress(self.fid)
                self.pool.submit(t.number, t.user_attrs["recipe"], rung={"k": 0, "items": self.fid.rung_items(0)})
            else:
                self.pool.submit(t.number, t.user_attrs["recipe"])

    def _next_rung(self, study, t: optuna.Trial, res) -> str:
        """A rung's result: add it, report it and ask the pruner. Returns "sent" when the
        trial's next rung was sent (to the worker that holds the candidate), "pruned" when
        the trial was pruned (and stored) here, "done" when it has scored every rung
        (``_finish`` stores it)."""
        p = self.progress[t.number]
        first = p.rung
        p.add(res.extra.get("item_scores") or {}, res.extra.get("task_scores"))
        p.materialize_s += res.timings.get("materialize_s", 0.0)
        p.eval_s += res.timings.get("eval_s", 0.0)
        p.writes += int(bool(res.extra.get("wrote")))
        p.worker, p.device = res.worker, res.device
        if p.done:
            return "done"
        reference = getattr(self, "reference", None)
        agg, feasible, value = objective_values(self.space, p.scores(), reference)
        if self.space.fidelity.pruner.name == "wilcoxon":
            ref = reference if self.space.objective.normalize == "sources" else None
            weights = {**self.space.evaluator.weights, **{t: 0.0 for t in self.space.scoring().monitor}}
            for step, v in p.blocks(first, weights, ref).items():
                t.report(v, step)
        elif self.space.fidelity.pruner.name == "improvement":  # raw block means: the pruner weighs them
            for step, v in p.blocks(first, {}, None).items():
                t.report(v, step)
        else:
            t.report(value, step=p.items)
        pruned = t.should_prune()
        chance = getattr(self.pruner, "last", {}).pop(t.number, None)  # the improvement pruner's estimate
        if pruned:
            record(t, {"worker": p.worker, "materialize_s": p.materialize_s, "eval_s": p.eval_s,
                       **({"chance": chance} if chance is not None else {}),
                       **({"scored_on": p.device} if p.device else {}), "scores": p.scores(), "aggregate": agg,
                       **_flat_scores(p.scores()),
                       "feasible": feasible, "items": p.items, "fidelity": p.share, "rungs": p.rung, "cost": p.share,
                       "writes": p.writes})
            study.tell(t, state=TrialState.PRUNED)
            self._tally_add(TrialState.PRUNED, {"items": p.items, "cost": p.share}, t.number)
            self.busy_s += p.materialize_s + p.eval_s
            del self.progress[t.number]
            return "pruned"
        self.pool.submit(t.number, t.user_attrs["recipe"], rung={"k": p.rung, "items": self.fid.rung_items(p.rung)},
                         worker=p.worker)
        return "sent"

    def _pruner_value(self, scores: dict[str, float]) -> float:
        """The value a trial with these per-task dev scores is told (the improvement pruner's objective)."""
        return objective_values(self.space, scores, getattr(self, "reference", None))[2]

    def _pruner_linear(self) -> dict[str, float] | None:
        """The objective's coefficient per task when it is a weighted sum of the raw scores."""
        obj = self.space.objective
        if obj.kind != "mean" or obj.floors or obj.min_task is not None or self.space.scoring().monitor:
            return None
        ref = getattr(self, "reference", None) if obj.normalize == "sources" else None
        w = {t: self.space.evaluator.weights.get(t, 1.0) for t in self.fid.order}
        total = sum(w.values())
        if not total:
            return None
        return {t: w[t] / total / ((ref or {}).get(t) or 1.0) for t in w}

    def _finish(self, study, t: optuna.Trial, res, progress=None) -> None:
        """Store a trial's result; with ``progress`` (a multi-fidelity trial) the scores are
        those of every rung, item by item."""
        if progress is not None and res.ok:
            from mergesearch.search.workers import Result
            res = Result(res.number, True, progress.scores(), {"materialize_s": progress.materialize_s,
                                                               "eval_s": progress.eval_s}, res.worker, device=res.device)
        payload = {"worker": res.worker, **res.timings, **({"scored_on": res.device} if res.device else {})}
        if res.ok:
            agg, feasible, value = objective_values(self.space, res.scores, getattr(self, "reference", None))
            payload.update(scores=res.scores, aggregate=agg, feasible=feasible, fidelity=1.0, **_flat_scores(res.scores))
            if getattr(self, "n_dev_items", None):
                payload["items"] = self.n_dev_items
            if progress is not None:
                payload.update(rungs=progress.rung, writes=progress.writes)
            record(t, payload)
            study.tell(t, value)
            self.busy_s += sum(res.timings.values())
        else:
            payload.update(reason=res.reason, scores=res.scores or None)
            if progress is not None:
                payload.update(items=progress.items, fidelity=progress.share)
            record(t, payload)
            study.tell(t, state=TrialState.FAIL)
        return payload

    def _refresh_report(self, force: bool = False) -> None:
        """Rewrite results/<run>/report.html every ``report_every_s`` seconds or
        ``report_every_trials`` finished trials, so an overnight run can be watched."""
        T = getattr(self, "_tally", None)
        now = time.monotonic()
        n = T["complete"] + T["pruned"] if T is not None else 0
        last = getattr(self, "_last_html", None)
        if not force and last is not None and now - last[0] < self.opts.report_every_s \
                and n - last[1] < self.opts.report_every_trials:
            return
        if last is None and not force:
            self._last_html = (now, n)
            return
        from mergesearch.runs.report import refresh
        args = (self.opts.run, self.opts.storage, self.opts.root)
        running = getattr(self, "_html_thread", None)
        if force:
            if running is not None:
                running.join()
            refresh(*args)
        elif running is None or not running.is_alive():
            # on a thread: building the report takes seconds, and the loop must keep
            # collecting results and handing out trials meanwhile
            self._html_thread = threading.Thread(target=refresh, args=args, name="report", daemon=True)
            self._html_thread.start()
        else:
            return  # the last one is still being written
        self._last_html = (time.monotonic(), n)

    def _count_finished(self) -> float:
        """Trial-equivalents spent: a pruned trial costs the share of the dev items it scored
        (kept in memory during a loop)."""
        if getattr(self, "_tally", None) is not None:
            return self._tally["spent"]
        return sum(t.user_attrs.get("cost", 1.0) if t.state == TrialState.PRUNED else 1.0
                   for t in self.study.get_trials(deepcopy=False,
                                                  states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED))
                   if counts_toward_budget(t))

    # -- counts kept in memory: one scan when a loop starts, then each result adds itself
    def _tally_reset(self) -> None:
        self._tally = {"complete": 0, "failed": 0, "pruned": 0, "items": 0, "spent": 0.0, "best": None}
        for t in self.study.get_trials(deepcopy=False):
            self._tally_add(t.state, t.user_attrs, t.number, counts_toward_budget(t), t.user_attrs.get("summary"))

    def _tally_add(self, state, attrs: dict, number: int, counted: bool = True, summary: str | None = None) -> None:
        T = self._tally
        key = {TrialState.COMPLETE: "complete", TrialState.FAIL: "failed", TrialState.PRUNED: "pruned"}.get(state)
        if key is None:
            return
        T[key] += 1
        T["items"] += attrs.get("items") or 0
        if counted:
            T["spent"] += attrs.get("cost", 1.0) if state == TrialState.PRUNED else 1.0
        if state == TrialState.COMPLETE:
            rank = (attrs.get("feasible", True), attrs.get("aggregate", -1))
            if T["best"] is None or rank > T["best"][0]:
                T["best"] = (rank, number, summary if summary is not None else "")

    def _report(self, final: bool = False) -> None:
        T = getattr(self, "_tally", None)
        if T is None:
            self._tally_reset()
            T = self._tally
        elapsed = time.monotonic() - self.t_start
        n = T["complete"] + T["failed"] + T["pruned"]
        spent = T["spent"]
        eta = (elapsed / spent * (self.n_trials - spent)) if spent and not final else 0.0
        fid = ""
        if self.fid is not None:
            fid = f"  {T['pruned']} pruned  {T['items']} items ({T['items'] / self.fid.total:.1f} trial-equivalents)"
        best = T["best"]
        best_txt = f"best {best[0][1]:.4f} (trial {best[1]}: {best[2][:80]})" if best else "best -"
        if self.opts.progress and not final:  # a live line on a terminal, log lines otherwise
            if getattr(self, "_live", None) is None:
                from rich.console import Console
                from rich.live import Live
                self._live = Live(console=Console(stderr=True), refresh_per_second=4, transient=True)
                self._live.start()
            from rich.text import Text
            self._live.update(Text(f"{n} trials ({spent:.1f}/{self.n_trials:g})  {T['failed']} failed{fid}  {best_txt}  "
                                   f"elapsed {elapsed:.0f}s  eta {eta:.0f}s"))
            return
        if getattr(self, "_live", None) is not None:
            self._live.stop()
            self._live = None
        log.info("%s %d trials (%.1f/%g), %d failed%s, %s, elapsed %.0fs%s", "done:" if final else "search:", n,
                 spent, self.n_trials, T["failed"], fid.replace("  ", ", "), best_txt, elapsed,
                 "" if final else f", eta {eta:.0f}s")

    def _summary(self) -> dict:
        from mergesearch.runs.store import all_trials
        trials = [t for kind, t in all_trials(self.study, self.storage) if kind != "baseline"]
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        elapsed = time.monotonic() - self.t_start
        return {"run": self.opts.run, "trials": len(trials), "complete": len(done),
                "failed": sum(t.state == TrialState.FAIL for t in trials),
                "pruned": sum(t.state == TrialState.PRUNED for t in trials),
                "items": sum(t.user_attrs.get("items", 0) for t in trials if t.state != TrialState.RUNNING),
                "elapsed_s": elapsed,
                "worker_busy_s": self.busy_s, "interrupted": self.interrupted,
                "replaced_workers": self.pool.replaced}


def _set_metric_names(study, space) -> None:
    import warnings

    from mergesearch.runs.report import metric_names
    with warnings.catch_warnings():  # experimental in Optuna
        warnings.simplefilter("ignore")
        study.set_metric_names(metric_names(space))


def _flat_scores(scores: dict | None) -> dict:
    """Per-task dev scores as attributes of their own (``dev:<task>``), which optuna-dashboard
    can show and sort as columns."""
    return {f"dev:{t}": v for t, v in (scores or {}).items()}


def _spec(name):
    from mergesearch.methods import REGISTRY
    return REGISTRY[name]


def _gb(n: int) -> str:
    from mergesearch.engine.plan import fmt_bytes
    return fmt_bytes(n)


def _yaml(data) -> str:
    import yaml
    return yaml.safe_dump(data, sort_keys=False)
