"""Merge methods: pure tensor functions in a registry (name -> MethodSpec).

Importing this package registers every built-in method.
"""

from mergesearch.methods import (  # noqa: F401  (registration)
    geometric,
    geometry,
    selective,
    spectral,
    task_arithmetic,
)
from mergesearch.methods.apply import merge_tensor
from mergesearch.methods.inputs import FactorCache, LowRank, TensorInputs, tensor_seed
from mergesearch.methods.registry import REGISTRY, MethodSpec, Param, get_method

__all__ = ["FactorCache", "LowRank", "REGISTRY", "MethodSpec", "Param", "TensorInputs", "get_method", "merge_tensor", "tensor_seed"]
