"""What a merge method sees for one output tensor: data only.

``TensorInputs`` holds the base tensor and, for each model, its tensor or its task
vector (delta = model - base), whichever the caller has, with the tensor's side inputs
(metrics, Gram matrices), the recipe seed and the dtype the merged tensor is cast to.
The streamed export fills it from memory-mapped files; the in-memory
:class:`~mergesearch.engine.materialize.Materializer` from device-resident tensors,
mapped host tensors or staged copies of them, as its placement says. Both go through the
same method code, which is what makes in-memory candidates bit-equal to exported
checkpoints.

It selects nothing: the selections (:mod:`mergesearch.methods.selection`) and the
sparsifiers (:mod:`mergesearch.methods.sparsify`) are functions that read it.
"""

from __future__ import annotations

import hashlib

import torch


def tensor_seed(seed: int, name: str) -> int:
    """The per-tensor random seed: independent of tensor order and of other tensors."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merges compute in float32 (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class FactorCache:
    """What a method derives from a tensor's inputs alone (the SVDs of its task matrices),
    kept between candidates: one entry per tensor and kind, replaced when its key (the
    weights, a rank) changes, so it never holds more than one entry per tensor and kind.
    The memory plan counts its bytes (:func:`mergesearch.engine.plan.factor_bytes`).
    ``prefixes`` limits what it keeps to kinds that start with one of them (others are
    built each time): a worker whose plan has no room for SVD factors still keeps the
    device selection's histograms (``triton_abs_top16/``, a few kB of host memory each)."""

    def __init__(self, prefixes: tuple[str, ...] | None = None):
        self.prefixes = prefixes
        self.entries: dict[tuple[str, str], tuple] = {}
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(value) -> int:
        parts = value if isinstance(value, (tuple, list)) else (value,)
        return sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))

    def get(self, name: str, kind: str, key, build):
        if self.prefixes is not None and not kind.startswith(self.prefixes):
            return build()
        entry = self.entries.get((name, kind))
        if entry is not None and entry[0] == key:
            self.hits += 1
            return entry[1]
        self.misses += 1
        if entry is not None:
            self.nbytes -= self._size(entry[1])
            del self.entries[(name, kind)]
        value = build()
        self.entries[(name, kind)] = (key, value)
        self.nbytes += self._size(value)
        return value


class LowRank:
    """A model's task vector for one tensor held as LoRA factors: ``delta = (b @ a) * scaling``,
    transposed when ``transpose`` (embeddings). Holds r x (in + out) values; the dense
    delta exists only while a merge reads it (:meth:`TensorInputs.delta`)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float, transpose: bool = False):
        self.a, self.b, self.scaling, self.transpose = a, b, float(scaling), bool(transpose)

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.b.shape[0], self.a.shape[1]
        return (cols, rows) if self.transpose else (rows, cols)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The task vector in ``dtype``: the product in ``dtype``, with the scaling applied to
        the smaller factor (PEFT scales the product: the same up to rounding, and the same
        bits for a power-of-two scaling), so no pass over the product is added."""
        a, b = self.a.to(dtype), self.b.to(dtype)
        if a.numel() <= b.numel():
            a = a * self.scaling
        else:
            b = b * self.scaling
        d = b @ a
        return d.T.contiguous() if self.transpose else d


