"""Progress lines for long steps, and third-party libraries kept quiet.

``quiet_libraries()``
    Call once, first thing (the CLI's ``main``, ``scripts/demo.py`` and ``build_zoo``
    do). Afterwards no library draws progress bars of its own (transformers' "Writing
    model shards" and "Loading weights", huggingface_hub, datasets, tqdm in lm-eval),
    those libraries log only errors (transformers, datasets, huggingface_hub, lm-eval,
    matplotlib), Python warnings raised inside them are ignored, and Ray's notice about
    token authentication at ``ray.init`` is not printed. It sets environment variables
    (read when a library is first imported, and inherited by child processes) and
    adjusts the libraries already imported. The ``mergesearch.*`` loggers and errors
    are left alone. Calling it again does no harm.

``step(description, total=None, unit="steps", parent=None, every=30.0) -> Step``
    One progress line for one long step, as a context manager::

        from mergesearch.progress import step

        with step("zoo: fine-tuning ft_add", total=180) as s:
            for _ in range(180):
                ...
                s.advance()                     # or s.update(completed=k, total=n)

    On a terminal (``interactive()``: stderr is a TTY and ``CI`` is not true) the step
    is one live rich line: description, bar, ``done/total unit``, elapsed time and ETA,
    cleared when the step ends. Elsewhere it logs one line when it starts, one every
    ``every`` seconds with the ETA, and nothing in between. Either way its end is one
    logged line, ``<description>: done, <n> <unit> in <time>``. Lines go to the
    ``mergesearch.progress`` logger at INFO. A step left by an exception logs nothing
    more (the error says what happened).

    ``total=None`` means not known yet: no bar and no ETA until ``update(total=...)``.
    Steps nest: on a terminal each open step is one line of a single live display,
    and log lines written meanwhile appear above it. A step opened with ``parent=``
    counts in its parent: its advances, and changes to its total, apply to the parent
    too (a whole job's ETA over its parts). Do not open a step around code that draws
    a rich live display of its own (the search controller's trial line): a terminal
    shows one live display at a time.

``interactive()``
    Whether steps draw live lines.

Only the standard library and rich (imported when a live line is first drawn) are
used here, so any part of mergesearch may call these.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings
from types import TracebackType
from typing import Any, ClassVar

log = logging.getLogger("mergesearch.progress")

# libraries whose logging is cut to errors, and whose Python warnings are ignored
LIBRARY_LOGGERS = ("transformers", "datasets", "huggingface_hub", "lm-eval", "lm_eval", "accelerate",
                   "matplotlib", "filelock", "fsspec", "urllib3",
                   # ray.init's notice about token authentication; the mode itself is left as is
                   "ray._private.authentication.authentication_token_setup")
WARNING_MODULES = ("transformers", "huggingface_hub", "datasets", "lm_eval", "ray", "tqdm", "accelerate")
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",       # huggingface_hub, and transformers' bars through it
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TQDM_DISABLE": "1",                        # any other tqdm bar (read when tqdm is imported)
}


def interactive() -> bool:
    """Live lines on a terminal; plain log lines in files, pipes and CI."""
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("true", "1")


def quiet_libraries() -> None:
    """Keep third-party progress bars, log lines and warnings off the terminal."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)  # a user's explicit setting wins
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    pattern = "|".join(re.escape(m) for m in WARNING_MODULES)
    warnings.filterwarnings("ignore", module=rf"({pattern})(\.|$)")
    if "transformers" in sys.modules:  # already imported: it read the environment then
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    if "datasets" in sys.modules:
        import datasets
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


def duration(seconds: float) -> str:
    """``41s``, ``2m05s``, ``1h02m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class _Display:
    """The one live rich display that the steps open on a terminal share."""

    lock = threading.Lock()
    progress: Any = None
    users = 0
    swapped: ClassVar[list[tuple[logging.StreamHandler, Any]]] = []

    @classmethod
    def add(cls, step: Step) -> Any:
        with cls.lock:
            if cls.progress is None:
                cls.progress = _make_progress()
                before = sys.stderr
                cls.progress.start()
                # log lines go through rich's redirected stderr, so they print above the line
                if sys.stderr is not before:
                    for h in logging.getLogger().handlers:
                        if type(h) is logging.StreamHandler and h.stream is before:
                            cls.swapped.append((h, h.setStream(sys.stderr)))
            cls.users += 1
            return cls.progress.add_task(step.description, total=step.total, unit=step.unit)

    @classmethod
    def remove(cls, task: Any) -> None:
        with cls.lock:
            cls.progress.remove_task(task)
            cls.users -= 1
            if cls.users == 0:
                for h, stream in cls.swapped:
                    h.setStream(stream)
                cls.swapped.clear()
                cls.progress.stop()
                cls.progress = None


def _make_progress() -> Any:
    from rich.console import Console
    from rich.progress import (BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    class Count(ProgressColumn):
        def render(self, task: Any) -> Text:
            unit = task.fields.get("unit", "")
            done = int(task.completed)
            return Text(f"{done}/{int(task.total)} {unit}" if task.total is not None else f"{done} {unit}")

    return Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), Count(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                    refresh_per_second=4, redirect_stdout=True, redirect_stderr=True)


class Step:
    """One long step's progress line; see the module docstring. Make it with :func:`step`."""

    def __init__(self, description: str, total: int | None = None, unit: str = "steps",
                 parent: Step | None = None, every: float = 30.0, live: bool | None = None):
        self.description = description
        self.total = total
        self.unit = unit
        self.parent = parent
        self.every = every
        self.completed = 0
        self.live = interactive() if live is None else live
        self._task: Any = None
        self._t0 = self._last = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def eta(self) -> float | None:
        """Seconds left at the mean rate so far; None while it cannot be told."""
        if self.total is None or self.completed <= 0:
            return None
        return self.elapsed / self.completed * max(0, self.total - self.completed)

    def __enter__(self) -> Step:
        self._t0 = self._last = time.monotonic()
        if self.live:
            self._task = _Display.add(self)
        else:
            log.info("%s (%s)", self.description, f"{self.total} {self.unit}" if self.total is not None else "started")
        return self

    def advance(self, n: int = 1) -> None:
        self.update(completed=self.completed + n)

    def update(self, completed: int | None = None, total: int | None = None) -> None:
        """Set the count done so far and/or the total (a parent follows the changes)."""
        d_done = 0 if completed is None else completed - self.completed
        d_total = None
        if total is not None:
            d_total = total - self.total if self.total is not None else None
            self.total = total
        self.completed += d_done
        if self.parent is not None:
            if d_total is not None and self.parent.total is not None:
                self.parent.update(total=self.parent.total + d_total)
            if d_done:
                self.parent.update(completed=self.parent.completed + d_done)
        if self._task is not None:
            _Display.progress.update(self._task, completed=self.completed, total=self.total)
        elif not self.live and time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            eta = self.eta()
            log.info("%s: %s %s, %s elapsed%s", self.description,
                     f"{self.completed}/{self.total}" if self.total is not None else self.completed, self.unit,
                     duration(self.elapsed), f", about {duration(eta)} left" if eta is not None else "")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._task is not None:
            _Display.remove(self._task)
            self._task = None
        if kind is None:
            log.info("%s: done, %d %s in %s", self.description, self.completed, self.unit, duration(self.elapsed))


def step(description: str, total: int | None = None, unit: str = "steps", parent: Step | None = None,
         every: float = 30.0) -> Step:
    """A progress line for one long step (a context manager); see the module docstring."""
    return Step(description, total, unit, parent, every)
