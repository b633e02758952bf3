"""A run's report: one self-contained HTML file (plotly's JavaScript inlined, nothing
fetched from a network), built from the store alone.

It shows, for a search: the header (space, sampler, budget used, wall time, trials by
state, items scored); the winner against the baselines and the source models per task,
on dev and on test (from the export's ``scores.json``; test items were never searched
on); the best-so-far history over trials and over wall time, with the best baseline and
the best single source as reference lines; parallel coordinates, parameter importances
and slices; the winner's recipe as heatmaps (models x groups, one per parameter); the
top-10 trials per task, and for multi-objective runs the Pareto front and the
exportable Pareto trials; the workers' timeline and the failures. For a soup: the
ingredients' scores, the greedy steps, and the final soup against the best ingredient
and the uniform soup.

``write_report`` writes ``results/<run>/report.html`` atomically; the controller
refreshes it during a run and at its end.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

log = logging.getLogger(__name__)

FIGURE_CLASS = "ms-figure"


class Page:
    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self.figures = 0

    def h2(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def p(self, text: str, cls: str = "") -> None:
        self.parts.append(f"<p class='{cls}'>{html.escape(text)}</p>")

    def table(self, head: list[str], rows: list[list], cls: str = "") -> None:
        h = "".join(f"<th>{html.escape(str(x))}</th>" for x in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(x))}</td>" for x in r) + "</tr>" for r in rows)
        self.parts.append(f"<table class='{cls}'><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>")

    def figure(self, fig, name: str) -> None:
        fig.update_layout(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50))
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}",
                          config={"displaylogo": False, "responsive": True})
        self.parts.append(f"<div class='{FIGURE_CLASS}' data-name='{name}'>{div}</div>")
        self.figures += 1

    def render(self) -> str:
        from plotly.offline import get_plotlyjs
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<meta name='mergesearch-figures' content='{self.figures}'>"
                f"<style>{CSS}</style><script type='text/javascript'>{get_plotlyjs()}</script></head>"
                f"<body><h1>{html.escape(self.title)}</h1>{''.join(self.parts)}</body></html>")


CSS = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}
th{background:#f3f3f3}.note{color:#666;font-size:13px}.ms-figure{margin:8px 0 24px}"""


def _fmt(x) -> str:
    if isinstance(x, float):
        return "-" if math.isnan(x) else f"{x:.4f}"
    return "-" if x is None else str(x)


def _short(path: str | None) -> str:
    from mergesearch.sources import short
    return short(path) if path else "-"


def write_report(run: str, storage_url: str | None = None, root: Path = Path("results"),
                 out: Path | None = None) -> Path:
    """Build the report of ``run`` and write it atomically; returns its path."""
    from mergesearch.runs.store import load_run
    study, storage = load_run(run, storage_url, root)
    out = Path(out) if out is not None else root / run / "report.html"
    text = build(study, storage, root / run)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, out)
    return out


def build(study: optuna.Study, storage, run_dir: Path) -> str:
    if study.user_attrs.get("kind") == "soup":
        return _soup(study, storage, run_dir)
    return _search(study, storage, run_dir)


# -- a search ----------------------------------------------------------------------------

