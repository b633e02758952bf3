"""A PostgreSQL storage URL, against a real server started here from the Debian
packages (.ci/run installs them when missing). Skipped, with the reason, only when
no server can start."""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest

from mergesearch.cli import main

from test_search import write_space
from test_zoo_eval import zoo  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow


def _bindir() -> Path | None:
    found = shutil.which("initdb")
    dirs = ([str(Path(os.path.realpath(found)).parent)] if found else []) + sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for d in dirs:
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    return None


@pytest.fixture(scope="module")
def postgres_url():
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server cannot start: initdb not found (apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="mspg-"))  # short: the socket path must stay under 107 bytes
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        import pwd
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("PostgreSQL server cannot start: running as root and there is no 'postgres' user")
        shutil.chown(base, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(*cmd):
        return subprocess.run(as_user + [str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    steps = [
        (bindir / "initdb", "-D", base / "data", "-U", "ms", "--auth=trust", "-E", "UTF8"),
        (bindir / "pg_ctl", "-D", base / "data", "-l", base / "log", "-w", "-o",
         f"-k {base} -p {port} -c listen_addresses=''", "start"),
        (bindir / "createdb", "-h", base, "-p", port, "-U", "ms", "mergesearch"),
    ]
    for cmd in steps:
        p = run(*cmd)
        if p.returncode != 0:
            run(bindir / "pg_ctl", "-D", base / "data", "-m", "immediate", "stop")
            shutil.rmtree(base, ignore_errors=True)
            pytest.skip(f"PostgreSQL server cannot start: {Path(str(cmd[0])).name}: "
                        f"{(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    yield f"postgresql+psycopg2://ms@/mergesearch?host={base}&port={port}"
    run(bindir / "pg_ctl", "-D", base / "data", "-m", "fast", "stop")
    shutil.rmtree(base, ignore_errors=True)


def test_search_resume_leaderboard_and_export_on_postgresql(tmp_path, zoo, postgres_url, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, zoo, budget={"n_trials": 5}, initial_trials=True, granularity={"level": "model"})
    assert main(["search", str(space), "--run", "pg", "--workers", "1", "--storage", postgres_url, "--no-export"]) == 0
    assert not (tmp_path / "results" / "pg" / "study.db").exists()  # the store is the server
    storage = optuna.storages.RDBStorage(postgres_url)
    assert sorted(s.study_name for s in optuna.get_all_study_summaries(storage)) == ["pg", "pg.baselines"]
    assert main(["search", str(space), "--run", "pg", "--workers", "1", "--storage", postgres_url, "--no-export",
                 "--resume", "--n-trials", "7"]) == 0
    trials = optuna.load_study(study_name="pg", storage=storage).get_trials()
    assert len(trials) == 5 and all(t.state.name == "COMPLETE" for t in trials)
    assert main(["search", str(space), "--run", "pg", "--storage", postgres_url]) == 2
    assert f"run 'pg' exists in {postgres_url} (pass --resume)" in capsys.readouterr().err
    assert main(["leaderboard", "pg", "--storage", postgres_url, "--csv", str(tmp_path / "lb.csv")]) == 0
    assert len((tmp_path / "lb.csv").read_text().splitlines()) == 1 + 5 + 2
    assert main(["export", "pg", "--storage", postgres_url]) == 0
    assert (tmp_path / "results" / "pg" / "model" / "model.safetensors").exists()
