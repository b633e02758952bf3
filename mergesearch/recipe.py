"""Recipes: a complete, serializable description of one merge.

A parameter value may be
- a scalar: ``0.5`` or ``true``;
- a gradient: ``[0.1, 0.9]``, interpolated linearly across the layers (layer i of
  L sits at t = i / (L - 1)); tensors outside the layers (embeddings, final norm,
  lm_head) take the first value;
- a list of filters: ``[{filter: self_attn, value: 0.3}, {value: 0.7}]``; the first
  entry whose filter is a substring of the tensor name (or that has no filter)
  applies, and its value may itself be a gradient.

These are mergekit's rules, so its YAML converts both ways (:func:`to_mergekit`,
:func:`from_mergekit`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, Union

import yaml
from pydantic import PrivateAttr, StrictBool, ValidationError, field_validator

from mergesearch.config import StrictModel, load_yaml, pydantic_error
from mergesearch.errors import MergeSearchError
from mergesearch.methods import MethodSpec, get_method

log = logging.getLogger(__name__)

Scalar = Union[StrictBool, float]


class Conditional(StrictModel):
    filter: Optional[str] = None
    value: Union[Scalar, list[Scalar]]


Setting = Union[Scalar, list[Scalar], list[Conditional]]
Params = tuple[dict[str, Any], list[dict[str, Any]]]  # one tensor's (global, per model) parameters


class TensorSettings(NamedTuple):
    """A recipe resolved for every tensor of a model (:meth:`Recipe.tensor_settings`)."""

    spec: MethodSpec
    params: dict[str, Params]  # tensor name -> its parameters
    distinct: int  # resolutions made: one per filters matched and layer position
    # per model: None, or (where its row scales come from, tensor name -> one multiplier
    # per row); None where no model has row scales
    rows: list[tuple[str, dict] | None] | None


class ModelEntry(StrictModel):
    path: str
    parameters: dict[str, Setting] = {}
    metric: Optional[str] = None  # diagonal metric file (fisher, preconditioned, gradient_matching)
    gram: Optional[str] = None  # Gram matrices of linear-layer inputs (regmean)
    # a safetensors file: tensor name -> one multiplier per output row (float32), applied to
    # this model's weight at that row (the task-vector family; written by refine.rows)
    row_scales: Optional[str] = None


class Recipe(StrictModel):
    method: str
    base: Optional[str] = None
    models: list[ModelEntry]
    parameters: dict[str, Setting] = {}
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    seed: int = 0
    tokenizer_source: Optional[str] = None
    base_metric: Optional[str] = None  # the base's curvature (gradient_matching)
    # per model, row scales held in memory (a refinement's, before the controller writes
    # them to files): model index -> tensor name -> multipliers; never serialized
    _rows: Optional[dict] = PrivateAttr(default=None)

    @field_validator("models")
    @classmethod
    def _some_models(cls, v):
        if not v:
            raise ValueError("at least one model is required")
        return v

    # -- semantics -----------------------------------------------------------
    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    def validate_semantics(self, where: str = "recipe") -> "Recipe":
        spec = get_method(self.method, where)
        n = len(self.models)
        if spec.uses_base == "required" and not self.base:
            raise MergeSearchError(f"{where}: method '{spec.name}' needs a base model ('base')")
        if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
            if spec.name == "slerp":
                raise MergeSearchError(f"{where}: slerp merges exactly 2 models (the base and 1 other); got {n + 1}")
            want = f"exactly {spec.min_models}" if spec.min_models == spec.max_models else (
                f"at least {spec.min_models}" if spec.max_models is None else f"{spec.min_models} to {spec.max_models}")
            raise MergeSearchError(f"{where}: method '{spec.name}' takes {want} models besides the base; got {n}")
        known = {p.name: p for p in spec.params}
        for key, setting in self.parameters.items():
            if key not in known:
                raise MergeSearchError(f"{where}: parameters.{key}: unknown parameter for method '{spec.name}' "
                                       f"(known: {', '.join(known)})")
            _check_leaves(known[key], setting, f"{where}: parameters.{key}")
        for i, m in enumerate(self.models):
            for key, setting in m.parameters.items():
                p = known.get(key)
                if p is None or p.scope != "model":
                    why = "unknown parameter" if p is None else "a global parameter, set it under top-level 'parameters'"
                    raise MergeSearchError(f"{where}: models[{i}].parameters.{key}: {why} for method '{spec.name}'")
                _check_leaves(p, setting, f"{where}: models[{i}].parameters.{key}")
        for i, m in enumerate(self.models):
            if m.metric is None and spec.needs_metric == "required":
                raise MergeSearchError(f"{where}: models[{i}] ({m.path}) needs a 'metric' file for method "
                                       f"'{spec.name}' (write one with: mergesearch curvature)")
            if m.metric is not None and spec.needs_metric == "no":
                raise MergeSearchError(f"{where}: models[{i}].metric: method '{spec.name}' uses no metric")
            if m.gram is None and spec.needs_gram:
                raise MergeSearchError(f"{where}: models[{i}] ({m.path}) needs a 'gram' file for method "
                                       f"'{spec.name}' (write one with: mergesearch curvature --kind gram)")
            if m.gram is not None and not spec.needs_gram:
                raise MergeSearchError(f"{where}: models[{i}].gram: method '{spec.name}' uses no Gram matrices")
        if any(m.row_scales for m in self.models) or self._rows:
            from mergesearch.methods.task_arithmetic import TASK_VECTOR_METHODS
            if spec.name not in TASK_VECTOR_METHODS:
                raise MergeSearchError(f"{where}: row_scales: method '{spec.name}' is not in the task-vector family "
                                       f"({', '.join(sorted(TASK_VECTOR_METHODS))})")
        if self.base_metric is not None and spec.name != "gradient_matching":
            raise MergeSearchError(f"{where}: base_metric: only gradient_matching uses a base curvature")
        for p in spec.params:
            if not p.required:
                continue
            if p.scope == "global" and p.name not in self.parameters:
                raise MergeSearchError(f"{where}: method '{spec.name}' needs parameters.{p.name}")
            if p.scope == "model":
                for i, m in enumerate(self.models):
                    if p.name not in m.parameters and p.name not in self.parameters:
                        raise MergeSearchError(f"{where}: models[{i}] ({m.path}) needs parameter '{p.name}' "
                                               f"for method '{spec.name}'")
        return self

    def resolve(self, tensor_name: str, t: float) -> Params:
        """Scalar parameters for one tensor at layer position t: (global, per model)."""
        spec = self.spec
        return self._resolve(spec.global_params, spec.model_params, tensor_name, t)

    def _resolve(self, global_params, model_params, tensor_name: str, t: float) -> Params:
        g = {p.name: _resolve_one(p, [self.parameters], tensor_name, t) for p in global_params}
        per_model = [{p.name: _resolve_one(p, [m.parameters, self.parameters], tensor_name, t) for p in model_params}
                     for m in self.models]
        return g, per_model

    def tensor_settings(self, names: Iterable[str], num_layers: int, *, validate: bool = True) -> TensorSettings:
        """Everything a merge of this recipe reads per tensor, resolved once for ``names``
        (the tensors of a model with ``num_layers`` layers): the method, each tensor's
        parameters and each model's row scales. Checks the recipe first with ``validate``.
        Filters are matched once per distinct filter set: tensors that match the same
        filters at the same layer position share one resolution."""
        if validate:
            self.validate_semantics()
        spec = self.spec
        filters: set[str] = set()
        for scope in [self.parameters, *(m.parameters for m in self.models)]:
            for setting in scope.values():
                _filters(setting, filters)
        order = sorted(filters)
        global_params, model_params = spec.global_params, spec.model_params
        by_key: dict[tuple, Params] = {}
        params: dict[str, Params] = {}
        for name in names:
            t = layer_position(name, num_layers)
            key = (tuple(f in name for f in order), t)
            if key not in by_key:
                by_key[key] = self._resolve(global_params, model_params, name, t)
            params[name] = by_key[key]
        rows = None
        if self.has_row_scales:
            rows = [None if v is None else (self.models[i].row_scales or f"models[{i}] row scales", v)
                    for i, v in enumerate(self.row_scales())]
        return TensorSettings(spec, params, len(by_key), rows)

    # -- files -----------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        path = Path(path)
        data = load_yaml(path)
        recipe = from_dict(data, str(path))
        try:
            return recipe.with_paths_relative_to(path.parent)
        except MergeSearchError as e:  # a model reference: name the recipe file too
            raise MergeSearchError(f"{path}: {e}") from None

    def with_paths_relative_to(self, folder: Path) -> "Recipe":
        """Paths relative to ``folder`` made absolute, and model references pinned
        (:func:`mergesearch.sources.pin`: Hub IDs at their commit, an adapter listed
        alone as base+adapter)."""
        from mergesearch.sources import pin

        def fix(p: str | None) -> str | None:
            if p is None or p == "base" or os.path.isabs(p):
                return p
            return str((folder / p).resolve())
        base = pin(self.base, folder, where="base")
        return self.model_copy(update={
            "base": base,
            "tokenizer_source": pin(self.tokenizer_source, folder, where="tokenizer_source"),
            "base_metric": fix(self.base_metric),
            "models": [m.model_copy(update={"path": pin(m.path, folder, base=base), "metric": fix(m.metric),
                                            "gram": fix(m.gram), "row_scales": fix(m.row_scales)})
                       for m in self.models],
        })

    @property
    def has_row_scales(self) -> bool:
        return bool(self._rows) or any(m.row_scales for m in self.models)

    def with_rows(self, rows: dict[int, dict]) -> "Recipe":
        """A copy holding per-model row scales in memory (model index -> tensor -> vector)."""
        out = self.model_copy()
        out._rows = {int(i): dict(v) for i, v in rows.items() if v}
        return out

    def row_scales(self) -> list[Optional[dict]]:
        """Each model's row scales (tensor name -> float32 vector), from memory or its file;
        None for a model without. A missing or unreadable file is a one-line error."""
        out: list[Optional[dict]] = []
        for i, m in enumerate(self.models):
            if self._rows and i in self._rows:
                out.append(self._rows[i])
            elif m.row_scales:
                from safetensors.torch import load_file
                try:
                    out.append(load_file(m.row_scales))
                except FileNotFoundError:
                    raise MergeSearchError(f"{m.row_scales}: models[{i}].row_scales: no such file") from None
                except Exception as e:
                    raise MergeSearchError(f"{m.row_scales}: models[{i}].row_scales: not a readable safetensors "
                                           f"file ({str(e).splitlines()[0][:200]})") from None
            else:
                out.append(None)
        return out

    def to_dict(self) -> dict:
        data = self.model_dump(mode="json", exclude_defaults=False)
        # side-input files appear only where a method uses them
        for m in data["models"]:
            for k in ("metric", "gram", "row_scales"):
                if m.get(k) is None:
                    m.pop(k, None)
        if data.get("base_metric") is None:
            data.pop("base_metric", None)
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        from mergesearch.fsutil import atomic_file
        with atomic_file(path) as f:
            f.write(self.to_yaml())

    def summary(self) -> str:
        parts = [self.method]
        for m in self.models:
            ps = ",".join(f"{k}={_short(v)}" for k, v in m.parameters.items())
            parts.append(f"{Path(m.path).name}({ps}{',row scales' if m.row_scales else ''})")
        if self.parameters:
            parts.append(",".join(f"{k}={_short(v)}" for k, v in self.parameters.items()))
        return " ".join(parts)


SHORT_LIST = 6  # a summary lists at most this many values of one setting


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        raw = [x.value if isinstance(x, Conditional) else x for x in v]
        values = [_short(x) for x in raw]
        if v and isinstance(v[0], Conditional):  # one value per group, in first-seen order
            values = list(dict.fromkeys(values))
        nums = [float(x) for x in raw if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if len(values) > SHORT_LIST and len(nums) == len(raw):
            # a refinement's value per tensor: its count and range, not a wall of numbers
            return f"[{len(raw)} values {min(nums):.3g}..{max(nums):.3g}]"
        return "[" + ",".join(values) + "]"
    return str(v)


def _filters(setting, out: set[str]) -> None:
    """Add the filters ``setting`` names (other than the catch-all) to ``out``."""
    if isinstance(setting, list):
        for item in setting:
            if isinstance(item, Conditional):
                if item.filter not in (None, "*"):
                    out.add(item.filter)
                _filters(item.value, out)


def _check_leaves(p, setting, where: str) -> None:
    if isinstance(setting, list):
        if not setting:
            raise MergeSearchError(f"{where}: empty list")
        for item in setting:
            if isinstance(item, Conditional):
                _check_leaves(p, item.value, where + (f"[filter={item.filter}]" if item.filter else ""))
            else:
                p.check(item, where)
    else:
        p.check(setting, where)


def resolve_setting(setting: Setting, tensor_name: str, t: float) -> Any:
    """Apply filters and gradients to get one scalar (None when no filter matches)."""
    if isinstance(setting, list):
        if setting and isinstance(setting[0], Conditional):
            for cond in setting:
                if cond.filter in (None, "*") or cond.filter in tensor_name:
                    return resolve_setting(cond.value, tensor_name, t)
            return None
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        return setting[int(t * (len(setting) - 1))]
    return setting


def _resolve_one(p, scopes: list[dict], tensor_name: str, t: float) -> Any:
    for scope in scopes:
        if p.name in scope:
            v = resolve_setting(scope[p.name], tensor_name, t)
            if v is not None:
                return p.kind(v) if p.kind is not bool else v
    if p.required:
        raise MergeSearchError(f"parameter '{p.name}' has no value for tensor {tensor_name}")
    return p.default


def layer_index(name: str) -> int | None:
    """The transformer block index in a tensor name (``model.layers.3.mlp...`` -> 3)."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h", "blocks", "layer") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def layer_position(tensor_name: str, num_layers: int) -> float:
    """Where a tensor sits for gradients: layer i of L at i / (L - 1); others at 0."""
    i = layer_index(tensor_name)
    if i is None:
        return 0.0
    return i / (num_layers - 1) if num_layers > 1 else 1.0


