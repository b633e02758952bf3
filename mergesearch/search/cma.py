"""CMA-ES as an Optuna sampler, with restarts (IPOP, BIPOP), a start point and a step.

Optuna's own CmaEsSampler dropped restarts in 4.4 (``restart_strategy`` is accepted and
ignored, with a FutureWarning) and deprecated ``x0`` and ``sigma0`` in 4.9, so a space's
``sampler: {x0, sigma0, restart}`` would warn and, for restarts, silently do nothing.
This sampler drives the ``cmaes`` package's CMA / SepCMA directly:

- Variables are mapped to the unit cube (log-scaled where the distribution is), so
  ``sigma0`` is a fraction of each range (default 1/6) and ``x0`` is given in the
  variables' own units.
- A generation is told once ``population`` trials asked from it have finished (complete,
  or pruned with a reported value when ``consider_pruned``); trials asked beyond that, by
  parallel workers, are scored but not told.
- When the optimizer meets a stopping criterion it restarts from a uniformly random mean:
  IPOP doubles the population each time; BIPOP alternates between doubling runs and small
  runs with a smaller, randomly drawn population and step, choosing the regime that has
  spent fewer evaluations so far (Hansen, 2009).
- The state (optimizer and restart bookkeeping) is stored as JSON (no pickle: a study
  may live in a shared database) in the system attributes of the trial whose ask told the
  last generation, so a resumed study goes on where it stopped. Each asked trial records
  its generation, counted across restarts, in ``mergesearch:cma:generation``, and its
  restart in ``mergesearch:cma:restart``. Arrays are stored as their compressed bytes in
  base64 (the covariance of 300 variables: about 0.5 MB of text instead of 1.8 MB; its
  eigendecomposition, a cache, not at all), in chunks of 2,000 characters. A state a
  stopped run left half written is passed over, with a warning, for the one before it.
- The sampler keeps the state it decoded with the text it came from, so the asks of one
  generation decode it once; a different text (a new generation, another sampler on the
  same study) is decoded afresh.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import math
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.search_space import IntersectionSearchSpace
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

PREFIX = "mergesearch:cma:"
GENERATION = PREFIX + "generation"
RESTART = PREFIX + "restart"
STATE = PREFIX + "state:"
CHUNK = 2000  # an RDB storage keeps a system attribute under 2,046 characters


@dataclass
class _State:
    optimizer: Any
    names: list[str]
    restart: int = 0
    offset: int = 0  # generations of the earlier runs, so generation numbers keep rising
    default_population: int = 0
    large_runs: int = 0  # BIPOP: runs in the large regime after the first
    evals_large: int = 0
    evals_small: int = 0
    regime: str = "large"
    history: list[dict] = field(default_factory=list)  # one entry per finished run


class _Unit:
    """The variables' values <-> the unit cube."""

    def __init__(self, space: dict[str, BaseDistribution]):
        self.names = sorted(space)
        self.dists = [space[n] for n in self.names]
        self.lo = np.array([math.log(d.low) if d.log else d.low for d in self.dists], dtype=float)
        self.hi = np.array([math.log(d.high) if d.log else d.high for d in self.dists], dtype=float)

    def to_unit(self, params: dict[str, Any]) -> np.ndarray:
        v = np.array([math.log(params[n]) if d.log else float(params[n]) for n, d in zip(self.names, self.dists)])
        return np.clip((v - self.lo) / (self.hi - self.lo), 0.0, 1.0)

    def from_unit(self, x: np.ndarray) -> dict[str, Any]:
        out = {}
        for i, (n, d) in enumerate(zip(self.names, self.dists)):
            v = self.lo[i] + float(np.clip(x[i], 0.0, 1.0)) * (self.hi[i] - self.lo[i])
            v = math.exp(v) if d.log else v
            if isinstance(d, IntDistribution):
                step = d.step or 1
                v = int(min(d.high, max(d.low, d.low + round((v - d.low) / step) * step)))
            else:
                if d.step is not None:
                    v = d.low + round((v - d.low) / d.step) * d.step
                v = min(d.high, max(d.low, v))
            out[n] = v
        return out


