"""The Evaluator protocol and its YAML configuration.

An evaluator scores a model (an ``nn.Module`` whose weights may be replaced in
place between calls) with its tokenizer: ``score(model, tokenizer)`` returns
``{task: value}``; ``aggregate(scores)`` is the weighted mean over tasks.

``evaluator: lmeval`` (the default) and ``evaluator: loglik`` are the same engine
(:mod:`mergesearch.evaluate.lmeval`); ``loglik`` only says that task names are the
project's JSONL files first. ``python`` runs a user function.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergesearch.errors import MergeSearchError


@runtime_checkable
class Evaluator(Protocol):
    tasks: list[str]

    def score(self, model, tokenizer) -> dict[str, float]: ...

    def aggregate(self, scores: dict[str, float]) -> float: ...


class EvalConfig(BaseModel):
    """What to score: the evaluator kind, tasks, split and options."""

    model_config = ConfigDict(extra="forbid")

    evaluator: Literal["loglik", "lmeval", "python"] = "lmeval"
    tasks: list[str] = Field(min_length=1)
    # task -> {"dev": lm-eval task, "test": lm-eval task}: written as a task entry
    # {dev: my_task_dev, test: my_task_test, name: my_task} (name: by default the dev task's, less "_dev")
    pairs: dict[str, dict[str, str]] = {}
    # tasks scored and shown but never optimized (a search space's monitor tasks with floors):
    # left out of the aggregate and of refinement's training data
    monitor: list[str] = []
    task_dir: Optional[str] = None  # zoo root, JSONL folder, or lm-eval include path
    split: Literal["dev", "test"] = "dev"
    limit: Optional[int] = Field(default=None, ge=1)
    num_fewshot: int = Field(default=0, ge=0)
    batch_size: int = Field(default=64, ge=1)
    weights: dict[str, float] = {}
    function: Optional[str] = None  # python evaluator: "module:function"
    options: dict = {}  # passed to the python evaluator's function
    trust_remote_code: bool = False  # load models that ship their own Python code (auto_map)
    # item-level dev/test splits of tasks with one evaluation split (mergesearch.evaluate.items)
    dev_items: Optional[int] = Field(default=None, ge=1)
    test_items: Optional[int] = Field(default=None, ge=1)
    dev_fraction: Optional[float] = Field(default=None, gt=0, lt=1)
    test_fraction: Optional[float] = Field(default=None, gt=0, lt=1)
    split_seed: int = 0
    dev_from: Optional[Literal["validation"]] = None  # dev on the task's validation split, test on its test split
    metrics: dict[str, str] = {}  # task -> "metric" or "metric,filter" (lm-eval); default: the task's first
    max_gen_toks: Optional[int] = Field(default=None, ge=1)  # generation tasks: greedy decoding up to this
    fewshot_seed: int = 1234  # every candidate sees the same few-shot examples
    apply_chat_template: bool = False
    system_instruction: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _task_pairs(cls, data):
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
            return data
        tasks, pairs = [], dict(data.get("pairs") or {})
        for k, entry in enumerate(data["tasks"]):
            if isinstance(entry, dict):
                extra = sorted(set(entry) - {"dev", "test", "name"})
                if extra or not isinstance(entry.get("dev"), str) or not isinstance(entry.get("test"), str):
                    raise ValueError(f"tasks[{k}]: a task pair is {{dev: TASK, test: TASK, name: NAME}}"
                                     + (f" (unknown key {extra[0]})" if extra else ""))
                if entry["dev"] == entry["test"]:
                    raise ValueError(f"tasks[{k}]: dev and test are the same task '{entry['dev']}'")
                name = entry.get("name") or entry["dev"]
                if not entry.get("name"):
                    for suffix in ("_dev", "-dev", ".dev"):
                        if name.endswith(suffix) and len(name) > len(suffix):
                            name = name[:-len(suffix)]
                            break
                pairs[name] = {"dev": entry["dev"], "test": entry["test"]}
                tasks.append(name)
            else:
                tasks.append(entry)
        if len(set(tasks)) < len(tasks):
            dup = next(t for t in tasks if tasks.count(t) > 1)
            raise ValueError(f"task '{dup}' is listed twice")
        return {**data, "tasks": tasks, "pairs": pairs}

    @field_validator("weights")
    @classmethod
    def _positive(cls, v):
        for k, w in v.items():
            if w < 0:
                raise ValueError(f"weight of task '{k}' must be >= 0")
        return v

    def check(self, where: str) -> "EvalConfig":
        unknown = sorted(set(self.weights) - set(self.tasks))
        if unknown:
            raise MergeSearchError(f"{where}: weights name tasks not in 'tasks': {', '.join(unknown)}")
        unknown = sorted(set(self.monitor) - set(self.tasks))
        if unknown:
            raise MergeSearchError(f"{where}: monitor names tasks not in 'tasks': {', '.join(unknown)}")
        unknown = sorted(set(self.metrics) - set(self.tasks))
        if unknown:
            raise MergeSearchError(f"{where}: metrics name tasks not in 'tasks': {', '.join(unknown)}")
        for a, b in (("dev_items", "dev_fraction"), ("test_items", "test_fraction")):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise MergeSearchError(f"{where}: give {a} or {b}, not both")
        if (self.dev_fraction or 0) + (self.test_fraction or 0) > 1:
            raise MergeSearchError(f"{where}: dev_fraction + test_fraction exceed 1")
        if self.metrics and self.evaluator == "python":
            raise MergeSearchError(f"{where}: metrics: the python evaluator has no metrics to choose from")
        if self.pairs and self.evaluator == "python":
            raise MergeSearchError(f"{where}: tasks: dev/test task pairs are lm-eval tasks, not the python evaluator's")
        if self.evaluator == "python" and not self.function:
            raise MergeSearchError(f"{where}: the python evaluator needs 'function: module:function'")
        return self

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvalConfig":
        from mergesearch.config import load_validated
        path = Path(path)
        cfg = load_validated(cls, path)
        if cfg.task_dir and not os.path.isabs(cfg.task_dir):
            cfg = cfg.model_copy(update={"task_dir": str((path.parent / cfg.task_dir).resolve())})
        return cfg.check(str(path))


def weighted_mean(scores: dict[str, float], weights: dict[str, float], skip=()) -> float:
    """The weighted mean of ``scores`` (weight 1 unless given), leaving out the tasks in ``skip``."""
    scores = {t: v for t, v in scores.items() if t not in skip}
    total = sum(weights.get(t, 1.0) for t in scores)
    if total == 0:
        return float("nan")
    return sum(v * weights.get(t, 1.0) for t, v in scores.items()) / total


def check_tokenizer_fits(model, tokenizer, where: str) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding table."""
    emb = model.get_input_embeddings().weight.shape[0]
    n = len(tokenizer)
    if n > emb:
        raise MergeSearchError(f"{where}: tokenizer has {n} tokens but the model's embedding has {emb} rows")
