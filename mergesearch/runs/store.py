"""The results store: Optuna RDB storage, one study per run.

By default a run lives in ``results/<run>/`` with its SQLite file ``study.db``;
``--storage`` takes any SQLAlchemy URL. What a trial stored is a typed
:class:`~mergesearch.runs.records.TrialRecord`: its full recipe, per-task dev scores and
the aggregate, timings, the worker id and, when it failed, the reason. Only this module
writes records (:func:`record`) and reads them (:func:`trial_records`, :func:`find_trial`,
:func:`leaderboard`); they are stored as the trial's user attributes, as they always
were, and Optuna's private calls are kept in :mod:`.optuna_io`. The baselines (uniform average, task arithmetic
at lambda = 1, a seeding soup) live in a side study ``<run>.baselines`` so the
sampler's model of the space only ever sees its own proposals; the leaderboard
ranks both together.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import optuna

from mergesearch.errors import MergeSearchError
from mergesearch.runs import optuna_io
from mergesearch.runs.records import STORED, TIMINGS, TrialRecord

log = logging.getLogger(__name__)
RESULTS = Path("results")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_dir(run: str, root: Path = RESULTS) -> Path:
    return root / run


def default_storage(run: str, root: Path = RESULTS) -> str:
    return f"sqlite:///{(run_dir(run, root) / 'study.db').resolve()}"


def open_storage(url: str, where: str = "--storage") -> optuna.storages.BaseStorage:
    """An RDB storage, refused with one line when it cannot be reached.

    Several processes may open one new database at once (concurrent searches sharing a
    SQLite file or a server): the loser of the race to create Optuna's schema fails on
    the winner's rows or tables, and simply opens the database again."""
    import time as _time

    try:
        sqlite = url.startswith("sqlite")
        if url.startswith("sqlite:///"):
            db = Path(url[len("sqlite:///"):])
            if not db.parent.is_dir():
                raise MergeSearchError(f"{where}: folder {db.parent} does not exist")
        kwargs = {"connect_args": {"timeout": 30}} if sqlite else {"pool_pre_ping": True}
        for attempt in range(6):
            try:
                storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
                break
            except Exception as e:
                text = str(e)
                if attempt == 5 or not any(k in text for k in ("IntegrityError", "UniqueViolation", "already exists",
                                                              "duplicate key", "database is locked")):
                    raise
                _time.sleep(0.2 * (attempt + 1))
        if sqlite:
            _fast_sqlite(storage)
        return storage
    except MergeSearchError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MergeSearchError(f"{where}: cannot open storage {url} ({first[:200]})") from None


def _fast_sqlite(storage) -> None:
    """WAL journal and NORMAL sync: a commit no longer waits for an fsync of the whole
    database, which made a trial's handful of small writes a visible share of its
    time. Committed trials survive a process crash either way (WAL is durable
    against process death; only an OS crash can lose the last commits)."""
    from sqlalchemy import event

    engine = storage.engine

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    engine.dispose()  # connections opened before the listener reconnect with it


STALE_RETRIES = 3  # re-runs of a trial whose controller died under it
HEARTBEAT_S = 10.0  # a running controller refreshes its heartbeat this often
GRACE_S = 60.0  # a controller heartbeat older than this is a dead controller


class RunLock:
    """One controller per run on this machine: an exclusive ``flock`` on
    ``results/<run>/.lock``. The OS releases it when the process dies, ``kill -9``
    included, so a crashed run can be resumed at once."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.fd: int | None = None

    def acquire(self, create: bool) -> None:
        import fcntl
        import os

        if create:
            try:
                self.folder.mkdir(parents=True)
            except FileExistsError:  # another process created it first
                raise MergeSearchError(f"{self.folder}: run exists (pass --resume to continue it, "
                                       "or pick another --run)") from None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise MergeSearchError(f"{self.folder}: the run is in use by another mergesearch process (pid {holder}); "
                                   "wait for it to finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        import fcntl
        import os

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def claim_run(run: str, root: Path, storage_url: str | None, resume: bool):
    """Check that a new run's name is free (or that a resumed run exists), and take the
    run's lock, before any work. Returns (url, storage or None when the default SQLite
    file is not created yet, the held RunLock, whether the folder was created here)."""
    folder = run_dir(run, root)
    if storage_url is None:
        exists = (folder / "study.db").exists()
        if resume and not exists:
            raise MergeSearchError(f"{folder}: cannot resume, no such run")
        if not resume and folder.exists():
            raise MergeSearchError(f"{folder}: run exists (pass --resume to continue it, or pick another --run)")
        url, storage = default_storage(run, root), None
    else:
        storage = open_storage(storage_url)
        names = study_names(storage)
        if resume and run not in names:
            raise MergeSearchError(f"cannot resume run '{run}': not in {storage_url}")
        if not resume and run in names:
            raise MergeSearchError(f"run '{run}' exists in {storage_url} (pass --resume)")
        url = storage_url
    created = not folder.exists()
    lock = RunLock(folder)
    lock.acquire(create=created and not resume)
    return url, storage, lock, created


def check_controller(study: optuna.Study) -> None:
    """Refuse to resume a run whose controller is alive elsewhere (shared storages:
    the local lock cannot see other machines). Its heartbeat is in the study."""
    import os
    import socket
    import time as _time

    c = study.user_attrs.get("controller")
    if not c:
        return
    age = _time.time() - float(c.get("time", 0))
    same_host = c.get("host") == socket.gethostname()
    if same_host:
        alive = c.get("pid") != os.getpid() and _pid_alive(int(c.get("pid", 0)))
    else:
        alive = age < GRACE_S
    if alive:
        raise MergeSearchError(f"run '{study.study_name}' is being searched by pid {c.get('pid')} on "
                               f"{c.get('host')} (heartbeat {age:.0f}s ago); stop it first"
                               + ("" if same_host else f", or wait {GRACE_S:.0f}s if it is gone"))


def _pid_alive(pid: int) -> bool:
    import os
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def heartbeat(study: optuna.Study, stopped: bool = False) -> None:
    """Record that this process is the run's live controller (or that it stopped)."""
    import os
    import socket
    import time as _time

    study.set_user_attr("controller", None if stopped else
                        {"host": socket.gethostname(), "pid": os.getpid(), "time": _time.time()})


