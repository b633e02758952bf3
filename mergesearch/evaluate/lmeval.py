"""LmEvalEvaluator: lm-eval tasks by name, including local task folders.

Task loading (the task index, datasets, prompts) happens once, in the constructor.
One ``HFLM`` wraps the worker's model and is reused across candidates: the
Materializer replaces the weights in place, and lm-eval reads them through the same
module.

Task names: any lm-eval task or group (standard ones work wherever their datasets are
present offline), or a zoo task name (``reverse``), which maps to the zoo's local task
``zoo_reverse_<split>`` under ``<task_dir>/tasks``.

**Items.** A standard task has one evaluation split, so dev and test are item sets of
it (:mod:`mergesearch.evaluate.items`): a seeded permutation of its documents, cut into
disjoint dev and test sets; ``split`` picks which one is scored, through lm-eval's
``samples``. A group's item counts are shared among its subtasks by size. Zoo tasks
keep their own dev and test files, and counts apply on top. ``dev_from: validation``
scores dev on a task's validation split and test on its test split.

**Metrics.** Per task ``metrics: {task: "metric,filter"}``; by default the task's first
metric with its first filter. A metric whose ``higher_is_better`` is false (perplexity,
bits per byte) is negated, so every score is maximized; ``directions`` says which.

**Generation.** ``generate_until`` tasks decode greedily (``do_sample: false``), up to
``max_gen_toks``; few-shot examples come from a sampler reseeded before every
candidate, so all candidates see the same prompts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mergesearch.errors import MergeSearchError
from mergesearch.evaluate import items as item_split
from mergesearch.evaluate.base import EvalConfig, check_tokenizer_fits, weighted_mean

log = logging.getLogger(__name__)


def include_path(cfg: EvalConfig) -> str | None:
    if not cfg.task_dir:
        return None
    root = Path(cfg.task_dir)
    if not root.exists():
        raise MergeSearchError(f"{root}: task folder not found")
    return str(root / "tasks") if (root / "tasks").is_dir() else str(root)


def quiet_lm_eval() -> None:
    """lm-eval and datasets draw progress bars and log per batch: keep them out of a search log."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
    import importlib

    from tqdm import tqdm

    def silent(*args, **kwargs):
        kwargs["disable"] = True
        return tqdm(*args, **kwargs)
    for mod in ("lm_eval.models.huggingface", "lm_eval.api.model", "lm_eval.evaluator", "lm_eval.api.task"):
        try:  # lm-eval passes its own `disable=` to each bar, so the environment alone does not do it
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if getattr(m, "tqdm", None) is tqdm:
            m.tqdm = silent


_MANAGERS: dict = {}


def task_manager(include: str | None):
    """lm-eval's task index (built once per process: it scans every task YAML)."""
    from lm_eval.tasks import TaskManager
    if include not in _MANAGERS:
        _MANAGERS[include] = TaskManager(include_path=include)
    return _MANAGERS[include]


def _leaves(obj) -> list:
    """The Task objects under one entry of lm-eval's task dict (a task, or a group)."""
    from lm_eval.api.task import Task
    if isinstance(obj, Task):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _leaves(v)]
    if hasattr(obj, "get_all_tasks"):
        return list(obj.get_all_tasks(recursive=True))
    return []


def _task_name(t) -> str:
    return t.config.task if getattr(t, "config", None) is not None else str(t)


