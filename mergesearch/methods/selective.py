"""Merges that choose, element by element, which model's change to keep: SCE, RAM and
RAM+ (tensor-local), NearSwap and Arcee Fusion (mergekit 0.1.5's semantics).

Each reads the task vectors (model - base) one model at a time where it can, and makes
them again from the inputs for a later pass instead of holding every one.
"""

from __future__ import annotations

import torch

from mergesearch.methods import kernels
from mergesearch.methods.inputs import TensorInputs
from mergesearch.methods.registry import MethodSpec, Param, register

# Arcee Fusion estimates its quantiles from this many elements drawn with replacement
# when a tensor has more
QUANTILE_SAMPLE = 1_000_000


# -- SCE: select by variance, weight by energy, erase minority signs ------------------

def _sce_selection(x: TensorInputs, share: float) -> torch.Tensor | None:
    """The elements SCE keeps: the ``share`` of those where the models' task vectors
    vary (population variance over models, nonzero) with the largest variance; None
    keeps everything. The variance is taken over the stacked task vectors, so that ties
    at the cut fall as mergekit's (torch.topk over the same numbers)."""
    if share >= 1:
        return None
    keep = torch.zeros(x.numel, dtype=torch.bool, device=x.device)
    if share <= 0:
        return keep
    stacked = torch.empty((x.n, x.numel), dtype=x.scalar(0).dtype, device=x.device)
    for i in range(x.n):
        stacked[i].copy_(x.delta(i).reshape(-1))
        x.release(i)
    spread = torch.var(stacked, dim=0, unbiased=False)
    del stacked
    k = int(torch.count_nonzero(spread) * share)
    if k > 0:
        keep[torch.topk(spread, k, largest=True).indices] = True
    return keep


