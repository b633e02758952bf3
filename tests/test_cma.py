"""mergesearch's CMA-ES sampler (mergesearch.search.cma) on real Optuna studies:
restarts actually happen (Optuna's CmaEsSampler accepts ``restart_strategy`` and ignores
it since 4.4), the state survives a new sampler on a stored study, the start point and
step are honoured, and nothing warns."""

import warnings

import numpy as np
import optuna
import pytest

from mergesearch.search.cma import GENERATION, RESTART, CmaSampler, load_state, restarts

from test_zoo_eval import zoo  # noqa: F401  (session fixture)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def plateau(trial):
    # flat almost everywhere: CMA-ES's function-value history goes flat and it stops
    return round(trial.suggest_float("a", 0.0, 1.0) + trial.suggest_float("b", 0.0, 1.0), 0)


def run(sampler, n, storage=None, name="s"):
    study = optuna.create_study(sampler=sampler, storage=storage, study_name=name, load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation, no runtime warning
        study.optimize(plateau, n_trials=n)
    return study


def generations(study):
    return [t.system_attrs.get(GENERATION) for t in study.get_trials()]


def test_ipop_restarts_with_a_doubled_population_and_generations_keep_counting(caplog):
    with caplog.at_level("INFO", logger="mergesearch.search.cma"):
        study = run(CmaSampler(seed=0, population=4, restart="ipop"), 300)
    runs = restarts(study)
    assert caplog.messages == [f"cma-es: run 0 stopped after {runs[0]['generations']} generations of 4; "
                               "restart 1 (ipop, large run): population 8, step 0.167"]
    assert [r["population"] for r in runs] == [4, 8] and [r["regime"] for r in runs] == ["large", "large"]
    # the first run stopped on a criterion: flat history needs more than 10 + 30*2/4 generations
    assert runs[0]["generations"] > 25
    gens = [g for g in generations(study) if g is not None]
    assert gens == sorted(gens)
    first = runs[0]["generations"]
    # the restarted run's trials carry its number and go on from the first run's count
    after = [t for t in study.get_trials() if t.system_attrs.get(RESTART) == 1]
    assert len(after) == 300 - 1 - 4 * first  # trial 0 is drawn independently
    assert min(t.system_attrs[GENERATION] for t in after) == first
    # each told generation is exactly one population
    counts = np.bincount(gens)
    assert set(counts[:first]) == {4} and set(counts[first:-1]) == {8}


def test_without_restart_a_stopped_run_goes_on():
    study = run(CmaSampler(seed=0, population=4), 300)
    assert restarts(study) == [{"restart": 0, "regime": "large", "population": 4,
                                "generations": (300 - 1) // 4}]


def test_bipop_alternates_small_runs_and_growing_large_ones():
    study = run(CmaSampler(seed=0, population=4, restart="bipop"), 700)
    runs = restarts(study)
    assert runs[0]["regime"] == "large" and runs[0]["population"] == 4
    small = [r for r in runs if r["regime"] == "small"]
    large = [r for r in runs[1:] if r["regime"] == "large"]
    assert small and large
    assert all(r["population"] >= 4 for r in small)
    assert [r["population"] for r in large] == [4 * 2 ** (i + 1) for i in range(len(large))]
    # a small run is chosen while the small regime has spent fewer evaluations than the large
    spent = {"small": 0, "large": 0}
    for prev, nxt in zip(runs, runs[1:]):
        spent[prev["regime"]] += prev["population"] * prev["generations"]
        assert nxt["regime"] == ("small" if spent["small"] < spent["large"] else "large")


def test_a_new_sampler_on_the_stored_study_goes_on_where_it_stopped(tmp_path):
    storage = f"sqlite:///{tmp_path / 'cma.db'}"
    run(CmaSampler(seed=0, population=4, restart="ipop"), 150, storage)
    before = restarts(optuna.load_study(study_name="s", storage=storage))
    assert [r["population"] for r in before] == [4, 8]  # restarted before the stop
    last = max(g for g in generations(optuna.load_study(study_name="s", storage=storage)) if g is not None)
    study = run(CmaSampler(seed=1, population=4, restart="ipop"), 50, storage)
    after = restarts(study)
    assert after[0] == before[0] and after[1]["population"] == 8 and after[1]["generations"] > before[1]["generations"]
    new = [g for g in generations(study)[150:]]
    assert None not in new and new == sorted(new) and new[0] in (last, last + 1)


def test_start_point_and_step_are_the_space_s_and_nothing_warns():
    x0 = {"a": 0.9, "b": 0.05}
    study = run(CmaSampler(seed=0, x0=x0, sigma0=1e-3, population=6), 13)
    drawn = [t.params for t in study.get_trials() if t.system_attrs.get(GENERATION) == 0]
    assert len(drawn) == 6
    for p in drawn:  # a step of a thousandth of each range around the start
        assert abs(p["a"] - 0.9) < 0.01 and abs(p["b"] - 0.05) < 0.01
    far = run(CmaSampler(seed=0, population=6), 13, name="centre")
    assert any(abs(t.params["a"] - 0.5) > 0.02 for t in far.get_trials()[1:])


def test_pruned_trials_with_a_value_are_told_when_asked_and_separable_uses_the_diagonal():
    def objective(trial):
        a = trial.suggest_float("a", 0.0, 1.0)
        trial.suggest_float("b", 0.0, 1.0)
        trial.report(a, step=1)
        if trial.number % 2:
            raise optuna.TrialPruned()
        return a

    for consider, told in ((True, 2), (False, 1)):
        s = CmaSampler(seed=0, population=4, consider_pruned=consider, separable=True)
        study = optuna.create_study(sampler=s)
        study.optimize(objective, n_trials=12)
        state = load_state(study.get_trials())
        assert type(state.optimizer).__name__ == "SepCMA"
        # 11 trials asked by CMA-ES: with pruned trials counted, 4 per generation
        # (generations 0 and 1 told); without, only the even ones finish generation 0
        assert state.optimizer.generation == told


def test_a_changed_space_draws_independently_and_bad_restart_is_refused():
    with pytest.raises(ValueError, match="restart"):
        CmaSampler(restart="sep")
    s = CmaSampler(seed=0, population=4)
    study = optuna.create_study(sampler=s)
    study.optimize(plateau, n_trials=6)
    study.optimize(lambda t: t.suggest_float("c", 0.0, 1.0) + t.suggest_float("a", 0.0, 1.0), n_trials=3)
    # trial 6 is asked while every finished trial still has {a, b}; from trial 7 on the
    # shared space is {a}, not the optimizer's
    assert all(t.system_attrs.get(GENERATION) is None for t in study.get_trials()[7:])


@pytest.mark.parametrize("name", ["cmaes", "tpe", "gp", "random", "nsga2"])
def test_every_sampler_a_space_names_is_built_without_a_deprecation_warning(tmp_path, name):
    from mergesearch.search.samplers import make_sampler
    from mergesearch.search.space import SearchSpace

    for m in ("base", "a", "b"):
        (tmp_path / m).mkdir()
    space = SearchSpace.model_validate({
        "base": str(tmp_path / "base"), "models": [str(tmp_path / "a"), str(tmp_path / "b")],
        "methods": ["ties"], "evaluator": {"evaluator": "loglik", "tasks": ["t"]},
        "parameters": {"weight": {"low": 0.0, "high": 1.0}},
        "sampler": {"name": name, **({"x0": {"weight/m0": 0.5}, "sigma0": 0.1, "restart": "ipop"}
                                     if name == "cmaes" else {})}})
    with warnings.catch_warnings():
        # Optuna's ExperimentalWarning (multivariate TPE, GP) is expected; a deprecation is not
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        sampler = make_sampler(space, 2)
    assert isinstance(sampler, CmaSampler if name == "cmaes" else optuna.samplers.BaseSampler)


@pytest.mark.parametrize("separable", [False, True])
def test_the_stored_state_is_plain_json_and_round_trips_exactly(separable):
    import json

    from mergesearch.search.cma import STATE, _decode_state, _encode_state

    s = CmaSampler(seed=0, population=4, restart="ipop", separable=separable)
    study = run(s, 40)
    trial = next(t for t in reversed(study.get_trials()) if any(k.startswith(STATE) for k in t.system_attrs))
    chunks = {int(k[len(STATE):]): v for k, v in trial.system_attrs.items() if k.startswith(STATE)}
    text = "".join(chunks[i] for i in range(len(chunks)))
    data = json.loads(text)  # JSON, not pickle: a shared study database cannot run code here
    state = load_state(study.get_trials())
    again = _decode_state(json.loads(json.dumps(_encode_state(state))))
    a, b = state.optimizer.__getstate__(), again.optimizer.__getstate__()
    assert a.keys() == b.keys() and data["optimizer"]["kind"] == ("SepCMA" if separable else "CMA")
    for k in a:  # (the function-value history starts as np.empty memory: it may hold NaN)
        assert np.array_equal(a[k], b[k], equal_nan=True) if isinstance(a[k], np.ndarray) else a[k] == b[k], k
    state.optimizer._rng.seed(7)
    again.optimizer._rng.seed(7)
    assert np.array_equal(state.optimizer.ask(), again.optimizer.ask())


@pytest.mark.parametrize("population,separable,refused", [(3, False, True), (2, False, True), (4, False, False),
                                                          (2, True, False)])
def test_a_population_cmaes_cannot_learn_from_gets_one_line(tmp_path, zoo, capsys, population, separable, refused):
    from mergesearch.cli import main
    from test_search import write_space

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # cmaes' division by zero
        space = write_space(tmp_path, zoo, sampler={"name": "cmaes", "population": population, "separable": separable})
        code = main(["plan", str(space), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    if refused:
        assert code == 2 and len(err) == 1
        assert "sampler.population: CMA-ES needs at least 4" in err[0] and "space.yaml" in err[0]
    else:
        assert code == 0


class _Uncached(CmaSampler):
    """Decodes the stored state at every ask (the sampler before it kept the decoded one)."""

    def sample_relative(self, study, trial, search_space):
        self._held = None
        return super().sample_relative(study, trial, search_space)


@pytest.mark.parametrize("separable", [False, True])
def test_the_decoded_state_is_kept_per_generation_and_draws_exactly_the_same(monkeypatch, separable):
    import mergesearch.search.cma as cma

    decodes = []
    real = cma._decode_state
    monkeypatch.setattr(cma, "_decode_state", lambda data: decodes.append(1) or real(data))

    def objective(trial):  # three variables, not flat: no restart needed for a long run
        x = [trial.suggest_float(n, 0.0, 1.0) for n in "abc"]
        return sum((v - 0.3) ** 2 for v in x)

    def params(sampler):
        study = optuna.create_study(sampler=sampler)
        study.optimize(objective, n_trials=81)
        return study, [t.params for t in study.get_trials()]

    kept, p_kept = params(CmaSampler(seed=0, population=4, restart="ipop", separable=separable))
    n_kept = len(decodes)
    decodes.clear()
    _, p_each = params(_Uncached(seed=0, population=4, restart="ipop", separable=separable))
    assert p_kept == p_each  # the same numbers, bit for bit, for every trial
    stores = sum(any(k.startswith(cma.STATE) for k in t.system_attrs) for t in kept.get_trials())
    # one decode per stored state (the first run at trial 1, then generation k told at
    # trial 4k + 5: 19 of them); decoded afresh, one more at each of the 79 asks that find
    # a stored state (trial 0 is drawn independently, trial 1 makes the first)
    assert stores == 20 and n_kept == stores and len(decodes) == stores + 79


def test_a_resumed_sampler_decodes_once_per_generation_and_one_sampler_serves_two_databases(tmp_path, monkeypatch):
    import mergesearch.search.cma as cma

    decodes = []
    real = cma._decode_state
    monkeypatch.setattr(cma, "_decode_state", lambda data: decodes.append(1) or real(data))
    from mergesearch.search.cma import _stored_texts

    storage = f"sqlite:///{tmp_path / 'resume.db'}"
    run(CmaSampler(seed=0, population=4), 19, storage)  # stopped after trials 17 and 18 of generation 4
    decodes.clear()
    study = run(CmaSampler(seed=1, population=4), 22, storage)  # trials 19..40: tells at 21, 25, .., 37
    assert len(decodes) == 1 + 5  # the stored state, read once for trials 19 to 21, then one per state stored
    assert restarts(study)[-1]["generations"] == 9

    # one sampler reading two databases whose study and holding trial have the same ids:
    # the state kept from one is never taken for the other's
    def other(trial):
        return (trial.suggest_float("a", 0.0, 1.0) - 0.8) ** 2 + trial.suggest_float("b", 0.0, 1.0)

    studies = []
    for name, objective in (("a", plateau), ("b", other)):
        st = optuna.create_study(sampler=CmaSampler(seed=0, population=4), study_name="s",
                                 storage=f"sqlite:///{tmp_path / name}.db")
        st.optimize(objective, n_trials=21)
        studies.append(st)
    (ka, _, ta), (kb, _, tb) = (next(_stored_texts(st.get_trials())) for st in studies)
    assert studies[0]._study_id == studies[1]._study_id and ka == kb and ta != tb
    reader = CmaSampler(seed=2, population=4)
    for st in studies + studies:
        kept = reader._load(st, st.get_trials())
        assert np.array_equal(kept.optimizer._mean, load_state(st.get_trials()).optimizer._mean)


def test_samplers_taking_turns_on_one_study_never_tell_a_stale_state(tmp_path):
    storage = f"sqlite:///{tmp_path / 'turns.db'}"
    a, b = CmaSampler(seed=0, population=4), CmaSampler(seed=1, population=4)
    for sampler in (a, b, a, b, a):
        run(sampler, 10, storage)
    study = optuna.load_study(study_name="s", storage=storage)
    gens = [g for g in generations(study) if g is not None]
    counts = np.bincount(gens)
    # 49 asked by CMA-ES: generations 0..11 of exactly 4 trials each, then one of the 13th;
    # a sampler telling the state it decoded before the other's turn would repeat a generation
    assert list(counts) == [4] * 12 + [1]
    assert restarts(study)[-1]["generations"] == 12


def _latest_holder(study):
    from mergesearch.search.cma import STATE

    return next(t for t in reversed(study.get_trials()) if any(k.startswith(STATE) for k in t.system_attrs))


def test_a_state_cut_short_by_a_stop_is_passed_over_with_one_warning(tmp_path, caplog):
    from mergesearch.search.cma import STATE, _stored_texts

    storage = f"sqlite:///{tmp_path / 'cut.db'}"
    study = run(CmaSampler(seed=0, population=4), 21, storage)  # generations 0..3 told, state at trial 17
    before = load_state(study.get_trials())
    holder = _latest_holder(study)
    text = next(_stored_texts(study.get_trials()))[2]
    # a controller killed while writing the next generation's state: a trial holding the
    # first chunk only (the state is written a chunk at a time)
    store = optuna.storages.RDBStorage(storage)
    cut = store.create_new_trial(study._study_id)
    store.set_trial_system_attr(cut, f"{STATE}0", text[: len(text) // 2])
    store.set_trial_state_values(cut, optuna.trial.TrialState.FAIL)
    assert load_state(study.get_trials()).optimizer.generation == before.optimizer.generation
    caplog.clear()
    with caplog.at_level("WARNING", logger="mergesearch.search.cma"):
        study = run(CmaSampler(seed=1, population=4), 12, storage)
    assert caplog.messages == [f"cma-es: the state stored with trial {store.get_trial_number_from_id(cut)} is "
                               "incomplete (a run stopped while writing it, or is writing it now); going on from the "
                               "one stored before it"]
    gens = [g for g in generations(study) if g is not None]
    assert list(np.bincount(gens)) == [4] * 8  # generations 4..7 asked on top of the four told
    assert restarts(study)[-1]["generations"] == 7 and _latest_holder(study).number > holder.number


def test_a_state_another_process_is_writing_is_read_once_it_is_whole(tmp_path, caplog):
    from mergesearch.search.cma import STATE, _stored_texts

    storage = f"sqlite:///{tmp_path / 'writing.db'}"
    study = run(CmaSampler(seed=0, population=4), 21, storage)
    held_before = _latest_holder(study)._trial_id
    text = next(_stored_texts(study.get_trials()))[2]
    store = optuna.storages.RDBStorage(storage)
    writing = store.create_new_trial(study._study_id)  # running: its writer is still at it
    store.set_trial_system_attr(writing, f"{STATE}0", text[: len(text) // 2])
    reader = CmaSampler(seed=1, population=4)
    with caplog.at_level("WARNING", logger="mergesearch.search.cma"):
        for _ in range(3):  # asks in between: one warning, the state before it used
            reader._load(study, study.get_trials())
            assert reader._held[0] == (study._study_id, held_before)
        assert len(caplog.messages) == 1
        store.set_trial_system_attr(writing, f"{STATE}1", text[len(text) // 2:])
        state = reader._load(study, study.get_trials())
    assert reader._held[0] == (study._study_id, writing) and len(caplog.messages) == 1
    assert state.optimizer.generation == load_state(study.get_trials()).optimizer.generation == 4


def test_a_state_stored_as_lists_of_numbers_still_resumes(tmp_path):
    import json

    from mergesearch.search.cma import STATE, _encode_state, _stored_texts

    storage = f"sqlite:///{tmp_path / 'old.db'}"
    study = run(CmaSampler(seed=0, population=4), 21, storage)
    state = load_state(study.get_trials())
    data = json.loads(next(_stored_texts(study.get_trials()))[2])
    assert data["optimizer"]["state"]["_B"] is None  # the eigendecomposition is not stored
    assert all("z" in v for v in data["optimizer"]["state"].values() if isinstance(v, dict))
    # the format before: every array as a list of its numbers
    old = _encode_state(state)
    old["optimizer"]["state"] = {k: ({"array": v.tolist(), "dtype": str(v.dtype), "shape": list(v.shape)}
                                     if isinstance(v, np.ndarray) else v)
                                 for k, v in state.optimizer.__getstate__().items()}
    text = json.dumps(old)
    store = optuna.storages.RDBStorage(storage)
    holder = store.create_new_trial(study._study_id)
    for i in range(0, len(text), 2000):
        store.set_trial_system_attr(holder, f"{STATE}{i // 2000}", text[i:i + 2000])
    store.set_trial_state_values(holder, optuna.trial.TrialState.FAIL)
    again = load_state(study.get_trials())
    for k, v in state.optimizer.__getstate__().items():
        w = again.optimizer.__getstate__()[k]
        # (the function-value history starts as np.empty memory: it may hold NaN)
        assert np.array_equal(v, w, equal_nan=True) if isinstance(v, np.ndarray) else v == w, k
    study = run(CmaSampler(seed=1, population=4), 8, storage)
    # trial 21 holds the old-format state; generation 4 (trials 17..20) is told at trial 22,
    # generation 5 (22..25) at trial 26
    assert restarts(study)[-1]["generations"] == 6
