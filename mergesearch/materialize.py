"""In-memory materialization of candidate merges (the search hot loop).

A :class:`Materializer` loads the base and the models once and keeps them
resident on its device in their stored dtype (task vectors are formed inside the
fused kernels, as in the export), and for magnitude-based sparsifiers (TIES,
breadcrumbs) the rank of every element of every task vector in the stable
magnitude order, so pruning at any density is one integer comparison inside the
fused kernel instead of a top-k (exact, ties included). A candidate is computed by the
same per-tensor code as the streamed export and written into an existing
``nn.Module`` in place, with no disk I/O. Results are bit-equal to
:func:`mergesearch.merge.stream_merge` for the same recipe.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from mergesearch.checkpoint import Checkpoint, check_compatible
from mergesearch.errors import MergeSearchError
from mergesearch.merge import merge_tensor
from mergesearch.methods.inputs import work_dtype
from mergesearch.methods import REGISTRY, TensorInputs, get_method
from mergesearch.methods.inputs import magnitude_ranks
from mergesearch.recipe import Recipe, layer_position

log = logging.getLogger(__name__)


class Materializer:
    def __init__(
        self,
        base: str | Path | None,
        models: list[str | Path],
        methods: list[str] | None = None,
        device: str = "cpu",
        allow_unrelated: bool = False,
        check: bool = True,
        metrics: dict[str, str] | None = None,
        grams: dict[str, str] | None = None,
        base_metric: str | None = None,
    ):
        """``metrics`` and ``grams`` map model paths to their side-input files (for
        the curvature-based methods); they are loaded once and stay resident."""
        t0 = time.perf_counter()
        self.device = torch.device(device)
        methods = methods or list(REGISTRY)
        specs = [get_method(m, "materializer") for m in methods]
        if base is None:  # soups: methods that never read the base
            needs = [s.name for s in specs if s.uses_base == "required"]
            if needs:
                raise MergeSearchError(f"materializer without a base cannot serve {', '.join(needs)}")
        self.model_ckpts = [Checkpoint(p) for p in models]
        self.base_ckpt = Checkpoint(base) if base is not None else None
        if check:
            check_compatible(self.base_ckpt, self.model_ckpts, allow_unrelated=allow_unrelated)
        self.paths = {str(Path(p).resolve()): i for i, p in enumerate(models)}
        self.base_path = str(Path(base).resolve()) if base is not None else None
        ref = self.base_ckpt if self.base_ckpt is not None else self.model_ckpts[0]
        self.ref_ckpt = ref
        keep_ranks = any(s.sparsifier in ("magnitude", "outliers") for s in specs)
        self.num_layers = ref.num_layers
        self.names = ref.names()
        self.float_names = [n for n in self.names if ref.dtype(n).is_floating_point]
        # Resident, in their stored dtype (bf16 stays bf16): the base and every model.
        # Task vectors are taken inside the fused kernels, exactly as the export does.
        self.base: dict[str, torch.Tensor] = {}
        self.tensors: dict[str, list[torch.Tensor]] = {}
        self.ranks: dict[str, list[torch.Tensor]] | None = {} if keep_ranks else None
        self.constants: dict[str, torch.Tensor] = {}
        for name in self.names:
            if name not in self.float_names:
                self.constants[name] = ref.get(name).to(self.device)
                continue
            ts = [self._load(m, name) for m in self.model_ckpts]
            self.tensors[name] = ts
            if self.base_ckpt is not None:
                b = self.base[name] = self._load(self.base_ckpt, name)
            if self.ranks is not None:
                wb = b.to(work_dtype(b.dtype))
                self.ranks[name] = [magnitude_ranks(t.to(wb.dtype) - wb) for t in ts]
            for c in [ref, *self.model_ckpts]:
                c.release()
        self._load_side(metrics or {}, grams or {}, base_metric)
        self.setup_seconds = time.perf_counter() - t0
        self.resident_bytes = sum(
            t.numel() * t.element_size()
            for store in (self.tensors, self.ranks)
            if store is not None
            for ts in store.values()
            for t in ts
        ) + sum(t.numel() * t.element_size() for t in self.base.values()) + sum(
            t.numel() * t.element_size() for tensors in self.side.values() for t in tensors.values())

    def _load_side(self, metrics: dict, grams: dict, base_metric: str | None) -> None:
        from mergesearch.checkpoint import SideFile

        def key(p):
            return str(Path(p).resolve())
        by_model = {key(c.path): i for i, c in enumerate(self.model_ckpts)}
        self.side_files: dict[tuple[str, int], str] = {}
        self.side: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        for kind, table in (("metric", metrics), ("gram", grams)):
            for model, file in table.items():
                i = by_model.get(key(model))
                if i is None:
                    raise MergeSearchError(f"{file}: {kind} for {model}, which is not among the models")
                f = SideFile(file, kind).check_against(self.model_ckpts[i])
                self.side_files[(kind, i)] = key(file)
                self.side[(kind, i)] = {n: f.get(n).to(self.device) for n in f.names()}
                f.release()
        if base_metric is not None:
            if self.base_ckpt is None:
                raise MergeSearchError(f"{base_metric}: a base metric needs a base model")
            f = SideFile(base_metric, "metric").check_against(self.base_ckpt)
            self.side_files[("metric", -1)] = key(base_metric)
            self.side[("metric", -1)] = {n: f.get(n).to(self.device) for n in f.names()}
            f.release()

    def _load(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        t = ckpt.get(name).to(device=self.device)
        if not torch.isfinite(t.sum(dtype=work_dtype(t.dtype))):
            raise MergeSearchError(f"{ckpt.path}: tensor '{name}' contains NaN or Inf")
        return t

    def bind(self, recipe: Recipe) -> tuple[list[int], dict]:
        """Resolve a recipe's models and side-input files to resident slots: done once
        per candidate, not once per tensor (path resolution is a filesystem call)."""
        spec = recipe.spec
        if recipe.base and self.base_path is None:
            raise MergeSearchError(f"recipe base {recipe.base}: this materializer holds no base")
        if recipe.base and str(Path(recipe.base).resolve()) != self.base_path:
            raise MergeSearchError(f"recipe base {recipe.base} differs from the materializer's base")
        if spec.sparsifier in ("magnitude", "outliers") and self.ranks is None:
            raise MergeSearchError(f"method '{spec.name}' was not among the materializer's methods")
        idx = []
        for m in recipe.models:
            key = str(Path(m.path).resolve())
            if key not in self.paths:
                raise MergeSearchError(f"recipe model {m.path} is not loaded in this materializer")
            idx.append(self.paths[key])

        def slot(kind: str, i: int, file: str | None):
            if file is None:
                return None
            if self.side_files.get((kind, i)) != str(Path(file).resolve()):
                raise MergeSearchError(f"recipe {kind} {file} is not loaded in this materializer")
            return (kind, i)
        side: dict = {}
        if spec.needs_metric != "no":
            side["metrics"] = [slot("metric", i, m.metric) for i, m in zip(idx, recipe.models)]
            side["base_metric"] = slot("metric", -1, recipe.base_metric)
        if spec.needs_gram:
            side["grams"] = [slot("gram", i, m.gram) for i, m in zip(idx, recipe.models)]
        return idx, side

    def inputs(self, recipe: Recipe, name: str, bound: tuple[list[int], dict] | None = None) -> TensorInputs:
        idx, side = bound if bound is not None else self.bind(recipe)
        tensors = [self.tensors[name][i] for i in idx]
        ranks = [self.ranks[name][i] for i in idx] if self.ranks is not None else None
        base = self.base.get(name) if recipe.spec.uses_base != "no" else None

        def get(key):
            return None if key is None else self.side[key].get(name)
        extra = {k: [get(x) for x in v] if isinstance(v, list) else get(v) for k, v in side.items()}
        return TensorInputs(name, base, tensors=tensors, ranks=ranks, seed=recipe.seed, **extra)

    def tensor(self, recipe: Recipe, name: str, bound: tuple[list[int], dict] | None = None) -> torch.Tensor:
        if name in self.constants:
            return self.constants[name]
        # No finiteness pass in the hot loop: a non-finite candidate shows up as a
        # non-finite score and fails its trial.
        return merge_tensor(recipe, recipe.spec, self.inputs(recipe, name, bound),
                            layer_position(name, self.num_layers), check_finite=False)

    def state_dict(self, recipe: Recipe, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The merged weights (for tests and small models)."""
        out = {}
        bound = self.bind(recipe)
        for name in self.names:
            t = self.tensor(recipe, name, bound)
            out[name] = t.to(dtype or self.ref_ckpt.dtype(name)) if t.is_floating_point() else t
        return out

    @torch.no_grad()
    def write_into(self, module: torch.nn.Module, recipe: Recipe) -> None:
        """Write the recipe's merged weights into ``module``'s parameters in place."""
        recipe.validate_semantics()
        targets = dict(module.named_parameters())
        targets.update(dict(module.named_buffers()))
        bound = self.bind(recipe)
        for name in self.names:
            target = targets.get(name)
            if target is None:
                continue  # e.g. a tied lm_head absent from the module's names
            merged = self.tensor(recipe, name, bound)
            target.copy_(merged.to(dtype=target.dtype, device=target.device))
