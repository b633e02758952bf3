"""A recipe compiled once per candidate into a per-tensor plan.

:class:`CompiledRecipe` checks a recipe's semantics once and resolves its parameters
(filters, layer gradients, defaults) for every tensor name before any merge work. The
in-memory Materializer, the streamed export and gradient refinement all read the
per-tensor parameters from it, and :meth:`CompiledRecipe.merge` is the one per-tensor
merge they share. Filters are matched once per distinct filter set, not once per tensor
and parameter: tensors that match the same filters at the same layer position share one
resolution.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from mergesearch.errors import MergeSearchError
from mergesearch.methods import MethodSpec, TensorInputs
from mergesearch.recipe import Conditional, Recipe, layer_position

Params = tuple[dict[str, Any], list[dict[str, Any]]]


def _filters(setting, out: set[str]) -> None:
    if isinstance(setting, list):
        for item in setting:
            if isinstance(item, Conditional):
                if item.filter not in (None, "*"):
                    out.add(item.filter)
                _filters(item.value, out)


class CompiledRecipe:
    """``recipe`` resolved for ``names`` (the tensors a model holds, in order)."""

    def __init__(self, recipe: Recipe, names: Iterable[str], num_layers: int, *, validate: bool = True):
        if validate:
            recipe.validate_semantics()
        self.recipe = recipe
        self.spec: MethodSpec = recipe.spec
        filters: set[str] = set()
        for scope in [recipe.parameters, *(m.parameters for m in recipe.models)]:
            for setting in scope.values():
                _filters(setting, filters)
        order = sorted(filters)
        by_key: dict[tuple, Params] = {}
        self.params: dict[str, Params] = {}
        for name in names:
            t = layer_position(name, num_layers)
            key = (tuple(f in name for f in order), t)
            if key not in by_key:
                by_key[key] = recipe.resolve(name, t)
            self.params[name] = by_key[key]
        self.distinct = len(by_key)
        self.rows = recipe.row_scales() if recipe.has_row_scales else None

    def __getitem__(self, name: str) -> Params:
        try:
            return self.params[name]
        except KeyError:
            raise MergeSearchError(f"{name}: not a tensor of the compiled recipe") from None

    def merge(self, x: TensorInputs, check_finite: bool = True) -> torch.Tensor:
        """One output tensor in the work dtype."""
        g, per_model = self[x.name]
        if self.rows is not None:
            per_model = self._row_weights(x, per_model)
        out = self.spec.fn(x, g, per_model)
        acc = torch.float64 if out.dtype == torch.float64 else torch.float32
        if check_finite and not torch.isfinite(out.sum(dtype=acc)):
            raise MergeSearchError(f"{x.name}: the merge produced NaN or Inf (check the parameters)")
        return out

    def _row_weights(self, x: TensorInputs, per_model: list[dict]) -> list[dict]:
        """Each model's weight times its row scales for this tensor, where it has them: a
        vector of one weight per output row."""
        out = []
        shape = tuple(x.raw_base.shape)
        for i, (p, rows) in enumerate(zip(per_model, self.rows)):
            v = None if rows is None else rows.get(x.name)
            if v is None:
                out.append(p)
                continue
            if len(shape) != 2 or tuple(v.shape) != (shape[0],):
                where = self.recipe.models[i].row_scales or f"models[{i}] row scales"
                raise MergeSearchError(f"{where}: {x.name}: {v.numel()} row scales for a tensor of shape "
                                       f"{'x'.join(map(str, shape))}")
            out.append({**p, "weight": v.to(device=x.raw_base.device, dtype=torch.float32) * float(p["weight"])})
        return out