def sce(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    """SCE: keep the top ``select_topk`` share of elements by variance across models,
    weight each model by the mean square of its (selected) task vector, normalized to
    sum 1 (equal weights when all are ~0), and at each element average, with those
    weights, only the task vectors whose sign agrees with the sign of their sum."""
    keep = _sce_selection(x, g["select_topk"])

    def tv(i: int) -> torch.Tensor:
        d = x.owned(i, True).reshape(-1)
        return d if keep is None else d.mul_(keep)

    total = None
    energy = []
    for i in range(x.n):
        d = tv(i)
        energy.append(d.square().mean())
        total = d if total is None else total.add_(d)
        del d
    positive = total >= 0
    del total
    energy = torch.stack(energy)
    mass = energy.sum().item()
    weights = torch.ones_like(energy) / energy.numel() if abs(mass) < 1e-6 else energy / mass
    num = den = None
    for i in range(x.n):
        d = tv(i)
        share = torch.where(positive, d > 0, d < 0) * weights[i]  # the sign agrees with the sum's
        d.mul_(share)
        num = d if num is None else num.add_(d)
        den = share if den is None else den.add_(share)
        del d, share
    out = num.div_(den.clamp_(min=1e-6)).reshape(x.shape)
    return out.add_(x.base)


# -- RAM: unique changes kept whole, shared ones averaged ------------------------------

def _ram_counts(x: TensorInputs, epsilon: float) -> torch.Tensor:
    """How many models change each element by more than ``epsilon``."""
    count = torch.zeros(x.shape, dtype=torch.uint8 if x.n < 255 else torch.int32, device=x.device)
    for i in range(x.n):
        count += x.delta(i).abs() > epsilon
        x.release(i)
    return count


def _ram_merge(x: TensorInputs, epsilon: float, count: torch.Tensor, gains: torch.Tensor | None = None) -> torch.Tensor:
    """base + at each element: the one task vector above ``epsilon`` there (times its
    model's gain), or the mean of several, or nothing. ``count``: how many models change
    each element (it is changed)."""
    unique = count == 1 if gains is not None else None
    divisor = count.clamp_(min=1).to(x.scalar(0).dtype)  # d / 1 is d: a unique element stays whole
    del count
    out = None
    for i in range(x.n):
        d = x.owned(i, True)
        unchanged = d.abs() <= epsilon
        d.div_(divisor)
        if gains is not None:
            d.mul_(torch.where(unique, gains[i], 1.0))
        d.masked_fill_(unchanged, 0.0)
        out = d if out is None else out.add_(d)
        del d, unchanged
    return out.add_(x.base)


def ram(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    """Reinforced Agent Merging: where one model alone changes an element (by more than
    epsilon) its change is kept whole; where several do, their changes are averaged."""
    return _ram_merge(x, g["epsilon"], _ram_counts(x, g["epsilon"]))


def ramplus_tl(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    """RAM+ (tensor-local): as RAM, with each model's unique changes amplified by
    1 + r * min(alpha, shared_i / unique_i), from the counts of its elements in this
    tensor that are shared with other models and unique to it."""
    epsilon = g["epsilon"]
    count = _ram_counts(x, epsilon)
    several, alone = count > 1, count == 1
    shared_n, unique_n = [], []
    for i in range(x.n):
        changed = x.delta(i).abs() > epsilon
        x.release(i)
        shared_n.append(torch.count_nonzero(changed & several))
        unique_n.append(torch.count_nonzero(changed & alone))
        del changed
    del several, alone
    ratio = torch.stack(shared_n) / torch.stack(unique_n).clamp(min=epsilon)
    gains = 1 + g["r"] * ratio.clamp(min=0, max=g["alpha"])
    # a model without unique elements: 0 / 0 when epsilon is 0, a gain nothing uses
    gains = torch.where(torch.isnan(gains), 1.0, gains).to(x.scalar(0).dtype)
    return _ram_merge(x, epsilon, count, gains)


# -- NearSwap and Arcee Fusion: base + one model --------------------------------------

def nearswap(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    """Move each element from the base to the model by t / |model - base| (at most all
    the way): elements that differ by at most t take the model's value."""
    a, b = x.base, x.tensor(0)
    # t / gap is reciprocal(gap) * t in torch, and 1 - w is -w + 1: the same bits
    w = (a - b).abs_().clamp_(min=1e-6).reciprocal_().mul_(g["t"]).clamp_(min=0, max=1)
    out = w * b
    del b
    x.release(0)
    return out.add_(w.neg_().add_(1).mul_(a))


def _kl_rows(model: torch.Tensor, base: torch.Tensor, chunk: int) -> torch.Tensor:
    """KL(softmax(model) || softmax(base)) along the last axis (each probability plus
    1e-8), one value per row (the last axis kept, of size 1); in blocks of rows of
    about ``chunk`` elements (each row's numbers are the same)."""
    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(a, dim=-1).add_(1e-8)
        q = torch.softmax(b, dim=-1).add_(1e-8)
        return (p / q).log_().mul_(p).sum(dim=-1, keepdim=True)

    width = model.shape[-1]
    if model.dim() < 2 or model.numel() <= chunk:
        return kl(model, base)
    rows_m, rows_b = model.reshape(-1, width), base.reshape(-1, width)
    out = torch.empty((rows_m.shape[0], 1), dtype=model.dtype, device=model.device)
    step = max(1, chunk // width)
    for lo in range(0, rows_m.shape[0], step):
        out[lo:lo + step] = kl(rows_m[lo:lo + step], rows_b[lo:lo + step])
    return out.reshape(*model.shape[:-1], 1)


def _quantiles(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The 25th, 50th and 75th percentiles by index into the sorted values (the lower
    one), estimated from a sample with replacement above QUANTILE_SAMPLE elements."""
    flat = values.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator, device=flat.device)]
    ordered = torch.sort(flat).values
    del flat
    where = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long().to(ordered.device)
    return ordered[where]


def arcee_fusion(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    """Arcee Fusion: an element takes the model's value where its importance, |model -
    base| times the KL divergence of softmax(model) from softmax(base) along the last
    axis, reaches median + 1.5 * IQR of the importances; elsewhere the base's. Above
    QUANTILE_SAMPLE elements the quartiles come from a sample drawn from the tensor's
    generator (mergekit draws from torch's global one)."""
    base, model = x.base, x.tensor(0)
    importance = (model - base).abs_().mul_(_kl_rows(model, base, kernels.eager_chunk(x.device)))
    del model
    x.release(0)
    q1, median, q3 = _quantiles(importance, x.generator)
    keep = importance >= median + 1.5 * (q3 - q1)
    del importance
    out = x.tensor(0) - base
    x.release(0)
    return out.mul_(keep).add_(base)


EPS = Param("epsilon", "global", float, 1e-5, 0.0, help="a task-vector element counts as changed above this")

register(MethodSpec(
    name="sce", fn=sce,
    params=(
        Param("select_topk", "global", float, 1.0, 0.0, 1.0, help="share of elements kept, by variance across models"),
        Param("int8_mask", "global", bool, False, help="memory option in mergekit; no effect on results", inert=True),
    ),
    description="SCE: select high-variance elements, weight models by energy, erase minority signs",
    uses_base="required", min_models=1,
))
register(MethodSpec(
    name="ram", fn=ram, params=(EPS,),
    description="RAM: unique task-vector elements kept whole, shared ones averaged",
    uses_base="required", min_models=1,
))
register(MethodSpec(
    name="ramplus_tl", fn=ramplus_tl,
    params=(
        Param("r", "global", float, 0.1, 0.0, help="gain of unique elements per unit of shared/unique ratio"),
        Param("alpha", "global", float, 0.2, 0.0, help="cap on the shared/unique ratio"),
        EPS,
    ),
    description="RAM+ (tensor-local): RAM with unique elements amplified by the model's overlap ratio",
    uses_base="required", min_models=1,
))
register(MethodSpec(
    name="nearswap", fn=nearswap,
    params=(Param("t", "global", float, low=0.0, help="distance below which an element takes the model's value"),),
    description="NearSwap: base elements move to the model's where the two are within t",
    uses_base="required", min_models=1, max_models=1,
))
register(MethodSpec(
    name="arcee_fusion", fn=arcee_fusion, params=(),
    description="Arcee Fusion: the model's elements where their KL-weighted change is an outlier, else the base",
    uses_base="required", min_models=1, max_models=1, random=True,
))
