"""Compatibility checks, run before any merge work: the same architecture, the same
tokenizer, and models that are fine-tunes of the base (relative distance)."""

from __future__ import annotations

import math
from typing import Iterable

from mergesearch.methods import native
from mergesearch.engine.checkpoint import Checkpoint, all_finite
from mergesearch.errors import MergeSearchError

# Relative distance ||theta_i - theta_base|| / ||theta_base|| above which a model is
# not considered a fine-tune of the base. LLM fine-tunes land around 0.001-0.05;
# the bundled zoo's tiny models, fine-tuned hard at high learning rates, reach
# 0.26-0.68. Two independently initialised networks of the same shape sit near
# sqrt(2) = 1.41 (1.2-1.4 measured here), so 1.0 separates the two.
MAX_FINETUNE_DISTANCE = 1.0
# The distance and finiteness pre-checks read at most this many elements per model.
CHECK_SAMPLE_ELEMENTS = 64_000_000


def _arch(ckpt: Checkpoint) -> tuple:
    return (tuple(ckpt.config.get("architectures") or ()), ckpt.config.get("model_type"))


def _arch_name(arch: tuple) -> str:
    return ",".join(arch[0]) if arch[0] else str(arch[1])


def check_compatible(
    base: Checkpoint | None,
    models: list[Checkpoint],
    *,
    allow_unrelated: bool = False,
    max_distance: float = MAX_FINETUNE_DISTANCE,
) -> dict[str, float]:
    """Refuse inputs that cannot be merged, before any merge work.

    Returns the relative distance of each model to the base (empty without a base).
    Each refusal is a one-line :class:`MergeSearchError` naming the offending folder.
    """
    ref = base if base is not None else models[0]
    others = [m for m in models if m is not ref and m.path.resolve() != ref.path.resolve()]
    ref_arch = _arch(ref)
    ref_names = set(ref.names())
    ref_vocab = ref.tokenizer_vocab()
    for m in others:
        arch = _arch(m)
        if ref.config and m.config and arch != ref_arch:
            raise MergeSearchError(
                f"{m.path}: architecture {_arch_name(arch)} differs from {ref.path} ({_arch_name(ref_arch)})"
            )
        names = set(m.names())
        if names != ref_names:
            missing = sorted(ref_names - names)[:3]
            extra = sorted(names - ref_names)[:3]
            raise MergeSearchError(
                f"{m.path}: tensor names differ from {ref.path} (missing {missing}, unexpected {extra})"
            )
        for name in ref.names():
            if m.shape(name) != ref.shape(name):
                raise MergeSearchError(
                    f"{m.path}: shape mismatch for '{name}': {list(m.shape(name))} vs {list(ref.shape(name))} in {ref.path}"
                )
        v1, v2 = ref.config.get("vocab_size"), m.config.get("vocab_size")
        if v1 is not None and v2 is not None and v1 != v2:
            raise MergeSearchError(f"{m.path}: vocab size {v2} differs from {ref.path} ({v1})")
        vocab = m.tokenizer_vocab()
        if ref_vocab is not None and vocab is not None and vocab != ref_vocab:
            diff = len(set(vocab.items()) ^ set(ref_vocab.items()))
            raise MergeSearchError(f"{m.path}: tokenizer vocabulary differs from {ref.path} ({diff} entries differ)")
    sample = sample_names(ref)
    for m in [ref, *others]:
        for name in sample:
            t = m.get(name)
            if t.is_floating_point() and not all_finite(t):
                raise MergeSearchError(f"{m.path}: tensor '{name}' contains NaN or Inf")
    distances: dict[str, float] = {}
    if base is not None:
        for m in others:
            d = relative_distance(base, m, sample)
            distances[str(m.path)] = d
            if d > max_distance and not allow_unrelated:
                raise MergeSearchError(
                    f"{m.path}: not a fine-tune of {base.path} (relative distance {d:.3f} > {max_distance}; "
                    f"pass --allow-unrelated to merge anyway)"
                )
        for m in models:
            m.release()
        base.release()
    return distances


def sample_names(ckpt: Checkpoint) -> list[str]:
    """Floating tensors to check: all of them when small, else an even spread."""
    names = [n for n in ckpt.names() if ckpt.dtype(n).is_floating_point]
    total = sum(ckpt.numel(n) for n in names)
    if total <= CHECK_SAMPLE_ELEMENTS:
        return names
    by_size = sorted(names, key=ckpt.numel)
    picked, count = [], 0
    stride = max(1, len(by_size) // 16)
    for n in by_size[::stride]:
        if count + ckpt.numel(n) > CHECK_SAMPLE_ELEMENTS:
            break
        picked.append(n)
        count += ckpt.numel(n)
    return picked or by_size[:1]


def relative_distance(base: Checkpoint, model: Checkpoint, names: Iterable[str]) -> float:
    num = den = 0.0
    for name in names:
        fast = native.squared_distance(model.get(name), base.get(name))
        if fast is not None:
            num, den = num + fast[0], den + fast[1]
            continue
        b = base.get(name).float()
        num += float((model.get(name).float() - b).square().sum())
        den += float(b.square().sum())
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
