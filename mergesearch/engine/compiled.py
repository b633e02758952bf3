"""A recipe compiled once per candidate into a per-tensor plan.

:class:`CompiledRecipe` asks the recipe once for everything a merge reads per tensor
(:meth:`mergesearch.recipe.Recipe.tensor_settings`: the method, every tensor's resolved
parameters, each model's row scales) and the dtype the export writes, before any merge
work. It is data from then on: the in-memory Materializer, the streamed export and
gradient refinement read the per-tensor parameters from it and hand them, with each
tensor's inputs, to the one per-tensor call they share
(:func:`mergesearch.methods.apply.merge_tensor`); nothing below calls back into it.
"""

from __future__ import annotations

from typing import Iterable

import torch

from mergesearch.engine.checkpoint import parse_dtype
from mergesearch.errors import MergeSearchError
from mergesearch.methods import MethodSpec
from mergesearch.methods.apply import RowScales
from mergesearch.recipe import Params, Recipe


class CompiledRecipe:
    """``recipe`` resolved for ``names`` (the tensors a model holds, in order)."""

    def __init__(self, recipe: Recipe, names: Iterable[str], num_layers: int, *, validate: bool = True):
        settings = recipe.tensor_settings(names, num_layers, validate=validate)
        self.recipe = recipe
        self.spec: MethodSpec = settings.spec
        self.params: dict[str, Params] = settings.params
        self.distinct: int = settings.distinct
        self.rows: RowScales | None = settings.rows
        # the dtype the export writes floating-point tensors in (None: each as stored)
        self.dtype: torch.dtype | None = parse_dtype(recipe.dtype)
        self.seed: int = recipe.seed

    def __getitem__(self, name: str) -> Params:
        try:
            return self.params[name]
        except KeyError:
            raise MergeSearchError(f"{name}: not a tensor of the compiled recipe") from None
