"""Placement of one worker over several GPUs (``resources.gpus_per_worker: 2`` or more).

A family too large for one GPU (a 70B model is 141 GB in bfloat16) is evaluated on a
model sharded over the worker's ``k`` GPUs. The shards follow accelerate's conventions:
a ``device_map`` of module name -> GPU index made by ``infer_auto_device_map`` within
the per-GPU limits of ``get_balanced_memory``, on a model built from the config on the
meta device (no weights are read), so whole decoder layers are never split. The worker
loads its evaluation model with that map (as ``from_pretrained`` does given a ``device_map``),
and each tensor of a candidate is merged where its parameter lives.

Each GPU's budget (``resources.device_memory`` is per GPU, else each GPU's free memory)
holds:

- its share of the evaluation model (the tensors of the modules mapped to it);
- an equal share of the evaluation reserve (``resources.eval_memory``, default 20% of
  the model, as on one GPU);
- the merge scratch and two staging slots for the largest tensor merged on it;
- the inputs (the base, the models, side files) for the tensors it holds, resident in
  priority order while they fit, else host-tier (memory-mapped, streamed tensor by
  tensor through its own staging slots).

A tensor whose full-tensor scratch and staging cannot fit beside the shard is merged on
the host instead, by the streamed export's path (:func:`mergesearch.methods.kernels.streaming`:
native CPU kernels, selections read in blocks with thresholds over the whole tensor, the
merge in chunks), and the merged tensor is copied into its parameter on its GPU. The plan
host-merges the fewest tensors that make a GPU fit: all tensors of at least some size.
A GPU whose share of the model and the reserve alone exceed its budget is refused, in
one line naming the GPU and the sizes. Sizes are bytes; ``80GB`` is 80e9 and ``80GiB``
80 x 2^30 (:func:`mergesearch.engine.plan.parse_size`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from mergesearch.engine.device_map import describe_modules, infer_device_map, layer_index, tensor_gpus
from mergesearch.engine.plan import (GB, EXTRA_PASSES, Input, _dname, family_inputs, fmt_bytes,
                                     scratch_bytes, slot_bytes)
from mergesearch.errors import MergeSearchError

# Bytes per second of the host's merge of a large tensor (the native kernels over a
# memory-mapped family), for the predicted time when not measured.
HOST_MERGE_ASSUMED = 2.0e10


@dataclass
class GpuShare:
    """What one GPU of a sharded worker holds."""

    index: int
    budget: int
    modules: list[str]  # the device_map's modules placed here, in model order
    layers: list[int]  # the decoder layers among them
    eval_bytes: int
    eval_reserve: int
    scratch: int
    staging: int
    parts: dict[str, int]  # input key -> bytes of its tensors merged on this GPU
    resident: list[str]
    host: list[str]
    host_merged: list[str]  # tensors merged on the host and copied here
    largest: tuple[str, int] | None  # the largest tensor merged on this GPU: name, elements
    cut: int = 0  # tensors of this many elements and more are host-merged (0: none)

    @property
    def device_bytes(self) -> int:
        return (self.eval_bytes + self.eval_reserve + self.scratch + self.staging
                + sum(self.parts[k] for k in self.resident))


@dataclass
class MultiPlacement:
    """A worker's placement over ``len(gpus)`` GPUs (see the module docstring)."""

    device: str  # cuda (each tensor on cuda:<its GPU>), or cpu for tests of the runtime path
    budget: int | None  # per GPU
    budget_source: str
    stream: str
    eval_bytes: int
    eval_dtype: str
    eval_reserve: int  # the whole worker's; each GPU holds an equal share
    device_map: dict[str, int | str]
    gpus: list[GpuShare]
    inputs: list[Input]
    tensor_gpu: dict[str, int] = field(repr=False)  # tensor name -> GPU index
    host_scratch: int = 0  # host bytes of the host merge: the largest host-merged tensor in its dtype
    bandwidth: dict = field(default_factory=dict)
    read_per_candidate: int = 0
    moved_per_candidate: int = 0
    predicted_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    factors: int = 0  # no SVD factors are kept between candidates on a sharded worker

    # the interface the Materializer and the worker read
    def tensor_device(self, name: str) -> str:
        g = self.tensor_gpu.get(name, 0)
        return f"cuda:{g}" if self.device.startswith("cuda") else "cpu"

    def merge_device(self, name: str) -> str:
        """Where ``name`` is merged: its GPU, or the host for a host-merged tensor."""
        return "cpu" if name in self.host_merged else self.tensor_device(name)

    def resident_on(self, key: str, name: str) -> bool:
        """Whether input ``key``'s tensor ``name`` is held on the GPU that merges it."""
        return name not in self.host_merged and key in self.gpus[self.tensor_gpu.get(name, 0)].resident

    @property
    def host_merged(self) -> set[str]:
        return getattr(self, "_host_merged", None) or self._index()

    def _index(self) -> set[str]:
        self._host_merged = {n for g in self.gpus for n in g.host_merged}
        return self._host_merged

    @property
    def resident(self) -> list[str]:
        return [f"{k}@{self._gpu_name(g.index)}" for g in self.gpus for k in g.resident]

    @property
    def host(self) -> list[str]:
        return [i.key for i in self.inputs if any(i.key in g.host for g in self.gpus)]

    @property
    def scratch(self) -> int:
        return max(g.scratch for g in self.gpus)

    @property
    def device_bytes(self) -> int:
        return sum(g.device_bytes for g in self.gpus)

    @property
    def host_bytes(self) -> int:
        return sum(i.nbytes for i in self.inputs if i.key in self.host)

    def on_device(self, key: str) -> bool:
        return all(key in g.resident for g in self.gpus)

    def input(self, key: str) -> Input:
        return next(i for i in self.inputs if i.key == key)

    def budget_for(self, k: int) -> int:
        """The most bytes any one GPU needs with the first ``k`` inputs (in priority order)
        resident for its tensors (its tensors merged as placed); compare with the per-GPU
        budget. Each GPU's reserve share is ``gpus[g].eval_reserve``."""
        placeable = [i for i in self.inputs if not i.adapter][:k]
        need = 0
        for g in self.gpus:
            names = [n for n, d in self.tensor_gpu.items() if d == g.index and n not in self.host_merged]
            host = [i for i in self.inputs if i not in placeable]
            need = max(need, g.eval_bytes + g.eval_reserve + g.scratch + sum(g.parts[i.key] for i in placeable)
                       + _staging(host, names, self.stream))
        return need

    def _gpu_name(self, g: int) -> str:
        return f"cuda:{g}" if self.device.startswith("cuda") else f"gpu{g}"

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("tensor_gpu")
        for i in d["inputs"]:
            i.pop("sizes")
        d["tiers"] = {"device": self.device_bytes, "host": self.host_bytes,
                      "pinned_host": sum(g.staging for g in self.gpus) if self.device.startswith("cuda") else 0,
                      "host_scratch": self.host_scratch}
        for g, share in zip(d["gpus"], self.gpus):
            g["device_bytes"] = share.device_bytes
            g["host_merged"] = len(share.host_merged)
        return d

    def render(self) -> str:
        budget = fmt_bytes(self.budget) if self.budget is not None else "none declared"
        lines = [f"worker on {len(self.gpus)} GPUs: budget {budget} per GPU ({self.budget_source}); evaluation model "
                 f"{fmt_bytes(self.eval_bytes)} ({self.eval_dtype}) sharded by accelerate's device_map (whole "
                 f"decoder layers); host inputs are memory-mapped (one copy per node), read "
                 f"{'in place' if self.stream == 'view' else 'through staging buffers'}"]
        for g in self.gpus:
            lines.append(f"  {self._gpu_name(g.index)}: {describe_modules(g.modules)}")
            lines.append(f"    evaluation model      {fmt_bytes(g.eval_bytes):>12}")
            lines.append(f"    evaluation reserve    {fmt_bytes(g.eval_reserve):>12}")
            if g.largest is not None:
                lines.append(f"    merge scratch         {fmt_bytes(g.scratch):>12}  (largest tensor merged here "
                             f"{g.largest[0]}, {g.largest[1]:,} elements)")
            if g.staging:
                lines.append(f"    staging slots         {fmt_bytes(g.staging):>12}")
            for i in self.inputs:
                if g.parts.get(i.key):
                    tier = "device" if i.key in g.resident else "host"
                    lines.append(f"    {i.key:<20}  {fmt_bytes(g.parts[i.key]):>12}  {tier}")
            if g.host_merged:
                lines.append(f"    host-merged           {len(g.host_merged):>5} tensors   (of {g.cut:,} "
                             "elements and more: merged on the host in blocks, copied in)")
            lines.append(f"    total                 {fmt_bytes(g.device_bytes):>12}  of {budget}")
        lines.append(f"tiers: device {fmt_bytes(self.device_bytes)} over {len(self.gpus)} GPUs, host "
                     f"{fmt_bytes(self.host_bytes)}" + (f", host merge scratch {fmt_bytes(self.host_scratch)}"
                                                       if self.host_scratch else ""))
        bw = self.bandwidth
        lines.append(f"per candidate: reads {fmt_bytes(self.read_per_candidate)}, moves "
                     f"{fmt_bytes(self.moved_per_candidate)} host->device; predicted {self.predicted_s:.3f} s "
                     f"(device {bw['device'] / GB:.0f} GB/s, link {bw['link'] / GB:.1f} GB/s, host merge "
                     f"{bw.get('host', HOST_MERGE_ASSUMED) / GB:.0f} GB/s, {bw['source']})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def make_multi_plan(base: str | None, models: list[str], methods: list[str], *, gpus: int, device: str = "cuda",
                    budget: int | None = None, eval_dtype: str | None = None, eval_reserve: int | None = None,
                    side: dict | None = None, stream: str = "auto", bandwidth: dict | None = None,
                    device_map: dict[str, int | str] | None = None,
                    trust_remote_code: bool = False) -> MultiPlacement:
    """Place a family on ``gpus`` GPUs of ``budget`` bytes each (see the module
    docstring). ``device_map`` (module -> GPU index) replaces accelerate's inference,
    for tests. Raises MergeSearchError when a GPU's share cannot fit."""
    from mergesearch.engine.adapter import open_model
    from mergesearch.engine.bandwidth import measure_bandwidth
    from mergesearch.engine.checkpoint import parse_dtype
    from mergesearch.engine.plan import _spectral
    from mergesearch.methods import REGISTRY

    if gpus < 2:
        raise MergeSearchError(f"resources.gpus_per_worker: a sharded worker takes 2 or more GPUs, got {gpus:g}")
    cuda = device.startswith("cuda")
    if stream == "auto":
        stream = "copy" if cuda else "view"
    if cuda and stream == "view":
        raise MergeSearchError("resources.stream: 'view' (zero copy) works on the CPU only; a CUDA device copies")
    base_ckpt = open_model(base) if base is not None else None
    ref = base_ckpt if base_ckpt is not None else open_model(models[0])
    floats = [n for n in ref.names() if ref.dtype(n).is_floating_point]
    edtype = parse_dtype(eval_dtype) or next((ref.dtype(n) for n in floats), torch.float32)
    size = {n: ref.numel(n) * (edtype.itemsize if n in floats else ref.dtype(n).itemsize) for n in ref.names()}
    eval_bytes = sum(size.values())
    reserve = eval_reserve if eval_reserve is not None else int(0.2 * eval_bytes)
    share = reserve // gpus

    budgets, source = _budgets(gpus, budget, cuda)
    if eval_bytes + reserve > sum(budgets):
        raise MergeSearchError(
            f"device memory: the evaluation model ({fmt_bytes(eval_bytes)}, {_dname(edtype)}) and its reserve "
            f"({fmt_bytes(reserve)}) need {fmt_bytes(eval_bytes + reserve)}, more than {gpus} GPUs of "
            f"{fmt_bytes(min(budgets))} hold ({source}); use more GPUs per worker (resources.gpus_per_worker)"
            + ("" if eval_reserve is not None else " or declare the reserve (resources.eval_memory)"))
    if device_map is None:
        device_map = infer_device_map(base if base is not None else models[0],
                                      {g: b - share for g, b in enumerate(budgets)}, edtype, trust_remote_code)
    spill = [m for m, d in device_map.items() if not isinstance(d, int)]
    owner = tensor_gpus(ref.names(), device_map)
    if spill:
        n = sum(size[t] for t, d in owner.items() if not isinstance(d, int))
        raise MergeSearchError(
            f"device memory: {describe_modules(spill)} of the evaluation model ({fmt_bytes(n)}) fit on none of the "
            f"{gpus} GPUs of {fmt_bytes(min(budgets))} ({source}) beside the reserve's share ({fmt_bytes(share)}) "
            "per GPU; use more GPUs per worker (resources.gpus_per_worker)")
    bad = sorted({d for d in owner.values() if d >= gpus})
    if bad:
        raise MergeSearchError(f"device map: GPU {bad[0]} is not among the worker's {gpus} GPUs")

    inputs = family_inputs(base, base_ckpt, models, side)
    adapters = [i for i in inputs if i.adapter]
    notes = []
    if adapters:
        notes.append("LoRA adapters' factors stay on the host on a sharded worker, moved per tensor")
    if any(_spectral(m) for m in methods):
        notes.append("the SVD factors of the singular-value methods are recomputed per candidate on a sharded worker")
    all_owner = {**owner, **tensor_gpus([n for i in inputs for n in i.sizes if n not in owner], device_map)}

    shares = []
    for g in range(gpus):
        mods = [m for m, d in device_map.items() if d == g]
        names = [n for n in floats if owner[n] == g]
        eval_g = sum(size[n] for n in ref.names() if owner[n] == g)
        fixed = eval_g + share
        if fixed > budgets[g]:
            raise MergeSearchError(
                f"device memory: GPU {g} of {gpus} holds {describe_modules(mods)} of the evaluation model "
                f"({fmt_bytes(eval_g)}, {_dname(edtype)}) and its share of the reserve ({fmt_bytes(share)}): "
                f"{fmt_bytes(fixed)}, more than its budget of {fmt_bytes(budgets[g])} ({source})")
        shares.append(_fit_gpu(g, budgets[g], mods, eval_g, share, names, ref, inputs, all_owner, methods,
                               len(models), edtype.itemsize, stream, len(adapters), device))

    p = MultiPlacement(device=device, budget=budget if budget is not None else min(budgets), budget_source=source,
                       stream=stream, eval_bytes=eval_bytes, eval_dtype=_dname(edtype), eval_reserve=reserve,
                       device_map=dict(device_map), gpus=shares, inputs=inputs, tensor_gpu=owner,
                       bandwidth=bandwidth or measure_bandwidth(device), notes=notes)
    hm = [n for g in shares for n in g.host_merged]
    p.host_scratch = max((ref.numel(n) * edtype.itemsize for n in hm), default=0)
    _predict(p, ref, methods, inputs, base is not None and (bool(adapters) or any(
        REGISTRY[m].uses_base != "no" for m in methods)), len(models), edtype.itemsize)
    try:
        from mergesearch.engine.plan import _mem_total
        if p.host and p.host_bytes > 0.8 * _mem_total():
            notes.append(f"the host tier ({fmt_bytes(p.host_bytes)}) exceeds 80% of this node's memory "
                         f"({fmt_bytes(_mem_total())}): the page cache cannot keep it, so inputs are re-read from disk")
    except OSError:
        pass
    if hm:
        notes.append(f"{len(hm)} tensors ({sum(ref.numel(n) for n in hm):,} elements) are merged on the host by the "
                     "streamed export's path (thresholds over the whole tensor, row blocks) and copied to their GPU")
    return p


