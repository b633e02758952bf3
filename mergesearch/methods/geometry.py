"""Geometry- and uncertainty-aware merges: each model comes with a metric.

Linear merging averages in a Euclidean geometry. When each model i minimised a loss
whose local quadratic model has curvature G_i around its weights theta_i, the
minimiser of the summed quadratics is

    theta* = (sum_i G_i)^-1 sum_i G_i theta_i          (elementwise for diagonal G_i)

- ``fisher``: G_i = weight_i * (F_i + floor), F_i a diagonal Fisher estimate
  (Matena & Raffel, 2022). Where every G_i is 0 the weighted average is used.
- ``preconditioned``: G_i = weight_i * (M_i ** power + epsilon) for any supplied
  diagonal metric M_i, such as Adam's bias-corrected second moments v_hat
  (power 0.5 gives Adam's own preconditioner sqrt(v_hat) + eps; power 1 gives v_hat,
  an empirical-Fisher estimate). A model without a metric (plain SGD) takes the
  identity.
- ``gradient_matching`` (Daheim et al., ICLR 2024):
      theta = theta_0 + sum_t a_t (d_0 + H_0 + sum_s a_s H_s)^-1 (d_0 + H_0 + H_t) (theta_t - theta_0)
  with H_t = data_size_t * metric_t, H_0 = base_data_size * base metric (0 without
  one) and d_0 = prior. Equal curvatures reduce it to task arithmetic; H_0 = 0 and
  d_0 -> 0 to Fisher averaging with the a_t as per-model scalars.
- ``regmean`` (Jin et al., 2023): for a linear layer y = W x with input Gram matrices
  G_i = X_i^T X_i, W* = (sum_i W_i G_i)(sum_i G_i)^-1, the least-squares fit of every
  model's outputs on its own inputs. ``alpha`` scales the off-diagonal Gram entries
  (1 keeps them, 0 reduces to a diagonal merge). Tensors without Gram matrices
  (embeddings, norms) are averaged with the weights.

The methods are pure functions of the tensors: the metrics arrive in
:class:`~mergesearch.methods.inputs.TensorInputs` (``metric(i)``, ``base_metric``,
``gram(i)``), read from the files that ``mergesearch curvature`` writes.
"""

from __future__ import annotations

import torch

from mergesearch.errors import MergeSearchError
from mergesearch.methods.inputs import TensorInputs
from mergesearch.methods.registry import MethodSpec, Param, register

WEIGHT1 = Param("weight", "model", float, 1.0, 0.0, help="per-model scalar on the metric")


def _weighted_mean(x: TensorInputs, weights: list[float]) -> torch.Tensor:
    total = sum(weights)
    if total <= 0:
        raise MergeSearchError(f"{x.name}: the model weights sum to {total}; cannot average")
    out = torch.zeros_like(x.tensor(0))
    for i, w in enumerate(weights):
        out.add_(x.tensor(i), alpha=w / total)
    return out


