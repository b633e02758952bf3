"""Search spaces: which merges a search may propose, and how a trial becomes a Recipe.

A space names the inputs (base, models), the evaluator, one or several methods
(several make the method itself a search variable), bounds for each parameter,
the granularity of the coefficients (whole model, N layer groups, or per layer,
with embeddings, lm_head and the final norm as groups of their own, and optional
attention/MLP module filters), the objective, the sampler, the budget and a seed.

Only this module and ``search/`` know Optuna: ``suggest(trial)`` turns a trial's
suggestions into a :class:`~mergesearch.recipe.Recipe`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from mergesearch.errors import MergeSearchError
from mergesearch.evaluate.base import EvalConfig
from mergesearch.methods import REGISTRY, get_method
from mergesearch.config import StrictModel
from mergesearch.recipe import from_dict


class Bounds(StrictModel):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"bounds reversed: low {self.low} > high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError("log bounds need low > 0")
        return self


class Granularity(StrictModel):
    level: Literal["model", "groups", "layer"] = "model"
    n_groups: int = Field(default=1, ge=1)
    special: bool = True  # embed_tokens, lm_head and the final norm as groups of their own
    modules: list[Literal["attn", "mlp"]] = []


class Objective(StrictModel):
    """How per-task dev scores become the value a sampler maximizes.

    ``kind``: the weighted mean, the worst task (``min``), or a soft minimum
    (``softmin``: -T log mean exp(-s/T), between the two; T = ``temperature``).
    ``normalize: sources`` divides each task's score by the best source model's dev score
    on it (the sources are scored first, as baselines), so every task counts relative to
    its specialist. ``floors`` (per task) and ``min_task`` (every task) are minimum raw
    scores; a shortfall is subtracted from the value, and the trial is marked infeasible."""

    kind: Literal["mean", "min", "softmin"] = "mean"
    floors: dict[str, float] = {}  # per-task minimum; violations are penalized
    min_task: Optional[float] = None  # a floor for every task
    normalize: Optional[Literal["sources"]] = None
    temperature: float = Field(default=0.05, gt=0)  # softmin


class SamplerConfig(StrictModel):
    name: Literal["cmaes", "tpe", "gp", "random", "nsga2"] = "cmaes"
    population: Optional[int] = Field(default=None, ge=1)  # CMA-ES popsize, NSGA-II population_size (default: theirs)
    n_startup_trials: Optional[int] = Field(default=None, ge=0)
    # CMA-ES: where the search starts (the best baseline's coefficients, or variable ->
    # value), its initial step, restarts with a growing population, and the separable
    # (diagonal) variant for many variables
    x0: Union[Literal["best_baseline"], dict[str, float], None] = None
    sigma0: Optional[float] = Field(default=None, gt=0)
    restart: Optional[Literal["ipop", "bipop"]] = None
    separable: bool = False


class Budget(StrictModel):
    n_trials: int = Field(default=50, ge=1)
    timeout: Optional[float] = Field(default=None, gt=0)  # seconds of wall time
    # dev items scored in all (a pruned trial costs the items it scored): the fair unit
    # between searches with and without pruning; it replaces n_trials when given
    items: Optional[int] = Field(default=None, ge=1)


class PrunerConfig(StrictModel):
    """Optuna's pruners over the rungs of a multi-fidelity search (mergesearch.search.fidelity)."""

    name: Literal["successive_halving", "hyperband", "median", "wilcoxon", "improvement", "none"] = \
        "successive_halving"
    reduction_factor: Optional[int] = Field(default=None, ge=2)  # halving, hyperband: default from the rungs
    min_early_stopping_rate: int = Field(default=0, ge=0)  # halving
    n_startup_trials: int = Field(default=5, ge=0)  # median: trials before any is pruned
    # wilcoxon: the p-value below which a trial is worse than the best (default 0.1);
    # improvement: the chance of ending above the best below which it stops (default 0.05)
    p_threshold: Optional[float] = Field(default=None, gt=0, lt=1)
    block: int = Field(default=8, ge=1)  # wilcoxon, improvement: items of one task per paired step

    @property
    def threshold(self) -> float:
        """``p_threshold``, or the pruner's default."""
        if self.p_threshold is not None:
            return self.p_threshold
        return 0.05 if self.name == "improvement" else 0.1


