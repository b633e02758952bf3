"""Placement of a merge family under a device memory budget.

Before any worker starts, the plan reads tensor sizes from the safetensors headers
(nothing is loaded) and decides, per input (the base, each model, each side file),
where it lives while a search runs:

- **device**: resident in the worker's device memory, in its stored dtype;
- **host**: memory-mapped from its files. The page cache holds one copy per node,
  shared by every worker of that node. A candidate reads such an input tensor by
  tensor: on a CUDA device through pinned staging buffers, one tensor ahead of the
  compute (copies overlap the merge); on the CPU in place (zero copy), or through the
  same staging buffers with ``stream: copy``.

The evaluation model (in the space's dtype, else the sources'), the per-tensor scratch
of the merge, an allowance for the evaluation's activations and, when anything is
streamed, the staging buffers must always fit; otherwise the run is refused with the
sizes, before Ray starts. Inputs go on the device in priority order (the base, then
the models in order, then side files) while they fit.

The budget is ``resources.device_memory`` (or ``--device-memory``), else the free
memory of the CUDA device; with a fractional ``gpus_per_worker``, that share of the
card's memory (at most what is free). On the
CPU without a declared budget every input stays on the host: the worker's "device"
is the same memory, so a private copy would only cost memory.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mergesearch.engine.bandwidth import measure_bandwidth
from mergesearch.errors import MergeSearchError

GB = 1e9
# Alignment of each input's part inside a staging slot (bytes).
SLOT_ALIGN = 256
# For plans that place inputs but predict no time (the Materializer's, a worker's).
NO_BANDWIDTH = {"device": 1.0, "link": 1.0, "source": "not measured"}
# Float32 buffers of the largest tensor's size alive at once while one tensor is merged,
# beside the inputs themselves, as (fixed, per model), by kind of method: the merged
# output, then the selection scratch (|delta| and its top bits, one model at a time),
# DARE's kept-element masks (a byte an element), the sparsified deltas that DELLA
# prepares, the norms and angles of
# model_stock and the slerps, or the metric sums of the geometry-aware methods.
# Measured on the eager kernels (tests/test_plan_scratch.py checks each kind with
# tests/memtrack.py, within 2.5 buffers); the compiled kernels keep fewer.
SCRATCH_F32 = {"plain": (1, 0), "select": (3, 0), "random": (2, 0.25), "della": (8, 1), "model_stock": (5, 2),
               "nuslerp": (9, 0), "slerp": (5, 0), "fisher": (4, 2), "preconditioned": (4, 2),
               "gradient_matching": (11, 2), "regmean": (2, 1), "multislerp": (5, 0), "karcher": (5, 0),
               "sce": (4, 1), "ram": (5, 0), "ramplus_tl": (6, 0), "nearswap": (4, 0), "arcee_fusion": (6, 0)}
# Float32 buffers of the largest tensor's size a LoRA adapter adds while one tensor is
# merged: its task vector made from the factors, and base + task vector where a method
# reads the fine-tune's tensor (TensorInputs keeps both until the tensor is merged).
ADAPTER_F32 = 2
# The eager kernels' temporaries, in float32 buffers of one chunk of
# ``kernels.eager_chunk(device)`` elements: (fixed, per model).
CHUNK_F32 = (8, 2)
# Full float32 passes per element and model that a method adds to reading its inputs.
EXTRA_PASSES = {None: 0, "magnitude": 6, "outliers": 6, "random": 4, "della": 10}


def parse_size(text: str | int | float, where: str = "size") -> int:
    """``80GB``, ``80GiB``, ``512MiB``, ``1.5e9`` or a byte count."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        size = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)?\s*", str(text).lower())
        if not m:
            raise MergeSearchError(f"{where}: cannot parse '{text}' (use e.g. 80GB, 512MiB or a byte count)")
        unit = m.group(2) or ""
        letter = unit.rstrip("b").rstrip("i")
        scale = ({"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4} if "i" in unit
                 else {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12})[letter]
        size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise MergeSearchError(f"{where}: must be positive, got '{text}'")
    return size


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class Input:
    """One placed input: a checkpoint or a side file."""

    key: str  # "base", "m0", "m1", ..., "metric:m0", "metric:base", "gram:m0"
    path: str
    nbytes: int  # its float tensors, as stored
    role: str  # base | model | side
    sizes: dict[str, int] = field(default_factory=dict, repr=False)  # tensor name -> bytes staged
    # a LoRA adapter: nbytes counts its factors, r x (in + out) per module, not dense tensors;
    # ``sizes`` holds only its full tensors (modules_to_save), the ones staged like a checkpoint's
    adapter: bool = False
    lowrank_numel: int = 0  # an adapter's largest tensor held as factors (elements)


@dataclass
class Placement:
    device: str
    budget: int | None
    budget_source: str
    stream: str  # view (zero copy, CPU) or copy (staging buffers)
    eval_bytes: int
    eval_dtype: str
    eval_reserve: int
    scratch: int
    staging: int  # device bytes of the staging slots (pinned host memory of the same size)
    inputs: list[Input]
    resident: list[str]
    host: list[str]
    largest: tuple[str, int]  # the largest float tensor: name, elements
    bandwidth: dict  # device / link bytes per second, and whether measured or assumed
    read_per_candidate: int = 0
    moved_per_candidate: int = 0
    predicted_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    # device bytes of the SVD factors kept between candidates (methods.spectral); 0 when
    # no listed method keeps any, or when they do not fit and are recomputed per candidate
    factors: int = 0

    def budget_for(self, k: int) -> int:
        """Device bytes under which the first ``k`` inputs (in priority order) are resident."""
        return (self.eval_bytes + self.eval_reserve + self.scratch + self.factors
                + sum(i.nbytes for i in self.inputs[:k]) + staging_bytes(self.inputs[k:], self.stream))

    def input(self, key: str) -> Input:
        return next(i for i in self.inputs if i.key == key)

    def on_device(self, key: str) -> bool:
        return key in self.resident

    @property
    def device_bytes(self) -> int:
        return (self.eval_bytes + self.eval_reserve + self.scratch + self.factors + self.staging
                + sum(self.input(k).nbytes for k in self.resident))

    @property
    def host_bytes(self) -> int:
        return sum(self.input(k).nbytes for k in self.host)

    def to_json(self) -> dict:
        d = asdict(self)
        for i in d["inputs"]:
            i.pop("sizes")
        d["tiers"] = {"device": self.device_bytes, "host": self.host_bytes,
                      "pinned_host": self.staging if self.device.startswith("cuda") else 0}
        return d

    def render(self) -> str:
        budget = fmt_bytes(self.budget) if self.budget is not None else "none declared"
        lines = [f"device {self.device}: budget {budget} ({self.budget_source}); host inputs are memory-mapped "
                 f"(one copy per node), read {'in place' if self.stream == 'view' else 'through staging buffers'}",
                 f"  evaluation model      {fmt_bytes(self.eval_bytes):>12}  ({self.eval_dtype})",
                 f"  evaluation reserve    {fmt_bytes(self.eval_reserve):>12}",
                 f"  merge scratch         {fmt_bytes(self.scratch):>12}  (largest tensor {self.largest[0]}, "
                 f"{self.largest[1]:,} elements)"]
        if self.factors:
            lines.append(f"  SVD factors           {fmt_bytes(self.factors):>12}  (kept between candidates)")
        if self.staging:
            lines.append(f"  staging slots         {fmt_bytes(self.staging):>12}")
        for i in self.inputs:
            tier = "device" if i.key in self.resident else "host"
            kind = "  (LoRA factors)" if i.adapter else ""
            lines.append(f"  {i.key:<20}  {fmt_bytes(i.nbytes):>12}  {tier:<6}  {i.path}{kind}")
        lines.append(f"tiers: device {fmt_bytes(self.device_bytes)}, host {fmt_bytes(self.host_bytes)}")
        bw = self.bandwidth
        lines.append(f"per candidate: reads {fmt_bytes(self.read_per_candidate)}, moves "
                     f"{fmt_bytes(self.moved_per_candidate)} host->device; predicted {self.predicted_s:.3f} s "
                     f"(device {bw['device'] / GB:.0f} GB/s, link {bw['link'] / GB:.1f} GB/s, {bw['source']})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def scratch_kind(method: str) -> str:
    from mergesearch.methods import REGISTRY
    spec = REGISTRY[method]
    if method in SCRATCH_F32:
        return method
    return {None: "plain", "magnitude": "select", "outliers": "select", "random": "random",
            "della": "della"}[spec.sparsifier]


def scratch_bytes(largest_numel: int, methods: list[str], n_models: int, out_elem: int, device: str = "cpu",
                  largest_matrix: tuple[int, int] | None = None, adapters: int = 0,
                  adapter_numel: int | None = None) -> int:
    """Device bytes one tensor's merge needs beside its inputs (the worst of ``methods``);
    the singular-value methods' SVDs are sized on ``largest_matrix`` (:func:`svd_scratch`).
    Each of ``adapters`` LoRA adapters adds ADAPTER_F32 buffers (its dense delta, and
    base + delta for methods that read tensors) of the largest tensor it holds as factors
    (``adapter_numel``, by default the largest tensor), made for one tensor at a time."""
    from mergesearch.methods.kernels import eager_chunk
    elementwise = [m for m in methods if not _spectral(m)]
    full = max((SCRATCH_F32[scratch_kind(m)][0] + SCRATCH_F32[scratch_kind(m)][1] * n_models for m in elementwise),
               default=0)
    chunk = CHUNK_F32[0] + CHUNK_F32[1] * n_models
    out = int(largest_numel * (4 * full + out_elem)) + min(largest_numel, eager_chunk(device)) * 4 * chunk
    if not elementwise:
        out = 0  # tensors that are not matrices take a weighted mean: within the matrices' bound
    out += (largest_numel if adapter_numel is None else adapter_numel) * 4 * ADAPTER_F32 * adapters
    svd = max((svd_scratch(largest_matrix, m, n_models) for m in methods if _spectral(m) and largest_matrix),
              default=0)
    return max(out, svd)


def _spectral(method: str) -> bool:
    from mergesearch.methods import REGISTRY
    return REGISTRY[method].factors is not None


# Float32 buffers of one matrix's size (m x n) alive while a singular-value method
# merges it, as (fixed, per model): the task matrices (one float copy per model, as
# TensorInputs keeps them), their sum or the projected task matrix, the SVD's factors and
# LAPACK's work space, the side-by-side factors and their polar factors, the output.
# Measured with tests/memtrack.py (tests/test_spectral_methods.py).
SVD_F32 = {"tsv": (6, 1), "iso_c": (3, 1), "iso_cts": (6, 1)}


def svd_scratch(shape: tuple[int, int], method: str, n_models: int) -> int:
    """Bytes one ``shape`` matrix's merge by a singular-value method keeps alive."""
    fixed, per = SVD_F32[method]
    return int(shape[0] * shape[1]) * 4 * (fixed + per * n_models)


def factor_bytes(shapes: dict[str, tuple[int, ...]], methods: list[str], n_models: int) -> int:
    """Bytes of the SVD factors a worker keeps between candidates (:class:`FactorCache`)
    for ``methods`` on matrices of ``shapes``: per matrix of rank r = min(m, n), each
    model's top floor(r / T) triplets (``task``: at most r in all) and the sum's full SVD
    (``sum``), each (m + n + 1) r float32 values."""
    from mergesearch.methods import REGISTRY
    kinds = {REGISTRY[m].factors for m in methods} - {None}
    total = 0
    for shape in shapes.values():
        if len(shape) != 2:
            continue
        m, n = shape
        r = min(m, n)
        if "task" in kinds:
            total += n_models * (r // n_models) * (m + n + 1) * 4
        if "sum" in kinds:
            total += r * (m + n + 1) * 4
    return total


def input_sizes(path: str, kind: str = "checkpoint") -> dict[str, int]:
    """Tensor name -> bytes of the float tensors of a model folder or side file (headers only)."""
    from mergesearch.engine.checkpoint import SideFile
    if kind == "checkpoint":
        from mergesearch.engine.adapter import open_model
        return checkpoint_sizes(open_model(path))
    f = SideFile(path, kind)
    return {n: f.numel(n) * f.dtype(n).itemsize for n in f.names()}


def checkpoint_sizes(c) -> dict[str, int]:
    return {n: c.numel(n) * c.dtype(n).itemsize for n in c.names() if c.dtype(n).is_floating_point}


def model_input(key: str, ref: str, base) -> Input:
    """A model's input: a checkpoint's float tensors, or a LoRA adapter's factors."""
    from mergesearch.engine.adapter import Adapter, open_model
    c = open_model(ref, base)
    if isinstance(c, Adapter):
        return Input(key, str(ref), sum(c.sizes().values()), "model", c.dense_sizes(), adapter=True,
                     lowrank_numel=max((c.numel(n) for n in c.factors), default=0))
    s = checkpoint_sizes(c)
    return Input(key, str(ref), sum(s.values()), "model", s)


def family_inputs(base: str | None, base_ckpt, models: list[str], side: dict | None) -> list[Input]:
    """The placed inputs in priority order: the base, each model, then the side files
    (``side`` as in :func:`make_plan`)."""
    inputs: list[Input] = []
    if base is not None:
        s = checkpoint_sizes(base_ckpt)
        inputs.append(Input("base", str(base), sum(s.values()), "base", s))
    inputs += [model_input(f"m{i}", m, base_ckpt) for i, m in enumerate(models)]
    side = side or {}
    for i, m in enumerate(models):
        for kind in ("metric", "gram"):
            f = (side.get(f"{kind}s") or {}).get(m)
            if f:
                s = input_sizes(f, kind)
                inputs.append(Input(f"{kind}:m{i}", str(f), sum(s.values()), "side", s))
    if side.get("base_metric"):
        s = input_sizes(side["base_metric"], "metric")
        inputs.append(Input("metric:base", str(side["base_metric"]), sum(s.values()), "side", s))
    return inputs


def make_plan(base: str | None, models: list[str], methods: list[str], *, device: str = "cpu",
              budget: int | None = None, eval_dtype: str | None = None, eval_reserve: int | None = None,
              side: dict | None = None, gpus_per_worker: float = 1.0, stream: str = "auto",
              bandwidth: dict | None = None) -> Placement:
    """Place ``base``, ``models`` and the side files (``side``: metrics / grams / base_metric
    as in :func:`mergesearch.search.side_inputs.resolve_side_inputs`) on ``device`` within ``budget``
    bytes. Raises MergeSearchError when the evaluation model and the scratch do not fit."""
    from mergesearch.engine.adapter import open_model
    from mergesearch.engine.checkpoint import parse_dtype
    from mergesearch.methods import REGISTRY

    base_ckpt = open_model(base) if base is not None else None
    ref = base_ckpt if base_ckpt is not None else open_model(models[0])
    floats = [n for n in ref.names() if ref.dtype(n).is_floating_point]
    src_dtype = next((ref.dtype(n) for n in floats), torch.float32)
    edtype = parse_dtype(eval_dtype) or src_dtype
    eval_bytes = sum(ref.numel(n) for n in floats) * edtype.itemsize
    eval_bytes += sum(ref.numel(n) * ref.dtype(n).itemsize for n in ref.names() if n not in floats)
    reserve = eval_reserve if eval_reserve is not None else int(0.2 * eval_bytes)
    largest = max(floats, key=ref.numel)
    matrices = {n: ref.shape(n) for n in floats if len(ref.shape(n)) == 2}
    largest_matrix = matrices[max(matrices, key=ref.numel)] if matrices else None
    inputs = family_inputs(base, base_ckpt, models, side)
    adapters = sum(i.adapter for i in inputs)
    scratch = scratch_bytes(ref.numel(largest), methods, len(models), edtype.itemsize, device, largest_matrix,
                            adapters=adapters, adapter_numel=max((i.lowrank_numel for i in inputs), default=0))
    factors = factor_bytes(matrices, methods, len(models))
    # a LoRA adapter's untouched tensors are the base's: read whatever the method
    uses_base = base is not None and (adapters > 0 or any(REGISTRY[m].uses_base != "no" for m in methods))

    cuda = device.startswith("cuda")
    if stream == "auto":
        stream = "copy" if cuda else "view"
    if cuda and stream == "view":
        raise MergeSearchError("resources.stream: 'view' (zero copy) works on the CPU only; a CUDA device copies")
    notes = []
    if budget is not None:
        source = "declared"
    elif cuda and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(torch.device(device))
        # a shared GPU: this worker's share of the card, or what is still free if less
        budget = int(min(free, total * gpus_per_worker)) if gpus_per_worker < 1 else int(free)
        source = ("free CUDA memory" if gpus_per_worker >= 1
                  else f"{gpus_per_worker:g} of the GPU's memory per worker, at most what is free")
    elif cuda:
        raise MergeSearchError("device memory: no CUDA device is visible here to measure; declare "
                               "resources.device_memory (or --device-memory)")
    else:
        source = "none declared on the CPU: every input stays on the host, shared by the node's workers"

    fixed = eval_bytes + reserve + scratch
    if factors and budget is not None and fixed + factors + staging_bytes(inputs, stream) > budget:
        notes.append(f"the SVD factors ({fmt_bytes(factors)}) do not fit beside the evaluation model: each candidate "
                     "recomputes its SVDs")
        factors = 0
    fixed += factors

    def staging(host: list[Input]) -> int:
        return staging_bytes(host, stream)

    if budget is None:
        resident: list[Input] = []
    else:
        resident = None
        for k in range(len(inputs), -1, -1):
            need = fixed + sum(i.nbytes for i in inputs[:k]) + staging(inputs[k:])
            if need <= budget:
                resident = inputs[:k]
                break
        if resident is None:
            need = fixed + staging(inputs)
            spectral = [m for m in methods if _spectral(m)]
            if spectral and largest_matrix:
                m = max(spectral, key=lambda m: svd_scratch(largest_matrix, m, len(models)))
                svd = svd_scratch(largest_matrix, m, len(models))
                if eval_bytes + reserve + svd + staging(inputs) > budget:  # the SVD alone does not fit
                    name = next(k for k, v in matrices.items() if v == largest_matrix)
                    raise MergeSearchError(
                        f"device memory: {m}'s SVD of {name} ({largest_matrix[0]} x {largest_matrix[1]}, "
                        f"{len(models)} models) needs {fmt_bytes(svd)} of scratch; with the evaluation model "
                        f"({fmt_bytes(eval_bytes)}) and its reserve ({fmt_bytes(reserve)}) that is "
                        f"{fmt_bytes(eval_bytes + reserve + svd + staging(inputs))}, more than the budget of "
                        f"{fmt_bytes(budget)} ({source})")
            parts = [f"the evaluation model ({fmt_bytes(eval_bytes)}, {_dname(edtype)})",
                     f"its reserve ({fmt_bytes(reserve)})", f"the merge scratch ({fmt_bytes(scratch)})"]
            if staging(inputs):
                parts.append(f"the staging slots ({fmt_bytes(staging(inputs))})")
            shard = (f"; shard it over GPUs with resources.gpus_per_worker: {math.ceil((eval_bytes + reserve) / budget)}"
                     if cuda and gpus_per_worker >= 1 and eval_bytes > budget else "")
            raise MergeSearchError(
                f"device memory: {', '.join(parts[:-1])} and {parts[-1]} need {fmt_bytes(need)}, more than the "
                f"budget of {fmt_bytes(budget)} ({source}){shard}")
    host = [i for i in inputs if i not in resident]
    p = Placement(device=device, budget=budget, budget_source=source, stream=stream, eval_bytes=eval_bytes,
                  eval_dtype=_dname(edtype), eval_reserve=reserve, scratch=scratch, staging=staging(host),
                  inputs=inputs, resident=[i.key for i in resident], host=[i.key for i in host],
                  largest=(largest, ref.numel(largest)), bandwidth=bandwidth or measure_bandwidth(device),
                  notes=notes, factors=factors)
    read = [i for i in inputs if i.role == "model" or (i.role == "base" and uses_base) or i.role == "side"]
    p.read_per_candidate = sum(i.nbytes for i in read)
    p.moved_per_candidate = 0 if stream == "view" else sum(i.nbytes for i in read if i.key in p.host)
    numel = sum(ref.numel(n) for n in floats)
    passes = max(EXTRA_PASSES.get(REGISTRY[m].sparsifier, 0) for m in methods)
    if budget is None and factors:
        notes.append(f"the SVD factors ({fmt_bytes(factors)}) are kept in this worker's memory between candidates")
    compute_bytes = p.read_per_candidate + numel * (4 + 2 * edtype.itemsize) + numel * 4 * passes * len(models)
    compute_s = compute_bytes / p.bandwidth["device"]
    transfer_s = p.moved_per_candidate / p.bandwidth["link"]
    p.predicted_s = max(compute_s, transfer_s)  # copies overlap the merge, one tensor ahead
    if p.host:
        try:
            total = _mem_total()
            if p.host_bytes > 0.8 * total:
                notes.append(f"the host tier ({fmt_bytes(p.host_bytes)}) exceeds 80% of this node's memory "
                             f"({fmt_bytes(total)}): the page cache cannot keep it, so inputs are re-read from disk")
        except OSError:
            pass
    return p


def staging_bytes(host: list[Input], stream: str) -> int:
    """The two staging slots (one filled while the other is merged), each sized for the
    largest set of host tensors that one output tensor reads."""
    if not host or stream == "view":
        return 0
    names = set().union(*(i.sizes for i in host))
    return 2 * max(sum(slot_bytes(i.sizes.get(n, 0)) for i in host) for n in names)


def slot_bytes(n: int) -> int:
    """Bytes a tensor of ``n`` bytes takes in a staging slot (aligned for any dtype)."""
    return -(-n // SLOT_ALIGN) * SLOT_ALIGN


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OSError("no MemTotal")


def space_plan(space, *, device: str | None = None, budget: int | None = None, side: dict | None = None,
               bandwidth: dict | None = None) -> Placement:
    """The placement for a search space's workers (its ``resources``; ``budget``
    overrides ``resources.device_memory``). A sharded worker's (2 or more GPUs each) is
    :func:`mergesearch.engine.multi_gpu.space_placement`'s."""
    r = space.resources
    methods = sorted(set(space.methods) | {"linear", "task_arithmetic"})
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if budget is None and r.device_memory is not None:
        budget = parse_size(r.device_memory, "resources.device_memory")
    reserve = parse_size(r.eval_memory, "resources.eval_memory") if r.eval_memory is not None else None
    return make_plan(space.base, space.models, methods, device=device, budget=budget, eval_dtype=space.dtype,
                     eval_reserve=reserve, side=side, gpus_per_worker=r.gpus_per_worker or 1.0, stream=r.stream,
                     bandwidth=bandwidth)


def dumps(p: Placement) -> str:
    return json.dumps(p.to_json(), indent=2)


def gpu_shares(workers: int, gpus: float, gpus_per_worker: float | None) -> float:
    """GPUs each worker asks Ray for. ``None`` chooses: one GPU each when there are
    enough, else an equal fraction so that every worker fits (1/k of a GPU for k
    workers per GPU). An explicit share that cannot seat every worker is an error,
    never a hang."""
    if gpus <= 0:
        if gpus_per_worker:
            raise MergeSearchError(f"resources.gpus_per_worker: {gpus_per_worker:g} GPU per worker, but the Ray "
                                   "cluster has no GPU")
        return 0.0
    if gpus_per_worker is None:
        if workers <= gpus:
            return 1.0
        per_gpu = math.ceil(workers / math.floor(gpus))
        return 1.0 / per_gpu
    if gpus_per_worker <= 0:
        return 0.0
    if gpus_per_worker < 1:
        seats = math.floor(1 / gpus_per_worker + 1e-9) * math.floor(gpus)
    else:
        seats = math.floor(gpus / gpus_per_worker + 1e-9)
    if seats < workers:
        raise MergeSearchError(
            f"--workers {workers} with resources.gpus_per_worker {gpus_per_worker:g}: the cluster's {gpus:g} GPU(s) "
            f"seat only {seats} worker(s); use fewer workers or a share such as {1 / math.ceil(workers / max(1, math.floor(gpus))):g}")
    return float(gpus_per_worker)
