"""Several processes opening one new storage at once: the race to create Optuna's
schema must not fail any of them (seen as an IntegrityError on alembic_version)."""

import multiprocessing as mp


def _open_and_create(url, barrier, q):
    import optuna

    from mergesearch.store import open_storage
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

    from mergesearch.store import record
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