def requeue_failed(study: optuna.Study, trial, reason: str, max_retry: int = STALE_RETRIES) -> bool:
    """Fail a trial that was abandoned through no fault of its own (its controller died,
    or stopped, or the time budget ran out) and queue it again with the same parameters,
    at most ``max_retry`` times along its retry history. Returns whether it was queued."""
    if not isinstance(trial, optuna.trial.FrozenTrial):
        trial = optuna_io.frozen(study, trial)
    return optuna_io.fail_and_requeue(study, trial, reason, max_retry)


def recover_stale(study: optuna.Study, requeue: bool = True) -> int:
    """Trials a dead controller left running: failed, and (``requeue``) queued again."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if requeue:
            requeue_failed(study, t, "stale: the controller stopped")
        else:
            optuna_io.fail(study, t, "stale: the controller stopped")
        n += 1
    return n


def study_names(storage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def load_run(run: str, storage_url: str | None = None, root: Path = RESULTS) -> tuple[optuna.Study, object]:
    url = storage_url or default_storage(run, root)
    if storage_url is None and not (run_dir(run, root) / "study.db").exists():
        raise MergeSearchError(f"{run_dir(run, root)}: no such run (no study.db)")
    storage = open_storage(url)
    if run not in study_names(storage):
        raise MergeSearchError(f"run '{run}' not found in {url}")
    return optuna.load_study(study_name=run, storage=storage), storage


def to_record(study_kind: str, t: optuna.trial.FrozenTrial) -> TrialRecord:
    """A stored trial as its typed record (the user attributes it was stored with)."""
    ua = t.user_attrs
    known = {k: ua[k] for k in STORED if k in ua}
    return TrialRecord(study_kind=study_kind, number=t.number, state=t.state.name,
                       value=t.value if len(t.values or []) == 1 else None, values=t.values,
                       params=dict(t.params), started=t.datetime_start, completed=t.datetime_complete,
                       timings={k: ua[k] for k in TIMINGS if k in ua}, **known)


def record(trial, **fields) -> None:
    """Store fields of a trial's :class:`TrialRecord` (each a field name: a misspelt one
    is an error). A scored candidate's per-task dev scores are also stored as attributes
    of their own (``dev:<task>``), which optuna-dashboard can show and sort as columns.
    One transaction on an SQL storage."""
    unknown = sorted(set(fields) - set(STORED) - {"timings"})
    if unknown:
        raise TypeError(f"record: not a field of TrialRecord: {', '.join(unknown)}")
    data = dict(fields)
    data.update(data.pop("timings", None) or {})
    if "aggregate" in fields:  # a scored candidate (complete or pruned)
        for task, v in (fields.get("scores") or {}).items():
            data[f"dev:{task}"] = v
    optuna_io.write_attrs(trial, {k: json.loads(json.dumps(v)) for k, v in data.items()})


def records_of(study: optuna.Study, study_kind: str = "search") -> list[TrialRecord]:
    """The trials of one study as typed records."""
    return [to_record(study_kind, t) for t in study.get_trials(deepcopy=False)]


def counts_toward_budget(t: optuna.trial.FrozenTrial) -> bool:
    """Finished trials, except failures that were queued again (their retry counts)."""
    return to_record("search", t).counts_toward_budget


def record_proposal(trial, recipe: dict, summary: str) -> None:
    """Store a trial's recipe when it is proposed. A retry of a failed trial carries its
    original's attributes: its failure is cleared."""
    retry = "reason" in trial.user_attrs
    record(trial, recipe=recipe, summary=summary, **({"reason": None, "requeued": False} if retry else {}))