def from_dict(data: dict, where: str = "recipe") -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise pydantic_error(e, where) from None
    return recipe.validate_semantics(where)


# -- mergekit interop -------------------------------------------------------------


def _setting_to_mk(setting):
    if isinstance(setting, list) and setting and isinstance(setting[0], Conditional):
        return [c.model_dump(exclude_none=True) for c in setting]
    return setting


def has_mergekit_equivalent(recipe: Recipe) -> bool:
    spec = recipe.spec
    return spec.needs_metric == "no" and not spec.needs_gram and spec.factors is None and not recipe.has_row_scales


def to_mergekit(recipe: Recipe) -> dict:
    """The equivalent mergekit configuration (mergekit computes in float32 like us)."""
    spec = recipe.spec
    if not has_mergekit_equivalent(recipe):
        why = "per-row weights (row_scales)" if recipe.has_row_scales else f"method '{spec.name}'"
        raise MergeSearchError(f"{why} has no mergekit equivalent; use the mergesearch recipe")
    models = [{"model": m.path, **({"parameters": {k: _setting_to_mk(v) for k, v in m.parameters.items()}}
                                   if m.parameters else {})} for m in recipe.models]
    out: dict[str, Any] = {"merge_method": recipe.method}
    if spec.name == "slerp":
        models = [{"model": recipe.base}] + models
    if spec.uses_base in ("required", "optional") and recipe.base:
        out["base_model"] = recipe.base
    out["models"] = models
    if recipe.parameters:
        out["parameters"] = {k: _setting_to_mk(v) for k, v in recipe.parameters.items()}
    out["dtype"] = "float32"
    if recipe.dtype:
        out["out_dtype"] = recipe.dtype
    if recipe.tokenizer_source:
        out["tokenizer_source"] = recipe.tokenizer_source
    return out


