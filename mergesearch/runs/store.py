"""The results store: Optuna RDB storage, one study per run.

By default a run lives in ``results/<run>/`` with its SQLite file ``study.db``;
``--storage`` takes any SQLAlchemy URL. Every trial records, as user attributes,
its full recipe, per-task dev scores and the aggregate, timings, the worker id
and, when it failed, the reason. The baselines (uniform average, task arithmetic
at lambda = 1, a seeding soup) live in a side study ``<run>.baselines`` so the
sampler's model of the space only ever sees its own proposals; the leaderboard
ranks both together.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import optuna

from mergesearch.errors import MergeSearchError

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


def requeue_failed(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str,
                   max_retry: int = STALE_RETRIES) -> bool:
    """Fail a trial that was abandoned through no fault of its own (its controller died,
    or stopped) and queue it again with the same parameters through Optuna's
    stale-trial retry (``RetryHeartbeatStaleTrialCallback``), at most ``max_retry``
    times along its retry history. Returns whether it was queued."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    storage = study._storage
    queued = len(trial.system_attrs.get("retry_history", [])) + 1 <= max_retry
    storage.set_trial_user_attr(trial._trial_id, "reason", reason)
    storage.set_trial_user_attr(trial._trial_id, "requeued", queued)
    if trial.state == optuna.trial.TrialState.RUNNING:
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    if queued:
        RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, storage.get_trial(trial._trial_id))
    return queued


