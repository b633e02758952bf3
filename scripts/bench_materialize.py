"""Placement benchmark: one in-memory candidate per method and placement.

On the bench family of ``scripts/bench_merge.py`` (Llama-shaped, hidden 1536, 12 layers,
vocab 32000, bf16: a base and 3 fine-tunes of 0.44B parameters, cached under
``results/bench_cache/``), each placement is a budget that leaves 0, 1, 2 or all 3
fine-tunes on the host (the base stays resident), plus the CPU default: every input on
the host, read in place. For task_arithmetic, ties and dare_ties, each in its own
process, it reports:

- set-up time (inputs placed and checked) as a ratio to plain loading (every tensor of
  the four inputs read into private memory, its own process);
- candidate time (``write_into`` a bf16 Llama module; median of ``--repeat`` after a
  warm-up) and the bytes moved from the host tier per candidate, against
  1.5 x (bytes moved / measured copy bandwidth) + the all-resident candidate time;
- peak memory per tier: private memory of the process (the "device" on a CPU) and
  mapped file pages (the host tier, shared through the page cache);
- bit-equality of the written module with the streamed export of the same recipe.

Then two workers on one node (each a process holding a Materializer in the CPU default
placement and a bf16 evaluation model, after one candidate): their combined memory as a
ratio to one worker's, as proportional set size (PSS: shared pages split between the
processes that map them) and as plain RSS (which counts shared pages in every process).

    .venv/bin/python scripts/bench_materialize.py              # full run (about 15 minutes)
    .venv/bin/python scripts/bench_materialize.py --small      # quick smoke run
    .venv/bin/python scripts/bench_materialize.py --spectral   # tsv, iso_c, iso_cts against TIES
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench_merge import (  # noqa: E402
    FULL, GB, N_MODELS, SMALL, _module_digests, family_dir, recipe_dict, tensor_digests, warm_page_cache,
)

METHODS = ("task_arithmetic", "ties", "dare_ties")
# (label, inputs resident on the device: base first, then fine-tunes; stream mode)
PLACEMENTS = [("0 on host", 4, "copy"), ("1 on host", 3, "copy"), ("2 on host", 2, "copy"),
              ("3 on host", 1, "copy"), ("all host, in place", 0, "view")]
TARGETS = {"setup_vs_plain": 1.5, "stream_slack": 1.5, "two_workers": 1.3}


def status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[k] = int(v.split()[0]) * 1024
    return out


class PeakSampler:
    """Peak private (RssAnon) and mapped-file (RssFile) memory of this process."""

    def __init__(self, every: float = 0.02):
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, args=(every,), daemon=True)
        self.t.start()

    def _run(self, every):
        while not self.stop.is_set():
            s = status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s.get(k, 0))
            time.sleep(every)

    def close(self) -> dict:
        self.stop.set()
        self.t.join()
        return dict(self.peak)


def copy_bandwidth() -> float:
    """Bytes per second of a large in-memory copy (what staging a host tensor costs)."""
    import torch
    src = torch.ones(256 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = time.perf_counter()
    for _ in range(4):
        dst.copy_(src)
    return 4 * src.numel() / (time.perf_counter() - t0)


# -- children ---------------------------------------------------------------------------


def child_plain(args: list[str]) -> int:
    """Plain loading: every tensor of every input read into this process's memory
    (``get_tensor`` alone maps the file lazily, so each tensor is cloned)."""
    from safetensors import safe_open
    out, folders = Path(args[0]), [Path(p) for p in args[1:]]
    t0 = time.perf_counter()
    held = []
    for f in folders:
        with safe_open(str(f / "model.safetensors"), framework="pt") as h:
            held.append({n: h.get_tensor(n).clone() for n in h.keys()})
    seconds = time.perf_counter() - t0
    out.write_text(json.dumps({"seconds": seconds, "bytes": sum(t.numel() * t.element_size()
                                                                for sd in held for t in sd.values())}))
    return 0


def child_candidate(args: list[str]) -> int:
    import torch

    from mergesearch.engine.materialize import Materializer
    from mergesearch.engine.models import load_model
    from mergesearch.engine.plan import make_plan
    from mergesearch.recipe import from_dict

    out, method, k, stream, repeat, digests = Path(args[0]), args[1], int(args[2]), args[3], int(args[4]), args[5]
    base, fts = args[6], args[7:]
    torch.set_num_threads(os.cpu_count() or 1)
    sampler = PeakSampler()
    bw = copy_bandwidth()
    band = {"device": 2 * bw, "link": bw, "source": "measured"}
    free = make_plan(base, fts, [method], stream=stream, bandwidth=band)
    plan = make_plan(base, fts, [method], budget=free.budget_for(k), stream=stream, bandwidth=band)
    model, _ = load_model(Path(base), dtype="bfloat16")
    t0 = time.perf_counter()
    mat = Materializer(base, fts, methods=[method], placement=plan, check=False)
    setup = time.perf_counter() - t0
    recipe = from_dict(recipe_dict(method, Path(base), [Path(p) for p in fts]))
    t0 = time.perf_counter()
    mat.write_into(model, recipe)  # warm-up: compiled kernels, page faults
    warm = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        mat.write_into(model, recipe)
        times.append(time.perf_counter() - t0)
    peaks = sampler.close()
    want = json.loads(Path(digests).read_text())
    got = _module_digests(model)
    equal = all(got.get(n) == d for n, d in want.items())
    out.write_text(json.dumps({
        "method": method, "resident": plan.resident, "host": plan.host, "stream": stream,
        "setup_s": setup, "warmup_s": warm, "candidate_s": statistics.median(times), "all_s": times,
        "moved": mat.last_moved, "copy_bw": bw, "predicted_s": plan.predicted_s, "planned_device": plan.device_bytes,
        "peak_private": peaks["RssAnon"], "peak_mapped": peaks["RssFile"], "bit_equal": equal}))
    mat.close()
    return 0


def child_spectral(args: list[str]) -> int:
    """One method's candidates in the CPU default placement (every input on the host, read
    in place): the first (its SVDs computed and kept) and the next, whose weights are
    unchanged (lambda, rank share and common share changed: the factors are reused)."""
    import torch

    from mergesearch.engine.materialize import Materializer
    from mergesearch.engine.models import load_model
    from mergesearch.recipe import from_dict

    out, method, base, fts = Path(args[0]), args[1], args[2], args[3:]
    torch.set_num_threads(os.cpu_count() or 1)
    sampler = PeakSampler()
    model, _ = load_model(Path(base), dtype="bfloat16")
    mat = Materializer(base, fts, methods=[method], check=False)
    # iso_cts redoes each task's SVD for every candidate (its common subspace depends on the
    # share): on a CPU its next candidate costs about its first less one SVD per matrix
    variants = [{}] if method == "iso_cts" else [{}, {"lambda": 1.3}]
    times = []
    for k, extra in enumerate(variants):
        data = recipe_dict(method, Path(base), [Path(p) for p in fts])
        if method in ("tsv", "iso_c", "iso_cts"):
            for m in data["models"]:
                m["parameters"] = {"weight": 1.0, **({"rank_share": 1.0 - 0.25 * k} if method == "tsv" else {})}
            data["parameters"] = {**extra, **({"common_share": 0.8 - 0.1 * k} if method == "iso_cts" else {})}
        else:
            data["parameters"] = {**data["parameters"], **extra}
        t0 = time.perf_counter()
        mat.write_into(model, from_dict(data))
        times.append(time.perf_counter() - t0)
    peaks = sampler.close()
    cache = mat.factor_cache
    out.write_text(json.dumps({
        "method": method, "first_s": times[0], "next_s": statistics.median(times[1:]) if times[1:] else None,
        "all_s": times,
        "factors_held": cache.nbytes if cache is not None else 0, "factors_planned": mat.placement.factors,
        "scratch_planned": mat.placement.scratch, "peak_private": peaks["RssAnon"], "threads": torch.get_num_threads()}))
    return 0


def spectral(a, base, fts, inputs: list[str], work: Path) -> str:
    rows = []
    for method in ("ties", "tsv", "iso_c", "iso_cts"):
        o = work / f"spectral-{method}.json"
        subprocess.run([sys.executable, __file__, "_spectral", str(o), method, *inputs], check=True)
        r = json.loads(o.read_text())
        rows.append(r)
        print(f"{method:10} first {r['first_s']:.2f}s  next {r['next_s']}s  factors {r['factors_held'] / GB:.2f} "
              f"GB (planned {r['factors_planned'] / GB:.2f})  private peak {r['peak_private'] / GB:.2f} GB", flush=True)
    ties = rows[0]
    lines = ["| method | first candidate (SVDs computed) | / TIES | next candidates (factors reused) | / TIES "
             "| SVD factors held (GB) | planned (GB) | private peak (GB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        nxt = (f"{r['next_s']:.2f} s | {r['next_s'] / ties['next_s']:.1f}×" if r["next_s"] is not None
               else "not run | -")
        lines.append(f"| {r['method']} | {r['first_s']:.2f} s | {r['first_s'] / ties['first_s']:.1f}× | "
                     f"{nxt} | {r['factors_held'] / GB:.2f} | {r['factors_planned'] / GB:.2f} | "
                     f"{r['peak_private'] / GB:.2f} |")
    return "\n".join(lines)


def child_worker(args: list[str]) -> int:
    """A worker's memory: the CPU default placement, a bf16 evaluation model, one candidate;
    then it waits for ``args[1]`` to appear so that the parent can read its memory."""
    import torch

    from mergesearch.engine.materialize import Materializer
    from mergesearch.engine.models import load_model
    from mergesearch.recipe import from_dict

    ready, release, base, fts = Path(args[0]), Path(args[1]), args[2], args[3:]
    torch.set_num_threads(1)
    mat = Materializer(base, fts, methods=["task_arithmetic"], check=False)
    model, _ = load_model(Path(base), dtype="bfloat16")
    mat.write_into(model, from_dict(recipe_dict("task_arithmetic", Path(base), [Path(p) for p in fts])))
    ready.write_text(str(os.getpid()))
    while not release.exists():
        time.sleep(0.1)
    return 0


def smaps(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        k, _, v = line.partition(":")
        if k in ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean"):
            out[k] = int(v.split()[0]) * 1024
    return out


def workers_memory(n: int, work: Path, inputs: list[str]) -> list[dict]:
    procs, readies = [], []
    release = work / f"release-{n}"
    release.unlink(missing_ok=True)
    for i in range(n):
        ready = work / f"ready-{n}-{i}"
        ready.unlink(missing_ok=True)
        readies.append(ready)
        procs.append(subprocess.Popen([sys.executable, __file__, "_worker", str(ready), str(release), *inputs]))
    while not all(r.exists() for r in readies):
        if any(p.poll() not in (None, 0) for p in procs):
            raise SystemExit("a worker process failed")
        time.sleep(0.2)
    mems = [smaps(p.pid) for p in procs]
    release.write_text("go")
    for p in procs:
        p.wait()
    return mems


# -- parent -----------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        return {"_plain": child_plain, "_cand": child_candidate, "_worker": child_worker,
                "_spectral": child_spectral}[sys.argv[1]](sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="a tiny family for a quick smoke run")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=2, help="timed candidates after the warm-up (median)")
    ap.add_argument("--cache", type=Path, default=ROOT / "results" / "bench_cache")
    ap.add_argument("--out-json", type=Path)
    ap.add_argument("--no-docs", action="store_true", help="do not update docs/BENCHMARKS.md")
    ap.add_argument("--spectral", action="store_true",
                    help="the singular-value methods (tsv, iso_c, iso_cts) against TIES: candidate times and memory")
    a = ap.parse_args()
    from mergesearch.zoo.synthetic import make_family

    shape = SMALL if a.small else FULL
    cache = a.cache.resolve()
    fam = make_family(family_dir(cache, shape), n_models=N_MODELS, dtype="bfloat16", noise=0.002, seed=0, **shape)
    base, fts = fam["base"], [fam[f"ft{k}"] for k in range(N_MODELS)]
    inputs = [str(base), *map(str, fts)]
    work = cache / f"mat-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    warm_page_cache([base, *fts])
    methods = [m for m in a.methods.split(",") if m]
    if a.spectral:
        try:
            table = spectral(a, base, fts, inputs, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(table)
        if not a.no_docs and not a.small:
            from doc_markers import write_between
            write_between(ROOT / "docs" / "BENCHMARKS.md", "<!-- bench_spectral:begin -->",
                          "<!-- bench_spectral:end -->", table)
        return 0
    res: dict = {"shape": shape, "rows": [], "cpus": os.cpu_count()}
    try:
        plains = []
        for _ in range(3):  # the median of three processes: page-fault costs vary on a VM
            subprocess.run([sys.executable, __file__, "_plain", str(work / "plain.json"), *inputs], check=True)
            plains.append(json.loads((work / "plain.json").read_text()))
        res["plain"] = sorted(plains, key=lambda p: p["seconds"])[1]
        res["plain"]["all_seconds"] = [p["seconds"] for p in plains]
        print(f"plain loading of the 4 inputs: {res['plain']['seconds']:.2f} s", flush=True)
        for method in methods:
            recipe = work / f"{method}.yaml"
            import yaml
            recipe.write_text(yaml.safe_dump(recipe_dict(method, base, fts)))
            out = work / f"export-{method}"
            subprocess.run([str(Path(sys.executable).parent / "mergesearch"), "merge", str(recipe), "-o", str(out)],
                           check=True, stdout=subprocess.DEVNULL)
            (work / f"{method}.digests").write_text(json.dumps(tensor_digests(out)))
            shutil.rmtree(out)
            for label, k, stream in PLACEMENTS:
                o = work / f"{method}-{k}-{stream}.json"
                subprocess.run([sys.executable, __file__, "_cand", str(o), method, str(k), stream, str(a.repeat),
                                str(work / f"{method}.digests"), *inputs], check=True)
                row = {"placement": label, **json.loads(o.read_text())}
                res["rows"].append(row)
                print(f"{method:16} {label:20} setup {row['setup_s']:.2f}s  candidate {row['candidate_s']:.2f}s  "
                      f"moved {row['moved'] / GB:.2f} GB  private {row['peak_private'] / GB:.2f} GB  "
                      f"mapped {row['peak_mapped'] / GB:.2f} GB  bit-equal {row['bit_equal']}", flush=True)
        one = workers_memory(1, work, inputs)
        two = workers_memory(2, work, inputs)
        res["workers"] = {"one": one, "two": two}
        print(f"one worker: PSS {one[0]['Pss'] / GB:.2f} GB, RSS {one[0]['Rss'] / GB:.2f} GB; two workers: PSS "
              f"{sum(m['Pss'] for m in two) / GB:.2f} GB, RSS {sum(m['Rss'] for m in two) / GB:.2f} GB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.out_json:
        a.out_json.write_text(json.dumps(res, indent=2))
    table = render(res)
    print(table)
    if not a.no_docs and not a.small:
        from doc_markers import write_between
        write_between(ROOT / "docs" / "BENCHMARKS.md", "<!-- bench_materialize:begin -->",
                      "<!-- bench_materialize:end -->", table)
    return 0


def render(res: dict) -> str:
    plain = res["plain"]["seconds"]
    lines = ["| method | placement (fine-tunes on host) | set-up | / plain loading | candidate | moved / candidate "
             "| bound: 1.5 × moved / bw + resident | private peak (GB) | mapped peak (GB) | bit-equal |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for method in dict.fromkeys(r["method"] for r in res["rows"]):
        rows = [r for r in res["rows"] if r["method"] == method]
        resident_s = next(r["candidate_s"] for r in rows if not r["host"])
        for r in rows:
            bound = TARGETS["stream_slack"] * r["moved"] / r["copy_bw"] + resident_s
            ok = "met" if r["candidate_s"] <= bound else "missed"
            lines.append(
                f"| {method} | {r['placement']} | {r['setup_s']:.2f} s | {r['setup_s'] / plain:.2f}× "
                f"| {r['candidate_s']:.2f} s | {r['moved'] / GB:.2f} GB | {bound:.2f} s ({ok}) "
                f"| {r['peak_private'] / GB:.2f} | {r['peak_mapped'] / GB:.2f} | {'yes' if r['bit_equal'] else 'NO'} |")
    w = res["workers"]
    one, two = w["one"][0], w["two"]
    pss = sum(m["Pss"] for m in two) / one["Pss"]
    rss = sum(m["Rss"] for m in two) / one["Rss"]
    bw = statistics.median(r["copy_bw"] for r in res["rows"])
    lines += ["", f"Plain loading (every tensor of the base and 3 fine-tunes read into private memory, "
                  f"{res['plain']['bytes'] / GB:.2f} GB): {plain:.2f} s. Measured copy bandwidth: {bw / GB:.1f} GB/s.",
              "", "| workers on one node | PSS (GB) | / one worker | RSS summed (GB) | / one worker |",
              "|---:|---:|---:|---:|---:|",
              f"| 1 | {one['Pss'] / GB:.2f} | 1.00× | {one['Rss'] / GB:.2f} | 1.00× |",
              f"| 2 | {sum(m['Pss'] for m in two) / GB:.2f} | {pss:.2f}× (target ≤ {TARGETS['two_workers']}×: "
              f"{'met' if pss <= TARGETS['two_workers'] else 'missed'}) | {sum(m['Rss'] for m in two) / GB:.2f} "
              f"| {rss:.2f}× |"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