class TensorInputs:
    """``base`` and ``tensors`` may be in their storage dtype (e.g. bfloat16): the
    work-dtype views (``base``, ``tensor(i)``, ``delta(i)``) are made on first use and
    kept, while the fused kernels read the raw tensors directly (``raw_base``, ``raw(i)``).

    A model given as a :class:`LowRank` (a LoRA adapter's factors) has no raw tensor: its
    delta is made from the factors on first use, and its tensor is the base plus it
    (``lowrank_base``, the base tensor, serves methods that do not read the base).
    """

    def __init__(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor] | None = None,
        deltas: list[torch.Tensor] | None = None,
        seed: int = 0,
        metrics: list[torch.Tensor | None] | None = None,
        base_metric: torch.Tensor | None = None,
        grams: list[torch.Tensor | None] | None = None,
        out_dtype: torch.dtype | None = None,
        cache: FactorCache | None = None,
        ids: list[str] | None = None,
        lowrank_base: torch.Tensor | None = None,
    ):
        if tensors is None and deltas is None:
            raise ValueError("TensorInputs needs tensors or deltas")
        if tensors is not None and any(isinstance(t, LowRank) for t in tensors):
            if base is None and lowrank_base is None:
                raise ValueError(f"{name}: a LowRank model needs the base tensor")
        self._lowrank_base = lowrank_base if lowrank_base is not None else base
        self.name = name
        self.raw_base = base
        self._tensors = tensors
        self._deltas = deltas
        self.seed = seed
        self._metrics = metrics
        self._base_metric = base_metric
        self._grams = grams
        given = tensors if tensors is not None else deltas
        self.n = len(given)
        ref = base if base is not None else self._lowrank_base if self._lowrank_base is not None else given[0]
        self.numel: int = ref.numel()
        self.shape: torch.Size = ref.shape
        self.device: torch.device = ref.device
        self._ref_dtype = ref.dtype
        # the dtype the caller casts the merged tensor to: methods that compute large
        # tensors in blocks may return it in this dtype already (the same bits)
        self.out_dtype = out_dtype
        # where the merged tensor may be written (e.g. the evaluation model's parameter, in
        # out_dtype): kernels that can write into it do, and return it
        self.out: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        self.cache = cache
        # which input each model is (the caller's keys), for cache keys; positions by default
        self.ids = list(ids) if ids is not None else [str(i) for i in range(self.n)]
        self._base_work: torch.Tensor | None = None
        self._tensor_cache: dict[int, torch.Tensor] = {}
        self._delta_cache: dict[int, torch.Tensor] = {}

    @property
    def base(self) -> torch.Tensor | None:
        if self.raw_base is None:
            return None
        if self._base_work is None:
            self._base_work = self.raw_base.to(work_dtype(self.raw_base.dtype))
        return self._base_work

    def metric(self, i: int, missing_ok: bool = False) -> torch.Tensor | None:
        """Model i's diagonal metric for this tensor, in the work dtype."""
        m = self._metrics[i] if self._metrics is not None else None
        if m is None:
            if missing_ok:
                return None
            raise ValueError(f"{self.name}: no metric for model {i}")
        return m.to(work_dtype(m.dtype))

    @property
    def base_metric(self) -> torch.Tensor | None:
        m = self._base_metric
        return None if m is None else m.to(work_dtype(m.dtype))

    def gram(self, i: int) -> torch.Tensor | None:
        """Model i's input Gram matrix when this tensor is a linear layer's weight."""
        g = self._grams[i] if self._grams is not None else None
        return None if g is None else g.to(work_dtype(g.dtype))

    def scalar(self, value) -> torch.Tensor:
        """A 0-d tensor in the work dtype on the inputs' device (no conversion pass)."""
        return torch.full((), value, dtype=work_dtype(self._ref_dtype), device=self.device)

    def cached(self, kind: str, key, build):
        """``build()``, or what it returned for this tensor, ``kind`` and ``key`` before
        (kept in the caller's :class:`FactorCache` between candidates, if it gave one)."""
        if self.cache is None:
            return build()
        return self.cache.get(self.name, kind, key, build)

    def raw(self, i: int) -> torch.Tensor | None:
        """Model i's tensor as stored, or None when only its delta was given (or its factors)."""
        if self._tensors is None or isinstance(self._tensors[i], LowRank):
            return None
        return self._tensors[i]

    def lowrank(self, i: int) -> LowRank | None:
        return self._tensors[i] if self._tensors is not None and isinstance(self._tensors[i], LowRank) else None

    def tensor(self, i: int) -> torch.Tensor:
        if self._tensors is None:
            return self.base + self._deltas[i]
        if i not in self._tensor_cache:
            t = self._tensors[i]
            if isinstance(t, LowRank):
                b = self._lowrank_base
                self._tensor_cache[i] = self.delta(i) + (self.base if self.raw_base is not None
                                                         else b.to(work_dtype(b.dtype)))
            else:
                self._tensor_cache[i] = t.to(work_dtype(t.dtype))
        return self._tensor_cache[i]

    def delta(self, i: int) -> torch.Tensor:
        if self._deltas is not None:
            return self._deltas[i]
        if i not in self._delta_cache:
            t = self._tensors[i]
            if isinstance(t, LowRank):
                self._delta_cache[i] = t.dense(work_dtype(self._ref_dtype)).reshape(self.shape)
            else:
                self._delta_cache[i] = self.tensor(i) - self.base
        return self._delta_cache[i]

    def holds_delta(self, i: int) -> bool:
        """Whether model i's delta is held in the work dtype (given, or already made)."""
        return self._deltas is not None or i in self._delta_cache

    def delta_blocks(self, i: int, size: int):
        """(lo, hi, delta_i over flat elements [lo, hi)), in the work dtype: the same
        bits as :meth:`delta`, without a whole float copy of a stored tensor."""
        n = self.numel
        whole = self._deltas[i] if self._deltas is not None else self._delta_cache.get(i)
        if whole is None and (self._tensors is None or self.raw_base is None or self.raw(i) is None):
            whole = self.delta(i)
        for lo in range(0, n, size):
            hi = min(n, lo + size)
            if whole is not None:
                yield lo, hi, whole.reshape(-1)[lo:hi]
            else:
                t, b = self._tensors[i].reshape(-1)[lo:hi], self.raw_base.reshape(-1)[lo:hi]
                yield lo, hi, t.to(work_dtype(t.dtype)) - b.to(work_dtype(b.dtype))

    def owned(self, i: int, delta: bool) -> torch.Tensor:
        """Model i's task vector (``delta``) or tensor in the work dtype, as a tensor of the
        caller's own, free to change in place; the float copies kept here are dropped."""
        v = self.delta(i) if delta else self.tensor(i)
        made = self.lowrank(i) is not None  # made from the factors here: ours
        if not made and (self.raw(i) is None or v is self.raw(i)):  # an input as given: not ours to change
            v = v.clone()
        self.release(i)
        return v

    def release(self, i: int) -> None:
        """Drop model i's work-dtype copies (the kernels re-read the raw tensor), so only
        one model's temporaries are alive at a time."""
        for cache in (self._delta_cache, self._tensor_cache):
            cache.pop(i, None)

    @property
    def generator(self) -> torch.Generator:
        """One generator per output tensor, seeded from the recipe seed and the name."""
        if self._generator is None:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(tensor_seed(self.seed, self.name))
        return self._generator
