"""What a merge method sees for one output tensor.

``TensorInputs`` holds the base tensor and, for each model, its tensor or its task
vector (delta = model - base), whichever the caller has. The streamed export fills
it from memory-mapped files; the in-memory :class:`~mergesearch.materialize.Materializer`
fills it from resident tensors and precomputed statistics, so a TIES threshold is a
lookup instead of a top-k. Both go through the same method code, which is what
makes in-memory candidates bit-equal to exported checkpoints.
"""

from __future__ import annotations

import hashlib

import torch


def tensor_seed(seed: int, name: str) -> int:
    """The per-tensor random seed: independent of tensor order and of other tensors."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


class TensorInputs:
    def __init__(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor] | None = None,
        deltas: list[torch.Tensor] | None = None,
        sorted_abs: list[torch.Tensor | None] | None = None,
        seed: int = 0,
    ):
        if tensors is None and deltas is None:
            raise ValueError("TensorInputs needs tensors or deltas")
        self.name = name
        self.base = base
        self._tensors = tensors
        self._deltas = deltas
        self._sorted_abs = sorted_abs
        self.seed = seed
        self._generator: torch.Generator | None = None

    @property
    def n(self) -> int:
        return len(self._tensors if self._tensors is not None else self._deltas)

    @property
    def like(self) -> torch.Tensor:
        return self.base if self.base is not None else self.tensor(0)

    def tensor(self, i: int) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[i]
        return self.base + self._deltas[i]

    def delta(self, i: int) -> torch.Tensor:
        if self._deltas is not None:
            return self._deltas[i]
        return self._tensors[i] - self.base

    def kth_smallest_abs(self, i: int, k: int) -> torch.Tensor:
        """The k-th smallest |delta_i| (0-based), from the precomputed sort if any."""
        if self._sorted_abs is not None and self._sorted_abs[i] is not None:
            return self._sorted_abs[i][k]
        flat = self.delta(i).abs().reshape(-1)
        return torch.kthvalue(flat, k + 1).values

    def count_abs(self, i: int, value: torch.Tensor) -> tuple[int, int]:
        """(#|delta_i| < value, #|delta_i| <= value): a binary search when sorted."""
        if self._sorted_abs is not None and self._sorted_abs[i] is not None:
            s = self._sorted_abs[i]
            v = value.reshape(1)
            return int(torch.searchsorted(s, v)), int(torch.searchsorted(s, v, right=True))
        a = self.delta(i).abs()
        return int((a < value).sum()), int((a <= value).sum())

    @property
    def generator(self) -> torch.Generator:
        """One generator per output tensor, seeded from the recipe seed and the name."""
        if self._generator is None:
            device = self.like.device
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(tensor_seed(self.seed, self.name))
        return self._generator
