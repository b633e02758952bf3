"""The search layer's wiring of curvature estimates: which metric and Gram files a
space's methods need, per model, computed once (cached on disk) before any worker starts.
The estimators themselves (:mod:`mergesearch.search.curvature`) know nothing of spaces."""

from __future__ import annotations

import logging
import time

from mergesearch.sources import key, short
from mergesearch.search.curvature import curvature, mean_estimate

log = logging.getLogger(__name__)


def resolve_side_inputs(space, progress: bool = False) -> dict | None:
    """The metric and Gram files a space's methods need, per model path (computed once,
    cached): {"metrics": {path: file or None}, "grams": {path: file}, "base_metric": file}."""
    c, g = space.curvature, space.gram
    if c is None and g is None:
        return None
    task_dir = space.evaluator.task_dir
    trc = space.evaluator.trust_remote_code
    n = len(space.models)

    def per_model(d):
        return [d] * n if isinstance(d, str) else list(d)
    out: dict = {"metrics": {}, "grams": {}, "base_metric": None}
    if c is not None:
        identity = {key(m) for m in c.identity}
        data = per_model(c.data) if c.data is not None else [None] * n
        for i, m in enumerate(space.models):
            if key(m) in identity:
                out["metrics"][m] = None
            elif c.kind == "files":
                out["metrics"][m] = c.files[i]
            else:
                t0 = time.perf_counter()
                path, cached = curvature(m, c.kind, data[i], task_dir, c.n_examples, c.batch_size, c.seed,
                                         trust_remote_code=trc)
                log.info("curvature %s of %s: %s (%.1fs)", c.kind, short(m), "cached" if cached else "computed",
                         time.perf_counter() - t0)
                out["metrics"][m] = str(path)
        if c.base_file:
            out["base_metric"] = c.base_file
        elif c.base_data is not None:
            kind = "empirical_fisher" if c.kind in ("adam", "files") else c.kind
            files = [curvature(space.base, kind, d, task_dir, c.n_examples, c.batch_size, c.seed,
                               trust_remote_code=trc)[0]
                     for d in ([c.base_data] if isinstance(c.base_data, str) else c.base_data)]
            out["base_metric"] = str(files[0]) if len(files) == 1 else str(mean_estimate(files))
    if g is not None:
        for m, d in zip(space.models, per_model(g.data)):
            out["grams"][m] = str(curvature(m, "gram", d, task_dir, g.n_examples, g.batch_size,
                                            trust_remote_code=trc)[0])
    return out