def _search(study, storage, run_dir: Path) -> str:
    import plotly.graph_objects as go

    from mergesearch.runs.store import trial_records
    page = Page(f"mergesearch run {study.study_name}")
    trials = trial_records(study, storage)
    space = study.user_attrs.get("space") or {}
    ev = space.get("evaluator") or {}
    tasks = list(ev.get("tasks") or [])
    complete = [r for r in trials if r.complete]
    searched = [r for r in complete if r.study_kind != "baseline"]
    _header(page, study, space, trials)
    if not complete:
        page.p("No finished trials yet: the report fills in as the run goes.", "note")
        return page.render()
    best = max(searched or complete, key=lambda r: r.rank)
    best_label = best.label
    baselines = [r for r in complete if r.study_kind == "baseline"]
    sources = [r for r in baselines if r.is_source]
    others = [r for r in baselines if not r.is_source]

    # winner against the rest, per task, on dev and on test
    page.h2(f"The winner (trial {best_label}) against the baselines and the sources")
    scores = _load_scores(run_dir, best_label)
    fig = go.Figure()
    fig.add_bar(name=f"winner {best_label} (dev)", x=tasks, y=[best.scores.get(t) for t in tasks])
    for r in others:
        fig.add_bar(name=f"{r.baseline} (dev)", x=tasks, y=[r.scores.get(x) for x in tasks])
    for r in sources:
        fig.add_bar(name=f"{_short(r.baseline[7:])} (dev)", x=tasks, y=[r.scores.get(x) for x in tasks])
    if scores is not None:
        fig.add_bar(name=f"winner {best_label} (TEST, never searched on)", x=tasks,
                    y=[scores["test"]["merged"].get(t) for t in tasks], marker_pattern_shape="/")
        for path, s in scores["test"]["sources"].items():
            fig.add_bar(name=f"{_short(path)} (TEST, never searched on)", x=tasks,
                        y=[s["scores"].get(t) for t in tasks], marker_pattern_shape="/")
    fig.update_layout(barmode="group", title="Per-task scores: dev (searched on) and test (held out)",
                      yaxis_title="score")
    page.figure(fig, "winner")
    if scores is None:
        page.p(f"No test scores yet: `mergesearch export {study.study_name}` scores the winner and the sources on "
               "test items the search never scored.", "note")
    elif str(scores.get("trial")) != best_label:
        page.p(f"The test scores are those of the exported trial {scores.get('trial')}.", "note")
    mon = (scores or {}).get("monitor")
    if mon:  # what the merge forgets outside its objective
        page.h2("Monitor tasks (test items; never optimized)")
        mt = list(mon["merged"])
        rows = [[f"winner {scores.get('trial')}"] + [f"{mon['merged'][t]:.4f}" for t in mt]]
        rows += [[_short(p)] + [f"{v[t]:.4f}" for t in mt] for p, v in mon["sources"].items()]
        if mon.get("floors"):
            rows.append(["floor"] + [f"{mon['floors'][t]:.4f}" if t in mon["floors"] else "" for t in mt])
        page.table(["model"] + mt, rows)

    # history
    page.h2("History")
    _history(page, study, searched, baselines, sources)
    # parameters
    _parameters(page, study)
    # the winner's recipe
    page.h2(f"The winner's recipe (trial {best_label})")
    _recipe_heatmaps(page, best.recipe or {})
    # per task
    page.h2("Per task: the top 10 trials")
    top = sorted(searched, key=lambda r: r.rank, reverse=True)[:10]
    fig = go.Figure(go.Heatmap(z=[[r.scores.get(x) for x in tasks] for r in top], x=tasks,
                               y=[f"trial {r.label}" for r in top], colorscale="Viridis",
                               text=[[_fmt(r.scores.get(x)) for x in tasks] for r in top],
                               texttemplate="%{text}"))
    fig.update_layout(title="Dev score per task, best trial on top", yaxis_autorange="reversed")
    page.figure(fig, "top10")
    if len(study.directions) > 1:
        _pareto(page, study)
    _workers(page, trials)
    return page.render()


def _header(page: Page, study, space: dict, trials: list) -> None:
    state = {s: sum(r.state == s.name for r in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED,
                                                                     TrialState.FAIL, TrialState.RUNNING)}
    starts = [r.started for r in trials if r.started]
    ends = [r.completed for r in trials if r.completed]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0
    items = sum(r.items or 0 for r in trials)
    budget = space.get("budget") or {}
    gran = space.get("granularity") or {}
    rows = [["run", study.study_name],
            ["methods", ", ".join(space.get("methods") or [])],
            ["models", ", ".join(_short(m) for m in space.get("models") or [])],
            ["granularity", f"{gran.get('level', '-')}" + (f", {gran.get('n_groups')} groups"
                                                          if gran.get("level") == "groups" else "")
             + (f"; schedule {space['schedule']}" if space.get("schedule") else "")],
            ["sampler", (space.get("sampler") or {}).get("name", "-")],
            ["budget", ", ".join(f"{k} {v}" for k, v in budget.items() if v is not None)],
            ["trials", f"{state[TrialState.COMPLETE]} complete, {state[TrialState.PRUNED]} pruned, "
                       f"{state[TrialState.FAIL]} failed, {state[TrialState.RUNNING]} running (baselines, "
                       "stages and refinements included)"],
            ["wall time", f"{wall:.0f} s (first trial start to last finish)"],
            ["updated", time.strftime("%Y-%m-%d %H:%M:%S")]]
    if items:
        rows.insert(7, ["dev items scored", f"{items}"])
    if space.get("fidelity"):
        rows.insert(5, ["fidelity", f"rungs {space['fidelity']['rungs']}, pruner "
                                    f"{space['fidelity']['pruner']['name']}"])
    page.table(["", ""], rows, "header")


