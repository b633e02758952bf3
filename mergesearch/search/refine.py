"""Gradient refinement of a task-vector merge: a stage no black-box search has.

For the task-vector family (task arithmetic, TIES, DARE, breadcrumbs, DELLA and their
variants) the merged weights are

    base + lambda * combine_i(w_i * tau_i)

where ``tau_i`` is model i's task vector after pruning (its density selection or its
seeded random drop) and ``combine`` is a sum, or TIES' sign election and disjoint mean.
With the pruning fixed at the candidate's densities, the merge is differentiable in the
weights and lambda. :func:`refine` learns a multiplier for each model's weight in each
coefficient group (tensor, layer, or layer group; embeddings, lm_head and the final norm are
groups of their own) and one for lambda in each group, by Adam on the dev items:

- ``choice``: the log-likelihood of the correct choice among the item's choices (cross
  entropy over the choices' summed log-likelihoods), the quantity accuracy thresholds;
- ``loglik``: the log-likelihood of the correct continuation;
- ``entropy``: the entropy of the choice distribution, which needs no labels
  (AdaMerging's objective, for unlabelled inputs);
- ``distill``: the KL divergence from a teacher's choice distribution to the merge's,
  each task's teacher being one of the source models (by default the one surest of its
  answers on the task's items, which needs no labels either); ``distill_mix`` below 1
  mixes in the ``choice`` loss with the labels. The teachers score every item once before
  training (one trial per source model, counted in the cost).

With a label-free loss (``entropy``, or ``distill`` alone with teachers chosen by
confidence) the held-out checks keep the coefficients with the lowest held-out loss, so no
label is read anywhere; otherwise the best held-out accuracy, then loss.

With ``rows``, each model also gets one multiplier per output row of every matrix (on top
of its group's weight): a finer unit than a tensor, so task vectors that interfere inside a
tensor can be weighted apart row by row. The refined recipe then carries them as
``row_scales`` (held in memory until the controller writes one safetensors file per
model), which the engine applies in :func:`mergesearch.methods.kernels.combine_rows`.

Sign election is recomputed at every step from the current coefficients (it selects,
it has no gradient), so the model being trained is the merge the engine computes for
those coefficients. A share of the dev items (``holdout``) is never trained on: it is
scored every ``eval_every`` steps, and the best coefficients (as above) are kept;
``patience`` checks without improvement stop early. What is checked and kept is an
exponential moving average of Adam's iterates (``average``, the decay per step): a step
on 16-32 items moves the coefficients noisily, and the average scores higher on held-out
items than the iterate it ends on. The result is an ordinary recipe (per-group weights
and lambda), which the caller materializes with the engine and scores like any trial, so
the stored score is that of the exported weights.

Cost is counted in forward-pass equivalents: a training sequence costs 3 (forward and
backward), a held-out sequence 1; divided by the sequences one trial scores, it is the
refinement's cost in trials.

Memory: the base and each model's pruned task vector are held in float32 on the
worker's device for the duration, (models + 1) x 4 bytes per parameter; with
``hold_inputs`` False nothing is held, and each tensor's inputs are read again from the
worker's Materializer (the same selections and draws) whenever its merge is computed.
Each tensor's merge runs in a checkpoint (:func:`merged_params`): the graph keeps only
its small inputs, and the merge is computed again, one tensor at a time, in the backward,
so a step keeps the merged weights and their gradients, not the merge's float32
intermediates. The distill
teachers come first, one source model's weights at a time (in the model's dtype), before
those float32 copies exist. :mod:`.refine_memory` plans the whole (the merge's autograd
graph, the batch's activations and logits) before the search starts and may choose
``checkpointing`` (each decoder layer recomputed in the backward, with the model's own
activation checkpointing: the merged weights stay in the model until the backward is done),
``hold_inputs`` False, a smaller ``batch_size`` and a smaller ``check_batch`` (items of one task a held-out check
scores at once, 32 by default). ``planned_bytes`` is its total; on CUDA the stats record the
peak the refinement allocated beside what the device held when it started.
"""

from __future__ import annotations

import logging
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from mergesearch.errors import MergeSearchError
from mergesearch.search.refine_data import TRAIN_COST, Items, item_losses, sequence_loglik, teacher_targets, untrainable
from mergesearch.search.variables import group_index, group_setting

log = logging.getLogger(__name__)

COEF_MAX = 4.0