def side_study_names(run: str, storage) -> list[tuple[str, str]]:
    """The run's side studies that exist, as (kind, study name): baselines, later schedule
    stages (``stage<k>``), refinements."""
    names = set(study_names(storage))
    sides = [("baseline", f"{run}.baselines")]
    k = 1
    while f"{run}.stage{k}" in names:
        sides.append((f"stage{k}", f"{run}.stage{k}"))
        k += 1
    sides.append(("refine", f"{run}.refine"))
    return [(kind, name) for kind, name in sides if name in names]


def trial_records(study: optuna.Study, storage, kinds: tuple[str, ...] | None = None) -> list[TrialRecord]:
    """Every trial of a run as typed records: the search study's, then its side
    studies' (baselines, later schedule stages, refinements); ``kinds`` keeps only those."""
    out = [to_record("search", t) for t in study.get_trials(deepcopy=False)] if not kinds or "search" in kinds else []
    for kind, name in side_study_names(study.study_name, storage):
        if kinds and not any(kind.startswith(k) for k in kinds):
            continue
        side = optuna.load_study(study_name=name, storage=storage)
        out += [to_record(kind, t) for t in side.get_trials(deepcopy=False)]
    return out


def best_record(records: list[TrialRecord]) -> TrialRecord | None:
    """The best complete record: feasible first, then by aggregate."""
    done = [r for r in records if r.complete]
    return max(done, key=lambda r: r.rank) if done else None


def leaderboard(study: optuna.Study, storage, top: int | None = None, include_failed: bool = False,
                include_pruned: bool = False, records: list[TrialRecord] | None = None):
    """A pandas DataFrame ranked by feasibility, then aggregate dev score. Pruned trials
    (partial scores, on the share ``fidelity`` of the dev items) and failed ones follow
    the complete trials when asked for."""
    import pandas as pd

    rows = []
    shown = {"COMPLETE"} | ({"PRUNED"} if include_pruned else set()) | ({"FAIL"} if include_failed else set())
    for r in records if records is not None else trial_records(study, storage):
        if r.state not in shown:
            continue
        scores = r.scores or {}
        rows.append({
            "trial": r.label,  # one type: Parquet-safe
            "kind": r.baseline or r.role or r.study_kind,
            "state": r.state,
            "aggregate": r.aggregate,
            "worst": min(scores.values()) if scores else None,
            "feasible": r.feasible,
            **{f"dev:{k}": v for k, v in scores.items()},
            # a refinement trains on part of the dev items: its accuracy on the rest
            "held_out": (r.refine or {}).get("holdout_after"),
            "method": r.method,
            "params": r.summary,
            "worker": r.worker,
            "materialize_s": r.timings.get("materialize_s"),
            "eval_s": r.timings.get("eval_s"),
            "fidelity": r.fidelity,
            "items": r.items,
            "reason": r.reason,
        })
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["_ok"] = df["state"] == "COMPLETE"
    df = df.sort_values(["_ok", "feasible", "aggregate"], ascending=[False, False, False], kind="stable")
    df = df.drop(columns="_ok").reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    return df.head(top) if top else df


def run_counts(study: optuna.Study, storage) -> dict:
    """Trials by state over the run's studies (baselines, stages, refinements), and the
    dev items they scored."""
    out = {"complete": 0, "pruned": 0, "failed": 0, "items": 0}
    for r in trial_records(study, storage):
        key = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(r.state)
        if key:
            out[key] += 1
            out["items"] += r.items or 0
    return out


def find_trial(study: optuna.Study, storage, trial: str | int | None) -> TrialRecord:
    """The best complete trial (by the leaderboard), or the one named (``7``, ``b0``, ``s1.4``, ``r0``)."""
    records = trial_records(study, storage)
    by_label = {r.label: r for r in records}
    if trial is None and study.user_attrs.get("kind") == "soup":
        final = study.user_attrs.get("final_trial")
        if final is None:
            raise MergeSearchError(f"soup run '{study.study_name}' has not finished (resume it with --resume)")
        trial = final
    if trial is None:
        board = leaderboard(study, storage, records=records)
        if board.empty:
            raise MergeSearchError(f"run '{study.study_name}' has no completed trial to export")
        return by_label[str(board.iloc[0]["trial"])]
    r = by_label.get(str(trial))
    if r is None:
        raise MergeSearchError(f"run '{study.study_name}' has no trial {trial}")
    if not r.complete:
        raise MergeSearchError(f"trial {trial} of run '{study.study_name}' did not complete ({r.state})")
    return r
