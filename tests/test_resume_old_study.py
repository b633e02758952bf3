"""A search started by the code before the package was laid out by layer (commit
fb4aaba: flat modules, untyped trial attributes, jobs numbered negatively) resumes
after it: the stored study in tests/data/study_before_layout was written by that code
(TPE over TIES on the zoo, two baselines and five trials in rungs), and this code
continues it to a larger budget, ranks it and exports its winner.

The stored space names its models under a fixed folder (a space's fingerprint includes
its paths), which the test points at this machine's zoo with symbolic links."""

import fcntl
import json
import shutil
from pathlib import Path

import optuna
import pytest

from mergesearch.cli import main
from mergesearch.runs.store import find_trial, leaderboard, load_run, trial_records
from test_zoo_eval import zoo  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data" / "study_before_layout"
FIXED = Path("/tmp/mergesearch-resume-fixture")


def _link_zoo(zoo: Path) -> None:
    (FIXED / "zoo").mkdir(parents=True, exist_ok=True)
    for name in ("base", "ft_reverse", "ft_shift", "ft_max", "ft_add", "data", "tasks", "manifest.json"):
        link = FIXED / "zoo" / name
        if link.is_symlink() or link.exists():
            if link.is_symlink() and link.resolve() == (zoo / name).resolve():
                continue
            link.unlink()
        link.symlink_to((zoo / name).resolve())


def test_a_study_written_before_the_layout_resumes_ranks_and_exports(tmp_path, zoo, monkeypatch, capsys):
    FIXED.mkdir(parents=True, exist_ok=True)
    with open(FIXED / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one test process at a time owns the links
        _link_zoo(zoo)
        monkeypatch.chdir(tmp_path)
        (tmp_path / "results" / "old").mkdir(parents=True)
        shutil.copy(DATA / "study.db", tmp_path / "results" / "old" / "study.db")
        space = tmp_path / "space.yaml"
        shutil.copy(DATA / "space.yaml", space)
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'results' / 'old' / 'study.db'}")
        before = optuna.load_study(study_name="old", storage=storage).get_trials()
        assert [t.state.name for t in before] == ["COMPLETE"] * 5

        assert main(["search", str(space), "--run", "old", "--workers", "1", "--resume", "--n-trials", "9",
                     "--no-export"]) == 0
        study, st = load_run("old")
        after = study.get_trials()
        assert [(t.params, t.value) for t in after[:5]] == [(t.params, t.value) for t in before]  # nothing re-run
        assert len(after) > 5 and all(t.state.name in ("COMPLETE", "PRUNED") for t in after[5:])
        # the old trials read back as typed records, beside the new ones
        records = trial_records(study, st)
        n = len(after)
        assert [r.label for r in records] == [str(k) for k in range(n)] + ["b0", "b1"]
        # 9 evaluations: the 2 baselines and 7 trial-equivalents (a pruned trial costs its share)
        assert sum(r.spent for r in records if r.study_kind == "search") == pytest.approx(7)
        assert [r.baseline for r in records[n:]] == ["uniform average", "task arithmetic 1.0"]
        old = records[0]
        assert old.recipe["method"] == "ties" and set(old.scores) == {"reverse", "shift", "max", "add"}
        assert old.items == 160 and old.rungs == 2 and old.worker == 0 and old.timings["eval_s"] > 0
        board = leaderboard(study, st)
        assert len(board) == sum(r.complete for r in records) and set(board["trial"]) >= {"b0", "b1", "0"}

        best = find_trial(study, st, None)
        assert main(["export", "old"]) == 0
        scores = json.loads((tmp_path / "results" / "old" / "scores.json").read_text())
        assert scores["trial"] == best.label  # (its dev scores verify only on the zoo that scored it)
        assert scores["recipe"] == best.recipe