def metric_average(x: TensorInputs, metrics: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i G_i theta_i / sum_i G_i with G_i = weights_i * metrics_i (the weighted
    average where every G_i is zero)."""
    num = torch.zeros_like(x.tensor(0))
    den = torch.zeros_like(num)
    for i, (g, w) in enumerate(zip(metrics, weights)):
        gi = g * w
        num.addcmul_(gi, x.tensor(i))
        den.add_(gi)
    zero = den == 0
    if bool(zero.any()):
        fallback = _weighted_mean(x, weights)
        return torch.where(zero, fallback, num / torch.where(zero, torch.ones_like(den), den))
    return num / den


def fisher(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    metrics = [x.metric(i) + g["floor"] for i in range(x.n)]
    return metric_average(x, metrics, [p["weight"] for p in m])


def preconditioned(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    metrics = []
    for i in range(x.n):
        mi = x.metric(i, missing_ok=True)
        metrics.append(torch.ones_like(x.tensor(i)) if mi is None else mi.clamp(min=0).pow(g["power"]) + g["epsilon"])
    return metric_average(x, metrics, [p["weight"] for p in m])


def gradient_matching(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    prior = x.scalar(g["prior"])
    h0 = x.base_metric * g["base_data_size"] if x.base_metric is not None else torch.zeros_like(x.base)
    anchor = h0 + prior  # d_0 + H_0
    hs = [x.metric(i) * m[i]["data_size"] for i in range(x.n)]
    den = anchor.clone()
    for i in range(x.n):
        den.add_(hs[i], alpha=m[i]["weight"])
    out = x.base.clone()
    zero = den == 0
    safe = torch.where(zero, torch.ones_like(den), den)
    for i in range(x.n):
        # where every curvature and the prior are 0 the ratio is taken as 1 (task arithmetic)
        ratio = torch.where(zero, torch.ones_like(den), (anchor + hs[i]) / safe)
        out.add_(ratio * x.delta(i), alpha=m[i]["weight"])
    return out


def regmean(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    weights = [p["weight"] for p in m]
    grams = [x.gram(i) for i in range(x.n)]
    if any(gr is None for gr in grams):
        return _weighted_mean(x, weights)
    alpha = g["alpha"]
    lhs = None
    rhs = None
    for i, (gr, w) in enumerate(zip(grams, weights)):
        d = torch.diag_embed(torch.diagonal(gr))
        gi = (gr * alpha + d * (1 - alpha)) * w  # [in, in]
        wi = x.tensor(i).to(gi.dtype)  # [out, in]
        lhs = gi if lhs is None else lhs + gi
        term = wi @ gi  # [out, in]
        rhs = term if rhs is None else rhs + term
    # W (sum G) = sum W_i G_i; solve on the right through the symmetric system.
    # Inputs that never vary (a zero row and column) get a small ridge so the system
    # stays solvable; there every model's column is kept by the weighted average.
    diag = torch.diagonal(lhs)
    dead = diag <= 0
    if bool(dead.any()):
        lhs = lhs + torch.diag_embed(dead.to(lhs.dtype))
    out = torch.linalg.solve(lhs, rhs.T).T
    if bool(dead.any()):
        out[:, dead] = _weighted_mean(x, weights).to(out.dtype)[:, dead]
    return out.to(x.tensor(0).dtype)


register(MethodSpec(
    name="fisher", fn=fisher,
    params=(WEIGHT1, Param("floor", "global", float, 0.0, 0.0, help="added to every Fisher value")),
    description="Fisher-weighted average: sum F_i theta_i / sum F_i (needs a metric per model)",
    uses_base="no", min_models=1, needs_metric="required",
))
register(MethodSpec(
    name="preconditioned", fn=preconditioned,
    params=(WEIGHT1,
            Param("power", "global", float, 0.5, 0.0, 2.0, help="metric ** power: 0.5 for Adam's sqrt(v), 1 for v"),
            Param("epsilon", "global", float, 1e-8, 0.0, help="added after the power (Adam's eps)")),
    description="metric-weighted average under any diagonal preconditioner (Adam's second moments)",
    uses_base="no", min_models=1, needs_metric="optional",
))
register(MethodSpec(
    name="gradient_matching", fn=gradient_matching,
    params=(Param("weight", "model", float, 1.0, help="alpha_t: scale of this task vector"),
            Param("data_size", "model", float, 1.0, 0.0, help="scales this model's curvature (its data size)"),
            Param("prior", "global", float, 0.0, 0.0, help="delta_0: prior precision"),
            Param("base_data_size", "global", float, 1.0, 0.0, help="scales the base curvature H_0")),
    description="uncertainty-based gradient matching (Daheim et al.): task vectors reweighted by curvature",
    uses_base="required", min_models=1, needs_metric="required",
))
register(MethodSpec(
    name="regmean", fn=regmean,
    params=(WEIGHT1, Param("alpha", "global", float, 0.9, 0.0, 1.0, help="scale of the off-diagonal Gram entries")),
    description="RegMean: least-squares merge of linear layers from input Gram matrices; other tensors averaged",
    uses_base="no", min_models=1, needs_gram=True,
))
