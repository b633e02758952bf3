"""Everything a search checks and decides before its first trial, kept in one typed
:class:`Setup`: the inputs are compatible, the tasks exist and can be trained on, the
schedule's stages nest, the budget leaves room for a search after the baselines and
the refinement reserve, and the placement fits (refused here, before Ray starts);
then the study is opened (created, or resumed after its checks).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna

from mergesearch.errors import MergeSearchError
from mergesearch.recipe import Recipe, from_dict
from mergesearch.search.space import SearchSpace
from mergesearch.search.variables import Group, group_index, layer_prefix

log = logging.getLogger("mergesearch.search")


@dataclass
class Setup:
    """What the preflight found and decided."""

    directions: dict | None  # which metric each task's score is, and how it is maximized
    num_layers: int
    tensor_names: list[str]
    stages: list[tuple[list[Group], float]]  # each schedule stage's groups and budget share
    fid: object | None  # the fidelity plan (mergesearch.search.fidelity), or None
    n_dev_items: int | None
    n_trials: float  # the budget in trial-equivalents
    refine_reserve: int  # trial-equivalents kept for the refine stage
    seed_recipe: Recipe | None  # the soup named by seed_from
    n_baselines: int
    placement: object | None = None
    side: dict | None = None  # resolved metric and Gram files
    seed_baseline: bool = False  # the seed soup runs beside the baselines (the space cannot express it)
    # the refinement's memory plan (mergesearch.search.refine_memory): the sizes it runs with
    refine_memory: object | None = None


def preflight(space: SearchSpace, opts, space_path: str, claim) -> Setup:
    """Every check before anything is created; ``claim`` takes the run's name and lock
    once the plan is known to fit (before the side inputs are computed)."""
    from mergesearch.engine.compat import check_compatible
    from mergesearch.engine.adapter import open_model
    from mergesearch.evaluate import build_evaluator

    base = open_model(space.base)
    check_compatible(base, [open_model(m, base) for m in space.models])
    # task files, task names, metrics and item splits are valid (monitor tasks with floors included)
    ev = build_evaluator(space.scoring())
    if space.monitor is not None and not space.monitor.floors:  # scored at export only: valid now
        from mergesearch.evaluate.monitor import monitor_config
        build_evaluator(monitor_config(space.evaluator, space.monitor, "test"))
    names = base.names()
    prefix = layer_prefix(names)
    stages = [(space.groups(base.num_layers, prefix, g), share) for g, share in space.stages(space_path)]
    if base.num_layers < 2 and any(g.level == "depth" for g, _ in space.stages(space_path)):
        raise MergeSearchError(f"{space_path}: granularity: depth: {space.base} has {base.num_layers} transformer "
                               "layer(s); a depth schedule needs at least 2 (use level: model)")
    _check_nesting(space, stages, space_path)
    fid = None
    n_dev_items = sum(len(v) for v in ev.items.values()) if hasattr(ev, "items") else None
    if space.fidelity is not None:
        from mergesearch.search.fidelity import plan_for
        fid = plan_for(space, {t: len(v) for t, v in ev.items.items()})
    n_trials = opts.n_trials or space.budget.n_trials
    if space.budget.items is not None and not opts.n_trials:
        if not n_dev_items:
            raise MergeSearchError(f"{space_path}: budget.items: the '{space.evaluator.evaluator}' "
                                   "evaluator does not count its items; give budget.n_trials")
        n_trials = space.budget.items / n_dev_items  # in trial-equivalents
    if space.refine is not None:  # a task the refinement cannot train on: one line, before any work
        from mergesearch.search.refine_data import untrainable
        skip = untrainable(ev.output_types(), space.refine.model_dump())
        if len(skip) == len(ev.tasks):
            raise MergeSearchError(f"{space_path}: refine: no task to train on: "
                                   + "; ".join(f"task '{t}': {w}" for t, w in skip.items()))
        for t, why in skip.items():
            log.warning("refine: task '%s' is scored but not trained on: %s", t, why)
    s = Setup(directions=getattr(ev, "directions", None), num_layers=base.num_layers, tensor_names=names,
              stages=stages, fid=fid, n_dev_items=n_dev_items, n_trials=n_trials,
              refine_reserve=_refine_reserve(space, ev),
              seed_recipe=_seed_recipe(space, opts, space_path) if space.seed_from else None,
              n_baselines=n_baselines(space))
    check_budget(space, s, s.n_baselines, space_path)
    s.placement = plan(space, opts, None, quiet=True)  # refuse a budget that cannot fit before anything is created
    s.refine_memory = plan_refinement(space, s, opts, ev, space_path)
    claim()
    from mergesearch.search.side_inputs import resolve_side_inputs
    s.side = resolve_side_inputs(space)  # computed once (cached on disk), before any worker starts
    s.placement = plan(space, opts, s.side)
    warning = space.scale_warning()
    if warning:
        log.warning("%s: %s", space_path, warning)
    for hint in space.lever_hints():
        log.info("hint: %s", hint)
    return s


def n_baselines(space: SearchSpace) -> int:
    """The baselines this run scores before the search (the budget counts them)."""
    from mergesearch.search.phases.baselines import baseline_recipes
    n = len(baseline_recipes(space)) if space.initial_trials else 0
    return n + (len(space.models) if space.objective.normalize == "sources" else 0)


def check_budget(space: SearchSpace, s: Setup, n_base: int, space_path: str) -> float:
    """The trials left for the search once ``n_base`` baselines and the refine reserve
    are counted (every evaluation counts); refused when none is left."""
    n_trials = s.n_trials
    total = n_trials - s.refine_reserve - n_base
    if total < 1:
        raise MergeSearchError(
            f"{space_path}: budget.n_trials {n_trials:g} leaves no search trial after {n_base} baselines"
            + (f" and {s.refine_reserve} trial-equivalents kept for refining" if s.refine_reserve else "")
            + "; raise budget.n_trials" + (" or lower refine.steps" if s.refine_reserve else "")
            + " (every evaluation counts, baselines included)")
    return total


def _check_nesting(space: SearchSpace, stages, space_path: str) -> None:
    """Each schedule stage must refine the one before it: every group of a stage lies
    inside one group of the previous stage, so the previous best is a point of it."""
    for k in range(1, len(stages)):
        coarse = [asdict(g) for g in stages[k - 1][0]]
        for g in stages[k][0]:
            owners = {group_index(f, coarse) for f in g.filters + g.fallback}
            if len(owners) > 1:
                raise MergeSearchError(
                    f"{space_path}: schedule[{k}]: '{space.schedule[k]}' does not refine "
                    f"'{space.schedule[k - 1]}' (its group {g.name} spans several groups of the previous "
                    "stage); use group counts that divide each other")


def _refine_reserve(space: SearchSpace, ev, options: dict | None = None) -> int:
    """Trials of the budget kept for the refine stage: for each refined candidate, the
    most its refinement can cost (in trial-equivalents) plus its scoring; ``options``: the
    refine section as the memory plan sized it."""
    cfg = space.refine
    if cfg is None:
        return 0
    from mergesearch.search.refine_data import estimate_cost, task_counts
    per = math.ceil(estimate_cost(options or cfg.model_dump(), task_counts(ev), len(space.models)) - 1e-9) + 1
    return cfg.top * per


def plan_refinement(space: SearchSpace, s: Setup, opts, ev, space_path: str):
    """The refinement's memory beside the placement (:mod:`mergesearch.search.refine_memory`),
    where a device budget is declared or measured: kept, with gradient checkpointing, or with
    a smaller batch (the refine reserve counted again for its steps); refused in one line
    when batch 1 does not fit. When the inputs the plan keeps resident leave it too little
    room, the workers' placement gets a budget that keeps the room free (``opts.device_memory``)."""
    if space.refine is None or s.placement is None or s.placement.budget is None:
        return None
    if not hasattr(s.placement, "budget_for"):  # a sharded worker's (engine.multi_gpu): per GPU, not planned here
        log.warning("refine: the refinement's memory is not planned for a worker sharded over several GPUs")
        return None
    from mergesearch.engine.plan import fmt_bytes
    from mergesearch.search.refine_memory import input_budget
    from mergesearch.search.refine_memory import plan_refinement as plan_memory
    m = plan_memory(space, s.placement, space_path, evaluator=ev)
    log.info("%s; device budget %s", m.line(), fmt_bytes(m.budget))
    for note in m.notes:
        log.warning("refine: %s", note)
    if (m.batch_size, m.steps, m.eval_every) != (space.refine.batch_size, space.refine.steps, space.refine.eval_every):
        s.refine_reserve = _refine_reserve(space, ev, m.options(space.refine.model_dump()))
        check_budget(space, s, s.n_baselines, space_path)
    room = input_budget(m, s.placement)
    if room is not None:  # the workers' plans (and the one with side files below) keep the room free
        before = s.placement.resident
        opts.device_memory = room
        s.placement = plan(space, opts, None, quiet=True)
        if s.placement.resident != before:
            log.info("refine: inputs stay resident within %s of the %s budget, so that the refinement fits at "
                     "the end of the search (device: %s)", fmt_bytes(room), fmt_bytes(m.budget),
                     ", ".join(s.placement.resident) or "-")
    return m


