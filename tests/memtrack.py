"""Live tensor memory of a block of code, on any device: a dispatch mode that counts the
bytes of every storage an operation creates until its last tensor is gone. Storages
that existed before (inputs, the model's parameters) are not counted."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [tensors alive, bytes]
        self.current = 0
        self.peak = 0

    def _gone(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self.live[key]
            self.current -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            entry = self.live.get(key)
            if entry is None:
                if inputs is None:
                    inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                              if isinstance(a, torch.Tensor)}
                if key in inputs:  # in place, or a view of an input
                    continue
                self.live[key] = [1, storage.nbytes()]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            else:
                entry[0] += 1
            weakref.finalize(t, self._gone, key)
        return out
