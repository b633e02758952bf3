"""Several processes opening one new storage at once: the race to create Optuna's
schema must not fail any of them (seen as an IntegrityError on alembic_version)."""

import multiprocessing as mp


def _open_and_create(url, barrier, q):
    import optuna

    from mergesearch.runs.store import open_storage
    barrier.wait()  # all at once
    try:
        optuna.create_study(study_name=f"s{mp.current_process().name}", storage=open_storage(url))
        q.put("ok")
    except Exception as e:
        q.put(repr(e)[:300])


def test_concurrent_first_opens_of_one_sqlite_file(tmp_path):
    ctx = mp.get_context("spawn")
    for k in range(5):
        url = f"sqlite:///{tmp_path / f'race{k}.db'}"
        barrier, q = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_open_and_create, args=(url, barrier, q), name=str(i)) for i in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [q.get(timeout=10) for _ in procs] == ["ok"] * 3


def test_a_trial_payload_is_one_transaction(tmp_path):
    import optuna
    import sqlalchemy

    from mergesearch.runs.optuna_io import write_attrs as record
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=storage)
    t = study.ask()
    commits = []
    sqlalchemy.event.listen(storage.engine, "commit", lambda conn: commits.append(1))
    payload = {"recipe": {"method": "ties"}, "scores": {"a": 0.5}, "aggregate": 0.5, "worker": 1, "eval_s": 0.2,
               **{f"dev:{k}": 0.1 * k for k in range(5)}}
    record(t, payload)
    assert len(commits) == 1
    record(t, {"aggregate": 0.75})  # an update in place
    assert len(commits) == 2
    study.tell(t, 0.75)
    assert study.trials[0].user_attrs == {**payload, "aggregate": 0.75}
    t2 = study.ask()
    record(t2, {"x": [1, 2]})
    assert t2.user_attrs == {"x": [1, 2]}  # the live trial sees what it recorded


def test_suggested_parameters_are_one_transaction_with_the_same_values(tmp_path):
    import optuna
    import pytest
    import sqlalchemy

    from mergesearch.runs.optuna_io import batched_params

    def suggest(t):
        return [t.suggest_float(f"w{k}", 0.0, 1.5) for k in range(6)] + [t.suggest_categorical("m", ["ties", "dare"])]

    got, per_trial = {}, {}
    for batched in (False, True):
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / f's{batched}.db'}")
        study = optuna.create_study(storage=storage, sampler=optuna.samplers.TPESampler(seed=3, n_startup_trials=2))
        commits = []
        sqlalchemy.event.listen(storage.engine, "commit", lambda conn: commits.append(1))
        values = []
        for _ in range(4):
            t = study.ask()
            n = len(commits)
            if batched:
                with batched_params(t):
                    v = suggest(t)
            else:
                v = suggest(t)
            per_trial.setdefault(batched, []).append(len(commits) - n)
            assert t.params == dict(zip([f"w{k}" for k in range(6)] + ["m"], v))
            study.tell(t, sum(x for x in v if isinstance(x, float)))
            values.append(v)
        got[batched] = (values, [tr.params for tr in study.trials])
    assert got[True] == got[False]  # the sampler saw the same history
    assert per_trial[True] == [c - 6 for c in per_trial[False]]  # seven parameters, one commit
    assert got[True][1][3] == dict(zip([f"w{k}" for k in range(6)] + ["m"], got[True][0][3]))  # stored
    # a parameter whose distribution conflicts with the study's is still refused
    t = study.ask()
    with pytest.raises(ValueError):
        with batched_params(t):
            t.suggest_categorical("w0", ["a", "b"])
