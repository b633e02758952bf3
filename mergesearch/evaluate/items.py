"""Item-level dev/test splits: which documents of a task each split scores.

A task with one evaluation split (gsm8k, arc_challenge, mmlu, ...) is split by items: a
permutation of its document indices, seeded by ``split_seed`` and the task's name, is
cut into a dev set (the first ``dev`` indices) and a disjoint test set (the next
``test``). The sizes come from ``dev_items``/``test_items`` (counts) or
``dev_fraction``/``test_fraction``; by default half the documents are dev and the rest
test. A task that has its own dev and test documents (the zoo's files, or
``dev_from: validation``) keeps them, and counts only cap each split. ``limit`` caps the
scored items of either split. The same configuration always gives the same indices, in
any process, so every worker scores the same items and the export re-scores the others.
"""

from __future__ import annotations

import hashlib
import random

from mergesearch.errors import MergeSearchError

DEFAULT_DEV_FRACTION = 0.5


def permutation(n: int, seed: int, name: str) -> list[int]:
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    order = list(range(n))
    random.Random(int.from_bytes(digest[:8], "little")).shuffle(order)
    return order


def _count(n: int, items: int | None, fraction: float | None) -> int | None:
    if items is not None:
        return items
    if fraction is not None:
        return int(fraction * n)
    return None


def split_sizes(n: int, cfg, where: str) -> tuple[int, int]:
    """(dev, test) item counts for a task of ``n`` documents without its own splits."""
    dev = _count(n, cfg.dev_items, cfg.dev_fraction)
    test = _count(n, cfg.test_items, cfg.test_fraction)
    if dev is None and test is None:
        dev = int(DEFAULT_DEV_FRACTION * n)
    if dev is None:
        dev = n - test
    if test is None:
        test = n - dev
    if dev + test > n:
        raise MergeSearchError(f"{where}: dev_items + test_items = {dev} + {test} = {dev + test}, but the task has "
                               f"only {n} documents")
    if dev < 1 or test < 1:
        raise MergeSearchError(f"{where}: {n} documents are too few to split into dev and test items "
                               f"(dev {dev}, test {test})")
    return dev, test


def shares(sizes: dict[str, int], cfg, where: str) -> dict[str, tuple[int, int]]:
    """(dev, test) counts per subtask of a group: the group's counts, shared by size."""
    total = sum(sizes.values())
    dev, test = split_sizes(total, cfg, where)
    out = {}
    for name, n in sizes.items():
        d = min(n - 1, max(1, round(dev * n / total)))
        out[name] = (d, min(n - d, max(1, round(test * n / total))))
    return out


def choose(n: int, cfg, split: str, name: str, where: str, own_split: bool,
           sizes: tuple[int, int] | None = None) -> list[int]:
    """The sorted document indices this split scores (``sizes``: the (dev, test)
    counts, when a group shares its counts among its subtasks)."""
    if own_split:  # the documents are this split's already: counts cap them
        cap = cfg.dev_items if split == "dev" else cfg.test_items
        if cap is not None and cap > n:
            raise MergeSearchError(f"{where}: {split}_items {cap}, but the {split} split has only {n} documents")
        chosen = list(range(n))[:cap]
    else:
        order = permutation(n, cfg.split_seed, name)
        dev, test = sizes or split_sizes(n, cfg, where)
        chosen = order[:dev] if split == "dev" else order[dev:dev + test]
    if cfg.limit is not None:
        chosen = chosen[:cfg.limit]
    return sorted(chosen)


def record(indices: list[int], n: int, cfg, split: str, source: str) -> dict:
    """What ``scores.json`` keeps of one task's items: enough to check which were scored."""
    digest = hashlib.sha256(",".join(map(str, indices)).encode()).hexdigest()[:16]
    return {"split": split, "source": source, "count": len(indices), "of": n, "seed": cfg.split_seed,
            "sha256": digest}