@dataclass
class _Term:
    name: str
    base: torch.Tensor | None  # float32; None where the inputs are read again (``read``)
    parts: list[torch.Tensor] | None  # pruned task vectors, float32 (likewise)
    weights: list[float]
    lam: float
    normalize: bool
    consensus: bool
    group: int
    dtype: torch.dtype
    shape: tuple[int, ...] = ()
    read: Callable[[], tuple[torch.Tensor, list[torch.Tensor]]] | None = None  # no holds: (base, parts) read again

    def inputs(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The float32 base and pruned task vectors: held, or read again from the worker's inputs."""
        return (self.base, self.parts) if self.read is None else self.read()


def build_terms(mat, recipe, groups: list[dict], names: list[str], dtypes: dict, device,
                hold: bool = True) -> tuple[list, dict, dict]:
    """Each tensor's fixed parts (base, pruned task vectors, weights, lambda, group) and
    each group's weight per model and lambda, read from the candidate's recipe. With
    ``hold`` False nothing is held: each term reads its inputs again from ``mat`` whenever
    its merge is computed (the same selections and draws, so the same parts)."""
    from mergesearch.methods.task_arithmetic import TASK_VECTOR_METHODS, task_vector_parts
    from mergesearch.engine.compiled import CompiledRecipe

    spec = recipe.spec
    if spec.name not in TASK_VECTOR_METHODS:
        raise MergeSearchError(f"refine: method '{spec.name}' is not in the task-vector family "
                               f"({', '.join(sorted(TASK_VECTOR_METHODS))})")
    sparsifier, consensus = TASK_VECTOR_METHODS[spec.name]
    terms: list[_Term] = []
    group_w: dict[tuple[int, int], float] = {}
    group_lam: dict[int, float] = {}
    # every merged tensor sets its group's weights, so a group no trained tensor falls in
    # (a tensor the model does not hold as a parameter) keeps the candidate's values
    merged = [n for n in mat.names if n not in mat.constants]
    compiled = CompiledRecipe(recipe, merged, mat.num_layers)
    group_of = {name: group_index(name, groups) for name in merged}
    for name in merged:
        g, per = compiled[name]
        k = group_of[name]
        for i, p in enumerate(per):
            v = float(p["weight"])
            if abs(group_w.setdefault((k, i), v) - v) > 1e-12:
                raise MergeSearchError(
                    f"refine: model {i}'s weight varies inside refine group '{groups[k]['name'] or 'all'}' "
                    f"({group_w[(k, i)]:g} vs {v:g} at {name}); refine at a level at least as fine as "
                    "the space's granularity")
        if abs(group_lam.setdefault(k, float(g["lambda"])) - float(g["lambda"])) > 1e-12:
            raise MergeSearchError(f"refine: lambda varies inside refine group '{groups[k]['name']}'")
    # a base streamed through the staging slots is a view of a slot the next tensor reuses:
    # the term keeps its own copy (a resident base, or one read in place, is kept as it is)
    plan = getattr(mat, "placement", None)
    staged = plan is not None and plan.stream == "copy" and not plan.on_device("base")

    def read(name: str, x=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            if x is None:
                ((_, x),) = list(mat.inputs(recipe, [name]))
            g, per = compiled[name]
            parts = [p.to(device=device, dtype=torch.float32) for p in task_vector_parts(x, g, per, sparsifier)]
            # held, a staged base must outlive its slot; read again, it is used before the next read
            return x.base.to(device=device, dtype=torch.float32, copy=staged and hold), parts

    def term(name: str, base, parts, shape) -> _Term:
        g, per = compiled[name]
        return _Term(name, base, parts, [float(p["weight"]) for p in per], float(g["lambda"]), bool(g["normalize"]),
                     consensus, group_of[name], dtypes[name], tuple(shape),
                     None if hold else partial(read, name))

    if hold:
        for name, x in mat.inputs(recipe, names):
            base, parts = read(name, x)
            terms.append(term(name, base, parts, base.shape))
    else:
        terms = [term(name, None, None, mat.ref_ckpt.shape(name)) for name in names if name not in mat.constants]
    return terms, group_w, group_lam


def _merge(t: _Term, c: torch.Tensor, s: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor's merged weight for its group's weight multipliers ``c`` (models), lambda
    multiplier ``s`` and row multipliers ``r`` (models x rows, or None)."""
    base, parts = t.inputs()
    # model i's weight: c_i * w_i, times r[i, k] at row k where the tensor has row multipliers
    w = [c[i] * t.weights[i] * (1.0 if r is None else r[i].unsqueeze(-1)) for i in range(len(parts))]
    parts = [wi * d for wi, d in zip(w, parts)]
    if t.consensus:
        with torch.no_grad():
            majority = torch.where(sum(p.detach() for p in parts) >= 0, 1.0, -1.0)
        mixed = torch.zeros_like(base)
        div = torch.zeros_like(base)
        for p, wi in zip(parts, w):
            agree = p.detach().sign() == majority
            mixed = mixed + torch.where(agree, p, 0.0)
            div = div + torch.where(agree, wi, 0.0)
        div = div + (div == 0).to(div.dtype)
    else:
        mixed = sum(parts)
        total = sum(w)
        div = torch.where(total.detach().abs() < 1e-8, torch.ones_like(total), total)
    if t.normalize:
        mixed = mixed / div
    return (base + mixed * (t.lam * s)).to(t.dtype)


def merged_params(terms: list[_Term], coef: torch.Tensor, scale: torch.Tensor,
                  rows: dict[str, torch.Tensor] | None = None, recompute: bool = True) -> dict[str, torch.Tensor]:
    """The merged tensors for per-group weight multipliers ``coef`` (groups x models) and
    lambda multipliers ``scale`` (groups), and, where given, per-row multipliers ``rows``
    (tensor name -> models x rows); differentiable in all; the same arithmetic as the
    engine's combine step, with sign election recomputed from the current weights.

    With gradients on and ``recompute`` (the default), each tensor's merge runs inside a
    (non-reentrant) checkpoint: the graph keeps only its small inputs (the group's row of
    ``coef``, its ``scale``, its row multipliers) and the merge is computed again, one
    tensor at a time, in the backward: the same operations on the same values, so the same
    weights and gradients, bit for bit, as the graph kept whole (``recompute`` False)."""
    out = {}
    for t in terms:
        r = None if rows is None else rows.get(t.name)
        args = (coef[t.group], scale[t.group]) + (() if r is None else (r,))
        if recompute and torch.is_grad_enabled() and any(a.requires_grad for a in args):
            out[t.name] = checkpoint(partial(_merge, t), *args, use_reentrant=False)
        else:
            out[t.name] = _merge(t, *args)
    return out


def refined_recipe(recipe, groups: list[dict], group_w: dict, group_lam: dict, coef: torch.Tensor,
                   scale: torch.Tensor):
    """The recipe of the merge :func:`merged_params` computes: each model's weight and
    lambda per group, times the multipliers (as filter lists)."""
    from mergesearch.recipe import from_dict

    data = recipe.to_dict()
    for i, m in enumerate(data["models"]):
        params = dict(m.get("parameters") or {})
        params["weight"] = group_setting(groups, [group_w.get((k, i), 0.0) * float(coef[k, i])
                                                 for k in range(len(groups))])
        m["parameters"] = params
    data["parameters"] = {**(data.get("parameters") or {}),
                          "lambda": group_setting(groups, [group_lam.get(k, 1.0) * float(scale[k])
                                                           for k in range(len(groups))])}
    return from_dict(data, "refined recipe")


@contextmanager
def checkpointed(model, params: dict):
    """The merged weights ``params`` written into ``model`` (as tensors of the merge's
    graph) with the model's activation checkpointing on, for a forward and its backward:
    each decoder layer keeps only its input and is recomputed, with these weights, in the
    backward. Only the layers are put in training mode (their flag gates the checkpoint);
    every other module stays in eval mode, so no dropout runs."""
    from torch.nn.utils.stateless import _reparametrize_module

    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise MergeSearchError(f"refine: {type(model).__name__} does not support gradient checkpointing")
    enable({"use_reentrant": False})
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    was = [m.training for m in layers]
    try:
        for m in layers:
            m.training = True
        with _reparametrize_module(model, params):
            yield
    finally:
        for m, w in zip(layers, was):
            m.training = w
        disable()


def refine(mat, model, tokenizer, evaluator, recipe, cfg: dict, groups: list[dict], seed: int = 0):
    """Learn per-group coefficients for ``recipe`` (see the module docstring); returns
    (refined Recipe, stats). ``groups``: the coefficient groups, as dicts with
    ``name``, ``filters``, ``fallback`` and ``default``."""
    if not hasattr(evaluator, "training_items"):
        raise MergeSearchError("refine: the python evaluator has no items to train on; use lm-eval tasks")
    if recipe.has_row_scales:
        raise MergeSearchError("refine: the candidate already has row scales (it is a refinement's); refine the "
                               "candidate it came from")
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:  # the refinement's own peak: above what the device holds now
        torch.cuda.synchronize(device)
        held_at_start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    check_n = int(cfg.get("check_batch", 32))
    ckpt = bool(cfg.get("checkpointing"))
    targets = dict(model.named_parameters())
    names = [n for n in mat.names if n in targets and targets[n].is_floating_point()]
    n_models = len(recipe.models)
    skip = untrainable(evaluator.output_types(), cfg)
    for t in getattr(evaluator.cfg, "monitor", []):  # monitor tasks are never optimized
        skip[t] = "a monitor task (scored, never optimized)"
    items = Items(evaluator, model, tokenizer, cfg["holdout"], seed, device, skip=skip)
    tasks = list(items.train)
    if not tasks:
        raise MergeSearchError("refine: no task to train on: " + "; ".join(f"task '{t}': {w}" for t, w in skip.items()))
    cost_seqs = 0.0
    was_training = model.training
    model.eval()
    mix = float(cfg.get("distill_mix", 1.0))
    teachers = None
    if cfg["loss"] == "distill":  # before the float32 terms: one teacher's weights at a time
        teachers = teacher_targets(mat, model, recipe, names, targets, items, device,
                                    cfg.get("teachers", "confidence"), lm=evaluator.lm(model, tokenizer), chunk=check_n)
        cost_seqs += n_models * items.n_seqs
    # a label-free loss (entropy; distill from confidence-chosen teachers alone) also keeps
    # the check with the lowest held-out loss, not the best held-out accuracy, which reads labels
    label_free = cfg["loss"] == "entropy" or (cfg["loss"] == "distill" and mix == 1.0
                                              and cfg.get("teachers", "confidence") == "confidence")
    hold = bool(cfg.get("hold_inputs", True))
    terms, group_w, group_lam = build_terms(mat, recipe, groups, names, {n: targets[n].dtype for n in names}, device,
                                            hold=hold)
    restarts = int(cfg.get("restarts", 1))
    rng = random.Random(f"refine-batches:{seed}")

    def run_once() -> tuple:
        """One refinement on the current fold: (best check, history, steps run)."""
        nonlocal cost_seqs
        coef = torch.ones(len(groups), n_models, device=device, requires_grad=True)
        scale = torch.ones(len(groups), device=device, requires_grad=True)
        # per-row multipliers (models x rows) of every matrix, with ``rows``
        row_mult = {t.name: torch.ones(n_models, t.shape[0], device=device, requires_grad=True)
                    for t in terms if cfg.get("rows") and len(t.shape) == 2}
        opt = torch.optim.Adam([{"params": [coef, scale], "lr": cfg["lr"]}]
                               + ([{"params": list(row_mult.values()), "lr": float(cfg.get("row_lr", 0.05))}]
                                  if row_mult else []))
        decay = float(cfg["average"])
        avg_c, avg_s = coef.detach().clone(), scale.detach().clone()  # what is checked and kept
        avg_r = {k: v.detach().clone() for k, v in row_mult.items()}
        pools = {t: [] for t in tasks}

        def rank(acc: float, loss: float) -> tuple[float, float]:
            return (-loss, 0.0) if label_free else (acc, -loss)

        def check() -> tuple[float, float]:
            nonlocal cost_seqs
            accs, losses = [], []
            with torch.no_grad():
                params = merged_params(terms, avg_c, avg_s, avg_r)
                for task in tasks:
                    rows = items.holdout[task]
                    right, loss_sum = 0, 0.0
                    for s in range(0, len(rows), check_n):
                        chunk = rows[s:s + check_n]
                        batch = items.batch(chunk)
                        loss, c = item_losses(chunk, sequence_loglik(model, params, batch), cfg["loss"], mix)
                        right += c
                        loss_sum += float(loss) * len(chunk)
                        cost_seqs += batch[4] if batch else 0
                    accs.append(right / max(len(rows), 1))
                    losses.append(loss_sum / max(len(rows), 1))
            return sum(accs) / len(accs), sum(losses) / len(losses)

        def draw() -> list:
            rows = []
            while len(rows) < cfg["batch_size"]:
                for task in tasks:
                    if len(rows) >= cfg["batch_size"]:
                        break
                    if not pools[task]:
                        pools[task] = list(items.train[task])
                        rng.shuffle(pools[task])
                    rows.append(pools[task].pop())
            return rows

        acc0, loss0 = check()
        best = (*rank(acc0, loss0), 0, avg_c.clone(), avg_s.clone(), acc0, {k: v.clone() for k, v in avg_r.items()})
        history = [{"step": 0, "holdout_acc": acc0, "holdout_loss": loss0}]
        stale, step = 0, 0
        for step in range(1, cfg["steps"] + 1):
            items_ = draw()
            batch = items.batch(items_)
            params = merged_params(terms, coef, scale, row_mult)
            opt.zero_grad(set_to_none=True)
            if ckpt:  # the backward recomputes each layer with the merged weights still in the model
                with checkpointed(model, params):
                    loss, _ = item_losses(items_, sequence_loglik(model, params, batch), cfg["loss"], mix)
                    if loss.requires_grad:
                        loss.backward()
            else:
                loss, _ = item_losses(items_, sequence_loglik(model, params, batch), cfg["loss"], mix)
                if loss.requires_grad:  # a batch of items with nothing to train on moves nothing
                    loss.backward()
            del params
            if loss.requires_grad:
                opt.step()
            with torch.no_grad():
                coef.clamp_(0.0, COEF_MAX)
                scale.clamp_(0.0, COEF_MAX)
                avg_c.mul_(decay).add_(coef.detach(), alpha=1.0 - decay)
                avg_s.mul_(decay).add_(scale.detach(), alpha=1.0 - decay)
                for k, v in row_mult.items():
                    v.clamp_(0.0, COEF_MAX)
                    avg_r[k].mul_(decay).add_(v.detach(), alpha=1.0 - decay)
            cost_seqs += TRAIN_COST * (batch[4] if batch else 0)
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise MergeSearchError(f"refine: the loss became {lv} at step {step}")
            if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
                acc, hl = check()
                history.append({"step": step, "train_loss": lv, "holdout_acc": acc, "holdout_loss": hl})
                if rank(acc, hl) > best[:2]:
                    best = (*rank(acc, hl), step, avg_c.clone(), avg_s.clone(), acc,
                            {k: v.clone() for k, v in avg_r.items()})
                    stale = 0
                else:
                    stale += 1
                    if stale >= cfg["patience"]:
                        break
        return best, history, step

    runs = []
    try:
        for r in range(restarts):
            items.fold(r)
            runs.append(run_once())
    finally:
        if was_training:
            model.train()
    # the restarts' kept coefficients, averaged into one recipe (one restart: its own); the
    # held-out accuracy reported is the mean of each restart's on its own fold
    bests = [b for b, _, _ in runs]
    mean = lambda xs: torch.stack(xs).mean(0)  # noqa: E731
    best = (*bests[0][:3], mean([b[3] for b in bests]), mean([b[4] for b in bests]),
            sum(b[5] for b in bests) / restarts, {k: mean([b[6][k] for b in bests]) for k in bests[0][6]})
    history = [dict(h, restart=i) if restarts > 1 else h for i, (_, hist, _) in enumerate(runs) for h in hist]
    step = sum(st for _, _, st in runs)
    _, _, best_step, c_best, s_best, acc_best, r_best = best
    out = refined_recipe(recipe, groups, group_w, group_lam, c_best, s_best)
    if r_best:
        out = out.with_rows({i: {k: v[i].detach().to("cpu", torch.float32).contiguous() for k, v in r_best.items()}
                             for i in range(n_models)})
    first = runs[0][1][0]  # each restart's check before its first step
    acc0, loss0 = first["holdout_acc"], first["holdout_loss"]
    kept = [{"best_step": b[2], "holdout_after": b[5], "steps": st,
             "holdout_loss_after": next(h["holdout_loss"] for h in hist if h["step"] == b[2])} for b, hist, st in runs]
    loss_best = sum(k["holdout_loss_after"] for k in kept) / restarts
    stats = {"steps": step, "best_step": best_step, "holdout_before": acc0, "holdout_after": acc_best,
             "holdout_loss_before": loss0, "holdout_loss_after": loss_best,
             "cost": cost_seqs / max(items.n_seqs, 1), "loss": cfg["loss"], "teachers": teachers, "history": history,
             "groups": [g["name"] or "all" for g in groups], "restarts": kept,
             "memory": {"planned": cfg.get("planned_bytes"), "batch_size": cfg["batch_size"], "steps_planned": cfg["steps"],
                        "check_batch": check_n, "checkpointing": ckpt, "hold_inputs": hold,
                        "peak": (torch.cuda.max_memory_allocated(device) - held_at_start) if cuda else None}}
    return out, stats
