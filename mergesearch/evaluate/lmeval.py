"""LmEvalEvaluator: lm-eval tasks by name, including local task folders.

Task loading (the task index, datasets, prompts) happens once, in the
constructor. One ``HFLM`` wraps the worker's model and is reused across
candidates: the Materializer replaces the weights in place, and lm-eval reads
them through the same module.

Task names: any lm-eval task (standard ones work wherever their datasets are
present), or a zoo task name (``reverse``) which maps to the zoo's local task
``zoo_reverse_<split>`` under ``<task_dir>/tasks``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mergesearch.errors import MergeSearchError
from mergesearch.evaluate.base import EvalConfig, check_tokenizer_fits, weighted_mean

log = logging.getLogger(__name__)


def include_path(cfg: EvalConfig) -> str | None:
    if not cfg.task_dir:
        return None
    root = Path(cfg.task_dir)
    if not root.exists():
        raise MergeSearchError(f"{root}: task folder not found")
    return str(root / "tasks") if (root / "tasks").is_dir() else str(root)


class LmEvalEvaluator:
    def __init__(self, cfg: EvalConfig, device: str = "cpu"):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval draws a bar per request batch
        from lm_eval.tasks import TaskManager, get_task_dict

        for name in ("lm-eval", "lm_eval"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.cfg = cfg
        self.tasks = list(cfg.tasks)
        self.device = device
        manager = TaskManager(include_path=include_path(cfg), verbosity="ERROR")
        known = set(manager.all_tasks)
        self.names: dict[str, str] = {}
        for task in self.tasks:
            zoo_name = f"zoo_{task}_{cfg.split}"
            if zoo_name in known:
                self.names[task] = zoo_name
            elif task in known:
                self.names[task] = task
            else:
                raise MergeSearchError(f"unknown lm-eval task '{task}'"
                                       + (f" (not in lm-eval or {include_path(cfg)})" if cfg.task_dir else ""))
        try:
            self.task_dict = get_task_dict(list(self.names.values()), manager)
        except Exception as e:  # dataset files missing or unreadable
            raise MergeSearchError(f"lm-eval could not load tasks {list(self.names.values())}: {e}") from None
        for task in self.task_dict.values():
            if hasattr(task, "set_config"):
                task.set_config(key="num_fewshot", value=cfg.num_fewshot)
        self._lm = None
        self._wrapped = None

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

    def score(self, model, tokenizer) -> dict[str, float]:
        from lm_eval.evaluator import evaluate

        lm = self._lm_for(model, tokenizer)
        was_training = model.training
        model.eval()
        out = evaluate(lm, self.task_dict, limit=self.cfg.limit, bootstrap_iters=0, log_samples=False,
                       verbosity="ERROR")
        if was_training:
            model.train()
        results = out["results"]
        scores = {}
        for task, name in self.names.items():
            metrics = results[name]
            key = "acc,none" if "acc,none" in metrics else next(k for k in metrics if k.endswith(",none")
                                                                and isinstance(metrics[k], (int, float)))
            scores[task] = float(metrics[key])
        return scores
