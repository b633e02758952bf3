"""Data-free merges in the singular-value domain of each weight matrix.

For a 2-D tensor the task matrix of model i is Delta_i = theta_i - theta_0 (scaled by
its ``weight``). Every method here returns theta_0 + lambda * M with

- ``tsv`` (Task Singular Vectors, TSV-M; Gargiulo et al., CVPR 2025): each Delta_i is
  cut to its top k_i singular triplets, k_i = floor(r * rank_share_i / T) of the full
  rank r = min(rows, cols) over T models (1/T of the rank each at share 1). The kept
  left vectors of all models, side by side, are replaced by the nearest matrix with
  orthonormal columns (the polar factor P Q^T of their SVD P S Q^T), and the right
  vectors likewise; M = U_perp diag(sigma) V_perp^T with every model's kept singular
  values. Decorrelating the tasks' subspaces is what removes their interference.
- ``iso_c`` (Iso-C; Marczak et al., ICML 2025): the SVD U S V^T of the sum
  sum_i Delta_i, with the spectrum flattened to its mean: M = mean(S) U V^T.
- ``iso_cts`` (Iso-CTS, same paper): the top k_c = common_share * r directions of the
  sum form the common subspace; each task matrix, with the common subspace projected
  out, gives its top (r - k_c) / T directions; all of them, side by side, are
  orthogonalized as in ``tsv`` and M = mean(sigma) U_perp V_perp^T over every kept
  singular value (common and task-specific).

Other tensors (1-D norms and biases, and any tensor of another rank) take the mean of
the weighted task vectors, lambda * sum_i Delta_i / T, as the papers' code does.

The per-model SVDs (``tsv``) and the SVD of the sum (``iso_*``) depend only on the
inputs and the weights, not on the other parameters: a :class:`FactorCache` keeps them
between candidates, so a candidate whose weights did not change only recombines factors.
With or without the cache the same operations run on the same inputs, so a cached
candidate equals the exported checkpoint bit for bit.
"""

from __future__ import annotations

import torch

from mergesearch.methods.inputs import TensorInputs
from mergesearch.methods.registry import MethodSpec, Param, register


def _mean_delta(x: TensorInputs, weights: list[float]) -> torch.Tensor:
    """lambda-free fallback for tensors that are not matrices: sum_i w_i Delta_i / T."""
    out = torch.zeros_like(x.delta(0))
    for i, w in enumerate(weights):
        out.add_(x.delta(i), alpha=w)
    return out.div_(x.n)


def kept_rank(r: int, share: float, n_models: int) -> int:
    """Singular triplets a model keeps in ``tsv``: floor(r * share / T)."""
    return int(r * (share / n_models))


