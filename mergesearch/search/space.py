"""Search spaces: which merges a search may propose, and how a trial becomes a Recipe.

A space names the inputs (base, models), the evaluator, one or several methods
(several make the method itself a search variable), bounds for each parameter,
the granularity of the coefficients (whole model, N layer groups, per layer, or a
depth schedule of two variables per parameter,
with embeddings, lm_head and the final norm as groups of their own, and optional
attention/MLP module filters), the objective, the sampler, the budget and a seed.

The sections' schemas are in :mod:`.schema`; the variables a sampler sees, and how a
trial becomes a :class:`~mergesearch.recipe.Recipe` and back, in :mod:`.variables`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from mergesearch.config import StrictModel
from mergesearch.errors import MergeSearchError
from mergesearch.evaluate.base import EvalConfig
from mergesearch.evaluate.monitor import MonitorConfig, monitor_config, scoring_config
from mergesearch.methods import REGISTRY, get_method
from mergesearch.search import variables
from mergesearch.search.schema import (  # noqa: F401  (the sections, importable with the space)
    Bounds, Budget, CurvatureConfig, Fidelity, Granularity, GramConfig, Objective, PrunerConfig, RefineConfig,
    Resources, SamplerConfig,
)
from mergesearch.search.variables import Group, make_groups


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
    # merges scored at their defaults beside the baselines, e.g. the data-free [tsv, iso_cts]:
    # with sampler.x0: best_baseline the search can start from the best of them
    baselines: list[str] = []
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
        space = load_validated(cls, path)
        try:
            space = space.resolved(path.parent)
        except MergeSearchError as e:  # a model reference: name the space file too
            raise MergeSearchError(f"{path}: {e}") from None
        return space.check(str(path))

    def resolved(self, folder: Path) -> "SearchSpace":
        fix = (lambda p: p if os.path.isabs(p) else str((folder / p).resolve()))
        ev = self.evaluator
        if ev.task_dir:
            ev = ev.model_copy(update={"task_dir": fix(ev.task_dir)})
        def fix_data(d):  # .jsonl paths are relative to the space file; TASK:SPLIT stays
            one = (lambda x: fix(x) if x.endswith(".jsonl") else x)
            return None if d is None else one(d) if isinstance(d, str) else [one(x) for x in d]

        from mergesearch.sources import pin
        base = pin(self.base, folder, where="base")
        update = {"base": base, "models": [pin(m, folder, base=base) for m in self.models], "evaluator": ev}
        if self.curvature is not None:
            c = self.curvature
            update["curvature"] = c.model_copy(update={
                "data": fix_data(c.data), "base_data": fix_data(c.base_data),
                "files": None if c.files is None else [None if f is None else fix(f) for f in c.files],
                "base_file": None if c.base_file is None else fix(c.base_file),
                "identity": [pin(m, folder, base=base) for m in c.identity]})
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
        for m in self.baselines:
            s = get_method(m, f"{where}: baselines")
            n = len(self.models)
            if s.needs_metric != "no" or s.needs_gram or any(p.required for p in s.params) or n < s.min_models \
                    or (s.max_models is not None and n > s.max_models):
                raise MergeSearchError(f"{where}: baselines: '{m}' cannot be scored at its defaults on {n} models "
                                       "(it needs side inputs, a parameter value, or another number of models)")
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
                elif level in ("model", "layer", "depth") and not n:
                    g = self.granularity.model_copy(update={"level": level})
                else:
                    raise ValueError
                shares.append(float(share) if share else None)
            except ValueError:
                raise MergeSearchError(f"{where}: schedule[{k}]: '{text}' is not model, groups:N, depth or layer "
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
            from mergesearch.sources import key
            keys = {key(m) for m in self.models}
            stray = [m for m in c.identity if key(m) not in keys]
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
        if not data.get("baselines"):  # likewise
            data.pop("baselines", None)
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

    def suggest(self, trial, groups: list[Group], side: dict | None = None):
        """Ask the trial for every variable; returns the Recipe (:func:`variables.suggest`)."""
        return variables.suggest(self, trial, groups, side)

    def soup_params(self, members: list[str], groups: list[Group]) -> dict | None:
        """The trial parameters of the uniform soup of ``members`` (:func:`variables.soup_params`)."""
        return variables.soup_params(self, members, groups)