def plan(space: SearchSpace, opts, side: dict | None, quiet: bool = False):
    """The workers' placement, refused here (before Ray starts) when the evaluation
    model and the scratch cannot fit; planned again once the side files are known.
    Each worker plans again on its own device."""
    import torch

    from mergesearch.engine.multi_gpu import space_placement
    from mergesearch.engine.plan import fmt_bytes
    r = space.resources
    budget = opts.device_memory
    if torch.cuda.is_available():
        device = "cuda"
    elif opts.ray_address and (r.gpus_per_worker or 0) > 0:
        if budget is None and r.device_memory is None:
            log.info("placement: planned by each worker on its GPU (declare resources.device_memory to check "
                     "it here)")
            return None
        device = "cuda"
    elif (r.gpus_per_worker or 0) >= 2 and (budget is not None or r.device_memory is not None):
        device = "cuda"  # a sharded worker (engine.multi_gpu), checked against its declared per-GPU budget
    else:
        device = "cpu"
    p = space_placement(space, device=device, budget=budget, side=side)
    if not quiet:
        log.info("placement: device %s (%s), host %s (%s)", ", ".join(p.resident) or "-",
                 fmt_bytes(p.device_bytes), ", ".join(p.host) or "-", fmt_bytes(p.host_bytes))
    return p


