"""The run report in a real headless browser (Debian's chromium), and the run in a real
optuna-dashboard. A real zoo search (two workers, baselines, a failure) and a real soup."""

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from mergesearch.cli import main

from test_search import write_space
from test_soup import eval_file
from test_zoo_eval import zoo  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def need_chromium():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it")
        pytest.skip("no chromium here")


def page_requests(net: Path) -> list[str]:
    """URLs the page asked for, from Chromium's network log: requests with an initiating
    document. The browser's own background requests (time, accounts) have none."""
    text = net.read_text()
    try:
        log = json.loads(text)
    except ValueError:  # cut short at exit: close the event list
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    return [e["params"]["url"] for e in log["events"]
            if names.get(e["type"]) == "URL_REQUEST_START_JOB"
            and e.get("params", {}).get("initiator") not in (None, "not an origin")]


def browse(page: Path, tmp: Path, screenshot: Path | None = None) -> tuple[str, list[str]]:
    """The page's DOM after its scripts ran, and every URL it asked for (from the
    browser's network log), with every host resolving nowhere so no fetch can succeed."""
    net = tmp / f"net-{page.stem}.json"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--host-resolver-rules=MAP * ~NOTFOUND", f"--log-net-log={net}", "--virtual-time-budget=15000",
            f"--user-data-dir={tmp / 'chrome-profile'}", "--window-size=1280,2400"]
    out = subprocess.run(args + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    urls = page_requests(net)
    if screenshot is not None:
        subprocess.run(args + [f"--screenshot={screenshot}", page.as_uri()], capture_output=True, timeout=180,
                       check=True)
    return out.stdout, urls


def figures(dom: str) -> dict[str, bool]:
    """Each report figure's name, and whether plotly drew it (an SVG of its own)."""
    parts = re.split(r'<div class="ms-figure" data-name="', dom)[1:]
    return {p.split('"', 1)[0]: 'class="main-svg"' in p for p in parts}


@pytest.fixture(scope="module")
def search_run(zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    old = os.getcwd()
    os.chdir(tmp)
    try:
        os.environ["MERGESEARCH_FAULT"] = "raise_eval@4"
        space = write_space(tmp, zoo, budget={"n_trials": 10})  # 2 baselines, 8 search trials
        assert main(["search", str(space), "--run", "rep", "--workers", "2"]) == 0
    finally:
        os.environ.pop("MERGESEARCH_FAULT", None)
        os.chdir(old)
    return tmp


def test_search_report_renders_offline_in_chromium(search_run, tmp_path):
    need_chromium()
    report = search_run / "results" / "rep" / "report.html"
    assert report.exists()  # written at the end of the search
    html = report.read_text()
    n = int(re.search(r"name='mergesearch-figures' content='(\d+)'", html).group(1))
    shot = tmp_path / "report.png"
    dom, urls = browse(report, tmp_path, shot)
    drawn = figures(dom)
    assert len(drawn) == n and all(drawn.values()), drawn
    assert {"winner", "history-trials", "history-wall", "parallel", "importances", "slices", "recipe-weight",
            "recipe-density", "top10", "timeline"} <= set(drawn)
    # the page asked for nothing beyond its own file
    assert [u for u in urls if not u.startswith(("file:", "data:", "blob:"))] == []
    # and the check does see a page that does fetch something
    control = tmp_path / "control.html"
    control.write_text("<html><body><img src='https://example.invalid/a.png'>"
                       "<script src='https://cdn.example.invalid/plotly.js'></script></body></html>")
    _, seen = browse(control, tmp_path)
    assert {"https://example.invalid/a.png", "https://cdn.example.invalid/plotly.js"} <= set(seen)
    assert "TEST, never searched on" in dom  # the export's test scores are marked as held out
    assert "injected fault in evaluate" in dom  # the failures table
    assert shot.stat().st_size > 50_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("MERGESEARCH_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_report_command_and_bad_input(search_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(search_run)
    out = tmp_path / "r.html"
    assert main(["report", "rep", "-o", str(out)]) == 0
    assert out.exists() and f"wrote {out}" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*tmp*"))
    assert main(["report", "nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results/nosuch: no such run" in err[0]


def test_soup_report(zoo, tmp_path, monkeypatch):
    need_chromium()
    monkeypatch.chdir(tmp_path)
    ev = eval_file(tmp_path, zoo, "add")
    pattern = str(zoo / "checkpoints" / "add" / "checkpoint-*")
    assert main(["soup", "--glob", pattern, "--eval", str(ev), "--base", str(zoo / "base"), "--workers", "2",
                 "--no-export"]) == 0
    report = tmp_path / "results" / "soup-add" / "report.html"
    dom, urls = browse(report, tmp_path)
    drawn = figures(dom)
    assert {"ingredients", "steps", "soup-final", "timeline"} <= set(drawn) and all(drawn.values()), drawn
    assert "accepted" in dom and "rejected" in dom


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_optuna_dashboard_shows_the_run(search_run):
    import sys
    exe = Path(sys.executable).parent / "optuna-dashboard"
    exe = exe if exe.exists() else shutil.which("optuna-dashboard")
    if exe is None:
        pytest.skip("optuna-dashboard is not installed (pip install mergesearch[dashboard])")
    port = free_port()
    db = search_run / "results" / "rep" / "study.db"
    proc = subprocess.Popen([str(exe), f"sqlite:///{db}", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def get(path):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return json.loads(r.read())
        for _ in range(100):
            try:
                studies = get("/api/studies")["study_summaries"]
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("optuna-dashboard did not answer")
        by_name = {s["study_name"]: s for s in studies}
        assert {"rep", "rep.baselines"} <= set(by_name)
        detail = get(f"/api/studies/{by_name['rep']['study_id']}")
        assert len(detail["trials"]) == 8
        assert detail["objective_names"] == ["dev mean"]
        keys = {a["key"] for a in detail["union_user_attrs"]}
        assert {"dev:reverse", "dev:shift", "dev:max", "dev:add"} <= keys
        assert "uniform average" in detail["note"]["body"] and "task arithmetic 1.0" in detail["note"]["body"]
        assert detail["plotly_graph_objects"]  # the winner against the baselines, per task
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_multi_objective_report_lists_the_pareto_trials(zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, zoo, sampler={"name": "nsga2", "population": 4}, budget={"n_trials": 6},
                        granularity={"level": "model"}, initial_trials=False)
    assert main(["search", str(space), "--run", "mo", "--workers", "1", "--no-export"]) == 0
    html = (tmp_path / "results" / "mo" / "report.html").read_text()
    names = re.findall(r"data-name='([a-z0-9-]+)'", html)
    assert "pareto" in names and "winner" in names
    import optuna
    study = optuna.load_study(study_name="mo", storage=f"sqlite:///{tmp_path / 'results' / 'mo' / 'study.db'}")
    assert study.metric_names == ["dev:reverse", "dev:shift", "dev:max", "dev:add"]
    for t in study.best_trials:  # every Pareto trial, with the command that exports it
        assert f"mergesearch export mo --trial {t.number}" in html


def test_a_run_without_finished_trials_gets_a_report_that_says_so(tmp_path, monkeypatch, capsys):
    import optuna
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "empty").mkdir(parents=True)
    study = optuna.create_study(study_name="empty", storage=f"sqlite:///{tmp_path / 'results' / 'empty' / 'study.db'}")
    study.set_user_attr("space", {"evaluator": {"tasks": ["a"]}, "methods": ["ties"]})
    assert main(["report", "empty"]) == 0
    html = (tmp_path / "results" / "empty" / "report.html").read_text()
    assert "No finished trials yet" in html and "content='0'" in html
