"""The life of one run, shared by the search and the soup.

:class:`RunLifecycle` is the order every run follows: checks before anything is
created (:meth:`preflight`), the run's name claimed and its lock taken
(:meth:`claim`), its study opened (:meth:`open_study`, with the resume checks in
:meth:`resume_checks`), a Ray session and a worker pool (:meth:`make_pool`), the work
(:meth:`work`), the stopped heartbeat. Whatever happens, the pool and Ray are shut down
and the lock released, and a run folder created by this process is removed when no
study was opened in it (nothing of the run exists yet).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import optuna

from mergesearch.runs.store import check_controller, claim_run, heartbeat, open_storage, recover_stale
from mergesearch.search.workers import WorkerPool, parse_faults, ray_session


class RunLifecycle:
    """Subclasses set ``opts`` (with run, root, storage, resume, workers, ray_address)
    and ``dir``, and implement preflight, open_study, make_pool and work."""

    opts: object
    dir: Path
    study: optuna.Study
    pool: WorkerPool

    def preflight(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def open_study(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def make_pool(self, faults: dict) -> WorkerPool:  # pragma: no cover - abstract
        raise NotImplementedError

    def work(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared steps ---------------------------------------------------------------
    def claim(self) -> None:
        """The run's name checked (free, or present for --resume) and its lock taken."""
        self.url, storage, self.lock, self.created_dir = claim_run(self.opts.run, self.opts.root, self.opts.storage,
                                                                   self.opts.resume)
        if storage is not None:
            self.storage = storage

    def storage_for_study(self):
        """The run's storage, its folder and default SQLite file created on first use."""
        if getattr(self, "storage", None) is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.storage = open_storage(self.url)
        return self.storage

    @staticmethod
    def resume_checks(study: optuna.Study, requeue: bool = True) -> int:
        """Refuse a run whose controller is alive elsewhere; fail (and with ``requeue``
        queue again) the trials the stopped controller left running. Returns their count."""
        check_controller(study)
        return recover_stale(study, requeue=requeue)

    def run(self) -> dict:
        try:
            self.preflight()
            self.open_study()
            heartbeat(self.study)
            with ray_session(self.dir, self.opts.workers, self.opts.ray_address):
                self.pool = self.make_pool(parse_faults(os.environ.get("MERGESEARCH_FAULT")))
                try:
                    summary = self.work()
                finally:
                    self.pool.shutdown()
            heartbeat(self.study, stopped=True)
            return summary
        except BaseException:
            if getattr(self, "created_dir", False) and not hasattr(self, "study"):
                shutil.rmtree(self.dir, ignore_errors=True)  # nothing of this run exists yet
            raise
        finally:
            if getattr(self, "lock", None) is not None:
                self.lock.release()