def _load_scores(run_dir: Path, label: str) -> dict | None:
    f = run_dir / "scores.json"
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def _history(page: Page, study, searched: list, baselines: list, sources: list) -> None:
    import plotly.graph_objects as go
    done = sorted((r for r in searched if r.completed), key=lambda r: r.completed)
    if not done:
        return
    t0 = min(r.started for r in done)
    best, ys, xs, ws = -math.inf, [], [], []
    for k, r in enumerate(done):
        best = max(best, r.aggregate if r.aggregate is not None else -math.inf)
        ys.append(best)
        xs.append(k + 1)
        ws.append((r.completed - t0).total_seconds())
    refs = []
    plain = [r for r in baselines if not r.is_source]
    if plain:
        b = max(plain, key=lambda r: r.aggregate)
        refs.append((f"best baseline ({b.baseline})", b.aggregate))
    if sources:
        s = max(sources, key=lambda r: r.aggregate)
        refs.append((f"best single source ({_short(s.baseline[7:])})", s.aggregate))
    for name, x, title in (("trials", xs, "Best so far, by finished trial"),
                           ("wall", ws, "Best so far, by wall time (s)")):
        fig = go.Figure()
        fig.add_scatter(x=x, y=[r.aggregate for r in done], mode="markers", name="trial",
                        marker=dict(size=5, opacity=0.5))
        fig.add_scatter(x=x, y=ys, mode="lines", name="best so far", line_shape="hv")
        for label, v in refs:
            fig.add_hline(y=v, line_dash="dash", annotation_text=label, annotation_position="bottom right")
        fig.update_layout(title=title, yaxis_title="objective (dev)")
        page.figure(fig, f"history-{name}")


def _parameters(page: Page, study) -> None:
    from optuna import visualization as vis
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2 or not any(t.params for t in done):
        return
    page.h2("Parameters")
    target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
    tname = "objective" if target is None else "first objective"
    page.figure(vis.plot_parallel_coordinate(study, target=target, target_name=tname), "parallel")
    names = []
    try:
        imp = optuna.importance.get_param_importances(study, target=target)
        page.figure(vis.plot_param_importances(study, target=target, target_name=tname), "importances")
        names = list(imp)[:4]
    except (RuntimeError, ValueError) as e:  # e.g. a parameter that never varied
        page.p(f"Parameter importances unavailable: {e}", "note")
        names = sorted({p for t in done for p in t.params})[:4]
    if names:
        page.figure(vis.plot_slice(study, params=names, target=target, target_name=tname), "slices")


def _recipe_heatmaps(page: Page, recipe: dict) -> None:
    import plotly.graph_objects as go
    models = recipe.get("models") or []
    names: list[str] = []
    for m in models:
        for p in (m.get("parameters") or {}):
            if p not in names:
                names.append(p)
    page.p(f"method: {recipe.get('method', '-')}; global parameters: "
           + (", ".join(f"{k} = {_value_text(v)}" for k, v in (recipe.get("parameters") or {}).items()) or "none"),
           "note")
    for p in names:
        cols: list[str] = []
        for m in models:
            for f, _ in _entries((m.get("parameters") or {}).get(p)):
                if f not in cols:
                    cols.append(f)
        z = []
        for m in models:
            vals = dict(_entries((m.get("parameters") or {}).get(p)))
            z.append([vals.get(c) for c in cols])
        fig = go.Figure(go.Heatmap(z=z, x=cols, y=[_short(m.get("path")) for m in models], colorscale="RdBu",
                                   zmid=0 if p == "weight" else None, text=[[_fmt(v) for v in r] for r in z],
                                   texttemplate="%{text}"))
        fig.update_layout(title=f"{recipe.get('method', '')}: {p} (models x layer groups)")
        page.figure(fig, f"recipe-{p}")


