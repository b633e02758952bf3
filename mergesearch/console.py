"""What the command line prints besides its one-line results: the export and
leaderboard tables, the per-tensor progress of a merge, and click's usage errors."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import click
import typer

from mergesearch.progress import interactive

try:  # typer 0.2x carries a click of its own, whose exceptions are not click's
    from typer._click import exceptions as _typer_click
except ImportError:  # older typer: click itself
    _typer_click = click.exceptions

CLICK_ERRORS = (click.ClickException, _typer_click.ClickException)
USAGE_ERRORS = (click.UsageError, _typer_click.UsageError)
EXITS = (click.exceptions.Exit, typer.Exit)
ABORTS = (click.exceptions.Abort, typer.Abort)


def show_click_error(e: Exception) -> int:
    """A usage mistake as click shows it (the usage line, a hint, one ``Error:`` line; help
    for a bare command group), exit code 2; any other click error as one line."""
    if isinstance(e, USAGE_ERRORS):
        e.show()
    else:
        print(f"error: {e.format_message()}", file=sys.stderr)
    return 2


@contextmanager
def tensor_progress(description: str, unit: str = "tensors") -> Iterator[Callable[[int, int, str], None]]:
    """Yields a callback(done, total, name); a rich bar on a TTY, log lines otherwise."""
    if interactive():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task(description, total=None)

            def cb(done: int, total: int, name: str) -> None:
                bar.update(task, completed=done, total=total)
            yield cb
    else:
        last = {"t": time.monotonic()}

        def cb(done: int, total: int, name: str) -> None:
            now = time.monotonic()
            if done == total or now - last["t"] >= 10:
                logging.getLogger("mergesearch").info("%s: %d/%d %s", description, done, total, unit)
                last["t"] = now
        yield cb


def print_export(res: dict) -> None:
    """The export's summary: the test table (merged and sources) and the monitor tasks."""
    tasks = list(res["test"]["merged"])
    typer.echo(f"exported trial {res['trial']} -> {res['model']} "
               f"(dev re-score {'matches' if res['dev']['verified'] else 'DIFFERS'})")
    typer.echo(f"{'test':<28}" + "".join(f"{t[:10]:>11}" for t in tasks) + f"{'mean':>9}")
    typer.echo(f"{'merged':<28}" + "".join(f"{res['test']['merged'][t]:>11.4f}" for t in tasks)
               + f"{res['test']['merged_aggregate']:>9.4f}")
    for p, s in res["test"]["sources"].items():
        typer.echo(f"{Path(p).name[:28]:<28}" + "".join(f"{s['scores'][t]:>11.4f}" for t in tasks)
                   + f"{s['aggregate']:>9.4f}")
    mon = res.get("monitor")
    if mon:
        mt = list(mon["merged"])
        typer.echo(f"{'monitor (test, never optimized)':<32}" + "".join(f"{t[:10]:>11}" for t in mt))
        typer.echo(f"{'merged':<32}" + "".join(f"{mon['merged'][t]:>11.4f}" for t in mt))
        for p, s in mon["sources"].items():
            typer.echo(f"{Path(p).name[:32]:<32}" + "".join(f"{s[t]:>11.4f}" for t in mt))


def print_leaderboard(run: str, df: Any, study: Any, counts: dict, top: int, pruned: bool) -> None:
    """The leaderboard table of a non-empty board ``df``, then its notes: refined trials,
    monitor floors and test scores, minimized metrics."""
    import pandas as pd

    n = counts
    typer.echo(f"run {run}: {n['complete']} complete, {n['pruned']} pruned, {n['failed']} failed trials"
               + (f"; {n['items']} dev items scored" if n["items"] else ""))
    cols = ["rank", "trial", "kind", "aggregate", "worst"] + [c for c in df.columns if c.startswith("dev:")]
    if pruned and "fidelity" in df.columns:
        cols.append("fidelity")
    refined = "held_out" in df.columns and df["held_out"].notna().any()
    if refined:
        cols.append("held_out")
    cols.append("params")
    with pd.option_context("display.max_colwidth", 70, "display.width", 200):
        typer.echo(df[cols].head(top).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if refined:
        typer.echo("a refined trial's dev scores include the dev items it was trained on; held_out is its "
                   "accuracy on those it never saw (its test score, at export, is on neither)")
    mon_floors = ((study.user_attrs.get("space") or {}).get("monitor") or {}).get("floors") or {}
    if mon_floors:
        typer.echo("monitor tasks (never optimized; a candidate below a floor is infeasible): "
                   + ", ".join(f"dev:{t} >= {v:g}" for t, v in mon_floors.items()))
    exported = Path("results") / run / "scores.json"
    if exported.exists():
        mon = json.loads(exported.read_text()).get("monitor")
        if mon:
            typer.echo(f"monitor tasks on test, exported trial {json.loads(exported.read_text()).get('trial')}: "
                       + ", ".join(f"{t} {v:.4f}" for t, v in mon["merged"].items()) + "; sources: "
                       + "; ".join(f"{Path(p).name} " + ", ".join(f"{v:.4f}" for v in s.values())
                                   for p, s in mon["sources"].items()))
    for task, d in (study.user_attrs.get("metrics") or {}).items():
        if not d.get("higher_is_better", True):
            typer.echo(f"dev:{task} is minus {d['metric']} ({d['filter']}): lower {d['metric']} is better, "
                       "so the scores are maximized")