def _svd(a: torch.Tensor):
    """The thin SVD. LAPACK's divide-and-conquer driver (the CPU's) can fail to converge on
    matrices with many repeated singular values (a task matrix with the common subspace
    projected out, a low-rank task vector); those are decomposed again in float64."""
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:
        if a.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
        return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def _polar(a: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (rows, for a wide matrix): P Q^T."""
    p, _, qt = _svd(a)
    return p @ qt


def _task_factors(x: TensorInputs, i: int, k: int):
    """Model i's unweighted task matrix, cut to its top k singular triplets."""
    def build():
        u, s, vh = _svd(x.delta(i))
        return u[:, :k].contiguous(), s[:k].contiguous(), vh[:k].contiguous()
    return x.cached(f"task:{x.ids[i]}", k, build)


def _sum_factors(x: TensorInputs, weights: list[float]):
    """The full SVD of sum_i w_i Delta_i."""
    def build():
        total = torch.zeros_like(x.delta(0))
        for i, w in enumerate(weights):
            total.add_(x.delta(i), alpha=w)
        return _svd(total)
    return x.cached("sum", (tuple(x.ids), tuple(weights)), build)


def _recombine(us: list[torch.Tensor], ss: list[torch.Tensor], vhs: list[torch.Tensor],
               flat: bool) -> torch.Tensor:
    """Side-by-side factors, orthogonalized; singular values as given, or their mean."""
    u = _polar(torch.cat(us, dim=1))
    vh = _polar(torch.cat(vhs, dim=0))
    s = torch.cat(ss)
    if flat:
        s = torch.full_like(s, s.mean())
    return (u * s) @ vh


def tsv(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    weights = [p["weight"] for p in m]
    if x.base.dim() != 2:
        return x.base + g["lambda"] * _mean_delta(x, weights)
    r = min(x.shape)
    us, ss, vhs = [], [], []
    cap = kept_rank(r, 1.0, x.n)
    for i, p in enumerate(m):
        k = kept_rank(r, p["rank_share"], x.n)
        if k == 0:
            continue
        u, s, vh = _task_factors(x, i, cap)
        w = p["weight"]
        # the SVD of w * Delta: the singular values scale by |w|, the sign goes to one side
        us.append(u[:, :k] if w >= 0 else -u[:, :k])
        ss.append(s[:k] * abs(w))
        vhs.append(vh[:k])
    if not us:
        return x.base.clone()
    return x.base + g["lambda"] * _recombine(us, ss, vhs, flat=False)


def iso_c(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    weights = [p["weight"] for p in m]
    if x.base.dim() != 2:
        return x.base + g["lambda"] * _mean_delta(x, weights)
    u, s, vh = _sum_factors(x, weights)
    return x.base + (g["lambda"] * s.mean()) * (u @ vh)


def common_split(r: int, share: float, n_models: int) -> tuple[int, int]:
    """(common directions, directions per task) of ``iso_cts`` for rank r: the
    task-specific part is rounded to a multiple of T, and the common part takes the rest."""
    common = int(r * share)
    specific = round((r - common) / n_models) * n_models
    if specific > r:  # rounding up past the rank (a share near 0): the largest multiple that fits
        specific = (r // n_models) * n_models
    return r - specific, specific // n_models


def iso_cts(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    weights = [p["weight"] for p in m]
    if x.base.dim() != 2:
        return x.base + g["lambda"] * _mean_delta(x, weights)
    r = min(x.shape)
    u, s, vh = _sum_factors(x, weights)
    kc, per_task = common_split(r, g["common_share"], x.n)
    uc = u[:, :kc]
    us, ss, vhs = [], [], []
    if per_task:
        for i, w in enumerate(weights):
            d = x.delta(i) * w
            specific = d - uc @ (uc.T @ d)  # never the rows x rows projector
            ut, st, vht = _svd(specific)
            del d, specific
            # copies of the kept parts, so the full factors are freed before the next model
            us.append(ut[:, :per_task].clone())
            ss.append(st[:per_task].clone())
            vhs.append(vht[:per_task].clone())
            del ut, st, vht
    us.append(uc)
    ss.append(s[:kc])
    vhs.append(vh[:kc])
    return x.base + g["lambda"] * _recombine(us, ss, vhs, flat=True)


WEIGHT1 = Param("weight", "model", float, 1.0, help="scales this model's task matrix before the SVD")
LAMBDA = Param("lambda", "global", float, 1.0, help="scale of the merged task matrix")

register(MethodSpec(
    name="tsv", fn=tsv,
    params=(WEIGHT1,
            Param("rank_share", "model", float, 1.0, 0.0, 1.0,
                  help="share of its 1/T of the rank a model keeps (0 drops it)"),
            LAMBDA),
    description="TSV-M: each task's top singular vectors, decorrelated across tasks",
    uses_base="required", min_models=1, factors="task",
))
register(MethodSpec(
    name="iso_c", fn=iso_c, params=(WEIGHT1, LAMBDA),
    description="Iso-C: the summed task matrix with a flat spectrum",
    uses_base="required", min_models=1, factors="sum",
))
register(MethodSpec(
    name="iso_cts", fn=iso_cts,
    params=(WEIGHT1,
            Param("common_share", "global", float, 0.8, 0.0, 1.0,
                  help="share of the rank given to the common subspace"),
            LAMBDA),
    description="Iso-CTS: common and task-specific subspaces, flat spectrum",
    uses_base="required", min_models=1, factors="sum",
))