def _entries(value) -> list[tuple[str, float]]:
    """(where, value) pairs of a setting: filters, or a gradient over the layers (a depth
    schedule: its first and last layer, or each layer where it was clipped)."""
    if value is None:
        return []
    if isinstance(value, list) and value and not isinstance(value[0], dict):
        if len(value) == 2:
            return [("first layer", value[0]), ("last layer", value[1])]
        return [(f"L{k}", v) for k, v in enumerate(value)]
    if isinstance(value, list):
        out = []
        for e in value:
            where = e.get("filter") or "rest"
            inner = e.get("value")
            out += [(f"{where} {w}", v) for w, v in _entries(inner)] if isinstance(inner, list) else [(where, inner)]
        return out
    return [("all", value)]


def _value_text(v) -> str:
    return ", ".join(f"{f}: {_fmt(x)}" for f, x in _entries(v)) if isinstance(v, list) else _fmt(v)


def _pareto(page: Page, study) -> None:
    from optuna import visualization as vis
    page.h2("Pareto front")
    names = study.metric_names or [f"objective {k}" for k in range(len(study.directions))]
    if len(study.directions) <= 3:
        page.figure(vis.plot_pareto_front(study, target_names=names), "pareto")
    else:
        page.figure(vis.plot_pareto_front(study, targets=lambda t: t.values[:3], target_names=names[:3]), "pareto")
    rows = [[t.number, *[round(v, 4) for v in t.values], f"mergesearch export {study.study_name} --trial {t.number}"]
            for t in study.best_trials]
    page.p("Every Pareto trial can be exported:", "note")
    page.table(["trial", *names, "export"], rows, "pareto")


def _workers(page: Page, trials: list) -> None:
    import plotly.graph_objects as go

    ran = [r for r in trials if r.started and r.completed and r.worker is not None]
    if ran:
        page.h2("Workers")
        t0 = min(r.started for r in ran)
        fig = go.Figure()
        colors = {TrialState.COMPLETE: "#4c78a8", TrialState.PRUNED: "#f58518", TrialState.FAIL: "#e45756"}
        for state, color in colors.items():
            sel = [r for r in ran if r.state == state.name]
            if not sel:
                continue
            fig.add_bar(name=state.name.lower(), orientation="h", marker_color=color,
                        y=[f"worker {r.worker}" for r in sel],
                        base=[(r.started - t0).total_seconds() for r in sel],
                        x=[max(0.01, (r.completed - r.started).total_seconds()) for r in sel],
                        text=[r.label for r in sel], hovertemplate="trial %{text}: %{x:.2f} s")
        fig.update_layout(barmode="overlay", title="Timeline: each trial on its worker (s since the first start)",
                          xaxis_title="seconds")
        page.figure(fig, "timeline")
    failed = [r for r in trials if r.state == "FAIL"]
    if failed:
        page.h2("Failures")
        page.table(["trial", "worker", "reason", "queued again"],
                   [[r.label, r.worker, r.reason, "yes" if r.requeued else "no"] for r in failed], "failures")


# -- a soup ------------------------------------------------------------------------------

