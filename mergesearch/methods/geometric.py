"""Spherical and geometric merges: SLERP, NuSLERP, Model Stock, and passthrough."""

from __future__ import annotations

import torch

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
