"""Evaluation: lm-eval defines the task, we compute. The configuration and protocol
(:mod:`.base`), the registry (:mod:`.registry`), the lm-eval engine (:mod:`.lmeval`,
:mod:`.fastlm`), JSONL tasks as inline lm-eval tasks (:mod:`.jsonl`), item splits
(:mod:`.items`) and user functions (:mod:`.python`)."""

from mergesearch.evaluate.base import EvalConfig, Evaluator, weighted_mean
from mergesearch.evaluate.registry import build_evaluator

__all__ = ["EvalConfig", "Evaluator", "build_evaluator", "weighted_mean"]
