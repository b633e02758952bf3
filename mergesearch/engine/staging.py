"""Staging host tensors into device slots (the streamed tier of a placement).

A :class:`Stager` holds two slots, each sized by the plan
(:func:`mergesearch.engine.plan.staging_bytes`) for the largest set of host tensors one
output tensor reads. While the merge reads one slot, a background thread fills the
other: the tensors' bytes are copied from the memory-mapped files by a small pool of
threads (:func:`parallel_copy`; ``memmove`` releases the GIL, so the copies run side by
side), on CUDA into a pinned buffer of the slot's size, then one asynchronous
host-to-device copy per slot on a copy stream. No buffer is allocated beyond the two
slots (and, on CUDA, their two pinned twins), so the host memory stays as planned.

One thread copying from a mapped file into pinned memory moves about a third of what a
PCIe Gen5 link takes (page-table walks, first-touch faults, one core's load/store
bandwidth); several threads reach the link. ``MERGESEARCH_STAGING_THREADS`` sets their
number (default: up to 8, at most the CPUs this process may run on).
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch

from mergesearch.engine.plan import slot_bytes
from mergesearch.errors import MergeSearchError

# A thread copies at least this many bytes: below it, handing work to a thread costs
# more than the copy.
MIN_CHUNK = 1 << 20
# Chunk boundaries fall on multiples of this (cache lines, and any element size).
CHUNK_ALIGN = 64
DEFAULT_THREADS = 8


def staging_threads() -> int:
    """Copy threads per stager: ``MERGESEARCH_STAGING_THREADS``, else up to
    :data:`DEFAULT_THREADS`, at most the CPUs this process may run on."""
    env = os.environ.get("MERGESEARCH_STAGING_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise MergeSearchError(f"MERGESEARCH_STAGING_THREADS: a positive integer, got '{env}'")
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(DEFAULT_THREADS, cpus))


def _pieces(pairs: list[tuple[int, int, int]], parts: int) -> list[list[tuple[int, int, int]]]:
    """``pairs`` of (destination address, source address, bytes), one per tensor, cut into
    at most ``parts`` runs of about equal bytes (boundaries aligned; a run may span the
    end of one tensor and the start of the next)."""
    total = sum(n for _, _, n in pairs)
    if total == 0:
        return []
    size = max(MIN_CHUNK, -(-total // parts))
    size = -(-size // CHUNK_ALIGN) * CHUNK_ALIGN
    runs: list[list[tuple[int, int, int]]] = [[]]
    room = size
    for dst, src, n in pairs:
        done = 0
        while done < n:
            if room == 0:
                runs.append([])
                room = size
            take = min(room, n - done)
            runs[-1].append((dst + done, src + done, take))
            done += take
            room -= take
    return [r for r in runs if r]


def _copy_run(run: list[tuple[int, int, int]]) -> None:
    for dst, src, n in run:
        ctypes.memmove(dst, src, n)  # a foreign call: the GIL is released meanwhile


def parallel_copy(dsts: list[torch.Tensor], srcs: list[torch.Tensor], pool: ThreadPoolExecutor | None,
                  threads: int) -> None:
    """Copy each CPU tensor of ``srcs`` into the CPU tensor of ``dsts`` beside it (same
    dtype and number of elements, ``dsts`` contiguous), byte for byte, split among
    ``threads`` threads: ``pool`` runs all runs but one, the caller the first. A source
    that is not contiguous is copied by torch instead."""
    pairs = []
    for d, s in zip(dsts, srcs):
        if d.dtype != s.dtype or d.numel() != s.numel() or not d.is_contiguous():
            raise ValueError(f"staging copy: {tuple(s.shape)} {s.dtype} into {tuple(d.shape)} {d.dtype}")
        if not s.is_contiguous() or s.device.type != "cpu" or d.device.type != "cpu":
            d.copy_(s)
            continue
        n = s.numel() * s.element_size()
        if n:
            pairs.append((d.data_ptr(), s.data_ptr(), n))
    runs = _pieces(pairs, threads if pool is not None else 1)
    if not runs:
        return
    futures = [pool.submit(_copy_run, r) for r in runs[1:]] if pool is not None else []
    try:
        _copy_run(runs[0])
    finally:
        for f in futures:  # every run has finished before the buffer is read or reused
            f.result()


class Stager:
    """Copies host tensors into one of two device slots on a background thread, one
    job ahead of the consumer; ``threads`` threads copy each job's bytes. On CUDA the
    copy goes through a pinned buffer and a copy stream; the compute stream waits for
    the copy, and a slot is refilled only after the compute that read it."""

    def __init__(self, device: torch.device, capacity: int, threads: int | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.capacity = capacity  # bytes per slot
        self.threads = threads or staging_threads()
        self.slots = [torch.empty(capacity, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self.pinned = ([torch.empty(capacity, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
                       if self.cuda else None)
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.copied: list = [None, None]  # CUDA events: a slot's copy has landed
        self.consumed: list = [None, None]  # CUDA events: the compute that read a slot is done
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="stager")
        self.copiers = (ThreadPoolExecutor(self.threads - 1, thread_name_prefix="stager-copy")
                        if self.threads > 1 else None)

    def _fill(self, slot: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        offsets, off = [], 0
        for t in tensors:
            offsets.append(off)
            off += slot_bytes(t.numel() * t.element_size())
        if off > self.capacity:
            raise MergeSearchError(f"staging slot of {self.capacity} bytes cannot hold {off} bytes")

        def place(buf, t, o):
            return buf[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        if not self.cuda:
            out = [place(self.slots[slot], t, o) for t, o in zip(tensors, offsets)]
            parallel_copy(out, tensors, self.copiers, self.threads)
            return out
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # the pinned buffer's last copy has left it
        pin = self.pinned[slot]
        parallel_copy([place(pin, t, o) for t, o in zip(tensors, offsets)], tensors, self.copiers, self.threads)
        with torch.cuda.stream(self.copy_stream):
            if self.consumed[slot] is not None:
                self.copy_stream.wait_event(self.consumed[slot])
            self.slots[slot][:off].copy_(pin[:off], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
            self.copied[slot] = ev
        return [place(self.slots[slot], t, o) for t, o in zip(tensors, offsets)]

    def run(self, jobs: list[tuple[str, list[torch.Tensor]]]) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """Yields (name, device copies) in order; the next job is copied meanwhile."""
        if not jobs:
            return
        pending = self.pool.submit(self._fill, 0, jobs[0][1])
        for k, (name, _) in enumerate(jobs):
            staged = pending.result()
            if k + 1 < len(jobs):
                nxt = (k + 1) % 2
                if self.cuda:  # everything enqueued so far read slot nxt at the latest
                    ev = torch.cuda.Event()
                    ev.record(torch.cuda.current_stream(self.device))
                    self.consumed[nxt] = ev
                pending = self.pool.submit(self._fill, nxt, jobs[k + 1][1])
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self.copied[k % 2])
            yield name, staged

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.copiers is not None:
            self.copiers.shutdown(wait=True)
