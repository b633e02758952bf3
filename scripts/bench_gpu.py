"""GPU check: the CUDA path of the materializer, the plan's device figures, and a worker.

Run where a CUDA device is visible (it also runs on a CPU, for a smoke test: then every
"device" figure is the CPU's). Two parts, each printed as it goes and written to
``--out-json``:

1. **Family** (the bench family of ``scripts/bench_merge.py``: base + 3 bf16 fine-tunes,
   0.44B parameters each; ``--small`` for a tiny one). For task_arithmetic, ties and
   dare_ties, the streamed export is written on the device and on the CPU. Then, on the
   device, for each placement (all inputs resident; 2 fine-tunes on the host; 3 on the
   host, staged through the pinned slots and the copy stream), a Materializer writes the
   same recipe into a bf16 evaluation model:
   - set-up time, candidate time (median of ``--repeat`` after a warm-up, synchronized),
     bytes moved from the host per candidate, against 1.5 x moved / measured host-to-device
     bandwidth + the all-resident candidate;
   - peak device memory (``torch.cuda.max_memory_allocated`` above what was allocated
     before) against the plan's device bytes (inputs + evaluation model + scratch +
     staging; the plan's reserve is left out of the comparison);
   - bit-equality, tensor by tensor, with the device export and with the CPU export.
   The CPU default placement (in place, every core) gives the CPU candidate time.
2. **Worker** (``--zoo``: a built zoo): a :class:`mergesearch.search.workers.Worker` on the
   device scores the hand-tuned TIES merge on dev, then refines it by gradient descent;
   the same on the CPU, in a child process that sees no CUDA device. Scores and times of
   both.

    python scripts/bench_gpu.py --zoo results/zoo --out-json gpu.json
    python scripts/bench_gpu.py --small --zoo results/zoo --no-worker-cpu   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench_merge import FULL, GB, N_MODELS, SMALL, family_dir, recipe_dict, tensor_digests  # noqa: E402

METHODS = ("task_arithmetic", "ties", "dare_ties")
# (label, inputs resident: base first, then fine-tunes)
PLACEMENTS = [("all resident", 4), ("2 on host", 2), ("3 on host", 1)]
ZOO_TASKS = ["reverse", "shift", "max", "add"]


def sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def module_digests(model) -> dict[str, str]:
    import hashlib

    import torch
    return {n: hashlib.blake2b(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy(),
                               digest_size=16).hexdigest() for n, t in model.state_dict().items()}


def max_abs_diff(model, folder: Path) -> float:
    from safetensors import safe_open
    sd = model.state_dict()
    worst = 0.0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                if name in sd:
                    d = (sd[name].detach().float().cpu() - h.get_tensor(name).float()).abs().max().item()
                    worst = max(worst, d)
    return worst


def family_part(a, device: str, res: dict) -> None:
    import torch

    from mergesearch.engine.materialize import Materializer
    from mergesearch.engine.merge import open_plan, stream_merge
    from mergesearch.engine.models import load_model
    from mergesearch.engine.plan import make_plan
    from mergesearch.recipe import from_dict
    from mergesearch.zoo.synthetic import make_family

    shape = SMALL if a.small else FULL
    t0 = time.perf_counter()
    fam = make_family(family_dir(a.cache, shape), n_models=N_MODELS, dtype="bfloat16", noise=0.002, seed=0, **shape)
    base, fts = fam["base"], [fam[f"ft{k}"] for k in range(N_MODELS)]
    res["family"] = {**shape, "generate_s": time.perf_counter() - t0,
                     "model_bytes": sum(f.stat().st_size for f in base.glob("*.safetensors"))}
    print(f"family {shape}: {res['family']['model_bytes'] / GB:.2f} GB a model, "
          f"made in {res['family']['generate_s']:.1f} s", flush=True)
    work = a.cache / f"gpu-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    cuda = device.startswith("cuda")
    rows = res.setdefault("rows", [])
    try:
        for method in a.methods:
            recipe = from_dict(recipe_dict(method, base, fts))
            digests, exports = {}, {}
            for where in dict.fromkeys([device] + ([] if a.no_cpu else ["cpu"])):
                out = work / f"export-{method}-{where.replace(':', '')}"
                t0 = time.perf_counter()
                stream_merge(open_plan(recipe), out, device=where, force=True)
                exports[where] = time.perf_counter() - t0
                digests[where] = tensor_digests(out)
                if where != "cpu":
                    shutil.rmtree(out)
            cpu_export = work / f"export-{method}-cpu"
            print(f"{method}: export {', '.join(f'{w} {s:.2f} s' for w, s in exports.items())}", flush=True)
            for label, k in PLACEMENTS:
                free = make_plan(str(base), [str(p) for p in fts], [method], device=device, stream="copy")
                plan = make_plan(str(base), [str(p) for p in fts], [method], device=device,
                                 budget=free.budget_for(k), stream="copy",
                                 bandwidth={"device": free.bandwidth["device"], "link": free.bandwidth["link"],
                                            "source": free.bandwidth.get("source", "")})
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                model, _ = load_model(Path(base), device=device, dtype="bfloat16")
                t0 = time.perf_counter()
                mat = Materializer(str(base), [str(p) for p in fts], methods=[method], device=device,
                                   placement=plan, check=False)
                sync(device)
                setup = time.perf_counter() - t0
                t0 = time.perf_counter()
                mat.write_into(model, recipe)
                sync(device)
                warm = time.perf_counter() - t0
                times = []
                for _ in range(a.repeat):
                    t0 = time.perf_counter()
                    mat.write_into(model, recipe)
                    sync(device)
                    times.append(time.perf_counter() - t0)
                peak = (torch.cuda.max_memory_allocated() - before) if cuda else None
                got = module_digests(model)
                eq = {w: sum(got.get(n) == d for n, d in dg.items()) for w, dg in digests.items()}
                eq.setdefault("cpu", None)
                row = {"method": method, "placement": label, "resident": plan.resident, "host": plan.host,
                       "setup_s": setup, "warmup_s": warm, "candidate_s": statistics.median(times), "all_s": times,
                       "moved": mat.last_moved, "bandwidth": plan.bandwidth, "planned_device": plan.device_bytes,
                       "planned_parts": {"eval": plan.eval_bytes, "reserve": plan.eval_reserve,
                                         "scratch": plan.scratch, "staging": plan.staging},
                       "planned_no_reserve": plan.device_bytes - plan.eval_reserve, "peak_device": peak,
                       "tensors": len(digests[device]), "equal_device_export": eq[device], "equal_cpu_export": eq["cpu"],
                       "max_abs_diff_cpu_export": max_abs_diff(model, cpu_export)
                       if eq["cpu"] is not None and eq["cpu"] < len(digests["cpu"]) else 0.0, "export_s": exports,
                       "compiled": os.environ.get("MERGESEARCH_COMPILE", "1") != "0"}
                rows.append(row)
                print(f"  {label:13} setup {setup:.2f}s cand {row['candidate_s'] * 1e3:.1f} ms (warm-up "
                      f"{warm * 1e3:.0f} ms) moved {row['moved'] / GB:.2f} GB peak "
                      f"{(peak or 0) / GB:.2f} GB planned {row['planned_no_reserve'] / GB:.2f} GB + reserve | equal: device export "
                      f"{eq[device]}/{row['tensors']}, cpu export {eq['cpu']}/{row['tensors']} "
                      f"(max |diff| {row['max_abs_diff_cpu_export']:.3g})", flush=True)
                mat.close()
                del mat, model
            shutil.rmtree(cpu_export, ignore_errors=True)
        if cuda and not a.no_cpu:  # the CPU default on the same machine: every input in place, every core
            torch.set_num_threads(os.cpu_count() or 1)
            for method in a.methods:
                recipe = from_dict(recipe_dict(method, base, fts))
                model, _ = load_model(Path(base), device="cpu", dtype="bfloat16")
                mat = Materializer(str(base), [str(p) for p in fts], methods=[method], device="cpu", check=False)
                mat.write_into(model, recipe)
                times = []
                for _ in range(a.repeat):
                    t0 = time.perf_counter()
                    mat.write_into(model, recipe)
                    times.append(time.perf_counter() - t0)
                res.setdefault("cpu_candidate_s", {})[method] = statistics.median(times)
                print(f"  cpu in place ({torch.get_num_threads()} threads) {method}: "
                      f"{statistics.median(times):.2f} s", flush=True)
                mat.close()
                del mat, model
    finally:
        shutil.rmtree(work, ignore_errors=True)


def worker_run(zoo: Path, refine_steps: int, threads: int) -> dict:
    """The hand-tuned TIES merge scored on dev by a Worker on this process's device, then refined."""
    from dataclasses import asdict

    from mergesearch.engine.checkpoint import Checkpoint
    from mergesearch.search.schema import RefineConfig
    from mergesearch.search.variables import Granularity, layer_prefix, make_groups
    from mergesearch.search.workers import Worker

    fts = [str(zoo / f"ft_{t}") for t in ZOO_TASKS]
    recipe = {"method": "ties", "base": str(zoo / "base"), "parameters": {"lambda": 1.5},
              "models": [{"path": p, "parameters": {"weight": 1.0, "density": 0.5}} for p in fts]}
    t0 = time.perf_counter()
    w = Worker(0, str(zoo / "base"), fts, ["ties"],
               {"evaluator": "loglik", "tasks": ZOO_TASKS, "task_dir": str(zoo), "split": "dev"}, threads=threads)
    out = {"device": w.device, "setup_s": time.perf_counter() - t0}
    runs = [w.run(k, recipe) for k in range(3)]
    out["scores"] = runs[-1]["scores"]
    out["materialize_s"] = statistics.median(r["materialize_s"] for r in runs[1:])
    out["eval_s"] = statistics.median(r["eval_s"] for r in runs[1:])
    ck = Checkpoint(str(zoo / "base"))
    groups = make_groups(Granularity(level="layer", modules=["attn", "mlp"]), ck.num_layers, layer_prefix(ck.names()))
    opts = RefineConfig(top=1, level="layer", modules=["attn", "mlp"], steps=refine_steps, eval_every=10,
                        patience=refine_steps).model_dump()
    r = w.run(10, recipe, refine={"options": opts, "groups": [asdict(g) for g in groups], "seed": 0})
    out["refined"] = {"scores": r.get("scores"), "refine_s": r.get("refine_s"), "stats": r.get("refine")}
    return out