class CmaSampler(optuna.samplers.BaseSampler):
    def __init__(self, seed: Optional[int] = None, population: Optional[int] = None, x0: Optional[dict] = None,
                 sigma0: Optional[float] = None, restart: Optional[str] = None, separable: bool = False,
                 n_startup_trials: int = 0, consider_pruned: bool = False):
        if restart not in (None, "ipop", "bipop"):
            raise ValueError(f"restart: {restart!r} (ipop or bipop)")
        self.seed = seed
        self.population = population
        self.x0 = x0
        self.sigma0 = sigma0
        self.restart = restart
        self.separable = separable
        self.n_startup_trials = n_startup_trials
        self.consider_pruned = consider_pruned
        self._rng = np.random.RandomState(seed)
        self._space = IntersectionSearchSpace()
        self._independent = optuna.samplers.RandomSampler(seed=seed)
        # the state decoded from the stored text it was read from, so the asks of one
        # generation decode it once: ((study, holding trial), text, state)
        self._held: Optional[tuple[tuple[int, int], str, _State]] = None
        # states found cut short, by the length of text seen: a stopped run's never grow,
        # one being written by another process does, and is read again when it has
        self._incomplete: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()  # one ask at a time: they share the decoded state

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- Optuna's interface ---------------------------------------------------------
    def reseed_rng(self) -> None:
        self._rng = np.random.RandomState()
        self._independent.reseed_rng()

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return {n: d for n, d in self._space.calculate(study).items()
                if isinstance(d, (FloatDistribution, IntDistribution)) and not d.single()}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._independent.sample_independent(study, trial, param_name, param_distribution)

    def sample_relative(self, study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict:
        if not search_space:
            return {}
        with self._lock:
            return self._sample(study, trial, search_space)

    def _sample(self, study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict:
        if study._is_multi_objective():
            raise ValueError("CMA-ES optimizes one objective (use nsga2 for several)")
        trials = study.get_trials(deepcopy=False)
        told = self._finished(trials)
        if len(told) < self.n_startup_trials:
            return {}
        unit = _Unit(search_space)
        state = self._load(study, trials)
        if state is not None and state.names != unit.names:
            return {}  # the space changed under the study: draw this trial independently
        changed = state is None
        if state is None:
            state = self._first_run(unit)
        opt = state.optimizer
        gen = state.offset + opt.generation
        solutions = [t for t in told if t.system_attrs.get(GENERATION) == gen]
        if len(solutions) >= opt.population_size:
            self._held = None  # telling changes the state read from the stored text
            sign = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
            opt.tell([(unit.to_unit(t.params), sign * t.value) for t in solutions[:opt.population_size]])
            if self.restart and opt.should_stop():
                self._restart(state, unit)
            changed = True
        if changed:
            self._store(study, trial, state)
        opt = state.optimizer
        opt._rng.seed(int(self._rng.randint(1, 2 ** 16)) + trial.number)
        x = opt.ask()
        study._storage.set_trial_system_attr(trial._trial_id, GENERATION, state.offset + opt.generation)
        study._storage.set_trial_system_attr(trial._trial_id, RESTART, state.restart)
        return unit.from_unit(x)

    def before_trial(self, study, trial) -> None:
        self._independent.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._independent.after_trial(study, trial, state, values)

    # -- runs and restarts ----------------------------------------------------------
    def _finished(self, trials: list[FrozenTrial]) -> list[FrozenTrial]:
        out = []
        for t in trials:
            if t.state == TrialState.COMPLETE:
                out.append(t)
            elif self.consider_pruned and t.state == TrialState.PRUNED and t.intermediate_values:
                value = t.intermediate_values[max(t.intermediate_values)]
                if value is not None and math.isfinite(value):
                    t = copy.deepcopy(t)
                    t.value = value
                    out.append(t)
        return out

    def _make(self, mean: np.ndarray, sigma: float, population: Optional[int]):
        import cmaes

        dim = len(mean)
        bounds = np.array([[0.0, 1.0]] * dim)
        seed = int(self._rng.randint(1, 2 ** 31 - 2))
        sigma = max(sigma, 1e-10)
        if self.separable and dim > 1:
            return cmaes.SepCMA(mean=mean, sigma=sigma, bounds=bounds, seed=seed,
                                n_max_resampling=10 * dim, population_size=population)
        return cmaes.CMA(mean=mean, sigma=sigma, bounds=bounds, seed=seed,
                         n_max_resampling=10 * dim, population_size=population)

    def _sigma0(self) -> float:
        return self.sigma0 if self.sigma0 is not None else 1 / 6

    def _first_run(self, unit: _Unit) -> _State:
        if self.x0:
            missing = [n for n in unit.names if n not in self.x0]
            mean = unit.to_unit({**{n: v for n, v in self.x0.items() if n in unit.names},
                                 **{n: _centre(d) for n, d in zip(unit.names, unit.dists) if n in missing}})
        else:
            mean = np.full(len(unit.names), 0.5)
        opt = self._make(mean, self._sigma0(), self.population)
        return _State(optimizer=opt, names=unit.names, default_population=opt.population_size)

    def _restart(self, state: _State, unit: _Unit) -> None:
        old = state.optimizer
        spent = old.generation * old.population_size
        if state.regime == "large":
            state.evals_large += spent
        else:
            state.evals_small += spent
        state.history.append({"restart": state.restart, "regime": state.regime,
                              "population": old.population_size, "generations": old.generation})
        state.offset += old.generation
        state.restart += 1
        mean = self._rng.uniform(0.0, 1.0, len(unit.names))
        sigma = self._sigma0()
        if self.restart == "bipop" and state.evals_small < state.evals_large:
            # a small run: a population between the default and half the latest large
            # one (never below the default), and a step down to a hundredth of the initial
            u = self._rng.uniform()
            large = state.default_population * 2 ** state.large_runs
            population = max(state.default_population,
                             int(state.default_population * (0.5 * large / state.default_population) ** (u * u)))
            sigma *= 10 ** (-2 * u)
            state.regime = "small"
        else:
            state.large_runs += 1
            population = state.default_population * 2 ** state.large_runs
            state.regime = "large"
        state.optimizer = self._make(mean, sigma, population)
        log.info("cma-es: run %d stopped after %d generations of %d; restart %d (%s, %s run): population %d, "
                 "step %.3g", state.restart - 1, old.generation, old.population_size, state.restart, self.restart,
                 state.regime, population, sigma)

    # -- persistence ----------------------------------------------------------------
    def _store(self, study, trial: FrozenTrial, state: _State) -> None:
        self._held = None
        text = json.dumps(_encode_state(state))
        for i in range(0, max(1, math.ceil(len(text) / CHUNK))):
            study._storage.set_trial_system_attr(trial._trial_id, f"{STATE}{i}", text[i * CHUNK:(i + 1) * CHUNK])
        # the next asks go on from the stored text, decoded once here (not from ``state``:
        # the text rounds the covariance to its upper triangle, and a resumed study reads
        # the text, so both must see the same numbers)
        self._held = ((study._study_id, trial._trial_id), text, _decode_state(json.loads(text)))

    def _load(self, study, trials: list[FrozenTrial]) -> Optional[_State]:
        """The latest stored state, decoded only when its text differs from the last one
        decoded (another sampler on the same study, a resume, a new generation)."""
        for trial_id, number, text in _stored_texts(trials):
            key = (study._study_id, trial_id)
            held = self._held
            if held is not None and held[0] == key and held[1] == text:
                return held[2]
            if self._incomplete.get(key) == len(text):
                continue
            data = _parse(text, number, warn=key not in self._incomplete)
            if data is None:
                self._incomplete[key] = len(text)
                continue
            state = _decode_state(data)
            self._held = (key, text, state)
            return state
        return None


def _stored_texts(trials: list[FrozenTrial]):
    """(holding trial's id and number, JSON text) of each stored state among ``trials``,
    latest first."""
    for t in reversed(trials):
        chunks = {k: v for k, v in t.system_attrs.items() if k.startswith(STATE)}
        if chunks:
            # chunks are written in order: a write cut short leaves a prefix
            yield t._trial_id, t.number, "".join(chunks.get(f"{STATE}{i}", "") for i in range(len(chunks)))


def _parse(text: str, number: int, warn: bool = True) -> Optional[dict]:
    """The stored state's data, or None for a text cut short (a run stopped while writing
    it, or another process is writing it: the JSON object lacks its end), with a warning."""
    try:
        return json.loads(text)
    except ValueError:
        if warn:
            log.warning("cma-es: the state stored with trial %d is incomplete (a run stopped while writing it, or "
                        "is writing it now); going on from the one stored before it", number)
        return None


def load_state(trials: list[FrozenTrial]) -> Optional[_State]:
    """The latest complete stored state among ``trials`` (None before the first)."""
    for _, number, text in _stored_texts(trials):
        data = _parse(text, number)
        if data is not None:
            return _decode_state(data)
    return None


def _plain(v):
    if isinstance(v, np.ndarray):
        # the array's bytes (little-endian), compressed, in base64: exact, and a fraction
        # of the text of its numbers (a zero matrix takes almost nothing)
        raw = np.ascontiguousarray(v, dtype=v.dtype.newbyteorder("<")).tobytes()
        return {"z": base64.b64encode(zlib.compress(raw, 6)).decode("ascii"), "dtype": str(v.dtype),
                "shape": list(v.shape)}
    if isinstance(v, np.generic):
        return v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cma state: cannot store a {type(v).__name__}")


def _value(v):
    if isinstance(v, dict) and "z" in v:
        raw = zlib.decompress(base64.b64decode(v["z"]))
        dtype = np.dtype(v["dtype"])
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(v["shape"])
    if isinstance(v, dict) and "array" in v:  # states stored as lists of numbers (before commit 66048a1 (2026-11-27))
        return np.array(v["array"], dtype=v["dtype"]).reshape(v["shape"])
    return v


def _encode_state(state: _State) -> dict:
    """The state as JSON-able data: the optimizer by its own ``__getstate__`` (numbers and
    arrays; its random generator is reseeded at every ask anyway)."""
    opt = state.optimizer
    kind = type(opt).__name__
    if kind not in ("CMA", "SepCMA"):
        raise TypeError(f"cma state: unknown optimizer {kind}")
    fields = {k: v for k, v in state.__dict__.items() if k != "optimizer"}
    data = opt.__getstate__()
    for k in ("_B", "_D"):  # the covariance's eigendecomposition: a cache the next ask rebuilds
        if k in data:
            data[k] = None
    return {"optimizer": {"kind": kind, "state": {k: _plain(v) for k, v in data.items()}}, **fields}


def _decode_state(data: dict) -> _State:
    import cmaes

    o = data.pop("optimizer")
    cls = {"CMA": cmaes.CMA, "SepCMA": cmaes.SepCMA}[o["kind"]]
    opt = cls.__new__(cls)
    opt.__setstate__({k: _value(v) for k, v in o["state"].items()})
    return _State(optimizer=opt, **data)


def _centre(d: BaseDistribution) -> float:
    return math.exp((math.log(d.low) + math.log(d.high)) / 2) if d.log else (d.low + d.high) / 2


def restarts(study: optuna.Study) -> list[dict]:
    """The finished runs of a study's CMA-ES (restart, regime, population, generations),
    then the current one, from the stored state; [] before the first generation is told."""
    s = load_state(study.get_trials(deepcopy=False))
    if s is None:
        return []
    return s.history + [{"restart": s.restart, "regime": s.regime, "population": s.optimizer.population_size,
                         "generations": s.optimizer.generation}]
