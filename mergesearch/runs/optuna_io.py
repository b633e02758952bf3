"""The one place that uses Optuna's private storage API, for three savings and one
recovery that its public API does not offer:

- :func:`write_attrs`: a trial's user attributes in one transaction on an SQL storage
  (Optuna commits each attribute on its own);
- :func:`batched_params`: a trial's suggested parameters in one transaction;
- :func:`fail_and_requeue`, :func:`fail`: a trial abandoned through no fault of its own
  failed and queued again through Optuna's stale-trial retry;
- :func:`frozen`: a running trial's stored state.

The batched writes fall back to the public API where the private one is missing (another
storage, another Optuna version). Samplers (:mod:`mergesearch.search.cma`) use ``study._storage``
for their system attributes as Optuna's own samplers do; that is the sampler interface.
"""

from __future__ import annotations

from contextlib import contextmanager

import optuna

TrialState = optuna.trial.TrialState


def frozen(study: optuna.Study, trial) -> optuna.trial.FrozenTrial:
    """The stored state of a trial (a live ``optuna.Trial`` or a frozen one)."""
    return study._storage.get_trial(trial._trial_id)


def write_attrs(trial, data: dict) -> None:
    """Store ``data`` (JSON values) as the trial's user attributes, in one transaction on
    an SQL storage; the live trial's cache sees them as ``set_user_attr`` keeps them."""
    if _record_batched(getattr(trial, "storage", None), getattr(trial, "_trial_id", None), data):
        cached = getattr(trial, "_cached_frozen_trial", None)  # what Trial.user_attrs reads
        if cached is not None:
            cached.user_attrs.update(data)
        return
    for k, v in data.items():
        trial.set_user_attr(k, v)


def fail(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str, requeued: bool = False) -> None:
    """Mark a trial failed (whatever its state) with the reason."""
    storage = study._storage
    storage.set_trial_user_attr(trial._trial_id, "reason", reason)
    storage.set_trial_user_attr(trial._trial_id, "requeued", requeued)
    if trial.state == TrialState.RUNNING:
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def fail_and_requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str, max_retry: int) -> bool:
    """Fail a trial and queue it again with the same parameters through Optuna's
    stale-trial retry (``RetryHeartbeatStaleTrialCallback``), at most ``max_retry`` times
    along its retry history. Returns whether it was queued."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    queued = len(trial.system_attrs.get("retry_history", [])) + 1 <= max_retry
    fail(study, trial, reason, queued)
    if queued:
        RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, study._storage.get_trial(trial._trial_id))
    return queued


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