class Fidelity(StrictModel):
    """Score each candidate on growing shares of the dev items (``rungs``, the last 1.0)
    and let ``pruner`` stop the weak ones after any rung."""

    rungs: list[float]
    pruner: PrunerConfig = PrunerConfig()
    seed: int = 0  # of the stratified item order

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_name(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _rungs(self):
        r = self.rungs
        if not r:
            raise ValueError("rungs: give at least one share of the dev items, ending at 1.0")
        bad = [x for x in r if not 0 < x <= 1]
        if bad:
            raise ValueError(f"rungs: {bad[0]} is not a share of the dev items in (0, 1]")
        if any(b <= a for a, b in zip(r, r[1:])):
            raise ValueError(f"rungs: {r} must increase strictly")
        if r[-1] != 1.0:
            raise ValueError(f"rungs: {r} must end at 1.0 (the full dev set)")
        return self


DataList = Union[str, list[str]]


class Resources(StrictModel):
    """Where a worker's inputs live and what it may use (see mergesearch.engine.plan)."""

    device_memory: Optional[Union[str, int]] = None  # e.g. 80GB; default: the device's free memory
    eval_memory: Optional[Union[str, int]] = None  # activations of the evaluation; default 20% of the model
    gpus_per_worker: Optional[float] = Field(default=None, ge=0)  # a fraction shares a GPU; default: chosen
    stream: Literal["auto", "view", "copy"] = "auto"  # host inputs: read in place (CPU) or staged copies
    setup_timeout: float = Field(default=1800.0, gt=0)  # seconds for a worker to load before it counts as hung

    @model_validator(mode="after")
    def _whole_or_fraction(self):
        g = self.gpus_per_worker
        if g is not None and g > 1 and g != int(g):
            raise ValueError(f"gpus_per_worker {g}: use a fraction below 1 or a whole number of GPUs")
        return self


class CurvatureConfig(StrictModel):
    """Where each model's diagonal metric comes from (fisher, preconditioned,
    gradient_matching). Estimates are computed once and cached (mergesearch curvature)."""

    kind: Literal["fisher", "empirical_fisher", "squared_grad", "adam", "files"] = "fisher"
    data: Optional[DataList] = None  # TASK:SPLIT or .jsonl: one for all models, or one per model
    files: Optional[list[Optional[str]]] = None  # kind files: one per model
    identity: list[str] = []  # models trained without a preconditioner (SGD): metric = identity
    n_examples: int = Field(default=128, ge=1)
    batch_size: int = Field(default=16, ge=1)
    seed: int = 0
    base_data: Optional[DataList] = None  # the base's curvature (gradient_matching): mean over these
    base_file: Optional[str] = None


class GramConfig(StrictModel):
    """Gram matrices of linear-layer inputs for regmean, per model on its own data."""

    data: DataList
    n_examples: int = Field(default=128, ge=1)
    batch_size: int = Field(default=16, ge=1)


class RefineConfig(StrictModel):
    """Gradient refinement of the best candidates (mergesearch.search.refine): per-group
    multipliers of each model's weight and of lambda, learned by Adam on the dev items
    with the candidate's pruning fixed. Task-vector methods, on lm-eval tasks of every output type."""

    top: int = Field(default=1, ge=1)  # how many of the best candidates are refined
    # coefficient groups of the refinement; "tensor": every tensor its own group
    level: Literal["groups", "layer", "tensor"] = "layer"
    n_groups: int = Field(default=2, ge=1)  # for level groups
    modules: Optional[list[Literal["attn", "mlp"]]] = None  # split groups by module; default: the space's
    steps: int = Field(default=30, ge=1)
    lr: float = Field(default=0.05, gt=0)
    batch_size: int = Field(default=16, ge=1)  # items per step
    loss: Literal["choice", "loglik", "entropy", "distill"] = "choice"
    distill_mix: float = Field(default=1.0, ge=0, le=1)  # distill: the teacher's share of the loss
    # distill: how each task's teacher is chosen among the source models (confidence needs no label)
    teachers: Literal["confidence", "accuracy"] = "confidence"
    holdout: float = Field(default=0.25, gt=0, lt=1)  # share of the dev items never trained on
    eval_every: int = Field(default=5, ge=1)  # steps between held-out checks
    patience: int = Field(default=3, ge=1)  # checks without improvement before stopping
    # the coefficients checked and kept are an exponential moving average of Adam's
    # iterates with this decay per step (0: the iterates themselves)
    average: float = Field(default=0.9, ge=0, lt=1)
    # also learn, for each model and each matrix, one multiplier per output row (the
    # recipe then carries row_scales files; mergekit's YAML cannot express them)
    rows: bool = False
    row_lr: float = Field(default=0.05, gt=0)  # Adam's step for the row multipliers


class MonitorConfig(StrictModel):
    """Tasks that show what a merge forgets outside its objective: scored on the winner and
    the sources at export (on test items), shown in the model card, the export's table and
    the report, never optimized. A floor on one of them marks a candidate below it
    infeasible; such a task is then scored on every candidate's dev items too (it appears
    in the leaderboard), still outside the objective and outside refinement."""

    tasks: list[Union[str, dict]] = Field(min_length=1)  # names, or {dev, test, name} pairs
    metrics: dict[str, str] = {}  # task -> "metric,filter", as for the evaluator
    floors: dict[str, float] = {}  # task -> the least score a feasible candidate keeps


def monitor_config(evaluator: EvalConfig, monitor: MonitorConfig, split: str | None = None) -> EvalConfig:
    """The evaluator settings (task folder, item splits, few-shot, ...) for the monitor tasks."""
    data = evaluator.model_dump(exclude={"tasks", "pairs", "metrics", "weights", "monitor"})
    return EvalConfig.model_validate({**data, "tasks": monitor.tasks, "metrics": monitor.metrics,
                                      **({"split": split} if split else {})})


def scoring_config(evaluator: EvalConfig, monitor: MonitorConfig | None) -> EvalConfig:
    """What every candidate is scored on: the objective's tasks and the monitor tasks that
    carry a floor (marked ``monitor``: outside the aggregate and refinement)."""
    if monitor is None or not monitor.floors:
        return evaluator
    mon = monitor_config(evaluator, monitor)
    floored = [t for t in mon.tasks if t in monitor.floors]
    return evaluator.model_copy(update={
        "tasks": list(evaluator.tasks) + floored,
        "pairs": {**evaluator.pairs, **{t: p for t, p in mon.pairs.items() if t in floored}},
        "metrics": {**evaluator.metrics, **{t: m for t, m in mon.metrics.items() if t in floored}},
        "monitor": floored})


class SearchSpace(StrictModel):
    base: str
    models: list[str] = Field(min_length=1)
    evaluator: EvalConfig
    methods: list[str] = Field(default=["task_arithmetic"], min_length=1)
    parameters: dict[str, Union[Bounds, float, bool]] = {}
    granularity: Granularity = Granularity()
    objective: Objective = Objective()
    sampler: SamplerConfig = SamplerConfig()
    budget: Budget = Budget()
    seed: int = 0
    initial_trials: bool = True
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    trial_timeout: float = Field(default=600.0, gt=0)  # seconds per candidate on a worker
    max_retries: int = Field(default=1, ge=0)  # re-runs of a trial whose worker died
    seed_from: Optional[str] = None  # a soup run whose recipe is enqueued first
    curvature: Optional[CurvatureConfig] = None
    gram: Optional[GramConfig] = None
    resources: Resources = Resources()
    # search a global scale (lambda) for every method that has one: true = bounds [0.5, 2.0]
    scale: Union[bool, Bounds] = False
    # coarse to fine: stages of granularity, each starting from the previous stage's best,
    # with the trial budget split between them (equal shares, or "layer@0.5")
    schedule: Optional[list[str]] = None
    refine: Optional[RefineConfig] = None
    fidelity: Optional[Fidelity] = None
    monitor: Optional[MonitorConfig] = None

    def scoring(self) -> EvalConfig:
        """The dev evaluation every candidate gets (see :func:`scoring_config`)."""
        return scoring_config(self.evaluator, self.monitor)

    @model_validator(mode="after")
    def _add_scale(self):
        if self.scale is not False and "lambda" not in self.parameters:
            if any(REGISTRY[m].param("lambda") is not None for m in self.methods if m in REGISTRY):
                bounds = self.scale if isinstance(self.scale, Bounds) else Bounds(low=0.5, high=2.0)
                self.parameters = {**self.parameters, "lambda": bounds}
        return self

    def scale_warning(self) -> str | None:
        """Why this space cannot scale the merged task vector, when it cannot: a method that
        normalizes its weights with lambda fixed at 1 can only average task vectors, and good
        merges of gentle fine-tunes often need more (lambda > 1)."""
        lam = self.parameters.get("lambda", 1.0)
        if isinstance(lam, Bounds) or lam != 1.0:
            return None
        stuck = [m for m in self.methods if m in REGISTRY and REGISTRY[m].param("lambda") is not None
                 and self.parameters.get("normalize", REGISTRY[m].param("normalize").default) is True]
        if not stuck:
            return None
        return (f"{', '.join(stuck)} normalize{'s' if len(stuck) == 1 else ''} the weights and lambda is fixed at 1, "
                "so no candidate can scale the merged task vector; add 'scale: true' (or bounds for "
                "parameters.lambda) to search it")

    def lever_hints(self) -> list[str]:
        """Short hints for the levers this space leaves out that the search-quality
        benchmark found to matter (docs/BENCHMARKS.md, "Search quality"); lambda has its
        own warning (:meth:`scale_warning`)."""
        from mergesearch.methods.task_arithmetic import TASK_VECTOR_METHODS
        hints = []
        sc = self.sampler
        if sc.name == "cmaes" and sc.x0 is None and len(self.methods) == 1:
            hints.append("sampler.x0: best_baseline starts CMA-ES from the best baseline instead of the centre "
                         "of the bounds")
        refinable = (self.evaluator.evaluator != "python" and not self.multi_objective
                     and all(m in TASK_VECTOR_METHODS for m in self.methods))
        if refinable and self.refine is None:
            hints.append("refine: {level: tensor, rows: true, loss: distill} refines the best candidate by gradient "
                         "descent on the dev items: a coefficient per model and tensor, and per output row")
        elif refinable and not self.refine.rows:
            hints.append("refine.rows: true also learns a weight per model and output row of every matrix (the "
                         "recipe then needs row_scales files and has no mergekit YAML)")
        return hints

    # -- loading and checks -----------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "SearchSpace":
        from mergesearch.config import load_validated
        path = Path(path)
        return load_validated(cls, path).resolved(path.parent).check(str(path))

    def resolved(self, folder: Path) -> "SearchSpace":
        fix = (lambda p: p if os.path.isabs(p) else str((folder / p).resolve()))
        ev = self.evaluator
        if ev.task_dir:
            ev = ev.model_copy(update={"task_dir": fix(ev.task_dir)})
        def fix_data(d):  # .jsonl paths are relative to the space file; TASK:SPLIT stays
            one = (lambda x: fix(x) if x.endswith(".jsonl") else x)
            return None if d is None else one(d) if isinstance(d, str) else [one(x) for x in d]

        update = {"base": fix(self.base), "models": [fix(m) for m in self.models], "evaluator": ev}
        if self.curvature is not None:
            c = self.curvature
            update["curvature"] = c.model_copy(update={
                "data": fix_data(c.data), "base_data": fix_data(c.base_data),
                "files": None if c.files is None else [None if f is None else fix(f) for f in c.files],
                "base_file": None if c.base_file is None else fix(c.base_file),
                "identity": [fix(m) for m in c.identity]})
        if self.gram is not None:
            update["gram"] = self.gram.model_copy(update={"data": fix_data(self.gram.data)})
        return self.model_copy(update=update)

    def check(self, where: str) -> "SearchSpace":
        specs = [get_method(m, where) for m in self.methods]
        for name, value in self.parameters.items():
            owners = [s for s in specs if s.param(name) is not None]
            if not owners:
                raise MergeSearchError(f"{where}: parameters.{name}: not a parameter of "
                                       f"{' or '.join(self.methods)}")
            p = owners[0].param(name)
            if isinstance(value, Bounds):
                if p.kind is bool:
                    raise MergeSearchError(f"{where}: parameters.{name}: a boolean parameter takes true or false")
                for v in (value.low, value.high):
                    p.check(v, f"{where}: parameters.{name}")
            else:
                p.check(value, f"{where}: parameters.{name}")
        for s in specs:
            n = len(self.models)
            if n < s.min_models or (s.max_models is not None and n > s.max_models):
                raise MergeSearchError(f"{where}: method '{s.name}' cannot merge {n} models")
            for p in s.params:
                if p.required and p.name not in self.parameters:
                    raise MergeSearchError(f"{where}: method '{s.name}' needs bounds or a value for parameters.{p.name}")
        self._check_side(specs, where)
        from mergesearch.engine.plan import parse_size
        for key in ("device_memory", "eval_memory"):
            value = getattr(self.resources, key)
            if value is not None:
                parse_size(value, f"{where}: resources.{key}")
        if self.seed_from is not None and not self.seed_from.strip():
            raise MergeSearchError(f"{where}: seed_from: give the name of a soup run")
        self.evaluator.check(f"{where}: evaluator")
        if self.monitor is not None:
            mon = monitor_config(self.evaluator, self.monitor).check(f"{where}: monitor")
            both = sorted(set(mon.tasks) & set(self.evaluator.tasks))
            if both:
                raise MergeSearchError(f"{where}: monitor: task '{both[0]}' is also an objective task (a monitor task "
                                       "is never optimized)")
            unknown = sorted(set(self.monitor.floors) - set(mon.tasks))
            if unknown:
                raise MergeSearchError(f"{where}: monitor.floors names tasks not in monitor.tasks: {', '.join(unknown)}")
            if self.monitor.floors and self.multi_objective:
                raise MergeSearchError(f"{where}: monitor.floors do not apply to the multi-objective nsga2 sampler")
        unknown = sorted(set(self.objective.floors) - set(self.evaluator.tasks))
        if unknown:
            raise MergeSearchError(f"{where}: objective.floors names unknown tasks: {', '.join(unknown)}")
        sc = self.sampler
        if (sc.x0 is not None or sc.sigma0 is not None or sc.restart or sc.separable) and sc.name != "cmaes":
            raise MergeSearchError(f"{where}: sampler: x0, sigma0, restart and separable apply to cmaes only")
        if sc.name == "cmaes" and not sc.separable and sc.population is not None and sc.population < 4 \
                and len(self.methods) == 1:
            raise MergeSearchError(f"{where}: sampler.population: CMA-ES needs at least 4 (with {sc.population} its "
                                   f"learning rates divide by zero); use 4 or more, or separable: true")
        if sc.x0 == "best_baseline" and len(self.methods) > 1:
            raise MergeSearchError(f"{where}: sampler.x0: best_baseline needs a single method (mixed spaces run TPE)")
        if self.fidelity is not None:
            if self.multi_objective:
                raise MergeSearchError(f"{where}: fidelity: pruning needs a single objective (Optuna cannot prune "
                                       f"multi-objective trials); drop fidelity or use a single-objective sampler")
            if self.evaluator.evaluator == "python":
                raise MergeSearchError(f"{where}: fidelity: the python evaluator cannot score item subsets; "
                                       "use lm-eval tasks (evaluator: lmeval)")
        if self.sampler.name == "nsga2" and (self.objective.floors or self.objective.min_task is not None):
            raise MergeSearchError(f"{where}: objective floors do not apply to the multi-objective nsga2 sampler")
        if self.refine is not None:
            from mergesearch.methods.task_arithmetic import TASK_VECTOR_METHODS
            other = [m for m in self.methods if m not in TASK_VECTOR_METHODS]
            if other:
                raise MergeSearchError(f"{where}: refine: method {', '.join(other)} is not in the task-vector family "
                                       "(task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, della, ...)")
            if self.evaluator.evaluator == "python":
                raise MergeSearchError(f"{where}: refine: the python evaluator has no items to train on; use lm-eval "
                                       "tasks (evaluator: lmeval)")
            if self.multi_objective:
                raise MergeSearchError(f"{where}: refine: not for the multi-objective nsga2 sampler")
        if self.schedule is not None:
            self.stages(where)
        return self

    def stages(self, where: str = "space") -> list[tuple[Granularity, float]]:
        """The schedule's stages: (granularity, share of the trial budget); one stage, the
        space's own granularity, without a schedule."""
        if self.schedule is None:
            return [(self.granularity, 1.0)]
        if not self.schedule:
            raise MergeSearchError(f"{where}: schedule: give at least one stage (model, groups:N or layer)")
        if self.sampler.name not in ("cmaes", "tpe", "random"):
            raise MergeSearchError(f"{where}: schedule: needs the cmaes, tpe or random sampler "
                                   f"(not {self.sampler.name})")
        out, shares = [], []
        for k, text in enumerate(self.schedule):
            spec, _, share = str(text).partition("@")
            level, _, n = spec.strip().partition(":")
            try:
                if level == "groups":
                    g = self.granularity.model_copy(update={"level": "groups", "n_groups": int(n)})
                    if int(n) < 1:
                        raise ValueError
                elif level in ("model", "layer") and not n:
                    g = self.granularity.model_copy(update={"level": level})
                else:
                    raise ValueError
                shares.append(float(share) if share else None)
            except ValueError:
                raise MergeSearchError(f"{where}: schedule[{k}]: '{text}' is not model, groups:N or layer "
                                       "(optionally @share, e.g. layer@0.5)") from None
            out.append(g)
        given = sum(v for v in shares if v is not None)
        if any(v is not None and not 0 < v < 1 for v in shares) or given >= 1 and None in shares or given > 1 + 1e-9:
            raise MergeSearchError(f"{where}: schedule: shares must lie in (0, 1) and add up to at most 1")
        rest = [k for k, v in enumerate(shares) if v is None]
        fill = (1 - given) / len(rest) if rest else 0.0
        shares = [v if v is not None else fill for v in shares]
        if not rest and abs(given - 1) > 1e-9:
            shares = [v / given for v in shares]
        return list(zip(out, shares))

    def _check_side(self, specs, where: str) -> None:
        n = len(self.models)
        for s in specs:
            if s.needs_metric == "required" and self.curvature is None:
                raise MergeSearchError(f"{where}: method '{s.name}' needs a 'curvature' section (where each "
                                       "model's metric comes from)")
            if s.needs_gram and self.gram is None:
                raise MergeSearchError(f"{where}: method '{s.name}' needs a 'gram' section (data for each model's "
                                       "Gram matrices)")
        c = self.curvature
        if c is not None:
            if c.kind == "files":
                if c.files is None or len(c.files) != n:
                    raise MergeSearchError(f"{where}: curvature.files: give one file per model ({n})")
            elif c.kind != "adam" and c.data is None:
                raise MergeSearchError(f"{where}: curvature.data: kind '{c.kind}' needs data (TASK:SPLIT or .jsonl)")
            if isinstance(c.data, list) and len(c.data) != n:
                raise MergeSearchError(f"{where}: curvature.data: give one entry per model ({n}) or a single one")
            keys = {str(Path(m).resolve()) for m in self.models}
            stray = [m for m in c.identity if str(Path(m).resolve()) not in keys]
            if stray:
                raise MergeSearchError(f"{where}: curvature.identity: {stray[0]} is not one of the models")
            if c.identity and any(s.needs_metric == "required" for s in specs):
                raise MergeSearchError(f"{where}: curvature.identity applies to 'preconditioned' only; "
                                       f"{', '.join(s.name for s in specs if s.needs_metric == 'required')} "
                                       "needs a real metric for every model")
        if self.gram is not None and isinstance(self.gram.data, list) and len(self.gram.data) != n:
            raise MergeSearchError(f"{where}: gram.data: give one entry per model ({n}) or a single one")

    def fingerprint(self) -> str:
        """Identity of the space for --resume (the budget and resources may change between runs)."""
        data = self.model_dump(mode="json", exclude={"budget", "resources"})
        if data.get("scale") is False:  # absent before it existed: runs started then still resume
            data.pop("scale")
        for key in ("fidelity", "monitor"):  # likewise
            if data.get(key) is None:
                data.pop(key, None)
        ev = data["evaluator"]
        for key in ("pairs", "monitor"):  # likewise
            if not ev.get(key):
                ev.pop(key, None)
        if "evaluator" not in self.evaluator.model_fields_set:  # the default was loglik then (the same engine now)
            ev["evaluator"] = "loglik"
        pruner = (data.get("fidelity") or {}).get("pruner")
        if pruner is not None and pruner.get("p_threshold") is None:
            # the pruner's own default (a fixed 0.1 before the improvement pruner came)
            pruner["p_threshold"] = self.fidelity.pruner.threshold
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    # -- variables -----------------------------------------------------------------
    @property
    def multi_objective(self) -> bool:
        return self.sampler.name == "nsga2"

    def groups(self, num_layers: int, layer_prefix: str, granularity: Granularity | None = None) -> list["Group"]:
        return make_groups(granularity or self.granularity, num_layers, layer_prefix)

    def suggest(self, trial, groups: list["Group"], side: dict | None = None):
        """Ask the trial for every variable; returns the Recipe. ``side`` holds the
        resolved metric and Gram files (:func:`mergesearch.search.side_inputs.resolve_side_inputs`)."""
        method = self.methods[0] if len(self.methods) == 1 else trial.suggest_categorical("method", self.methods)
        spec = REGISTRY[method]
        models = []
        for i, path in enumerate(self.models):
            params = {}
            for p in spec.model_params:
                if p.name in self.parameters:
                    params[p.name] = self._value(trial, p.name, f"m{i}", groups)
            entry = {"path": path, "parameters": params}
            if side and spec.needs_metric != "no" and side["metrics"].get(path):
                entry["metric"] = side["metrics"][path]
            if side and spec.needs_gram:
                entry["gram"] = side["grams"][path]
            models.append(entry)
        global_params = {}
        for p in spec.global_params:
            if p.name in self.parameters:
                global_params[p.name] = self._value(trial, p.name, "", [groups[0].as_whole()])
        recipe = {"method": method, "base": self.base, "models": models, "parameters": global_params,
                  "seed": self.seed}
        if side and spec.name == "gradient_matching" and side.get("base_metric"):
            recipe["base_metric"] = side["base_metric"]
        if self.dtype:
            recipe["dtype"] = self.dtype
        return from_dict(recipe, "search trial")

    def soup_params(self, members: list[str], groups: list["Group"]) -> dict | None:
        """The trial parameters under which this space proposes the uniform soup of
        ``members`` (a subset of its models), or None when it cannot express it.

        A uniform soup puts weight 1/k on each of its k members. ``linear`` reaches it
        with equal weights and ``normalize`` (or weights 1/k without); task
        arithmetic with lambda * weight = 1/k (or equal weights, lambda 1 and
        ``normalize``), since base + sum (theta_i - base) / k = sum theta_i / k.
        Non-members need weight 0 in the bounds. Sparsifying methods are not exact.
        """
        keys = [str(Path(m).resolve()) for m in self.models]
        try:
            idx = {keys.index(str(Path(m).resolve())) for m in members}
        except ValueError:
            return None
        k = len(idx)
        for method in self.methods:
            if method not in ("linear", "task_arithmetic"):
                continue
            spec = REGISTRY[method]
            normalize = self.parameters.get("normalize", spec.param("normalize").default)
            weight = self.parameters.get("weight", 1.0)
            lam = self.parameters.get("lambda", 1.0) if method == "task_arithmetic" else 1.0
            fits = (lambda b, v: (b.low <= v <= b.high) if isinstance(b, Bounds) else abs(b - v) < 1e-12)
            choice = None
            # (lambda, member weight) pairs to try, simplest first
            lams = [1.0] + ([lam.low, lam.high] if isinstance(lam, Bounds) else [lam])
            for L in lams:
                if L <= 0 or not fits(lam, L):
                    continue
                if normalize:
                    if L != 1.0:
                        continue
                    cands = [1.0] + ([weight.high] if isinstance(weight, Bounds) else [weight])
                    w = next((v for v in cands if v > 0 and fits(weight, v)), None)
                else:
                    w = 1.0 / (k * L)
                    w = w if fits(weight, w) else None
                if w is not None:
                    choice = (L, w)
                    break
            if choice is None or (k < len(self.models) and not fits(weight, 0.0)):
                continue
            L, w = choice
            params: dict = {}
            if len(self.methods) > 1:
                params["method"] = method
            if isinstance(weight, Bounds):
                for i in range(len(self.models)):
                    for g in groups:
                        params["/".join(x for x in ("weight", f"m{i}", g.name) if x)] = w if i in idx else 0.0
            if isinstance(lam, Bounds):
                params["lambda"] = L
            return params
        return None

    def _value(self, trial, name: str, owner: str, groups: list["Group"]):
        bounds = self.parameters[name]
        if not isinstance(bounds, Bounds):
            return bounds
        values = []
        for g in groups:
            var = "/".join(x for x in (name, owner, g.name) if x)
            values.append(trial.suggest_float(var, bounds.low, bounds.high, log=bounds.log))
        if len(groups) == 1:
            return values[0]
        setting = [{"filter": f, "value": v} for g, v in zip(groups, values) for f in g.filters]
        setting += [{"filter": f, "value": v} for g, v in zip(groups, values) for f in g.fallback]
        setting.append({"value": values[groups.index(next(g for g in groups if g.default))]})
        return setting


@dataclass
class Group:
    """A set of tensors sharing one coefficient: the tensor-name filters that select it."""

    name: str
    filters: list[str]
    default: bool = False  # takes tensors no filter matches
    fallback: list[str] = field(default_factory=list)  # filters tried after every group's own

    def as_whole(self) -> "Group":
        return Group("", [], True)


def make_groups(g: Granularity, num_layers: int, prefix: str) -> list[Group]:
    if g.level == "model":
        return [Group("", [], True)]
    n = num_layers if g.level == "layer" else min(g.n_groups, num_layers)
    groups: list[Group] = []
    if g.special:
        groups += [Group("embed", ["embed_tokens"]), Group("lm_head", ["lm_head"]), Group("norm", ["model.norm."])]
    for k in range(n):
        layers = [i for i in range(num_layers) if i * n // num_layers == k]
        label = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}"
        if g.modules:
            for mod in g.modules:
                key = "self_attn" if mod == "attn" else "mlp"
                groups.append(Group(f"{label}.{mod}", [f"{prefix}{i}.{key}" for i in layers]))
            # the rest of each layer (its norms) follows the group's first module
            groups[-len(g.modules)].fallback = [f"{prefix}{i}." for i in layers]
        else:
            groups.append(Group(label, [f"{prefix}{i}." for i in layers]))
    first_layer_group = 3 if g.special else 0
    groups[first_layer_group].default = True
    return groups


def tensor_groups(names: list[str], special: bool = True) -> list[Group]:
    """One coefficient group per tensor (its full name as the filter), the finest level
    a recipe can express; embed_tokens, lm_head and the final norm first, as in
    :func:`make_groups`."""
    groups: list[Group] = []
    rest = list(names)
    if special:
        for label, key in (("embed", "embed_tokens"), ("lm_head", "lm_head"), ("norm", "model.norm.")):
            mine = [n for n in rest if key in n]
            if mine:
                groups.append(Group(label, mine))
                rest = [n for n in rest if key not in n]
    first = len(groups)
    groups += [Group(n, [n]) for n in rest]
    groups[first if first < len(groups) else 0].default = True
    return groups


def layer_prefix(names: list[str]) -> str:
    """The tensor-name prefix of the transformer blocks (``model.layers.``)."""
    from mergesearch.recipe import layer_index
    for n in names:
        i = layer_index(n)
        if i is not None:
            return n[: n.index(f".{i}.") + 1]
    return "model.layers."
