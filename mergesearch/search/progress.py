"""What a running search shows: one progress line (trials, budget spent, failures,
pruned trials, the best so far, elapsed time and an ETA) and the HTML report,
refreshed on a thread every few minutes or trials so an overnight run can be watched.

The counts are kept in memory (:class:`Tally`): one scan of the stored records when a
loop starts, then each finished trial adds itself.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mergesearch.runs.records import TrialRecord

log = logging.getLogger("mergesearch.search")


@dataclass
class Tally:
    complete: int = 0
    failed: int = 0
    pruned: int = 0
    items: int = 0
    spent: float = 0.0  # trial-equivalents: a pruned trial costs the share of the dev items it scored
    best: tuple | None = None  # ((feasible, aggregate), trial number, summary)

    @classmethod
    def of(cls, records: list[TrialRecord]) -> "Tally":
        t = cls()
        for r in records:
            t.add(r.state, r.items, r.cost, r.rank, r.number, r.summary, r.counts_toward_budget)
        return t

    def add(self, state: str, items: int | None, cost: float | None, rank: tuple | None, number: int,
            summary: str | None = None, counted: bool = True) -> None:
        key = {"COMPLETE": "complete", "FAIL": "failed", "PRUNED": "pruned"}.get(state)
        if key is None:
            return
        setattr(self, key, getattr(self, key) + 1)
        self.items += items or 0
        if counted:
            self.spent += (cost if cost is not None else 1.0) if state == "PRUNED" else 1.0
        if state == "COMPLETE" and rank is not None and (self.best is None or rank > self.best[0]):
            self.best = (rank, number, summary or "")

    @property
    def finished(self) -> int:
        return self.complete + self.failed + self.pruned


class RunProgress:
    """The progress line and the report refresh of one search run."""

    def __init__(self, run: str, storage_url: str | None, root: Path, live: bool, report_every_s: float,
                 report_every_trials: int):
        self.run, self.storage_url, self.root = run, storage_url, root
        self.live = live
        self.report_every_s, self.report_every_trials = report_every_s, report_every_trials
        self.tally = Tally()
        self.t_start = time.monotonic()
        self._live = None
        self._last_html: tuple[float, int] | None = None
        self._html_thread: threading.Thread | None = None

    def line(self, n_trials: float, items_per_trial: int | None = None, final: bool = False) -> None:
        """The live line on a terminal, a log line otherwise (and at the end)."""
        T = self.tally
        elapsed = time.monotonic() - self.t_start
        eta = (elapsed / T.spent * (n_trials - T.spent)) if T.spent and not final else 0.0
        fid = ""
        if items_per_trial:
            fid = f"  {T.pruned} pruned  {T.items} items ({T.items / items_per_trial:.1f} trial-equivalents)"
        best_txt = f"best {T.best[0][1]:.4f} (trial {T.best[1]}: {T.best[2][:80]})" if T.best else "best -"
        if self.live and not final:
            if self._live is None:
                from rich.console import Console
                from rich.live import Live
                self._live = Live(console=Console(stderr=True), refresh_per_second=4, transient=True)
                self._live.start()
            from rich.text import Text
            self._live.update(Text(f"{T.finished} trials ({T.spent:.1f}/{n_trials:g})  {T.failed} failed{fid}  "
                                   f"{best_txt}  elapsed {elapsed:.0f}s  eta {eta:.0f}s"))
            return
        self.stop()
        log.info("%s %d trials (%.1f/%g), %d failed%s, %s, elapsed %.0fs%s", "done:" if final else "search:",
                 T.finished, T.spent, n_trials, T.failed, fid.replace("  ", ", "), best_txt, elapsed,
                 "" if final else f", eta {eta:.0f}s")

    def refresh_report(self, force: bool = False) -> None:
        """Rewrite results/<run>/report.html every ``report_every_s`` seconds or
        ``report_every_trials`` finished trials; ``force``: now, and wait for it."""
        from mergesearch.runs.report import refresh

        now = time.monotonic()
        n = self.tally.complete + self.tally.pruned
        last = self._last_html
        if not force and last is not None and now - last[0] < self.report_every_s \
                and n - last[1] < self.report_every_trials:
            return
        if last is None and not force:
            self._last_html = (now, n)
            return
        args = (self.run, self.storage_url, self.root)
        running = self._html_thread
        if force:
            if running is not None:
                running.join()
            refresh(*args)
        elif running is None or not running.is_alive():
            # on a thread: building the report takes seconds, and the loop must keep
            # collecting results and handing out trials meanwhile
            self._html_thread = threading.Thread(target=refresh, args=args, name="report", daemon=True)
            self._html_thread.start()
        else:
            return  # the last one is still being written
        self._last_html = (time.monotonic(), n)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
