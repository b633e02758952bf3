"""The sections of a search space file, as pydantic schemas: bounds, granularity,
objective, sampler, budget, fidelity and its pruner, resources, curvature and Gram data,
refinement. :class:`~mergesearch.search.space.SearchSpace` assembles them and checks
them together."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from mergesearch.config import StrictModel


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
    """Where coefficients may differ: one per model, per group of layers, per layer, or a
    depth schedule (``depth``: per parameter alpha + beta * l / (L - 1) at layer l of L,
    two variables instead of L)."""

    level: Literal["model", "groups", "layer", "depth"] = "model"
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
    # refinements from the same candidate, each holding out the next share of the items (with
    # holdout 1/restarts the held-out shares tile the dev items) and drawing its own batches;
    # the refined recipe averages their kept coefficients. Each costs a refinement's steps.
    restarts: int = Field(default=1, ge=1)
    eval_every: int = Field(default=5, ge=1)  # steps between held-out checks
    patience: int = Field(default=3, ge=1)  # checks without improvement before stopping
    # the coefficients checked and kept are an exponential moving average of Adam's
    # iterates with this decay per step (0: the iterates themselves)
    average: float = Field(default=0.9, ge=0, lt=1)
    # also learn, for each model and each matrix, one multiplier per output row (the
    # recipe then carries row_scales files; mergekit's YAML cannot express them)
    rows: bool = False
    row_lr: float = Field(default=0.05, gt=0)  # Adam's step for the row multipliers
