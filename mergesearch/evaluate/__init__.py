"""Evaluation: the Evaluator protocol, a fast log-likelihood scorer, lm-eval and user functions."""

from mergesearch.evaluate.base import EvalConfig, Evaluator, build_evaluator, weighted_mean

__all__ = ["EvalConfig", "Evaluator", "build_evaluator", "weighted_mean"]