def _seed_recipe(space: SearchSpace, opts, space_path: str) -> Recipe:
    """The final recipe of the soup run named by ``seed_from``; its members must be
    among the space's models."""
    from mergesearch.runs.store import load_run

    name = space.seed_from
    try:
        soup, _ = load_run(name, opts.storage, opts.root)
    except MergeSearchError as e:
        raise MergeSearchError(f"{space_path}: seed_from: {e}") from None
    if soup.user_attrs.get("kind") != "soup":
        raise MergeSearchError(f"{space_path}: seed_from: run '{name}' is not a soup run")
    final = soup.user_attrs.get("final_recipe")
    if final is None:
        raise MergeSearchError(f"{space_path}: seed_from: soup run '{name}' has not finished")
    recipe = from_dict(final, f"soup run {name}")
    from mergesearch.sources import key
    ours = {key(m) for m in space.models}
    extra = [m.path for m in recipe.models if key(m.path) not in ours]
    if extra:
        raise MergeSearchError(f"{space_path}: seed_from: soup '{name}' uses models not in this space's "
                               f"models: {', '.join(extra[:3])}")
    return recipe


def open_study(space: SearchSpace, s: Setup, opts, storage, space_path: str, run_folder: Path, sampler, pruner,
               resume_checks) -> optuna.Study:
    """The run's main study: created with the space, its fingerprint and the metrics it
    reports (and the seed soup as its first trial, when the space can express it), or
    loaded for --resume after checking that the space is the same."""
    import yaml

    from mergesearch.runs.report import metric_names
    directions = ["maximize"] * (len(space.evaluator.tasks) if space.multi_objective else 1)
    if opts.resume:
        study = optuna.load_study(study_name=opts.run, storage=storage, sampler=sampler, pruner=pruner)
        if study.user_attrs.get("space_fingerprint") != space.fingerprint():
            then = study.user_attrs.get("space") or {}
            moved = [(a, b) for a, b in zip([then.get("base"), *(then.get("models") or [])],
                                            [space.base, *space.models]) if a != b]
            if moved and len(then.get("models") or []) == len(space.models):
                raise MergeSearchError(f"{space_path}: {moved[0][1]} is not the {moved[0][0]} that run '{opts.run}' "
                                       f"started with (a branch moved?); name that revision in the space to resume")
            raise MergeSearchError(f"{space_path}: the space changed since run '{opts.run}' started; "
                                   "start a new run instead of --resume")
        n = resume_checks(study)
        if n:
            log.info("resume: %d trial(s) left running by the stopped controller failed and queued again", n)
        return study
    study = optuna.create_study(study_name=opts.run, storage=storage, sampler=sampler, directions=directions,
                                pruner=pruner)
    set_metric_names(study, metric_names(space))
    study.set_user_attr("space", space.model_dump(mode="json"))
    study.set_user_attr("space_fingerprint", space.fingerprint())
    study.set_user_attr("kind", "search")
    from mergesearch.sources import describe
    # each input's origin: Hub repositories with the revision asked for and the commit it resolved to
    study.set_user_attr("sources", {ref: describe(ref) for ref in [space.base, *space.models]})
    if s.directions:  # which metric each task's score is, and how it is maximized
        study.set_user_attr("metrics", s.directions)
    if s.seed_recipe is not None:
        params = space.soup_params([m.path for m in s.seed_recipe.models], s.stages[0][0])
        if params is not None:  # the sampler sees it as one of its own trials
            study.enqueue_trial(params, user_attrs={"role": f"soup {space.seed_from}"})
            log.info("seed: the soup of run '%s' is the first trial", space.seed_from)
        else:  # not expressible in this space: run it beside the baselines
            s.seed_baseline = True
    if run_folder.exists():
        (run_folder / "space.yaml").write_text(yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False))
    return study


def set_metric_names(study: optuna.Study, names: list[str]) -> None:
    import warnings
    with warnings.catch_warnings():  # experimental in Optuna
        warnings.simplefilter("ignore")
        study.set_metric_names(names)
