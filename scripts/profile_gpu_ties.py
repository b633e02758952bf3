"""Where a TIES candidate's time goes on a GPU.

1. A micro-benchmark of the 1-D k-th value: ``torch.kthvalue`` against a sort.
2. For the zoo (39 small tensors) and the bench family of ``scripts/bench_merge.py`` (111
   tensors, 0.44B parameters a model, bf16): the candidate time of the Materializer on the
   device (median, synchronized), then ``torch.profiler``'s top operators by CPU and by
   device time for one candidate; the same with every remaining ``torch.kthvalue`` call
   replaced by a sort, and whether the two give the same bits.

    python scripts/profile_gpu_ties.py [cuda|cpu]      # needs results/zoo (mergesearch zoo build)
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from mergesearch.engine.materialize import Materializer  # noqa: E402
from mergesearch.engine.models import load_model  # noqa: E402
from mergesearch.recipe import from_dict  # noqa: E402

DEV = sys.argv[1] if len(sys.argv) > 1 else "cuda"
KTHVALUE = torch.kthvalue


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def kth_by_sort(a, k, *args, **kw):
    if a.dim() == 1 and not args and not kw:
        return types.SimpleNamespace(values=torch.sort(a).values[k - 1])
    return KTHVALUE(a, k, *args, **kw)


def timed(fn, reps: int) -> list[float]:
    fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def digests(model) -> dict[str, str]:
    return {n: hashlib.blake2b(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy(),
                               digest_size=16).hexdigest() for n, t in model.state_dict().items()}


def candidate(label: str, base: Path, fts: list[Path], dtype: str, recipe, reps: int) -> None:
    model, _ = load_model(base, device=DEV, dtype=dtype)
    mat = Materializer(str(base), [str(p) for p in fts], methods=["ties"], device=DEV, check=False)
    out = {}
    for mode in ("as is", "kthvalue by sort"):
        torch.kthvalue = KTHVALUE if mode == "as is" else kth_by_sort
        mat.write_into(model, recipe)
        ts = timed(lambda: mat.write_into(model, recipe), reps)
        out[mode] = digests(model)
        print(f"{label} ties candidate [{mode}] median {statistics.median(ts) * 1e3:.1f} ms of {reps}: "
              f"{[round(t * 1e3, 1) for t in ts]}", flush=True)
        if mode == "as is":
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
            with profile(activities=acts) as p:
                mat.write_into(model, recipe)
                sync()
            ka = p.key_averages()
            print(ka.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))
            if DEV == "cuda":
                print(ka.table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=40))
    torch.kthvalue = KTHVALUE
    same = sum(out["as is"][n] == d for n, d in out["kthvalue by sort"].items())
    print(f"{label}: kthvalue by sort equals as is in {same}/{len(out['as is'])} tensors", flush=True)
    mat.close()


def ties(base: Path, fts: list[Path]):
    return from_dict({"method": "ties", "base": str(base), "parameters": {"lambda": 1.5},
                      "models": [{"path": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in fts]})


def main() -> int:
    print("1-D k-th value on", DEV)
    for n in (10_000, 100_000, 1_000_000, 6_000_000):
        x = torch.rand(n, device=DEV)
        for name, f in (("kthvalue", lambda: KTHVALUE(x, n // 2)), ("sort", lambda: torch.sort(x))):
            print(f"  n={n:>9} {name:9} {statistics.median(timed(f, 5)) * 1e3:8.3f} ms")
    zoo = ROOT / "results" / "zoo"
    fts = [zoo / f"ft_{t}" for t in ("reverse", "shift", "max", "add")]
    candidate("zoo", zoo / "base", fts, "float32", ties(zoo / "base", fts), 7)
    if DEV == "cuda":
        from bench_merge import FULL, N_MODELS, family_dir, recipe_dict

        from mergesearch.zoo.synthetic import make_family
        fam = make_family(family_dir(Path("/tmp/bench_cache"), FULL), n_models=N_MODELS, dtype="bfloat16",
                          noise=0.002, seed=0, **FULL)
        base, ffts = fam["base"], [fam[f"ft{k}"] for k in range(N_MODELS)]
        candidate("family", base, ffts, "bfloat16", from_dict(recipe_dict("ties", base, ffts)), 3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