def worker_part(a, res: dict) -> None:
    import torch
    res["worker"] = {}
    for where in (["cuda"] if torch.cuda.is_available() else []) + ([] if a.no_worker_cpu else ["cpu"]):
        if where == "cuda":
            r = worker_run(a.zoo, a.refine_steps, threads=1)
        else:
            j = a.cache / f"worker-cpu-{os.getpid()}.json"
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
            subprocess.run([sys.executable, __file__, "_worker", str(a.zoo), str(a.refine_steps), str(j)],
                           check=True, env=env)
            r = json.loads(j.read_text())
            j.unlink()
        res["worker"][where] = r
        mean = lambda s: sum(s.values()) / len(s) if s else float("nan")  # noqa: E731
        print(f"worker on {r['device']}: setup {r['setup_s']:.1f} s, materialize {r['materialize_s'] * 1e3:.1f} ms, "
              f"evaluate {r['eval_s']:.2f} s, dev mean {mean(r['scores']):.4f} {r['scores']}; refined "
              f"({a.refine_steps} steps) in {r['refined']['refine_s']:.1f} s: dev mean "
              f"{mean(r['refined']['scores'] or {}):.4f}", flush=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        import torch
        zoo, steps, out = Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
        out.write_text(json.dumps(worker_run(zoo, steps, threads=torch.get_num_threads())))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="a tiny family for a quick smoke run")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=ROOT / "results" / "bench_cache")
    ap.add_argument("--zoo", type=Path, help="a built zoo: run the worker part")
    ap.add_argument("--refine-steps", type=int, default=30)
    ap.add_argument("--no-family", action="store_true")
    ap.add_argument("--no-worker-cpu", action="store_true", help="skip the worker's CPU run")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU export and the CPU candidate")
    ap.add_argument("--out-json", type=Path)
    a = ap.parse_args()
    a.methods = [m for m in a.methods.split(",") if m]
    a.cache = a.cache.resolve()
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                 "torch": torch.__version__, "cpus": os.cpu_count()}
    print(f"device: {res['device']}; torch {res['torch']}; {res['cpus']} CPUs", flush=True)
    try:
        if not a.no_family:
            family_part(a, device, res)
        if a.zoo:
            worker_part(a, res)
    finally:
        if a.out_json:
            a.out_json.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