def _budgets(gpus: int, budget: int | None, cuda: bool) -> tuple[list[int], str]:
    if budget is not None:
        return [budget] * gpus, "declared"
    if cuda and torch.cuda.is_available():
        if torch.cuda.device_count() < gpus:
            raise MergeSearchError(f"resources.gpus_per_worker: {gpus} GPUs per worker, but {torch.cuda.device_count()} "
                                   "are visible here to measure; declare resources.device_memory (or --device-memory), "
                                   "the budget of each GPU")
        return [int(torch.cuda.mem_get_info(g)[0]) for g in range(gpus)], "free CUDA memory of each GPU"
    raise MergeSearchError("device memory: no CUDA device is visible here to measure; declare "
                           "resources.device_memory (or --device-memory), the budget of each GPU")


def _fit_gpu(g: int, budget: int, mods: list[str], eval_g: int, share: int, names: list[str], ref,
             inputs: list[Input], owner: dict, methods: list[str], n_models: int, out_elem: int, stream: str,
             adapters: int, device: str) -> GpuShare:
    """The fewest largest tensors merged on the host, then the most inputs resident (in
    priority order), that fit GPU ``g``'s budget."""
    numel = {n: ref.numel(n) for n in names}
    cuts = sorted(set(numel.values()), reverse=True) + [0]
    placeable = [i for i in inputs if not i.adapter]
    for cut in [None, *cuts]:  # host-merge every tensor of ``cut`` elements or more
        merged = [n for n in names if cut is None or numel[n] < cut]
        host_merged = [n for n in names if cut is not None and numel[n] >= cut]
        mset = set(merged)
        parts = {i.key: sum(b for n, b in i.sizes.items() if n in mset and owner.get(n) == g) for i in inputs}
        if merged:
            largest = max(merged, key=numel.get)
            matrices = [n for n in merged if len(ref.shape(n)) == 2]
            big = ref.shape(max(matrices, key=numel.get)) if matrices else None
            scratch = scratch_bytes(numel[largest], methods, n_models, out_elem, device, big, adapters=adapters)
        else:
            largest, scratch = None, 0
        fixed = eval_g + share + scratch
        for k in range(len(placeable), -1, -1):
            host = [i for i in inputs if i not in placeable[:k]]
            staging = _staging(host, merged, stream)
            need = fixed + sum(parts[i.key] for i in placeable[:k]) + staging
            if need <= budget:
                s = GpuShare(index=g, budget=budget, modules=mods, layers=[n for n in map(layer_index, mods)
                                                                            if n is not None],
                             eval_bytes=eval_g, eval_reserve=share, scratch=scratch, staging=staging, parts=parts,
                             resident=[i.key for i in placeable[:k]], host=[i.key for i in host if parts[i.key]],
                             host_merged=host_merged, largest=(largest, numel[largest]) if largest else None,
                             cut=min((numel[n] for n in host_merged), default=0))
                return s
    raise AssertionError("unreachable: with every tensor merged on the host the shard fits")


