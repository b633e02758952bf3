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
