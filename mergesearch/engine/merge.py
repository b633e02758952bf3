"""Streamed merge: recipe -> checkpoint on disk, tensor by tensor.

Inputs are read lazily from memory-mapped files, each output tensor is computed
by the registered method and written straight into its planned shard, so peak
memory is a few tensors regardless of model size. The recipe is compiled once
(:class:`mergesearch.engine.compiled.CompiledRecipe`) and every tensor goes through the
per-tensor call the in-memory Materializer makes (:func:`mergesearch.methods.apply.merge_tensor`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from mergesearch import sources
from mergesearch.engine.adapter import Adapter, open_model
from mergesearch.engine.checkpoint import Checkpoint, SideFile, all_finite, dtype_name, parse_dtype, tokenizer_vocab
from mergesearch.engine.compat import check_compatible
from mergesearch.engine.compiled import CompiledRecipe
from mergesearch.errors import MergeSearchError
from mergesearch.methods import LowRank, MethodSpec, TensorInputs, kernels, merge_tensor
from mergesearch.engine.writer import StreamingWriter
from mergesearch.recipe import Recipe

log = logging.getLogger(__name__)

RELEASE_EVERY_BYTES = 256 * 1024**2


@dataclass
class MergePlan:
    """Opened and checked inputs of a recipe."""

    recipe: Recipe
    spec: MethodSpec
    base: Checkpoint | None
    models: list[Checkpoint]
    distances: dict[str, float] = field(default_factory=dict)
    side: "SideInputs | None" = None

    @property
    def ref(self) -> Checkpoint:
        return self.base if self.base is not None else self.models[0]

    @property
    def num_layers(self) -> int:
        return self.ref.num_layers

    def release(self) -> None:
        for c in self.checkpoints():
            c.release()
        if self.side is not None:
            self.side.release()

    def checkpoints(self) -> list[Checkpoint]:
        return ([self.base] if self.base is not None else []) + self.models


def open_plan(recipe: Recipe, *, allow_unrelated: bool = False, check: bool = True) -> MergePlan:
    """Open every input and run the compatibility checks (before any merge work)."""
    recipe.validate_semantics()
    cache: dict[str, Checkpoint | Adapter] = {}

    def open_ckpt(p: str, base=None) -> Checkpoint | Adapter:
        k = sources.key(p)
        if k not in cache:
            cache[k] = open_model(p, base, allow_unrelated=allow_unrelated)
        return cache[k]

    base = open_ckpt(recipe.base) if recipe.base else None
    models = [open_ckpt(m.path, base) for m in recipe.models]
    if base is None:
        bases = {str(m.base.path.resolve()): m for m in models if isinstance(m, Adapter)}
        if len(bases) > 1:
            a, b = list(bases.values())[:2]
            raise MergeSearchError(f"{b.label}: an adapter of another base than {a.label}; a merge without a base "
                                   "takes adapters of one base")
    distances = check_compatible(base, models, allow_unrelated=allow_unrelated) if check else {}
    tok = recipe.tokenizer_source
    if tok and tok != "base":
        tok_dir = sources.model_dir(tok)
        if not tok_dir.is_dir():
            raise MergeSearchError(f"{tok}: tokenizer_source is not a folder")
        ref = base if base is not None else models[0]
        vocab, ref_vocab = tokenizer_vocab(tok_dir), ref.tokenizer_vocab()
        if vocab is not None and ref_vocab is not None and vocab != ref_vocab:
            raise MergeSearchError(f"{tok}: tokenizer vocabulary differs from {ref.path}")
    side = open_side_inputs(recipe, base, models)
    return MergePlan(recipe, recipe.spec, base, models, distances, side)


@dataclass
class SideInputs:
    """The per-model metric and Gram files of a recipe, checked against the models."""

    metrics: list[SideFile | None]
    grams: list[SideFile | None]
    base_metric: SideFile | None

    def read(self, name: str, device: str) -> dict:
        def get(f: SideFile | None):
            return f.get(name).to(device) if f is not None and f.has(name) else None
        return {"metrics": [get(f) for f in self.metrics] if any(self.metrics) else None,
                "grams": [get(f) for f in self.grams] if any(self.grams) else None,
                "base_metric": get(self.base_metric)}

    def release(self) -> None:
        for f in [*self.metrics, *self.grams, self.base_metric]:
            if f is not None:
                f.release()


def open_side_inputs(recipe: Recipe, base: Checkpoint | None, models: list[Checkpoint]) -> SideInputs | None:
    entries = recipe.models
    if not any(m.metric or m.gram for m in entries) and not recipe.base_metric:
        return None
    metrics = [SideFile(m.metric, "metric").check_against(c) if m.metric else None for m, c in zip(entries, models)]
    grams = [SideFile(m.gram, "gram").check_against(c) if m.gram else None for m, c in zip(entries, models)]
    present = [g for g in grams if g is not None]
    if present:
        keys = set(present[0].names())
        for g in present[1:]:
            if set(g.names()) != keys:
                raise MergeSearchError(f"{g.path}: Gram matrices cover other layers than {present[0].path}")
    base_metric = None
    if recipe.base_metric:
        base_metric = SideFile(recipe.base_metric, "metric").check_against(base if base is not None else models[0])
    return SideInputs(metrics, grams, base_metric)


def build_inputs(plan: MergePlan, name: str, device: str) -> TensorInputs:
    """Read one tensor from every input, as stored, on ``device`` (the methods make
    float32 views when they need them; the fused kernels read the raw tensors)."""
    base = lowrank_base = None
    adapters = [m for m in plan.models if isinstance(m, Adapter)]
    if plan.base is not None and (plan.spec.uses_base != "no" or adapters):
        lowrank_base = _read_checked(plan.base, name, device)
        base = lowrank_base if plan.spec.uses_base != "no" else None
    elif adapters:  # a recipe without a base: BASE+ADAPTER references name theirs
        lowrank_base = _read_checked(adapters[0].base, name, device)
    tensors = [_read_model(m, name, device, lowrank_base) for m in plan.models]
    side = plan.side.read(name, device) if plan.side is not None else {}
    return TensorInputs(name, base, tensors=tensors, seed=plan.recipe.seed, lowrank_base=lowrank_base, **side)


def _read_model(m: Checkpoint | Adapter, name: str, device: str, base: torch.Tensor | None):
    """A model's input for one tensor: as stored, or a LoRA adapter's factors (LowRank),
    its full copy of the tensor, or the base's tensor where it changes nothing."""
    if not isinstance(m, Adapter):
        return _read_checked(m, name, device)
    lr = m.lowrank(name)
    if lr is not None:
        for t, which in ((lr.a, "A"), (lr.b, "B")):
            if not all_finite(t):
                raise MergeSearchError(f"{m.path}: LoRA factor {which} of '{name}' contains NaN or Inf")
        return LowRank(lr.a.to(device), lr.b.to(device), lr.scaling, lr.transpose)
    if name in m.dense:
        return _read_checked(m, name, device)
    return base