def from_mergekit(data: dict, where: str = "mergekit config", strict: bool = False) -> Recipe:
    """Build a recipe from a mergekit configuration with a ``models`` list.

    As mergekit runs them: parameters the method does not use (published configs often
    carry ``density`` for task arithmetic, or a misspelled name) are dropped with one
    warning line naming them all; ``strict`` refuses them instead."""
    if not isinstance(data, dict):
        raise MergeSearchError(f"{where}: expected a mapping")
    unsupported = [k for k in ("slices", "modules", "tokenizer", "chat_template") if data.get(k)]
    if unsupported:
        raise MergeSearchError(f"{where}: '{unsupported[0]}' is not supported; use a 'models' list")
    known = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
    for k in data:
        if k not in known:
            raise MergeSearchError(f"{where}: unknown key '{k}'")
    if "merge_method" not in data:
        raise MergeSearchError(f"{where}: missing key 'merge_method'")
    method = data["merge_method"]
    spec = get_method(method, where)
    base = data.get("base_model")
    models = []
    for i, m in enumerate(data.get("models") or []):
        if not isinstance(m, dict) or "model" not in m:
            raise MergeSearchError(f"{where}: models[{i}] needs a 'model' key")
        path = m["model"]
        if base and path == base and spec.name != "linear":
            continue
        models.append({"path": path, "parameters": m.get("parameters") or {}})
    params = dict(data.get("parameters") or {})
    known = {p.name for p in spec.params}
    unused = [f"parameters.{k}" for k in params if k not in known]
    for i, m in enumerate(models):
        if isinstance(m["parameters"], dict):
            unused += [f"models[{i}].parameters.{k}" for k in m["parameters"] if k not in known]
    if unused:
        if strict:
            raise MergeSearchError(f"{where}: {unused[0]}: not a parameter of '{spec.name}' "
                                   f"(known: {', '.join(sorted(known))}); without --strict it is ignored, as mergekit does")
        log.warning("%s: ignoring what '%s' does not use, as mergekit does: %s (--strict refuses)", where, spec.name,
                    ", ".join(unused))
        params = {k: v for k, v in params.items() if k in known}
        for m in models:
            if isinstance(m["parameters"], dict):
                m["parameters"] = {k: v for k, v in m["parameters"].items() if k in known}
    if spec.name == "linear" and base and all(m["path"] != base for m in models):
        # mergekit adds an unlisted base as an input; it takes the global weight.
        models.append({"path": base, "parameters": {}})
    dtype = data.get("out_dtype") or data.get("dtype")
    recipe = {
        "method": method,
        "base": base,
        "models": models,
        "parameters": params,
        "tokenizer_source": data.get("tokenizer_source"),
    }
    if dtype:
        recipe["dtype"] = dtype
    return from_dict(recipe, where)


def load_mergekit(path: str | os.PathLike, strict: bool = False) -> Recipe:
    path = Path(path)
    return from_mergekit(load_yaml(path), str(path), strict=strict).with_paths_relative_to(path.parent)


def save_mergekit(recipe: Recipe, path: str | os.PathLike) -> None:
    from mergesearch.fsutil import atomic_file
    with atomic_file(path) as f:
        f.write(yaml.safe_dump(to_mergekit(recipe), sort_keys=False))