def _staging(host: list[Input], names: list[str], stream: str) -> int:
    """Two staging slots, each for the host inputs of the largest tensor merged here."""
    if not host or not names or stream == "view":
        return 0
    return 2 * max(sum(slot_bytes(i.sizes.get(n, 0)) for i in host) for n in names)


def _predict(p: MultiPlacement, ref, methods: list[str], inputs: list[Input], uses_base: bool, n_models: int,
             elem: int) -> None:
    """Bytes read and moved per candidate, and the predicted time: the GPUs' merges run
    one tensor after another (each overlapping its copies), then the host's."""
    from mergesearch.methods import REGISTRY
    read = [i for i in inputs if i.role == "model" or (i.role == "base" and uses_base) or i.role == "side"]
    passes = max(EXTRA_PASSES.get(REGISTRY[m].sparsifier, 0) for m in methods)
    bw = p.bandwidth
    total_s, hm = 0.0, p.host_merged
    for g in p.gpus:
        reads = sum(g.parts[i.key] for i in read)
        moved = 0 if p.stream == "view" else sum(g.parts[i.key] for i in read if i.key not in g.resident)
        numel = sum(ref.numel(n) for n, d in p.tensor_gpu.items() if d == g.index and n not in hm
                    and ref.dtype(n).is_floating_point)
        compute = (reads + numel * (4 + 2 * elem) + numel * 4 * passes * n_models) / bw["device"]
        total_s += max(compute, moved / bw["link"])
        p.read_per_candidate += reads
        p.moved_per_candidate += moved
    hnumel = sum(ref.numel(n) for n in hm)
    hread = sum(b for i in read for n, b in i.sizes.items() if n in hm)
    p.read_per_candidate += hread
    p.moved_per_candidate += hnumel * elem  # the merged tensors, copied to their GPUs
    total_s += (hread + hnumel * 4 * passes * n_models) / bw.get("host", HOST_MERGE_ASSUMED) + hnumel * elem / bw["link"]
    p.predicted_s = total_s