def _read_checked(ckpt: Checkpoint, name: str, device: str) -> torch.Tensor:
    t = ckpt.get(name).to(device=device)
    if not all_finite(t):
        raise MergeSearchError(f"{ckpt.path}: tensor '{name}' contains NaN or Inf")
    return t


def output_dtype(plan: MergePlan, name: str, override: torch.dtype | None) -> torch.dtype:
    src = plan.ref.dtype(name)
    if not src.is_floating_point:
        return src
    return override or parse_dtype(plan.recipe.dtype) or src


def stream_merge(
    plan: MergePlan,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    device: str = "cpu",
    max_shard_bytes: int = 2 * 1024**3,
    force: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    extra_files: dict[str, str] | None = None,
) -> dict:
    """Merge to ``out`` atomically. Returns a summary (tensors, bytes, seconds)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeSearchError("--device cuda: no CUDA device is available")
    override = parse_dtype(dtype, "--dtype")
    ref = plan.ref
    names = ref.names()
    layout = [(n, ref.shape(n), output_dtype(plan, n, override)) for n in names]
    compiled = CompiledRecipe(plan.recipe, names, plan.num_layers, validate=False)  # open_plan validated it
    start = time.perf_counter()
    read_since_release = 0
    written = 0
    with StreamingWriter(out, layout, max_shard_bytes=max_shard_bytes, force=force) as writer, kernels.streaming():
        for k, (name, _, out_dtype) in enumerate(layout):
            # the mapped pages of the inputs count in the resident set: drop them before a
            # tensor that would take the pages read since the last release over the limit
            reads = ref.numel(name) * ref.dtype(name).itemsize * len(plan.checkpoints())
            if read_since_release and read_since_release + reads > RELEASE_EVERY_BYTES:
                plan.release()
                read_since_release = 0
            if not ref.dtype(name).is_floating_point:
                merged = ref.get(name)
            else:
                x = build_inputs(plan, name, device)
                x.out_dtype = out_dtype
                g, per_model = compiled.params[name]
                merged = merge_tensor(compiled.spec, x, g, per_model, compiled.rows)
                del x
            merged = merged.to(out_dtype)
            writer.write(name, merged)
            nbytes = merged.numel() * merged.element_size()
            written += nbytes
            read_since_release += reads
            del merged
            if progress:
                progress(k + 1, len(layout), name)
        source = plan.ref.path
        tok = plan.recipe.tokenizer_source
        out_name = dtype_name(override or parse_dtype(plan.recipe.dtype) or _main_dtype(plan))
        cfg_updates = {k: out_name for k in ("torch_dtype", "dtype") if k in plan.ref.config} or {"torch_dtype": out_name}
        tok_dir = None
        if tok and tok != "base":
            tok_dir = sources.model_dir(tok)
            if not tok_dir.is_dir():
                raise MergeSearchError(f"{tok}: tokenizer_source is not a folder")
        writer.copy_side_files(source, tok_dir, cfg_updates)
        for fname, text in (extra_files or {}).items():
            writer.write_file(fname, text)
    plan.release()
    return {"tensors": len(layout), "bytes": written, "seconds": time.perf_counter() - start, "out": str(out)}


def _main_dtype(plan: MergePlan) -> torch.dtype:
    for n in plan.ref.names():
        d = plan.ref.dtype(n)
        if d.is_floating_point:
            return d
    return torch.float32
