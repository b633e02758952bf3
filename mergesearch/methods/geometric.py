"""Spherical and geometric merges: SLERP, NuSLERP, Multi-SLERP, the Karcher mean, Model
Stock, and passthrough."""

from __future__ import annotations

import torch

from mergesearch.errors import MergeSearchError
from mergesearch.methods.inputs import TensorInputs
from mergesearch.methods.registry import MethodSpec, Param, register


def _slerp_flat(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """SLERP between two whole tensors treated as flat vectors; nearly collinear
    pairs (|cos| > dot_threshold) fall back to linear interpolation."""
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    na = torch.linalg.vector_norm(a)
    nb = torch.linalg.vector_norm(b)
    na = torch.where(na > eps, na, 1)
    nb = torch.where(nb > eps, nb, 1)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = torch.acos(dot)
    s = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / s) * v0 + (torch.sin(t * theta) / s) * v1


def slerp(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    # model 0 is the other endpoint; t = 0 gives the base, t = 1 the model.
    return _slerp_flat(g["t"], x.base, x.tensor(0))


def _nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(v):
        return v / torch.norm(v, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = (unit(v0) * unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, 0, cos))
    s = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / s
    out = torch.where(collinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    w0, w1 = m[0]["weight"], m[1]["weight"]
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    args = dict(row_wise=g["nuslerp_row_wise"], flatten=g["nuslerp_flatten"])
    if x.base is not None:
        return x.base + _nuslerp(t, x.delta(0), x.delta(1), **args)
    return _nuslerp(t, x.tensor(0), x.tensor(1), **args)


def model_stock(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    """Model Stock: interpolate between the base and the models' average by a ratio
    set from the mean pairwise cosine of the task vectors (whole tensor or per row)."""
    base = x.base
    shape = base.shape
    if g["filter_wise"]:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [x.tensor(i).reshape(w0.shape) for i in range(x.n)]
    else:
        w0 = base.reshape(-1)
        ws = [x.tensor(i).reshape(-1) for i in range(x.n)]
    offsets = [w - w0 for w in ws]
    cosines = []
    for a_i, a in enumerate(offsets):
        for b in offsets[a_i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denom = 1 + (k - 1) * cos
    singular = denom.abs() < 1e-6
    ratio = torch.where(singular, torch.zeros_like(cos), (k * cos) / torch.where(singular, 1, denom))
    average = sum(ws) / k
    return (ratio * average + (1 - ratio) * w0).reshape(shape)


def multislerp(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    """Barycentric interpolation on the unit sphere (mergekit's Multi-SLERP).

    Each point (a task vector with a base, else the model's tensor, as one flat vector)
    is scaled to unit length; their weighted mean, normalized, is the point at which the
    sphere's tangent space is taken; the weighted sum of the points' tangent components
    is mapped back onto the sphere (exponential map) and scaled by the weighted mean of
    the points' norms. One model is returned as it is. The points are made again for
    the second pass instead of being held."""
    n = x.n
    if n == 1:
        return x.tensor(0)
    eps = g["eps"]
    with_base = x.base is not None
    weights = [float(p["weight"]) for p in m]
    w = torch.tensor(weights, dtype=x.scalar(0).dtype, device=x.device)
    if g["normalize_weights"]:
        if sum(weights) == 0:
            raise MergeSearchError(f"{x.name}: multislerp: the weights sum to zero; cannot normalize them "
                                   f"(set normalize_weights: false or change the weights)")
        w = w / w.sum()

    def point(i: int) -> torch.Tensor:
        return x.owned(i, with_base).reshape(-1)

    norms = []
    mean = None
    for i in range(n):
        v = point(i)
        norms.append(torch.linalg.vector_norm(v))
        v.div_(norms[i] + eps).mul_(w[i])
        mean = v if mean is None else mean.add_(v)
        del v
    size = torch.linalg.vector_norm(mean)
    if all(float(v) == 0 for v in norms):  # no model moves this tensor (e.g. LoRA adapters that skip it)
        out = torch.zeros(x.shape, dtype=mean.dtype, device=x.device)
        return out.add_(x.base) if with_base else out
    if size < eps:
        if n != 2:
            raise MergeSearchError(f"{x.name}: multislerp: the weighted directions of the models cancel out "
                                   f"(antipodal {'task vectors' if with_base else 'tensors'} with balancing "
                                   f"weights); use other weights")
        # two opposite points: the straight line between them
        out = point(0).mul_(w[0]).add_(point(1).mul_(w[1])).reshape(x.shape)
        return out.add_(x.base) if with_base else out
    mean.div_(size)
    tangent = None
    for i in range(n):
        u = point(i).div_(norms[i] + eps)
        u.sub_((u * mean).sum() * mean).mul_(w[i])
        tangent = u if tangent is None else tangent.add_(u)
        del u
    angle = torch.linalg.vector_norm(tangent) + eps
    out = mean.mul_(torch.cos(angle)).add_(tangent.mul_(torch.sin(angle) / angle))
    del tangent
    out = out.mul_((torch.stack(norms) * w).sum()).reshape(x.shape)
    return out.add_(x.base) if with_base else out


def karcher(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    """The Karcher (Riemannian) mean of the points' directions, with equal weights,
    scaled by the mean of their norms (mergekit's karcher). The points are the models'
    tensors and, with a base, the base too, as mergekit adds the base model as an input
    (after the listed models). Points of norm <= tol take no part in the direction (a
    zero tensor has none) but count in the norm; when none is left, zeros.

    The mean starts at the normalized mean of the unit points and moves along the mean
    of their log maps (Riemannian gradient descent) until that step is shorter than tol
    or max_iter steps are taken. Unit points are made again where needed, not held."""
    points: list = list(range(x.n)) + (["base"] if x.base is not None else [])
    k = len(points)
    if k == 1:
        return x.tensor(0)
    norms = []
    for p in points:
        norms.append(torch.linalg.vector_norm(x.base if p == "base" else x.tensor(p)))
        if p != "base":
            x.release(p)
    sizes = [float(v) for v in norms]
    dtype = x.scalar(0).dtype

    def unit(j: int) -> torch.Tensor:
        p = points[j]
        if sizes[j] == 0.0:
            return torch.zeros(x.shape, dtype=dtype, device=x.device)
        return x.base / norms[j] if p == "base" else x.owned(p, False).div_(norms[j])

    tol, alpha = g["tol"], 1.0 / k
    valid = [j for j in range(k) if sizes[j] > tol]
    if not valid:
        return torch.zeros(x.shape, dtype=dtype, device=x.device)
    total = sum(alpha for _ in valid)
    shares = [alpha / total for _ in valid]
    mean = torch.zeros(x.shape, dtype=dtype, device=x.device)
    for a, j in zip(shares, valid):
        mean += unit(j).mul_(a)
    size = torch.linalg.vector_norm(mean)
    mean = unit(valid[0]) if size.item() < tol else mean.div_(size)
    for _ in range(g["max_iter"]):
        step = torch.zeros_like(mean)
        for a, j in zip(shares, valid):
            u = unit(j)
            cos = torch.dot(mean.reshape(-1), u.reshape(-1)).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            step += u.sub_(cos * mean).mul_(a * (theta / torch.sin(theta)))
            del u
        length = torch.linalg.vector_norm(step)
        if length.item() < tol:
            break
        mean.mul_(torch.cos(length)).add_(step.div_(length).mul_(torch.sin(length)))
        del step
        size = torch.linalg.vector_norm(mean)
        if size.item() > tol:
            mean.div_(size)
    return mean.mul_(sum(alpha * v for v in norms))


def passthrough(x: TensorInputs, g: dict, m: list[dict]) -> torch.Tensor:
    scale = m[0]["scale"]
    out = x.tensor(0)
    return out if scale == 1.0 else out * scale


register(MethodSpec(
    name="slerp", fn=slerp,
    params=(Param("t", "global", float, low=0.0, high=1.0, help="interpolation from the base (0) to the model (1)"),),
    description="spherical interpolation between the base and one model",
    uses_base="required", min_models=1, max_models=1,
))
register(MethodSpec(
    name="nuslerp", fn=nuslerp,
    params=(
        Param("weight", "model", float, help="relative weight; t = w2 / (w1 + w2)"),
        Param("nuslerp_row_wise", "global", bool, False, help="interpolate rows instead of columns"),
        Param("nuslerp_flatten", "global", bool, True, help="treat the tensor as one vector"),
    ),
    description="spherical interpolation of two models or two task vectors",
    uses_base="optional", min_models=2, max_models=2,
))
register(MethodSpec(
    name="multislerp", fn=multislerp,
    params=(
        Param("weight", "model", float, help="weight of this model's point on the sphere"),
        Param("normalize_weights", "global", bool, True, help="divide the weights by their sum"),
        Param("eps", "global", float, 1e-8, 0.0, help="added to norms before dividing"),
    ),
    description="barycentric spherical interpolation of any number of models or task vectors",
    uses_base="optional", min_models=1,
))
register(MethodSpec(
    name="karcher", fn=karcher,
    params=(
        Param("max_iter", "global", int, 10, 0, help="most steps of the Karcher mean iteration"),
        Param("tol", "global", float, 1e-5, 0.0, help="stop when a step is shorter; smaller norms have no direction"),
    ),
    description="Karcher mean on the sphere of the models (and the base, when given), scaled by the mean norm",
    uses_base="optional", min_models=1,
))
register(MethodSpec(
    name="model_stock", fn=model_stock,
    params=(Param("filter_wise", "global", bool, False, help="one ratio per row instead of per tensor"),),
    description="Model Stock: base-to-average ratio from task-vector cosines",
    uses_base="required", min_models=2,
))
register(MethodSpec(
    name="passthrough", fn=passthrough,
    params=(Param("scale", "model", float, 1.0, help="multiply the tensor by this"),),
    description="copy one model's tensors, optionally scaled",
    uses_base="no", min_models=1, max_models=1,
))