def dumps(p: MultiPlacement) -> str:
    return json.dumps(p.to_json(), indent=2)


def space_placement(space, *, device: str | None = None, budget: int | None = None, side: dict | None = None,
                    bandwidth: dict | None = None, gpus: int | None = None):
    """The placement for a search space's workers: with ``gpus`` (default
    ``resources.gpus_per_worker``) of 2 or more on CUDA, a sharded worker's; otherwise
    :func:`mergesearch.engine.plan.space_plan`'s."""
    from mergesearch.engine.plan import space_plan
    gpus = gpus or space.resources.gpus_per_worker or 1
    if gpus >= 2 and (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return space_multi_plan(space, int(gpus), budget=budget, side=side, bandwidth=bandwidth)
    return space_plan(space, device=device, budget=budget, side=side, bandwidth=bandwidth)


def space_multi_plan(space, gpus: int, *, budget: int | None = None, side: dict | None = None,
                     bandwidth: dict | None = None) -> MultiPlacement:
    """A search space's sharded workers' placement (its ``resources``; ``budget``, per
    GPU, overrides ``resources.device_memory``)."""
    from mergesearch.engine.plan import parse_size
    r = space.resources
    methods = sorted(set(space.methods) | {"linear", "task_arithmetic"})
    if budget is None and r.device_memory is not None:
        budget = parse_size(r.device_memory, "resources.device_memory")
    reserve = parse_size(r.eval_memory, "resources.eval_memory") if r.eval_memory is not None else None
    return make_multi_plan(space.base, space.models, methods, gpus=gpus, budget=budget, eval_dtype=space.dtype,
                           eval_reserve=reserve, side=side, stream=r.stream, bandwidth=bandwidth,
                           trust_remote_code=bool(getattr(space.evaluator, "trust_remote_code", False)))


def worker_plan(base: str | None, models: list[str], methods: list[str], device: str, opts: dict, side: dict,
                trust_remote_code: bool = False):
    """A worker's own placement on its device(s): sharded over its GPUs when it holds 2
    or more (``opts["share"]``), else :func:`mergesearch.engine.plan.make_plan`'s."""
    from mergesearch.engine.plan import NO_BANDWIDTH, make_plan
    share = opts.get("share") or 1.0
    kw = dict(budget=opts.get("budget"), eval_dtype=opts.get("dtype"), eval_reserve=opts.get("eval_reserve"),
              side=side, stream=opts.get("stream", "auto"), bandwidth=NO_BANDWIDTH)
    if share >= 2 and device.startswith("cuda"):
        return make_multi_plan(base, models, methods, gpus=int(share), device=device, trust_remote_code=trust_remote_code,
                               **kw)
    return make_plan(base, models, methods, device=device, gpus_per_worker=share, **kw)
