"""Usage mistakes (docs/ERRORS.md, "Usage mistakes"): the installed ``mergesearch``
command answers each with click's usage line, a hint and one ``Error:`` line on stderr,
exit code 2 and no traceback."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXE = Path(sys.executable).parent / "mergesearch"
DOC = Path(__file__).resolve().parents[1] / "docs" / "ERRORS.md"

# (case, argv, usage line, error line)
CASES = [
    ("usage-unknown-command", ["serch"], "Usage: mergesearch [OPTIONS] COMMAND [ARGS]...",
     "Error: No such command 'serch'. Did you mean 'search'?"),
    ("usage-missing-argument", ["search"], "Usage: mergesearch search [OPTIONS] {SPACE.yaml}",
     "Error: Missing argument 'SPACE.yaml'."),
    ("usage-unknown-option", ["search", "space.yaml", "--bogus"], "Usage: mergesearch search [OPTIONS] {SPACE.yaml}",
     "Error: No such option: --bogus"),
    ("usage-extra-argument", ["export", "RUN", "extra"], "Usage: mergesearch export [OPTIONS] {run}",
     "Error: Got unexpected extra argument(s) (extra)"),
]


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run([str(EXE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case,argv,usage,error", CASES, ids=[c[0] for c in CASES])
def test_a_usage_mistake_gets_a_usage_message(case, argv, usage, error, tmp_path):
    p = cli(argv, tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    command = usage.split(" [OPTIONS]")[0].removeprefix("Usage: ")
    assert lines == [usage, f"Try '{command} --help' for help.", error]
    assert list(tmp_path.iterdir()) == []  # nothing ran


def test_the_usage_table_documents_every_case():
    section = DOC.read_text().split("\n## Usage mistakes\n")[1].split("\n## ")[0]
    rows = {re.match(r"\| `([^`]+)`", line).group(1): line for line in section.splitlines() if line.startswith("| `")}
    assert sorted(rows) == sorted(c[0] for c in CASES)
    for case, argv, usage, error in CASES:
        row = rows[case]
        assert f"| `mergesearch {' '.join(argv)}` |" in row, row
        assert f"| {usage} / {error} | 2 |" in row, row


def test_help_and_a_bare_command_still_print_help(tmp_path):
    p = cli(["--help"], tmp_path)
    assert p.returncode == 0 and "Usage: mergesearch [OPTIONS] COMMAND [ARGS]..." in p.stdout
    assert "Error" not in p.stdout + p.stderr
    bare = cli(["zoo"], tmp_path)
    out = bare.stdout + bare.stderr
    assert bare.returncode == 2 and "Usage: mergesearch zoo [OPTIONS] COMMAND [ARGS]..." in out
    assert "build" in out and "Traceback" not in out


def test_debug_keeps_the_traceback_of_a_usage_mistake(tmp_path):
    p = cli(["--debug", "search"], tmp_path)
    assert p.returncode == 1
    assert "Traceback" in p.stderr and p.stderr.rstrip().endswith("Missing parameter: space_file")
