"""Which evaluator a configuration names. The implementations import :mod:`.base`, never
this module, so the registry and its implementations import each other in no circle."""

from __future__ import annotations

from mergesearch.evaluate.base import EvalConfig


def build_evaluator(cfg: EvalConfig, device: str = "cpu"):
    """The configured evaluator (task files are read and checked here, once). The
    implementations are imported on first use: lm-eval takes seconds to import."""
    if cfg.evaluator in ("lmeval", "loglik"):
        from mergesearch.evaluate.lmeval import LmEvalEvaluator
        return LmEvalEvaluator(cfg, device=device)
    from mergesearch.evaluate.python import PythonEvaluator
    return PythonEvaluator(cfg)
