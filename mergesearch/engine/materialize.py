"""In-memory materialization of candidate merges (the search hot loop).

A :class:`Materializer` holds a family's inputs where a :class:`~mergesearch.engine.plan.Placement`
puts them: on the device (resident, in their stored dtype) or on the host, as
zero-copy views of the memory-mapped files, which the page cache keeps once per node
for every worker there. A candidate is computed tensor by tensor by the same
per-tensor code as the streamed export (:class:`mergesearch.engine.compiled.CompiledRecipe`),
cast to the dtype the export writes, and written into an existing ``nn.Module`` in
place, with no disk I/O: the recipe is compiled once per candidate, then each tensor
goes down once (its inputs, :func:`mergesearch.methods.apply.merge_tensor`, the method,
its selections and kernels) and comes back as the merged tensor. Host inputs are read
in place on the CPU (``stream: view``) or staged into the device through two slots,
one tensor ahead of the merge (:class:`~mergesearch.engine.staging.Stager`, its bytes
copied by several threads). TIES and breadcrumbs thresholds are
selected per candidate (a radix select), exactly as the export selects them, so nothing
per element is precomputed. Results are bit-equal to
:func:`mergesearch.engine.merge.stream_merge` for the same recipe in every placement and
dtype.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import torch

from mergesearch import sources
from mergesearch.engine.adapter import Adapter, open_model
from mergesearch.engine.checkpoint import SideFile, all_finite, mapped_safetensors
from mergesearch.engine.compat import check_compatible
from mergesearch.engine.compiled import CompiledRecipe
from mergesearch.errors import MergeSearchError
from mergesearch.methods import REGISTRY, FactorCache, LowRank, MethodSpec, TensorInputs, get_method, kernels, merge_tensor
from mergesearch.engine.plan import NO_BANDWIDTH, Placement, make_plan, slot_bytes
from mergesearch.engine.staging import Stager
from mergesearch.recipe import Recipe

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
        placement: Placement | None = None,
        budget: int | None = None,
        stream: str = "auto",
    ):
        """``metrics`` and ``grams`` map model paths to their side-input files (for the
        curvature-based methods). ``placement`` (or a plan made here for ``budget``
        bytes of device memory) says which inputs are resident on the device. A sharded
        worker's placement (:class:`mergesearch.engine.multi_gpu.MultiPlacement`) puts each
        tensor on its GPU: its inputs resident there or staged through that GPU's slots,
        merged there, or merged on the host (the export's path) where the plan says so."""
        t0 = time.perf_counter()
        self.device = torch.device(device)
        methods = methods or list(REGISTRY)
        specs = [get_method(m, "materializer") for m in methods]
        if base is None:  # soups: methods that never read the base
            needs = [s.name for s in specs if s.uses_base == "required"]
            if needs:
                raise MergeSearchError(f"materializer without a base cannot serve {', '.join(needs)}")
        self.base_ref = sources.pin(str(base)) if base is not None else None
        self.refs = [sources.pin(str(p), base=self.base_ref) for p in models]
        self.base_ckpt = open_model(self.base_ref) if base is not None else None
        self.model_ckpts = [open_model(r, self.base_ckpt, allow_unrelated=allow_unrelated)
                            for r in self.refs]
        if check:
            check_compatible(self.base_ckpt, self.model_ckpts, allow_unrelated=allow_unrelated)
        self.paths = {sources.key(r): i for i, r in enumerate(self.refs)}
        self.base_path = sources.key(self.base_ref) if base is not None else None
        ref = self.base_ckpt if self.base_ckpt is not None else self.model_ckpts[0]
        self.ref_ckpt = ref
        self.num_layers = ref.num_layers
        self.names = ref.names()
        self.dtypes = {n: ref.dtype(n) for n in self.names}  # as stored
        self.float_names = [n for n in self.names if self.dtypes[n].is_floating_point]
        side = {"metrics": {str(k): v for k, v in (metrics or {}).items() if v},
                "grams": {str(k): v for k, v in (grams or {}).items() if v}, "base_metric": base_metric}
        self.placement = placement or make_plan(
            self.base_ref, self.refs, methods, device=str(self.device),
            budget=budget, side=side, stream=stream, bandwidth=NO_BANDWIDTH)
        self.stream = self.placement.stream
        self.sharded = hasattr(self.placement, "tensor_device")  # a worker over several GPUs
        # the SVD factors of the singular-value methods, kept between candidates where the plan has room
        # (and on an accelerator, the Triton selection's top-16 histograms: host memory, kept
        # always, so a TIES candidate reads each model about 2.2 times instead of 3.4)
        self.factor_cache = (FactorCache() if self.placement.factors
                             else FactorCache(("triton_abs_top16/",)) if self.device.type == "cuda" else None)
        self.constants = {n: ref.get(n).to(self._home(n)) for n in self.names if n not in self.float_names}
        self.slots: dict[str, dict[str, torch.Tensor]] = {}  # input key -> tensor name -> tensor
        # LoRA adapters' factors: input key -> tensor name -> LowRank (their full copies of
        # modules_to_save tensors are in slots, like a checkpoint's tensors)
        self.lowrank: dict[str, dict[str, LowRank]] = {}
        self.side_files: dict[str, str] = {}  # side key -> resolved path
        if self.base_ckpt is not None:
            self._place("base", self.base_ckpt.mapped(), self.base_ckpt.path)
        for i, c in enumerate(self.model_ckpts):
            if isinstance(c, Adapter):
                self._place_adapter(f"m{i}", c)
            else:
                self._place(f"m{i}", c.mapped(), c.path)
        # where an adapter's untouched tensors come from: the base, or, for a merge without
        # one, the base its BASE+ADAPTER references name (not a base the method reads)
        self.lowrank_base = "base" if self.base_ckpt is not None else None
        adapters = [c for c in self.model_ckpts if isinstance(c, Adapter)]
        if adapters and self.base_ckpt is None:
            self._place("adapter_base", adapters[0].base.mapped(), adapters[0].base.path)
            self.lowrank_base = "adapter_base"
        self._place_side(side)
        for c in [ref, *self.model_ckpts]:
            c.release()
        self.adapter_keys = set(self.lowrank)
        host = [k for k in self.slots if not self.placement.on_device(k)]
        self.host_keys = set(host)
        slot = max((sum(slot_bytes(self.slots[k][n].numel() * self.slots[k][n].element_size())
                        for k in host if n in self.slots[k]) for n in self.float_names), default=0)
        copying = host and (self.stream == "copy" or self.device.type != "cpu")
        self.stager = Stager(self.device, slot) if copying and not self.sharded else None
        self.stagers = self._gpu_stagers() if self.sharded else {}
        self.setup_seconds = time.perf_counter() - t0
        self.resident_bytes = sum(self._bytes(k) for k in self.slots if k not in self.host_keys)
        self.host_bytes = sum(self._bytes(k) for k in self.host_keys)
        if self.sharded:  # by tensor: an input may be resident on one GPU and host-tier on another
            total = self.resident_bytes + self.host_bytes
            self.resident_bytes = sum(t.numel() * t.element_size() for k, d in self.slots.items()
                                      for n, t in d.items() if self.placement.resident_on(k, n))
            self.host_bytes = total - self.resident_bytes
        self.last_moved = 0

    def _home(self, name: str) -> torch.device:
        """The device that holds ``name``'s parameter in the evaluation model."""
        return torch.device(self.placement.tensor_device(name)) if self.sharded else self.device

    def _merge_device(self, name: str) -> torch.device:
        """Where ``name`` is merged: this worker's device, its GPU, or the host."""
        return torch.device(self.placement.merge_device(name)) if self.sharded else self.device

    def _gpu_stagers(self) -> dict[int, Stager]:
        """A sharded worker's staging: two slots on each GPU, sized for the host inputs of
        the largest tensor merged there (none for the host-merged tensors, read in place)."""
        p, out = self.placement, {}
        for share in p.gpus:
            names = [n for n in self.float_names if p.tensor_gpu.get(n, 0) == share.index and n not in p.host_merged]
            host = [k for k in self.slots if k not in share.resident]
            slot = max((sum(slot_bytes(self.slots[k][n].numel() * self.slots[k][n].element_size())
                            for k in host if n in self.slots[k]) for n in names), default=0)
            dev = self._home(names[0]) if names else None
            if slot and (self.stream == "copy" or dev.type != "cpu"):
                out[share.index] = Stager(dev, slot)
        return out

    def _routes(self, used: list[str], floats: list[str]) -> dict[str, tuple]:
        """Tensor name -> (the staging run that brings its host inputs, their keys), for
        the names whose inputs are staged: one run for this worker's device, or one per GPU."""
        groups = []
        if self.stager is not None:
            groups.append((self.stager, [k for k in used if k in self.host_keys], floats))
        p = self.placement
        for g, stager in self.stagers.items():
            groups.append((stager, [k for k in used if k not in p.gpus[g].resident],
                           [n for n in floats if p.tensor_gpu.get(n, 0) == g and n not in p.host_merged]))
        routes = {}
        for stager, keys, names in groups:
            if keys and names:
                run = stager.run([(n, [self.slots[k][n] for k in keys if n in self.slots[k]]) for n in names])
                routes.update({n: (run, keys) for n in names})
        return routes

    def _bytes(self, key: str) -> int:
        factors = sum(t.numel() * t.element_size() for lr in self.lowrank.get(key, {}).values() for t in (lr.a, lr.b))
        return factors + sum(t.numel() * t.element_size() for t in self.slots[key].values())

    def _place_adapter(self, key: str, adapter: Adapter) -> None:
        """A LoRA adapter: its factors (checked, and copied to the device when resident) and
        its full tensors (modules_to_save), placed like a checkpoint's."""
        views = adapter.mapped()
        self._place(key, {n: views[k] for n, k in adapter.dense.items()}, adapter.path)
        factors = self._placed({k: views[k] for k in adapter.factor_keys()}, adapter.path,
                               self.placement.on_device(key))
        self.lowrank[key] = {n: adapter.lowrank(n, factors) for n in adapter.factors}

    def _place(self, key: str, views: dict[str, torch.Tensor], where, side: SideFile | None = None) -> None:
        """Check every float tensor once (non-finite values; for metrics, negative ones),
        then keep it as a view of its mapped file (host) or as a device copy."""
        resident = (lambda n: self.placement.resident_on(key, n)) if self.sharded else self.placement.on_device(key)
        self.slots[key] = self._placed(views, where, resident, side)

    def _placed(self, views: dict[str, torch.Tensor], where, resident,
                side: SideFile | None = None) -> dict[str, torch.Tensor]:
        """``resident``: for all of ``views``, or a function of the tensor name."""
        out = {}
        for name, t in views.items():
            if not t.is_floating_point():
                continue
            if side is not None:
                side.check_values(name, t)
            elif not all_finite(t):
                raise MergeSearchError(f"{where}: tensor '{name}' contains NaN or Inf")
            if resident(name) if callable(resident) else resident:
                dev = self._merge_device(name)  # a private copy (on the CPU, .to() would return the mapped view)
                t = t.clone() if dev.type == "cpu" else t.to(dev)
            out[name] = t
        return out

    def _place_side(self, side: dict) -> None:
        by_model = {sources.key(r): i for i, r in enumerate(self.refs)}
        for kind in ("metric", "gram"):
            for model, file in side[f"{kind}s"].items():
                i = by_model.get(sources.key(model))
                if i is None:
                    raise MergeSearchError(f"{file}: {kind} for {model}, which is not among the models")
                f = SideFile(file, kind).check_against(self.model_ckpts[i])
                self.side_files[f"{kind}:m{i}"] = str(Path(file).resolve())
                self._place(f"{kind}:m{i}", mapped_safetensors(f.path), f.path, side=f)
        if side["base_metric"] is not None:
            if self.base_ckpt is None:
                raise MergeSearchError(f"{side['base_metric']}: a base metric needs a base model")
            f = SideFile(side["base_metric"], "metric").check_against(self.base_ckpt)
            self.side_files["metric:base"] = str(Path(f.path).resolve())
            self._place("metric:base", mapped_safetensors(f.path), f.path, side=f)

    def bind(self, recipe: Recipe, spec: MethodSpec) -> tuple[list[str], str | None, dict]:
        """Resolve a recipe's models and side-input files to input keys: done once per
        candidate, not once per tensor (path resolution is a filesystem call)."""
        if recipe.base and self.base_path is None:
            raise MergeSearchError(f"recipe base {recipe.base}: this materializer holds no base")
        if recipe.base and sources.key(recipe.base) != self.base_path:
            raise MergeSearchError(f"recipe base {recipe.base} differs from the materializer's base")
        keys = []
        for m in recipe.models:
            i = self.paths.get(sources.key(m.path))
            if i is None and recipe.base:  # an adapter listed alone
                i = self.paths.get(sources.key(sources.pin(m.path, base=self.base_ref)))
            if i is None:
                raise MergeSearchError(f"recipe model {m.path} is not loaded in this materializer")
            keys.append(f"m{i}")

        def slot(kind: str, owner: str, file: str | None):
            if file is None:
                return None
            key = f"{kind}:{owner}"
            if self.side_files.get(key) != str(Path(file).resolve()):
                raise MergeSearchError(f"recipe {kind} {file} is not loaded in this materializer")
            return key
        side: dict = {}
        if spec.needs_metric != "no":
            side["metrics"] = [slot("metric", k, m.metric) for k, m in zip(keys, recipe.models)]
            side["base_metric"] = slot("metric", "base", recipe.base_metric)
        if spec.needs_gram:
            side["grams"] = [slot("gram", k, m.gram) for k, m in zip(keys, recipe.models)]
        base = "base" if spec.uses_base != "no" and "base" in self.slots else None
        return keys, base, side

    def inputs(self, recipe: Recipe | CompiledRecipe, names: list[str]
               ) -> Iterator[tuple[str, TensorInputs | torch.Tensor]]:
        """Each of ``names`` in order: its merge inputs (host inputs streamed), or the
        tensor itself for a constant (non-float) one."""
        if isinstance(recipe, CompiledRecipe):
            spec, recipe = recipe.spec, recipe.recipe
        else:
            spec = recipe.spec
        keys, base, side = self.bind(recipe, spec)
        adapters = [k for k in keys if k in self.adapter_keys]
        lowrank_base = self.lowrank_base if adapters else None  # an adapter's untouched tensors are the base's
        used = [k for k in [base, lowrank_base, *keys] if k is not None]
        used += [k for v in side.values() for k in (v if isinstance(v, list) else [v]) if k is not None]
        used = list(dict.fromkeys(used))
        self.last_moved = 0

        def build(name: str, staged: dict) -> TensorInputs:
            def get(key):
                if key is None:
                    return None
                return staged[key] if key in staged else self.slots[key].get(name)
            def model(key):
                if key not in self.adapter_keys:
                    return get(key)
                lr = self.lowrank[key].get(name)
                if lr is not None:
                    dev = self._merge_device(name)
                    return lr if lr.a.device == dev else LowRank(lr.a.to(dev), lr.b.to(dev), lr.scaling, lr.transpose)
                t = get(key)  # a full copy (modules_to_save), or None: the base's own tensor
                return t if t is not None else get(lowrank_base)
            extra = {k: [get(x) for x in v] if isinstance(v, list) else get(v) for k, v in side.items()}
            return TensorInputs(name, get(base), tensors=[model(k) for k in keys], seed=recipe.seed,
                                cache=self.factor_cache, ids=keys, lowrank_base=get(lowrank_base), **extra)

        floats = [n for n in names if n not in self.constants]
        routes = self._routes(used, floats)
        for name in names:
            if name in self.constants:
                yield name, self.constants[name]
                continue
            staged = {}
            if name in routes:
                run, staged_keys = routes[name]
                _, copies = next(run)
                present = [k for k in staged_keys if name in self.slots[k]]
                staged = dict(zip(present, copies))
                self.last_moved += sum(t.numel() * t.element_size() for t in copies)
            yield name, build(name, staged)

    def compile(self, recipe: "Recipe | CompiledRecipe", validate: bool = True) -> CompiledRecipe:
        """The recipe checked once (unless the caller did) and resolved for every tensor of
        this family; a compiled recipe is taken as it is."""
        if isinstance(recipe, CompiledRecipe):
            return recipe
        return CompiledRecipe(recipe, self.names, self.num_layers, validate=validate)

    def _candidate(self, compiled: CompiledRecipe, names: list[str],
                   targets: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """The merged tensors of ``names`` in order, host inputs streamed: in the work
        dtype, or already in the export dtype where a large tensor is made in blocks.
        A kernel that can write a tensor straight into its ``targets`` entry does (and
        yields it): no new buffer and no copy."""
        for name, x in self.inputs(compiled, names):
            if name in self.constants:
                yield name, x
                continue
            # no finiteness pass in the hot loop: a non-finite candidate shows up as a
            # non-finite score and fails its trial
            x.out_dtype = self.export_dtype(compiled, name)
            # a sharded worker's host-merged tensor: the export's path (selections and merge
            # in blocks, bounded scratch), then copied into its parameter on its GPU
            host = self.sharded and name in self.placement.host_merged
            if targets is not None and not host:
                x.out = targets.get(name)
            g, per_model = compiled.params[name]
            dev = self._merge_device(name)
            with kernels.streaming() if host else torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
                merged = merge_tensor(compiled.spec, x, g, per_model, compiled.rows, check_finite=False)
            yield name, merged
            del x, merged  # not alive while the next tensor's inputs are prepared

    def export_dtype(self, compiled: CompiledRecipe, name: str) -> torch.dtype:
        """The dtype the streamed export writes this tensor in."""
        src = self.dtypes[name]
        return (compiled.dtype or src) if src.is_floating_point else src

    def state_dict(self, recipe: "Recipe | CompiledRecipe") -> dict[str, torch.Tensor]:
        """The merged weights, as the export writes them (for tests and small models)."""
        compiled = self.compile(recipe)
        return {name: t.to(self.export_dtype(compiled, name)) for name, t in self._candidate(compiled, self.names)}

    @torch.no_grad()
    def write_into(self, module: torch.nn.Module, recipe: "Recipe | CompiledRecipe", validate: bool = True) -> None:
        """Write the recipe's merged weights into ``module``'s parameters in place, in
        the dtype the export writes them (the module must hold them in that dtype). A
        recipe is compiled here (checked first with ``validate``), a compiled one taken
        as it is: one call per candidate."""
        compiled = self.compile(recipe, validate=validate)
        targets = dict(module.named_parameters())
        targets.update(dict(module.named_buffers()))
        names = [n for n in self.names if n in targets]  # e.g. a tied lm_head is absent
        for name in names:
            dtype = self.export_dtype(compiled, name)
            if targets[name].dtype != dtype:
                raise MergeSearchError(f"evaluation model holds '{name}' in {targets[name].dtype}, but the export "
                                       f"writes {dtype}: load it in the recipe's dtype")
        for name, merged in self._candidate(compiled, names, {n: targets[n].data for n in names}):
            target = targets[name]
            if merged.data_ptr() != target.data_ptr():  # not already written in place
                target.copy_(merged.to(dtype=self.export_dtype(compiled, name)))
            del merged  # not alive while the next tensor is merged

    def close(self) -> None:
        for stager in [self.stager, *self.stagers.values()]:
            if stager is not None:
                stager.close()
