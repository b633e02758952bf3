"""Linear merging and the task-vector family: task arithmetic, TIES, DARE,
breadcrumbs and DELLA, with their sign-consensus variants."""

from __future__ import annotations

from functools import partial

import torch

from mergesearch.errors import MergeSearchError
from mergesearch.methods import kernels, selection, sparsify
from mergesearch.methods.inputs import TensorInputs
from mergesearch.methods.registry import MethodSpec, Param, register


def linear(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    weights = [p["weight"] for p in m]
    total = sum(weights)
    if g["normalize"] and total == 0:
        raise MergeSearchError(f"linear: weights sum to zero for tensor {x.name}; cannot normalize")
    sources = [x.raw(i) if x.raw(i) is not None else x.tensor(i) for i in range(x.n)]
    return kernels.weighted_sum(sources, weights, total, g["normalize"], out_dtype=x.out_dtype, out=x.out)


def sparsified_delta(kind: str | None, x: TensorInputs, i: int, p: dict, rescale: bool) -> torch.Tensor:
    if kind is None:
        return x.delta(i)
    if kind == "random":
        return sparsify.dare(x, i, p["density"], rescale)
    if kind == "della":
        return sparsify.della(x, i, p["density"], p["epsilon"], rescale)
    raise ValueError(kind)


def task_vector_merge(x: TensorInputs, g: dict, m: list[dict], *, sparsifier: str | None, consensus: bool) -> torch.Tensor:
    """base + lambda * combine(w_i * sparsify(delta_i)).

    With sign consensus (TIES), each element keeps only the weighted deltas whose
    sign agrees with the sign of their sum; elements with zero delta never vote.
    ``normalize`` divides by the sum of the weights that took part.

    Magnitude pruning without rescale reaches the fused kernel as a selection
    (thresholds with a tie split by index), so no masked copy of a task
    vector is made; other sparsifiers prepare their deltas first.
    """
    sources, is_delta, windows, masks = [], [], [], []

    def stored(i: int, raw, window=None, mask=None) -> None:
        """Model i reaches the kernel as stored (its delta taken there), with its
        selection: a window of magnitudes or a DARE mask; its float copies go."""
        sources.append(raw if raw is not None else x.delta(i))
        is_delta.append(raw is None)
        windows.append(window)
        masks.append(mask)
        if raw is not None:
            x.release(i)

    for i, p in enumerate(m):
        raw = x.raw(i)
        if sparsifier == "random":
            # DARE reaches the kernel as a bool mask and an L1 factor: no float copy of
            # a sparsified task vector is held while the other models are prepared
            stored(i, raw, mask=sparsify.dare_mask(x, i, p["density"], g["rescale"]) if p["density"] < 1 else None)
            continue
        if sparsifier in ("magnitude", "outliers"):
            # None: everything kept (no selection pass in the kernel)
            w = selection.kept_window(x, i, sparsifier, p["density"], p.get("gamma", 0.0))
            if not g["rescale"]:
                stored(i, raw, window=w)
                continue
            d = x.delta(i) if w is None else sparsify.rescale_l1(x.delta(i), selection.apply_window(x.delta(i), w))
        elif sparsifier is None and raw is not None:
            stored(i, raw)
            continue
        else:
            d = sparsified_delta(sparsifier, x, i, p, g["rescale"])
        if raw is not None:
            x.release(i)  # model i's float copies are no longer needed: only d is
        sources.append(d)
        is_delta.append(True)
        windows.append(None)  # keep everything
        masks.append(None)
    weights = [p["weight"] for p in m]
    if any(isinstance(w, torch.Tensor) for w in weights):  # per-row weights (a recipe's row_scales)
        return kernels.combine_rows(x.raw_base, sources, is_delta, windows, weights, g["lambda"], g["normalize"],
                                    consensus, out_dtype=x.out_dtype, masks=masks)
    total = sum(weights)
    divisor = 1.0 if abs(total) < 1e-8 else total
    return kernels.combine(x.raw_base, sources, is_delta, windows, weights, g["lambda"], g["normalize"],
                           consensus, divisor, out_dtype=x.out_dtype, masks=masks, out=x.out)


def task_vector_parts(x: TensorInputs, g: dict, m: list[dict], sparsifier: str | None) -> list[torch.Tensor]:
    """Each model's task vector as the merge uses it: pruned (zeros where dropped) and
    rescaled, before weights, sign election and lambda. The same selections and draws
    as :func:`task_vector_merge` (models in order), for gradient refinement, which keeps
    them fixed and learns the coefficients."""
    out = []
    for i, p in enumerate(m):
        if sparsifier in ("magnitude", "outliers"):
            w = selection.window(x, i, *selection.keep_range(sparsifier, x.numel, p["density"], p.get("gamma", 0.0)))
            kept = selection.apply_window(x.delta(i), w)
            out.append(sparsify.rescale_l1(x.delta(i), kept) if g["rescale"] else kept)
        else:
            out.append(sparsified_delta(sparsifier, x, i, p, g["rescale"]))
    return out


# the methods base + lambda * combine(w_i * sparsify(delta_i)): differentiable in their
# weights and lambda once the selections are fixed (see mergesearch.search.refine)
TASK_VECTOR_METHODS: dict[str, tuple[str | None, bool]] = {}  # name -> (sparsifier, sign consensus)

WEIGHT = Param("weight", "model", float, help="coefficient of this model (negative negates a task vector)")
DENSITY = Param("density", "model", float, 1.0, 0.0, 1.0, help="share of the task vector kept")
GAMMA = Param("gamma", "model", float, 0.01, 0.0, 1.0, help="share of largest-magnitude outliers removed")
EPSILON = Param("epsilon", "model", float, 0.15, 0.0, 1.0, help="spread of DELLA keep probabilities")
LAMBDA = Param("lambda", "global", float, 1.0, help="scale of the combined task vector")
INT8 = Param("int8_mask", "global", bool, False, help="memory option in mergekit; no effect on results", inert=True)


def _gta(name, sparsifier, consensus, normalize, rescale, description):
    params = [WEIGHT, DENSITY, LAMBDA,
              Param("normalize", "global", bool, normalize, help="divide by the sum of weights"),
              Param("rescale", "global", bool, rescale, help="rescale kept deltas to the original L1 norm"),
              INT8]
    if sparsifier is None:
        params.remove(DENSITY)
    if sparsifier == "outliers":
        params.append(GAMMA)
    if sparsifier == "della":
        params.append(EPSILON)
    TASK_VECTOR_METHODS[name] = (sparsifier, consensus)
    register(MethodSpec(
        name=name,
        fn=partial(task_vector_merge, sparsifier=sparsifier, consensus=consensus),
        params=tuple(params),
        description=description,
        uses_base="required",
        random=sparsifier in ("random", "della"),
        sparsifier=sparsifier,
    ))


register(MethodSpec(
    name="linear",
    fn=linear,
    params=(WEIGHT, Param("normalize", "global", bool, True, help="divide by the sum of weights")),
    description="weighted average of the models",
    uses_base="no",
))
_gta("task_arithmetic", None, False, False, False, "base + lambda * sum of weighted task vectors")
_gta("ties", "magnitude", True, True, False, "top-k magnitude pruning, sign election, disjoint mean")
_gta("dare_ties", "random", True, False, True, "random drop with rescale, then sign election")
_gta("dare_linear", "random", False, False, True, "random drop with rescale, then weighted sum")
_gta("breadcrumbs", "outliers", False, False, False, "drop smallest and largest magnitudes, weighted sum")
_gta("breadcrumbs_ties", "outliers", True, False, False, "breadcrumbs pruning with sign election")
_gta("della", "della", True, True, True, "rank-adaptive random drop, sign election")
_gta("della_linear", "della", False, False, True, "rank-adaptive random drop, weighted sum")
