"""One output tensor of a merge: a method's function applied to that tensor's inputs.

This is the per-tensor call of every merge. The in-memory
:class:`~mergesearch.engine.materialize.Materializer` and the streamed export
(:func:`mergesearch.engine.merge.stream_merge`) both compile a recipe once
(:class:`~mergesearch.engine.compiled.CompiledRecipe`: the method and every tensor's
resolved parameters) and, tensor by tensor, hand its inputs and parameters here; the
method calls the selections and kernels below it and returns the merged tensor.
"""

from __future__ import annotations

import torch

from mergesearch.errors import MergeSearchError
from mergesearch.methods.inputs import TensorInputs
from mergesearch.methods.registry import MethodSpec

# per model: None, or (where the scales come from, tensor name -> one multiplier per row)
RowScales = list[tuple[str, dict] | None]


def merge_tensor(spec: MethodSpec, x: TensorInputs, g: dict, per_model: list[dict],
                 rows: RowScales | None = None, check_finite: bool = True) -> torch.Tensor:
    """``spec``'s merge of ``x`` with the global parameters ``g`` and the per-model
    parameters ``per_model``, in the work dtype (or in ``x.out_dtype`` where a kernel
    made a large tensor in blocks, or written into ``x.out`` where a kernel could).
    ``rows``: each model's row scales, which multiply its weight per output row."""
    if rows is not None:
        per_model = row_weights(x, per_model, rows)
    out = spec.fn(x, g, per_model)
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    if check_finite and not torch.isfinite(out.sum(dtype=acc)):
        raise MergeSearchError(f"{x.name}: the merge produced NaN or Inf (check the parameters)")
    return out


def row_weights(x: TensorInputs, per_model: list[dict], rows: RowScales) -> list[dict]:
    """Each model's weight times its row scales for this tensor, where it has them: a
    vector of one weight per output row."""
    out = []
    shape = tuple(x.raw_base.shape)
    for p, entry in zip(per_model, rows):
        v = None if entry is None else entry[1].get(x.name)
        if v is None:
            out.append(p)
            continue
        if len(shape) != 2 or tuple(v.shape) != (shape[0],):
            raise MergeSearchError(f"{entry[0]}: {x.name}: {v.numel()} row scales for a tensor of shape "
                                   f"{'x'.join(map(str, shape))}")
        out.append({**p, "weight": v.to(device=x.raw_base.device, dtype=torch.float32) * float(p["weight"])})
    return out