def recover_stale(study: optuna.Study, requeue: bool = True) -> int:
    """Trials a dead controller left running: failed, and (``requeue``) queued again."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if requeue:
            requeue_failed(study, t, "stale: the controller stopped")
        else:
            study._storage.set_trial_user_attr(t._trial_id, "reason", "stale: the controller stopped")
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        n += 1
    return n


def counts_toward_budget(t: optuna.trial.FrozenTrial) -> bool:
    """Finished trials, except failures that were queued again (their retry counts)."""
    if t.state == optuna.trial.TrialState.FAIL:
        return not t.user_attrs.get("requeued", False)
    return t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


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


def all_trials(study: optuna.Study, storage) -> list[tuple[str, optuna.trial.FrozenTrial]]:
    """Every trial of a run: the search study's, then its side studies': baselines,
    later schedule stages (``stage<k>``) and refinements."""
    out = [("search", t) for t in study.get_trials(deepcopy=False)]
    names = set(study_names(storage))
    sides = [("baseline", f"{study.study_name}.baselines")]
    k = 1
    while f"{study.study_name}.stage{k}" in names:
        sides.append((f"stage{k}", f"{study.study_name}.stage{k}"))
        k += 1
    sides.append(("refine", f"{study.study_name}.refine"))
    for kind, name in sides:
        if name in names:
            side = optuna.load_study(study_name=name, storage=storage)
            out += [(kind, t) for t in side.get_trials(deepcopy=False)]
    return out


def trial_label(kind: str, t: optuna.trial.FrozenTrial) -> str:
    """How a trial is named in the leaderboard and on the command line: ``7`` (search),
    ``b0`` (baseline), ``s1.4`` (schedule stage 1), ``r0`` (refinement)."""
    if kind == "search":
        return str(t.number)
    if kind == "baseline":
        return f"b{t.number}"
    if kind == "refine":
        return f"r{t.number}"
    return f"s{kind[5:]}.{t.number}"


def leaderboard(study: optuna.Study, storage, top: int | None = None, include_failed: bool = False,
                include_pruned: bool = False):
    """A pandas DataFrame ranked by feasibility, then aggregate dev score. Pruned trials
    (partial scores, on the share ``fidelity`` of the dev items) and failed ones follow
    the complete trials when asked for."""
    import pandas as pd

    rows = []
    tasks: list[str] = []
    for kind, t in all_trials(study, storage):
        ua = t.user_attrs
        st = optuna.trial.TrialState
        if not (t.state == st.COMPLETE or (t.state == st.PRUNED and include_pruned)
                or (t.state == st.FAIL and include_failed)):
            continue
        scores = ua.get("scores") or {}
        for k in scores:
            if k not in tasks:
                tasks.append(k)
        recipe = ua.get("recipe") or {}
        rows.append({
            "trial": trial_label(kind, t),  # one type: Parquet-safe
            "kind": ua.get("baseline") or ua.get("role") or kind,
            "state": t.state.name,
            "aggregate": ua.get("aggregate"),
            "worst": min(scores.values()) if scores else None,
            "feasible": ua.get("feasible", True),
            **{f"dev:{k}": v for k, v in scores.items()},
            # a refinement trains on part of the dev items: its accuracy on the rest
            "held_out": (ua.get("refine") or {}).get("holdout_after"),
            "method": recipe.get("method"),
            "params": ua.get("summary", ""),
            "worker": ua.get("worker"),
            "materialize_s": ua.get("materialize_s"),
            "eval_s": ua.get("eval_s"),
            "fidelity": ua.get("fidelity"),
            "items": ua.get("items"),
            "reason": ua.get("reason"),
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
    st = optuna.trial.TrialState
    for _, t in all_trials(study, storage):
        key = {st.COMPLETE: "complete", st.PRUNED: "pruned", st.FAIL: "failed"}.get(t.state)
        if key:
            out[key] += 1
            out["items"] += t.user_attrs.get("items") or 0
    return out


def find_trial(study: optuna.Study, storage, trial: str | int | None) -> optuna.trial.FrozenTrial:
    """The best complete trial (by the leaderboard), or the one named (``7``, ``b0``, ``s1.4``, ``r0``)."""
    trials = {trial_label(kind, t): t for kind, t in all_trials(study, storage)}
    if trial is None and study.user_attrs.get("kind") == "soup":
        final = study.user_attrs.get("final_trial")
        if final is None:
            raise MergeSearchError(f"soup run '{study.study_name}' has not finished (resume it with --resume)")
        trial = final
    if trial is None:
        board = leaderboard(study, storage)
        if board.empty:
            raise MergeSearchError(f"run '{study.study_name}' has no completed trial to export")
        return trials[str(board.iloc[0]["trial"])]
    t = trials.get(str(trial))
    if t is None:
        raise MergeSearchError(f"run '{study.study_name}' has no trial {trial}")
    if t.state != optuna.trial.TrialState.COMPLETE:
        raise MergeSearchError(f"trial {trial} of run '{study.study_name}' did not complete ({t.state.name})")
    return t


def record(trial_or_study_trial, payload: dict) -> None:
    """Store a trial's payload as user attributes, in one transaction on an SQL storage
    (one commit instead of one per attribute)."""
    data = {k: json.loads(json.dumps(v)) for k, v in payload.items()}
    t = trial_or_study_trial
    if _record_batched(getattr(t, "storage", None), getattr(t, "_trial_id", None), data):
        cached = getattr(t, "_cached_frozen_trial", None)  # what Trial.user_attrs reads, as set_user_attr keeps it
        if cached is not None:
            cached.user_attrs.update(data)
        return
    for k, v in data.items():
        t.set_user_attr(k, v)


class _ParamBuffer:
    """A trial's storage while its parameters are suggested: parameter writes are kept
    for one transaction; everything else goes to the real storage."""

    def __init__(self, storage):
        self._storage = storage
        self.params: list[tuple] = []

    def set_trial_param(self, trial_id: int, name: str, value: float, distribution) -> None:
        self.params.append((trial_id, name, value, distribution))

    def __getattr__(self, name: str):
        return getattr(self._storage, name)


@contextmanager
def batched_params(trial):
    """Inside, ``trial.suggest_*`` writes its parameters in one transaction at the end
    (Optuna's SQL storage commits each on its own: about 1 ms apiece). The trial reads
    its own values from its cache, so nothing inside sees the difference. Other storages
    write as usual."""
    try:
        from optuna.storages._cached_storage import _CachedStorage
        from optuna.storages._rdb.storage import RDBStorage
    except ImportError:
        _CachedStorage = RDBStorage = None
    storage = getattr(trial, "storage", None)
    backend = getattr(storage, "_backend", None)
    if (_CachedStorage is None or not isinstance(storage, _CachedStorage) or not isinstance(backend, RDBStorage)
            or not hasattr(backend, "_set_trial_param_without_commit")):
        yield
        return
    buf = _ParamBuffer(storage)
    trial.storage = buf
    try:
        yield
    finally:
        trial.storage = storage
        if buf.params:
            _write_params(storage, backend, buf.params)


def _write_params(cached, backend, params: list[tuple]) -> None:
    from optuna.storages._rdb.storage import _create_scoped_session
    with cached._lock, _create_scoped_session(backend.scoped_session, True) as session:
        for trial_id, name, value, distribution in params:
            study_id, _ = cached._trial_id_to_study_id_and_number[trial_id]
            known = cached._studies[study_id].param_distribution
            backend._set_trial_param_without_commit(session, trial_id, name, value, distribution, known.get(name))
            known.setdefault(name, distribution)


def _record_batched(storage, trial_id, data: dict) -> bool:
    try:  # Optuna's RDB storage writes one attribute per transaction; several go in one here
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import RDBStorage, _create_scoped_session
    except ImportError:
        return False
    backend = getattr(storage, "_backend", storage)
    if trial_id is None or not isinstance(backend, RDBStorage) or not hasattr(backend, "_set_trial_attr_without_commit"):
        return False
    with _create_scoped_session(backend.scoped_session, True) as session:
        for k, v in data.items():
            backend._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, k, v)
    return True