class LmEvalEvaluator:
    def __init__(self, cfg: EvalConfig, device: str = "cpu"):
        quiet_lm_eval()
        from lm_eval.tasks import get_task_dict

        self.cfg = cfg
        self.tasks = list(cfg.tasks)
        self.device = device
        manager = task_manager(include_path(cfg))
        known = set(manager.all_tasks)
        self.names: dict[str, str] = {}
        own: set[str] = set()  # tasks whose documents are this split's already (zoo files)
        for task in self.tasks:
            zoo_name = f"zoo_{task}_{cfg.split}"
            if zoo_name in known:
                self.names[task] = zoo_name
                own.add(task)
            elif task in known:
                self.names[task] = task
            else:
                raise MergeSearchError(f"unknown lm-eval task '{task}'"
                                       + (f" (not in lm-eval or {include_path(cfg)})" if cfg.task_dir else ""))
        try:
            self.task_dict = get_task_dict(list(self.names.values()), manager)
        except Exception as e:  # dataset files missing or unreadable
            raise MergeSearchError(f"lm-eval could not load tasks {list(self.names.values())}: {e}") from None
        entries = {(key if isinstance(key, str) else getattr(key, "group_name", str(key))): value
                   for key, value in self.task_dict.items()}
        self.leaves = {task: _leaves(entries[name]) for task, name in self.names.items()}
        self.samples: dict[str, list[int]] = {}
        self.item_record: dict[str, dict] = {}
        self.metric: dict[str, tuple[str, str, bool]] = {}
        for task, name in self.names.items():
            leaves = self.leaves[task]
            if not leaves:
                raise MergeSearchError(f"lm-eval task '{task}' has no subtasks to score")
            self._configure(leaves, own_split=task in own)
            self._choose_items(task, leaves, own_split=task in own)
            self.metric[task] = self._metric(task, leaves)
        self._lm = None
        self._wrapped = None

    # -- set-up --------------------------------------------------------------------------
    def _configure(self, leaves: list, own_split: bool) -> None:
        cfg = self.cfg
        for t in leaves:
            if hasattr(t, "set_config"):
                t.set_config(key="num_fewshot", value=cfg.num_fewshot)
                if t.OUTPUT_TYPE == "generate_until":
                    gen = {"do_sample": False, "temperature": 0.0}
                    if cfg.max_gen_toks is not None:
                        gen["max_gen_toks"] = cfg.max_gen_toks
                    t.set_config(key="generation_kwargs", value=gen, update=True)
            if cfg.dev_from == "validation" and not own_split:
                if not t.has_validation_docs():
                    raise MergeSearchError(f"evaluator: dev_from: validation, but lm-eval task '{_task_name(t)}' "
                                           "has no validation split")
                if not t.has_test_docs():
                    raise MergeSearchError(f"evaluator: dev_from: validation, but lm-eval task '{_task_name(t)}' "
                                           "has no test split to keep for test")
                if cfg.split == "dev":  # score the validation documents
                    t.config.test_split = None

    def _choose_items(self, task: str, leaves: list, own_split: bool) -> None:
        cfg = self.cfg
        own = own_split or cfg.dev_from == "validation"  # documents that belong to this split only
        sizes = {_task_name(t): len(t.eval_docs) for t in leaves}
        shares = None
        if len(leaves) > 1 and not own:
            shares = item_split.shares(sizes, cfg, f"evaluator: task '{task}'")
        records = {}
        for t in leaves:
            leaf = _task_name(t)
            n = sizes[leaf]
            where = f"evaluator: task '{leaf}'"
            chosen = item_split.choose(n, cfg, cfg.split, leaf, where, own, shares[leaf] if shares else None)
            self.samples[leaf] = chosen
            source = ("its own split file" if own_split else "its validation split" if own and cfg.split == "dev"
                      else "its test split" if own else "an item split of its documents")
            records[leaf] = item_split.record(chosen, n, cfg, cfg.split, source)
        if len(records) == 1:
            self.item_record[task] = next(iter(records.values()))
        else:
            self.item_record[task] = {"split": cfg.split, "count": sum(r["count"] for r in records.values()),
                                "of": sum(r["of"] for r in records.values()), "subtasks": records}

    def _metric(self, task: str, leaves: list) -> tuple[str, str, bool]:
        t = leaves[0]
        hib = t.higher_is_better()
        metric_names = list(hib) or [m["metric"] for m in (t.config.metric_list or [])]
        filters = [f.name for f in getattr(t, "_filters", [])] or ["none"]
        asked = self.cfg.metrics.get(task)
        if asked:
            metric, _, filt = asked.partition(",")
            filt = filt or filters[0]
        else:
            metric, filt = metric_names[0], filters[0]
        if metric not in metric_names:
            raise MergeSearchError(f"evaluator: metrics.{task}: task '{task}' has no metric '{metric}' "
                                   f"(it has: {', '.join(metric_names)})")
        if filt not in filters:
            raise MergeSearchError(f"evaluator: metrics.{task}: task '{task}' has no filter '{filt}' "
                                   f"(it has: {', '.join(filters)})")
        return metric, filt, bool(hib.get(metric, True))

    # -- scoring ---------------------------------------------------------------------------
    @property
    def directions(self) -> dict[str, dict]:
        """Per task: the metric and filter scored, and how the score relates to it."""
        return {task: {"metric": m, "filter": f, "higher_is_better": h,
                       "score": "the metric" if h else "minus the metric (lower is better)"}
                for task, (m, f, h) in self.metric.items()}

    def aggregate(self, scores: dict[str, float]) -> float:
        return weighted_mean(scores, self.cfg.weights)

    def _lm_for(self, model, tokenizer):
        if self._wrapped is not model:
            from lm_eval.models.huggingface import HFLM
            check_tokenizer_fits(model, tokenizer, "evaluator")
            device = str(next(model.parameters()).device)
            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.cfg.batch_size, device=device)
            self._wrapped = model
        return self._lm

    def run(self, model, tokenizer) -> dict:
        """lm-eval's results for this split's items."""
        from lm_eval.evaluator import evaluate

        lm = self._lm_for(model, tokenizer)
        for leaves in self.leaves.values():
            for t in leaves:
                if hasattr(t, "set_fewshot_seed"):
                    t.set_fewshot_seed(seed=self.cfg.fewshot_seed)
        was_training = model.training
        model.eval()
        try:
            out = evaluate(lm, self.task_dict, samples=self.samples, bootstrap_iters=0, log_samples=False,
                           verbosity="ERROR", apply_chat_template=self.cfg.apply_chat_template,
                           system_instruction=self.cfg.system_instruction)
        finally:
            if was_training:
                model.train()
        return out

    def score(self, model, tokenizer) -> dict[str, float]:
        results = self.run(model, tokenizer)["results"]
        scores = {}
        for task, name in self.names.items():
            metric, filt, higher = self.metric[task]
            key = f"{metric},{filt}"
            value = (results.get(name) or {}).get(key)
            if not isinstance(value, (int, float)):  # a group without its own aggregate: by size
                parts = [(results[_task_name(t)][key], len(self.samples[_task_name(t)])) for t in self.leaves[task]]
                value = sum(v * n for v, n in parts) / max(1, sum(n for _, n in parts))
            scores[task] = float(value) if higher else -float(value)
        return scores
