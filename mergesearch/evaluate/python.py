"""PythonEvaluator: score with a user function.

SECURITY: this imports and runs user code. ``function: "module:function"`` names
any importable callable, which is called as ``fn(model, tokenizer, tasks=...,
split=..., limit=..., **options)`` and must return ``{task: float}``. Only use
evaluation configs you trust.
"""

from __future__ import annotations

import importlib
import logging
import math

from mergesearch.errors import MergeSearchError
from mergesearch.evaluate.base import EvalConfig, weighted_mean

log = logging.getLogger("mergesearch.evaluate")


class PythonEvaluator:
    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.tasks = list(cfg.tasks)
        spec = cfg.function or ""
        log.warning("python evaluator: importing and running user code '%s' (use only evaluators you trust)", spec)
        module, _, attr = spec.partition(":")
        if not module or not attr:
            raise MergeSearchError(f"function '{spec}': expected 'module:function'")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise MergeSearchError(f"function '{spec}': cannot import module '{module}' ({e})") from None
        self.fn = getattr(mod, attr, None)
        if not callable(self.fn):
            raise MergeSearchError(f"function '{spec}': '{attr}' is not a callable in module '{module}'")

    def aggregate(self, scores: dict[str, float]) -> float:
        return weighted_mean(scores, self.cfg.weights, self.cfg.monitor)

    def score(self, model, tokenizer) -> dict[str, float]:
        out = self.fn(model, tokenizer, tasks=self.tasks, split=self.cfg.split, limit=self.cfg.limit,
                      **self.cfg.options)
        if not isinstance(out, dict):
            raise MergeSearchError(f"function '{self.cfg.function}' returned {type(out).__name__}, not a dict")
        missing = [t for t in self.tasks if t not in out]
        if missing:
            raise MergeSearchError(f"function '{self.cfg.function}' returned no score for {', '.join(missing)}")
        scores = {t: float(out[t]) for t in self.tasks}
        bad = [t for t, v in scores.items() if not math.isfinite(v)]
        if bad:
            raise MergeSearchError(f"function '{self.cfg.function}' returned a non-finite score for {', '.join(bad)}")
        return scores
