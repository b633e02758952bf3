"""lm-eval as the engine uses it: its task index (built once per process), Jinja templates
compiled once, its progress bars and logs kept out of a search's output, and the gold
choice or target of a document as lm-eval's own ``process_results`` reads it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mergesearch.errors import MergeSearchError
from mergesearch.evaluate.base import EvalConfig


def include_path(cfg: EvalConfig) -> str | None:
    if not cfg.task_dir:
        return None
    root = Path(cfg.task_dir)
    if not root.exists():
        raise MergeSearchError(f"{root}: task folder not found")
    return str(root / "tasks") if (root / "tasks").is_dir() else str(root)


def keep_compiled_templates() -> None:
    """lm-eval compiles a task's Jinja template (doc_to_text, doc_to_target, doc_to_choice)
    again at every call, and ``process_results`` asks for the target and the choices of
    every document of every candidate: most of a small candidate's scoring time. A compiled
    template renders the same text, so each is compiled once per process."""
    import functools

    from lm_eval import utils
    if getattr(utils.apply_template, "mergesearch", False):
        return
    compiled = functools.lru_cache(maxsize=4096)(utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compiled(template).render(**doc)
    apply_template.mergesearch = True
    utils.apply_template = apply_template


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


def task_manager(include: str | None, defaults: bool = True):
    """lm-eval's task index, built once per process: with ``defaults`` it scans every task
    YAML lm-eval ships (about 15,000, several seconds); without, only ``include``."""
    from lm_eval.tasks import TaskManager
    key = (include, defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=include, include_defaults=defaults)
    return _MANAGERS[key]


def task_name(t) -> str:
    return t.config.task if getattr(t, "config", None) is not None else str(t)


def groups_and_tasks(loaded: dict) -> tuple[dict, dict, dict]:
    """(groups, leaf tasks, group -> child names) of TaskManager.load's result."""
    return loaded.get("groups", {}), loaded.get("tasks", {}), loaded.get("group_map", {})


def gold_index(task, doc, choices: list) -> int:
    """The gold choice's index, as lm-eval's multiple-choice ``process_results`` reads it
    (the first of several golds)."""
    gold = task.doc_to_target(doc)
    if isinstance(gold, list):
        gold = gold[0] if gold else -1
    if isinstance(gold, str):  # as lm-eval: a string names a choice, or none
        gold = choices.index(gold) if gold in choices else -1
    return int(gold) if 0 <= int(gold) < len(choices) else -1


def target_text(task, doc) -> str:
    """A generation task's gold continuation: its target delimiter and its target (the
    first of several)."""
    target = task.doc_to_target(doc)
    if isinstance(target, list):
        target = target[0] if target else ""
    if target is None or target == "":
        return ""
    return f"{task.config.target_delimiter}{target}"


def slug(task: str) -> str:
    import re
    return re.sub(r"[^A-Za-z0-9]+", "_", Path(task).stem if task.endswith(".jsonl") else task).strip("_") or "task"
