"""Monitor tasks: what a merge forgets outside its objective. Their configuration, the
evaluator settings they are scored with, and what every candidate is scored on."""

from __future__ import annotations

from typing import Union

from pydantic import Field

from mergesearch.config import StrictModel
from mergesearch.evaluate.base import EvalConfig


class MonitorConfig(StrictModel):
    """Tasks that show what a merge forgets outside its objective: scored on the winner and
    the sources at export (on test items), shown in the model card, the export's table and
    the report, never optimized. A floor on one of them marks a candidate below it
    infeasible; such a task is then scored on every candidate's dev items too (it appears
    in the leaderboard), still outside the objective and outside refinement."""

    tasks: list[Union[str, dict]] = Field(min_length=1)  # names, or {dev, test, name} pairs
    metrics: dict[str, str] = {}  # task -> "metric,filter", as for the evaluator
    floors: dict[str, float] = {}  # task -> the least score a feasible candidate keeps


def monitor_config(evaluator: EvalConfig, monitor: MonitorConfig, split: str | None = None) -> EvalConfig:
    """The evaluator settings (task folder, item splits, few-shot, ...) for the monitor tasks."""
    data = evaluator.model_dump(exclude={"tasks", "pairs", "metrics", "weights", "monitor"})
    return EvalConfig.model_validate({**data, "tasks": monitor.tasks, "metrics": monitor.metrics,
                                      **({"split": split} if split else {})})


def scoring_config(evaluator: EvalConfig, monitor: MonitorConfig | None) -> EvalConfig:
    """What every candidate is scored on: the objective's tasks and the monitor tasks that
    carry a floor (marked ``monitor``: outside the aggregate and refinement)."""
    if monitor is None or not monitor.floors:
        return evaluator
    mon = monitor_config(evaluator, monitor)
    floored = [t for t in mon.tasks if t in monitor.floors]
    return evaluator.model_copy(update={
        "tasks": list(evaluator.tasks) + floored,
        "pairs": {**evaluator.pairs, **{t: p for t, p in mon.pairs.items() if t in floored}},
        "metrics": {**evaluator.metrics, **{t: m for t, m in mon.metrics.items() if t in floored}},
        "monitor": floored})
