"""The CMA-ES sampler's cost per ask on a real SQLite study, for spaces of 17 variables
(the zoo's per-group TIES space), 100 and 300 (per-layer spaces of LLMs: a weight and a
density per model and layer). The sampler stores its state as JSON in the study; it keeps
the state it decoded and decodes again only when the stored text changes (once per
generation), and stores arrays as compressed bytes. The reference, in the same process:
the sampler as it was before (decoding at every ask, arrays as lists of numbers). Prints
the stored state's size, the milliseconds of an ask that only draws and of the ask that
tells a generation and stores the state, and the ratios.

    .venv/bin/python scripts/bench_cma.py              # about a minute on 2 cores
    .venv/bin/python scripts/bench_cma.py --dims 17 --generations 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import optuna  # noqa: E402

from mergesearch.search.cma import CHUNK, STATE, CmaSampler, _stored_texts  # noqa: E402


class Decoding(CmaSampler):
    """The reference: the sampler before commit 66048a1 (2026-11-27). It decodes the stored state at every ask
    and stores every array as a list of its numbers, the eigendecomposition too when it is
    set (with restarts on; this benchmark runs without, so the sizes here do not show it)."""

    def sample_relative(self, study, trial, search_space):
        self._held = None
        return super().sample_relative(study, trial, search_space)

    def _store(self, study, trial, state) -> None:
        opt = state.optimizer
        arrays = {k: ({"array": v.tolist(), "dtype": str(v.dtype), "shape": list(v.shape)}
                      if isinstance(v, np.ndarray) else v.item() if isinstance(v, np.generic) else v)
                  for k, v in opt.__getstate__().items()}
        fields = {k: v for k, v in state.__dict__.items() if k != "optimizer"}
        text = json.dumps({"optimizer": {"kind": type(opt).__name__, "state": arrays}, **fields})
        for i in range(0, max(1, math.ceil(len(text) / CHUNK))):
            study._storage.set_trial_system_attr(trial._trial_id, f"{STATE}{i}", text[i * CHUNK:(i + 1) * CHUNK])
        self._held = None


def ask_ms(cls, dims: int, generations: int, folder: Path) -> dict:
    """Over the asks of the last generation: the median ms in ``sample_relative`` (an ask
    that only draws), the ms of the ask that tells the generation and stores the state,
    the population, and the stored state's size in characters."""
    sampler = cls(seed=0)
    spent: list[float] = []
    inner = sampler.sample_relative

    def timed(study, trial, space):
        t0 = time.perf_counter()
        out = inner(study, trial, space)
        spent.append(time.perf_counter() - t0)
        return out
    sampler.sample_relative = timed
    names = [f"x{i:03d}" for i in range(dims)]

    def objective(trial):
        return sum((trial.suggest_float(n, 0.0, 1.0) - 0.3) ** 2 for n in names)

    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / f'{cls.__name__}_{dims}.db'}")
    study = optuna.create_study(sampler=sampler, storage=storage, study_name="bench")
    population = 4 + int(3 * math.log(dims))
    # trial 0 is drawn independently; generation k is told by the ask of trial 4k + 5 (for
    # a population of 4): the last population of asks starts with a telling one
    study.optimize(objective, n_trials=1 + population * (generations + 1))
    last = spent[-population:]
    size = len(next(_stored_texts(study.get_trials(deepcopy=False)))[2])
    return {"draw": statistics.median(last[1:]), "store": last[0], "population": population, "size": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="17,100,300")
    ap.add_argument("--generations", type=int, default=3, help="generations told before the measured one")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print("ms per ask (median of a generation's drawing asks) and for the ask that tells and stores the state;")
    print("before: the sampler decoding the stored state at every ask, arrays stored as lists of numbers")
    print(f"{'variables':>9} {'population':>10} | {'state chars: before':>19} {'now':>9} "
          f"| {'draw: before':>12} {'now':>7} {'ratio':>6} | {'tell+store: before':>18} {'now':>7} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for dims in (int(d) for d in args.dims.split(",")):
            ref = ask_ms(Decoding, dims, args.generations, Path(tmp))
            kept = ask_ms(CmaSampler, dims, args.generations, Path(tmp))
            print(f"{dims:>9} {kept['population']:>10} | {ref['size']:>19,} {kept['size']:>9,} "
                  f"| {1000 * ref['draw']:>9.2f} ms {1000 * kept['draw']:>7.2f} {kept['draw'] / ref['draw']:>6.3f} "
                  f"| {1000 * ref['store']:>15.0f} ms {1000 * kept['store']:>7.0f} {kept['store'] / ref['store']:>6.3f}")


if __name__ == "__main__":
    main()
