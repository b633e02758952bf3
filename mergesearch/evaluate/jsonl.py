"""The project's JSONL task format, read as a local lm-eval task.

Each JSONL line is one item:
- multiple choice: ``{"context": str, "choices": [str, ...], "answer": int}``, scored as
  lm-eval's ``multiple_choice`` (``acc``, ``acc_norm``);
- target: ``{"context": str, "target": str}``, scored as lm-eval's ``loglikelihood``
  (``acc``: the target is the greedy continuation; ``perplexity``).

The file is checked here (one line per problem, naming the file and line), then turned
into an inline lm-eval task config (:func:`lmeval_spec`); lm-eval builds its requests and
computes its metrics like any other task's, so this format has no scoring code of its own.
``encode_pair`` is lm-eval's context/continuation split, for the curvature estimators'
training pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

from mergesearch.errors import MergeSearchError
from mergesearch.evaluate.base import EvalConfig


def task_file(cfg: EvalConfig, task: str, split: str) -> Path:
    """Where a task's split lives: a .jsonl path, or under task_dir in the zoo layout
    (``data/<task>/<split>.jsonl``), ``<task>/<split>.jsonl`` or ``<task>_<split>.jsonl``."""
    if task.endswith(".jsonl"):
        p = Path(task)
        if not p.exists():
            raise MergeSearchError(f"{p}: task file not found")
        return p
    root = Path(cfg.task_dir or ".")
    candidates = [root / "data" / task / f"{split}.jsonl", root / task / f"{split}.jsonl",
                  root / f"{task}_{split}.jsonl"]
    for c in candidates:
        if c.exists():
            return c
    raise MergeSearchError(f"{candidates[0]}: task file not found (task '{task}', split '{split}')")


def read_items(path: Path, limit: int | None = None) -> list[dict]:
    items = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                raise MergeSearchError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            where = f"{path}:{lineno}"
            if not isinstance(item, dict) or not isinstance(item.get("context"), str):
                raise MergeSearchError(f"{where}: item needs a string 'context'")
            if "target" in item and "choices" not in item:
                if not isinstance(item["target"], str) or not item["target"]:
                    raise MergeSearchError(f"{where}: 'target' must be a non-empty string")
            else:
                choices = item.get("choices")
                if not isinstance(choices, list) or not choices:
                    raise MergeSearchError(f"{where}: item has no answer choices")
                if not all(isinstance(c, str) and c for c in choices):
                    raise MergeSearchError(f"{where}: answer choices must be non-empty strings")
                ans = item.get("answer")
                if not isinstance(ans, int) or isinstance(ans, bool) or not 0 <= ans < len(choices):
                    raise MergeSearchError(f"{where}: 'answer' must be an index into the {len(choices)} choices")
            items.append(item)
            if limit and len(items) >= limit:
                break
    if not items:
        raise MergeSearchError(f"{path}: no items")
    return items


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split as lm-eval splits them."""
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped):] + continuation
        context = stripped
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def lmeval_spec(path: Path, name: str) -> dict:
    """An inline lm-eval task config reading ``path`` (checked first) as task ``name``."""
    items = read_items(path)
    mc = ["choices" in it for it in items]
    if any(mc) and not all(mc):
        first = mc.index(not mc[0]) + 1
        raise MergeSearchError(f"{path}: mixes multiple-choice and target items (item {first} differs from item 1)")
    common = {"task": name, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"eval": str(Path(path).resolve())}}, "test_split": "eval",
              "doc_to_text": "{{context}}", "target_delimiter": "", "metadata": {"version": 1}}
    if all(mc):
        return {**common, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    return {**common, "output_type": "loglikelihood", "doc_to_target": "{{target}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}]}
