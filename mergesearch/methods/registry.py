"""The merge-method registry.

Every method declares its parameters next to its math: name, whether the value is
given per model or once for the merge (global), its type, default and valid range.
Recipes, the CLI, mergekit import/export and search spaces all read this one
declaration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from mergesearch.errors import MergeSearchError

Scope = Literal["model", "global"]
REQUIRED = object()


@dataclass(frozen=True)
class Param:
    name: str
    scope: Scope
    kind: type = float
    default: Any = REQUIRED
    low: float = -math.inf
    high: float = math.inf
    help: str = ""
    # Accepted for mergekit compatibility but without effect on the result.
    inert: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any, where: str) -> Any:
        """Validate one resolved scalar; returns it converted to ``kind``."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MergeSearchError(f"{where}: parameter '{self.name}' must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergeSearchError(f"{where}: parameter '{self.name}' must be a number, got {value!r}")
        if self.kind is int and (not math.isfinite(value) or value != int(value)):
            raise MergeSearchError(f"{where}: parameter '{self.name}' must be a whole number, got {value!r}")
        value = self.kind(value)
        if not math.isfinite(value) or not (self.low <= value <= self.high):
            raise MergeSearchError(
                f"{where}: parameter '{self.name}' = {value} is outside its valid range [{self.low}, {self.high}]"
            )
        return value


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    description: str
    uses_base: Literal["required", "optional", "no"] = "required"
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    # how task vectors are sparsified: magnitude, outliers (breadcrumbs), random (DARE), della
    sparsifier: str | None = None
    # per-model side inputs: a diagonal metric file (curvature), Gram matrices (RegMean)
    needs_metric: Literal["no", "optional", "required"] = "no"
    needs_gram: bool = False
    # SVD factors a worker keeps between candidates (methods.spectral): each model's task
    # matrix ("task") or the sum of them ("sum")
    factors: Literal["task", "sum"] | None = None

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope == "model")

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope == "global")


REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"method {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def get_method(name: str, where: str = "recipe") -> MethodSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise MergeSearchError(f"{where}: unknown merge method '{name}' (known: {known})") from None