def _soup(study, storage, run_dir: Path) -> str:
    import plotly.graph_objects as go
    page = Page(f"mergesearch soup {study.study_name}")
    from mergesearch.runs.store import trial_records
    trials = trial_records(study, storage)
    _header(page, study, {"methods": ["linear (soup)"], "models": [i["path"] for i in
                                                                   (study.user_attrs.get("report") or {})
                                                                   .get("ingredients", [])]}, trials)
    rep = study.user_attrs.get("report")
    if not rep:
        page.p("No soup yet: the report fills in when the soup is made.", "note")
        return page.render()
    page.h2("Ingredients")
    ing = rep["ingredients"]
    fig = go.Figure(go.Bar(x=[_short(i["path"]) for i in ing], y=[i["dev"] for i in ing], name="dev"))
    fig.update_layout(title="Each ingredient alone (dev)", yaxis_title="dev score")
    page.figure(fig, "ingredients")
    if rep.get("steps"):
        page.h2(f"Greedy steps ({rep['strategy']})")
        steps = rep["steps"]
        fig = go.Figure(go.Scatter(x=list(range(1, len(steps) + 1)), y=[s["dev"] for s in steps], mode="markers+lines",
                                   marker=dict(size=10, color=["#54a24b" if s["accepted"] else "#e45756"
                                                               for s in steps]),
                                   text=[f"{_short(s['ingredient'])}: {'accepted' if s['accepted'] else 'rejected'}"
                                         for s in steps], hovertemplate="%{text}<br>dev %{y:.4f}"))
        fig.update_layout(title="Each candidate addition: dev of the soup with it (green accepted, red rejected)",
                          xaxis_title="step", yaxis_title="dev score")
        page.figure(fig, "steps")
        page.table(["step", "ingredient", "dev with it", "accepted"],
                   [[k + 1, _short(s["ingredient"]), s["dev"], "yes" if s["accepted"] else "no"]
                    for k, s in enumerate(steps)], "steps")
    page.h2("The final soup against the best ingredient and the uniform soup")
    rows = rep["rows"]
    fig = go.Figure()
    fig.add_bar(name="dev", x=list(rows), y=[r["dev"] for r in rows.values()])
    fig.add_bar(name="TEST (never searched on)", x=list(rows), y=[r["test"] for r in rows.values()],
                marker_pattern_shape="/")
    fig.update_layout(barmode="group", title="Dev and test means", yaxis_title="score")
    page.figure(fig, "soup-final")
    page.table(["", "members", "dev", "test"], [[k, r["members"], r["dev"], r["test"]] for k, r in rows.items()])
    _workers(page, trials)
    return page.render()


# -- optuna-dashboard ----------------------------------------------------------------------

def metric_names(space) -> list[str]:
    """What the study's objective values are, for optuna-dashboard and plots."""
    if space.multi_objective:
        return [f"dev:{t}" for t in space.evaluator.tasks]
    o = space.objective
    return [f"dev {o.kind}" + (", normalized by the sources" if o.normalize == "sources" else "")]


def dashboard_extras(study, storage) -> bool:
    """Show the baselines and the sources where optuna-dashboard looks: a study note with
    their per-task dev scores beside the best trial's, and the same as a bar chart.
    Returns False when optuna-dashboard is not installed (an optional extra)."""
    try:
        from optuna_dashboard import save_note, save_plotly_graph_object
    except ImportError:
        return False
    import plotly.graph_objects as go

    from mergesearch.runs.store import trial_records
    space = study.user_attrs.get("space") or {}
    tasks = list((space.get("evaluator") or {}).get("tasks") or [])
    rows = [r for r in trial_records(study, storage) if r.complete]
    base = [r for r in rows if r.study_kind == "baseline"]
    rest = [r for r in rows if r.study_kind != "baseline"]
    best = max(rest, key=lambda r: r.rank, default=None)
    shown = ([best] if best else []) + base
    lines = [f"## Baselines and the best trial of run {study.study_name}", "",
             "Baselines live in the side study `" + study.study_name + ".baselines`; their dev scores per task:", "",
             "| trial | what | mean | " + " | ".join(tasks) + " |", "|---|---|---:|" + "---:|" * len(tasks)]
    for r in shown:
        what = r.baseline or ("best trial" if r is best else "")
        lines.append(f"| {r.label} | {what} | {_fmt(r.aggregate)} | "
                     + " | ".join(_fmt((r.scores or {}).get(x)) for x in tasks) + " |")
    lines += ["", f"The report: `mergesearch report {study.study_name}` (results/{study.study_name}/report.html)."]
    save_note(study, "\n".join(lines))
    fig = go.Figure()
    for r in shown:
        fig.add_bar(name=f"{r.label} {r.baseline or 'best trial'}", x=tasks, y=[(r.scores or {}).get(x) for x in tasks])
    fig.update_layout(barmode="group", title="Dev score per task: the best trial against the baselines")
    save_plotly_graph_object(study, fig, graph_object_id="winner-vs-baselines")
    return True


def refresh(run: str, storage_url: str | None = None, root: Path = Path("results")) -> Path | None:
    """Write the report and the dashboard extras; never fails the run that calls it."""
    try:
        path = write_report(run, storage_url, root)
        from mergesearch.runs.store import load_run
        study, storage = load_run(run, storage_url, root)
        if study.user_attrs.get("kind") != "soup":
            dashboard_extras(study, storage)
        return path
    except Exception as e:  # noqa: BLE001: a report is never worth a failed search
        log.warning("report: not written (%s: %s)", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
