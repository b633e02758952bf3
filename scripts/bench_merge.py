"""`make bench`: time the merge engine against a floor and against mergekit.

On a generated Llama-shaped family (base + 3 bf16 fine-tunes, cached under
``results/bench_cache/``) this measures, each as a separate process with its own peak
RSS (``os.wait4`` in a small launcher process, which reports the rusage of that one child
and its reaped descendants; not in this script, whose own resident set a child forked from
it would count as its own):

- the floor: read the 4 inputs once with safetensors, weighted sum tensor by tensor in
  float32, write one bf16 safetensors file. Its weights (-0.2, 0.4, 0.4, 0.4) make it
  task arithmetic at weight 0.4, so its output is compared with that merge too;
- ``mergesearch merge`` (the streamed export) per method;
- ``mergekit-yaml`` on the converted recipe per method (when mergekit is installed);
- one in-memory candidate per method: mergesearch's Materializer ``write_into`` a
  bf16 ``LlamaForCausalLM`` against ``mergekit.merge_methods.merge_state_dicts`` on
  preloaded state dicts (then ``load_state_dict`` into the same kind of module), each
  side in its own process, median of ``--repeat`` timed candidates after a warm-up.

Inputs are read once into the page cache before timing, and ``sync`` runs between
timings, so the figures are warm-cache figures without writeback from an earlier run.
Outputs go under the cache folder and are deleted after each timing (after a
tensor-by-tensor comparison of the mergesearch and mergekit outputs).

    .venv/bin/python scripts/bench_merge.py                 # full run (15+ minutes)
    .venv/bin/python scripts/bench_merge.py --small         # quick smoke run
    .venv/bin/python scripts/bench_merge.py --methods ties --skip-mergekit --out-json r.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
METHODS = ("linear", "task_arithmetic", "dare_ties", "ties")
WEIGHT, DENSITY = 0.4, 0.3
N_MODELS = 3
FLOOR_WEIGHTS = (1.0 - N_MODELS * WEIGHT,) + (WEIGHT,) * N_MODELS  # base, ft0.. : task arithmetic

FULL = dict(hidden=1536, layers=12, intermediate=4096, vocab=32000, heads=12)
# Small, but the embeddings reach mergesearch's compile threshold (2**20 elements) and span
# several of its compiled blocks (2**21), so the warm-up compiles every kernel variant.
SMALL = dict(hidden=256, layers=2, intermediate=512, vocab=16384, heads=4)

TARGETS = {
    "stream_vs_floor": {"linear": 1.3, "task_arithmetic": 1.3, "ties": 2.0, "dare_ties": 2.0},
    "stream_peak_rss_gb": 1.5,
    "candidate_s": {"ties": 3.0, "task_arithmetic": 1.5},
}
GB = 1e9


# -- helpers -------------------------------------------------------------------------


def family_dir(cache: Path, shape: dict) -> Path:
    return cache / "family_h{hidden}_l{layers}_i{intermediate}_v{vocab}".format(**shape)


def model_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def warm_page_cache(folders: list[Path]) -> None:
    for folder in folders:
        for f in model_files(folder):
            with open(f, "rb", buffering=0) as fh:
                while fh.read(64 << 20):
                    pass


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def self_rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    vals = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            vals[k] = int(v.split()[0]) * 1024
    return vals.get("VmRSS", 0), vals.get("VmHWM", 0)


def cpu_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (user, nice, system, irq, softirq)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


QUIET = {"max_wait": 600.0, "cores": 0.15}
CONTENDED_CORES = 0.25  # other processes' average CPU use above which a timing is flagged


def wait_quiet() -> float:
    """Wait (up to QUIET['max_wait'] s) until other processes use under QUIET['cores'] cores
    for 9 s in a row. Returns the load seen last, in cores."""
    t_end = time.monotonic() + QUIET["max_wait"]
    said = False
    quiet_windows = 0
    while True:
        b0, t0 = cpu_busy(), time.monotonic()
        time.sleep(3)
        load = (cpu_busy() - b0) / (time.monotonic() - t0)
        quiet_windows = quiet_windows + 1 if load < QUIET["cores"] else 0
        if quiet_windows >= 3 or time.monotonic() >= t_end:  # 9 s in a row below the limit
            return load
        if not said and load >= QUIET["cores"]:
            print(f"  (waiting for other processes to finish: {load:.2f} cores busy)", flush=True)
            said = True


# A forked child's peak RSS starts at its parent's resident set at the fork (the pages are
# mapped into both until the exec), so a child forked by this script, which grows as it
# compares outputs, would report this script's memory as its own. Every timed command is
# therefore started by this small launcher, a fresh interpreter, which times it and
# reports its rusage.
LAUNCHER = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(p.pid, 0)
wall = time.perf_counter() - t0
json.dump({"wall": wall, "maxrss_kb": ru.ru_maxrss, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
           "rc": os.waitstatus_to_exitcode(status)}, open(sys.argv[1], "w"))
"""


def run_process(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run one child; wall time and that child's own peak RSS (its rusage, through
    :data:`LAUNCHER`), and how many cores other processes used meanwhile (machine busy
    time minus the child's CPU time)."""
    os.sync()  # no writeback of an earlier output during this timing
    wait_quiet()
    stats = log.with_suffix(".rusage.json")
    with open(log, "w") as fh:
        b0 = cpu_busy()
        p = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(stats), *cmd], stdout=fh,
                             stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        p.wait()
        busy = cpu_busy() - b0
    ru = json.loads(stats.read_text())
    wall = ru["wall"]
    p.returncode = ru["rc"]
    other = max(0.0, busy - ru["user_s"] - ru["sys_s"]) / wall
    res = {"seconds": wall, "peak_rss": ru["maxrss_kb"] * 1024, "user_s": ru["user_s"], "sys_s": ru["sys_s"],
           "other_cores": other, "contended": other > CONTENDED_CORES, "rc": p.returncode, "log": str(log)}
    if p.returncode != 0:
        tail = log.read_text()[-2000:]
        res["error"] = tail.strip().splitlines()[-1] if tail.strip() else f"exit code {p.returncode}"
        print(f"  ! {' '.join(cmd[:3])}... failed (rc {p.returncode}); log: {log}\n{tail}", file=sys.stderr)
    return res


def median_run(cmd: list[str], log: Path, out: Path | None, repeat: int, env: dict | None = None) -> dict:
    runs = []
    for _ in range(repeat):
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        runs.append(run_process(cmd, log, env))
        if runs[-1]["rc"] != 0:
            return runs[-1]
    res = dict(sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2])
    res["all_seconds"] = [r["seconds"] for r in runs]
    res["peak_rss"] = max(r["peak_rss"] for r in runs)
    res["contended"] = any(r["contended"] for r in runs)
    res["other_cores"] = max(r["other_cores"] for r in runs)
    return res


def tensor_digests(folder: Path) -> dict[str, str]:
    import torch
    from safetensors import safe_open
    out = {}
    for f in model_files(folder):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                t = h.get_tensor(name).contiguous()
                out[name] = hashlib.blake2b(t.view(-1).view(torch.uint8).numpy(), digest_size=16).hexdigest()
    return out


def compare_outputs(a: Path, b: Path) -> dict:
    """Element-wise comparison of two model folders, tensor by tensor, in float32."""
    from safetensors import safe_open
    ha = {n: f for f in model_files(a) for n in safe_open(str(f), framework="pt").keys()}
    hb = {n: f for f in model_files(b) for n in safe_open(str(f), framework="pt").keys()}
    if set(ha) != set(hb):
        return {"same_names": False}
    max_abs = 0.0
    differ = total = 0
    num = den = 0.0
    opened: dict[Path, object] = {}

    def get(f, n):
        if f not in opened:
            opened[f] = safe_open(str(f), framework="pt")
        return opened[f].get_tensor(n)

    for n in sorted(ha):
        x, y = get(ha[n], n), get(hb[n], n)
        if x.dtype != y.dtype or x.shape != y.shape:
            return {"same_names": True, "same_dtypes": False, "tensor": n, "a": str(x.dtype), "b": str(y.dtype)}
        x, y = x.float(), y.float()
        d = (x - y).abs()
        max_abs = max(max_abs, float(d.max()) if d.numel() else 0.0)
        differ += int((d > 0).sum())
        total += d.numel()
        num += float(d.square().sum())
        den += float(y.square().sum())
    return {"same_names": True, "same_dtypes": True, "max_abs_diff": max_abs, "differing_elements": differ,
            "differing_share": differ / total if total else 0.0, "rel_l2": math.sqrt(num / den) if den else 0.0}


def recipe_dict(method: str, base: Path, fts: list[Path]) -> dict:
    params = {"weight": WEIGHT} if method in ("linear", "task_arithmetic") else {"weight": WEIGHT, "density": DENSITY}
    return {"method": method, "base": str(base), "models": [{"path": str(p), "parameters": dict(params)} for p in fts],
            "parameters": {}, "dtype": "bfloat16", "seed": 0}


# -- children ---------------------------------------------------------------------------


def child_floor(args: list[str]) -> int:
    """The floor: read each input once, weighted float32 sum, write one bf16 safetensors file."""
    import torch
    from safetensors import safe_open

    out = Path(args[0])
    weights = [float(w) for w in args[1].split(",")]
    folders = [Path(p) for p in args[2:]]
    handles = []
    for folder in folders:
        (f,) = model_files(folder)
        handles.append(safe_open(str(f), framework="pt"))
    names = list(handles[0].keys())
    header, offset = {}, 0
    for n in names:
        shape = handles[0].get_slice(n).get_shape()
        nbytes = math.prod(shape) * 2
        header[n] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for n in names:
            acc = handles[0].get_tensor(n).float().mul_(weights[0])
            for h, w in zip(handles[1:], weights[1:]):
                acc.add_(h.get_tensor(n), alpha=w)
            fh.write(acc.to(torch.bfloat16).view(torch.uint8).numpy().data)
    shutil.copy2(folders[0] / "config.json", out / "config.json")
    return 0


def _build_module(base: Path):
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(base)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def _module_digests(model) -> dict[str, str]:
    import torch
    return {n: hashlib.blake2b(t.detach().contiguous().view(-1).view(torch.uint8).numpy(), digest_size=16).hexdigest()
            for n, t in model.state_dict().items()}


def child_inmem(args: list[str]) -> int:
    """One side of the in-memory comparison; writes a JSON result to args[0]."""
    import torch

    out_json, side, method, repeat, base = Path(args[0]), args[1], args[2], int(args[3]), Path(args[4])
    fts = [Path(p) for p in args[5:]]
    res: dict = {"side": side, "method": method}
    t0 = time.perf_counter()
    model = _build_module(base)
    res["module_build_s"] = time.perf_counter() - t0
    if side == "mergesearch":
        from mergesearch.engine.materialize import Materializer
        from mergesearch.recipe import from_dict

        mat = Materializer(base, fts, methods=[method], device="cpu")
        res["setup_s"] = mat.setup_seconds
        res["resident_bytes"] = mat.resident_bytes
        recipe = from_dict(recipe_dict(method, base, fts))

        def candidate():
            mat.write_into(model, recipe)
    else:
        from mergekit.merge_methods import merge_state_dicts
        from safetensors.torch import load_file

        t1 = time.perf_counter()
        sds = {"base": {}}
        for f in model_files(base):
            sds["base"].update(load_file(str(f)))
        for k, p in enumerate(fts):
            sds[f"ft{k}"] = {}
            for f in model_files(p):
                sds[f"ft{k}"].update(load_file(str(f)))
        res["setup_s"] = time.perf_counter() - t1
        res["resident_bytes"] = sum(t.numel() * t.element_size() for sd in sds.values() for t in sd.values())
        ids = [f"ft{k}" for k in range(len(fts))]
        if method == "linear":
            inputs = {k: sds[k] for k in ids}
            params, base_id = {"weight": {k: WEIGHT for k in ids}}, None
        else:
            inputs = sds
            params, base_id = {"weight": {k: WEIGHT for k in ids}}, "base"
            if method != "task_arithmetic":
                params["density"] = {k: DENSITY for k in ids}
        merge_only: list[float] = []

        def candidate():
            with torch.no_grad():
                t = time.perf_counter()
                merged = merge_state_dicts(inputs, method, parameters=params, base=base_id,
                                           dtype=torch.float32, out_dtype=torch.bfloat16)
                merge_only.append(time.perf_counter() - t)
                model.load_state_dict(merged, strict=True)
    rss, hwm = self_rss()
    res["rss_after_setup"] = rss
    t = time.perf_counter()
    candidate()  # warm-up (compilation, allocator)
    res["warmup_s"] = time.perf_counter() - t
    import resource
    times = []
    b0, r0 = cpu_busy(), resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(repeat):
        t = time.perf_counter()
        candidate()
        times.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    own = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    res["candidate_cpu_s"] = own / repeat
    res["other_cores"] = max(0.0, cpu_busy() - b0 - own) / sum(times)
    res["contended"] = res["other_cores"] > CONTENDED_CORES
    res["candidate_s"] = times
    res["candidate_median_s"] = statistics.median(times)
    if side == "mergekit":
        res["merge_only_s"] = merge_only[1:]
        res["merge_only_median_s"] = statistics.median(merge_only[1:])
    res["rss_end"], res["peak_rss_self"] = self_rss()
    res["digests"] = _module_digests(model)
    out_json.write_text(json.dumps(res))
    return 0


# -- the run ----------------------------------------------------------------------------


def fmt_s(x) -> str:
    return "-" if x is None else f"{x:.2f}s"


def fmt_run(r: dict | None, key: str = "seconds") -> str:
    """A timing, starred when other processes used more than CONTENDED_CORES meanwhile."""
    if not r or r.get(key) is None or r.get("rc", 0) != 0:
        return "-"
    return f"{r[key]:.2f}s" + ("*" if r.get("contended") else "")


def fmt_gb(x) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


def fmt_x(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def passfail(value, limit) -> str:
    if limit is None:
        return ""
    if value is None:
        return f"<= {limit:g} (n/a)"
    return f"<= {limit:g} {'PASS' if value <= limit else 'FAIL'}"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_floor":
        return child_floor(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_inmem":
        return child_inmem(sys.argv[2:])

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: %(default)s)")
    ap.add_argument("--small", action="store_true", help="a tiny family for a quick smoke run")
    ap.add_argument("--cache", type=Path, default=ROOT / "results" / "bench_cache", help="family and output folder")
    ap.add_argument("--skip-mergekit", action="store_true", help="time mergesearch and the floor only")
    ap.add_argument("--skip-mergesearch", action="store_true",
                    help="time the floor and mergekit only (e.g. to fill in mergekit figures)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed export per method on the small family that fills TorchInductor's cache")
    ap.add_argument("--skip-stream", action="store_true", help="skip the floor and the streamed exports")
    ap.add_argument("--skip-inmemory", action="store_true", help="skip the in-memory candidates")
    ap.add_argument("--repeat", type=int, default=3, help="timed in-memory candidates after the warm-up (median)")
    ap.add_argument("--stream-repeat", type=int, default=1, help="runs of each whole process (median)")
    ap.add_argument("--out-json", type=Path, help="write every figure here")
    ap.add_argument("--rev", help="benchmark the mergesearch package of this git revision (extracted with "
                                   "git archive under the cache folder) instead of the working tree")
    ap.add_argument("--quiet-wait", type=float, default=600.0,
                    help="before each timing, wait up to this many seconds for other processes to go idle")
    a = ap.parse_args()
    QUIET["max_wait"] = a.quiet_wait

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: {m} is not one of {', '.join(METHODS)}")
    have_mk = importlib.util.find_spec("mergekit") is not None and (BIN / "mergekit-yaml").exists()
    use_mk = have_mk and not a.skip_mergekit
    shape = SMALL if a.small else FULL
    cache = a.cache.resolve()
    work = cache / f"work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logs = cache / "logs"
    logs.mkdir(exist_ok=True)

    if a.rev:
        snap = snapshot(a.rev, cache)
        sys.path.insert(0, str(snap))
        os.environ["PYTHONPATH"] = os.pathsep.join([str(snap), *filter(None, [os.environ.get("PYTHONPATH")])])
    elif importlib.util.find_spec("mergesearch") is None:
        sys.path.insert(0, str(ROOT))
    import torch
    from mergesearch.engine.checkpoint import Checkpoint
    from mergesearch.recipe import from_dict
    from mergesearch.zoo.synthetic import make_family

    t = time.perf_counter()
    fam = make_family(family_dir(cache, shape), n_models=N_MODELS, dtype="bfloat16", noise=0.002, seed=0, **shape)
    gen_s = time.perf_counter() - t
    base, fts = fam["base"], [fam[f"ft{k}"] for k in range(N_MODELS)]
    small = None
    if not a.no_warmup and not a.skip_mergesearch and not a.skip_stream:
        small = make_family(family_dir(cache, SMALL), n_models=N_MODELS, dtype="bfloat16", noise=0.002, seed=0, **SMALL)
    ck = Checkpoint(base)
    n_params = sum(ck.numel(n) for n in ck.names())
    model_bytes = sum(f.stat().st_size for f in model_files(base))
    env = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
        "cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), "?"),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mergekit": _version("mergekit") if have_mk else None,
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", f"/tmp/torchinductor_{os.environ.get('USER', 'root')}"),
        "mergesearch": code_revision(),
    }
    print(f"mergesearch: {env['mergesearch']['describe']}", flush=True)
    print(f"family: {family_dir(cache, shape)} ({'generated' if gen_s > 1 else 'cached'}): base + {N_MODELS} fine-tunes, "
          f"{shape}, bf16, {n_params / 1e9:.3f}B params, {model_bytes / 1e6:.0f} MB per model")
    print(f"machine: {env['machine']} ({env['cpu']}); torch {env['torch']} ({env['torch_threads']} threads); "
          f"mergekit {env['mergekit'] or 'not installed'}")
    print(f"warming the page cache ({(N_MODELS + 1) * model_bytes / 1e9:.2f} GB of inputs)...", flush=True)
    warm_page_cache([base, *fts])

    results: dict = {"family": {**shape, "n_models": N_MODELS, "params": n_params, "model_bytes": model_bytes,
                                "path": str(family_dir(cache, shape))},
                     "env": env, "weight": WEIGHT, "density": DENSITY, "targets": TARGETS,
                     "floor": None, "stream": {}, "inmemory": {}}
    py = str(Path(sys.executable))
    script = str(Path(__file__).resolve())

    # -- whole processes ---------------------------------------------------------------
    if not a.skip_stream:
        out = work / "floor"
        print("floor: read 4 inputs, weighted sum, write one file ...", flush=True)
        floor = median_run([py, script, "_floor", str(out), ",".join(map(str, FLOOR_WEIGHTS)), str(base), *map(str, fts)],
                           logs / "floor.log", out, a.stream_repeat)
        print(f"  {fmt_run(floor)}, peak RSS {fmt_gb(floor['peak_rss'])} GB", flush=True)
        results["floor"] = floor
        floor_out = out  # kept until task arithmetic has been compared with it
        for method in methods:
            r: dict = {}
            recipe = from_dict(recipe_dict(method, base, fts))
            rpath = work / f"{method}.yaml"
            recipe.save(rpath)
            ms_out = work / f"ms_{method}"
            ok = False
            if small is not None:
                # The kernels are compiled by TorchInductor on first use in a process and cached on
                # disk; an untimed export on the small family (whose embeddings reach the compile
                # threshold) fills that cache, so the timing below is the steady state.
                wpath = work / f"{method}_warmup.yaml"
                from_dict(recipe_dict(method, small["base"], [small[f"ft{k}"] for k in range(N_MODELS)])).save(wpath)
                wout = work / f"warmup_{method}"
                subprocess.run([str(BIN / "mergesearch"), "merge", str(wpath), "-o", str(wout)], capture_output=True,
                               cwd=ROOT)
                shutil.rmtree(wout, ignore_errors=True)
            if not a.skip_mergesearch:
                print(f"{method}: mergesearch merge ...", flush=True)
                r["mergesearch"] = median_run([str(BIN / "mergesearch"), "merge", str(rpath), "-o", str(ms_out)],
                                              logs / f"ms_{method}.log", ms_out, a.stream_repeat)
                r["mergesearch"]["loop_s"] = _merged_seconds(Path(r["mergesearch"]["log"]))
                print(f"  {fmt_run(r['mergesearch'])}, peak RSS {fmt_gb(r['mergesearch']['peak_rss'])} GB", flush=True)
                ok = r["mergesearch"]["rc"] == 0
            if ok:
                r["mergesearch_digests"] = tensor_digests(ms_out)
                if method == "task_arithmetic" and floor["rc"] == 0:
                    r["vs_floor_output"] = compare_outputs(ms_out, floor_out)
            if use_mk:
                mk_cfg = work / f"{method}_mergekit.yaml"
                subprocess.run([str(BIN / "mergesearch"), "convert", str(rpath), "-o", str(mk_cfg), "--to", "mergekit",
                                "--force"], check=True, capture_output=True)
                mk_out = work / f"mk_{method}"
                print(f"{method}: mergekit-yaml ...", flush=True)
                r["mergekit"] = median_run([str(BIN / "mergekit-yaml"), str(mk_cfg), str(mk_out), "--device", "cpu",
                                            "--quiet"], logs / f"mk_{method}.log", mk_out, a.stream_repeat)
                print(f"  {fmt_run(r['mergekit'])}, peak RSS {fmt_gb(r['mergekit']['peak_rss'])} GB", flush=True)
                if ok and r["mergekit"]["rc"] == 0:
                    r["vs_mergekit_output"] = compare_outputs(ms_out, mk_out)
                shutil.rmtree(mk_out, ignore_errors=True)
            shutil.rmtree(ms_out, ignore_errors=True)
            results["stream"][method] = r
        shutil.rmtree(floor_out, ignore_errors=True)

    # -- in-memory candidates ------------------------------------------------------------
    if not a.skip_inmemory:
        sides = ([] if a.skip_mergesearch else ["mergesearch"]) + (["mergekit"] if use_mk else [])
        for method in methods:
            results["inmemory"][method] = {}
            for side in sides:
                need = _inmem_need(method, side, n_params)
                avail = mem_available()
                if need > 0.9 * avail:
                    msg = f"needs about {need / GB:.1f} GB, {avail / GB:.1f} GB available"
                    print(f"{method}: in-memory {side}: skipped ({msg})", flush=True)
                    results["inmemory"][method][side] = {"skipped": msg}
                    continue
                print(f"{method}: in-memory candidate, {side} ...", flush=True)
                jpath = work / f"inmem_{side}_{method}.json"
                proc = run_process([py, script, "_inmem", str(jpath), side, method, str(a.repeat), str(base),
                                    *map(str, fts)], logs / f"inmem_{side}_{method}.log")
                r = json.loads(jpath.read_text()) if proc["rc"] == 0 else {}
                r["process"] = proc
                results["inmemory"][method][side] = r
                if proc["rc"] == 0:
                    print(f"  candidate {fmt_s(r['candidate_median_s'])} (runs {', '.join(f'{x:.2f}' for x in r['candidate_s'])}; "
                          f"warm-up {r['warmup_s']:.2f}s), setup {r['setup_s']:.1f}s, resident {r['resident_bytes'] / GB:.2f} GB, "
                          f"peak RSS {fmt_gb(proc['peak_rss'])} GB", flush=True)
            ms = results["inmemory"][method].get("mergesearch", {})
            stream = results["stream"].get(method, {})
            if ms.get("digests") and stream.get("mergesearch_digests"):
                ms["bit_equal_to_stream"] = ms["digests"] == stream["mergesearch_digests"]

    after = code_revision()
    if after["source_digest"] != env["mergesearch"]["source_digest"]:
        env["mergesearch"]["changed_during_run"] = True
        print("WARNING: mergesearch's source changed during the run; the figures mix two versions", file=sys.stderr)
    table = render(results, methods, use_mk)
    print("\n" + table)
    if a.out_json:
        slim = json.loads(json.dumps(results))
        for m in slim["stream"].values():
            m.pop("mergesearch_digests", None)
        for m in slim["inmemory"].values():
            for side in m.values():
                side.pop("digests", None)
        slim["table"] = table
        a.out_json.parent.mkdir(parents=True, exist_ok=True)
        a.out_json.write_text(json.dumps(slim, indent=2) + "\n")
        print(f"\nfigures: {a.out_json}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def snapshot(rev: str, cache: Path) -> Path:
    """mergesearch/ as of ``rev`` in a folder of its own (read-only git commands)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    dest = cache / f"code-{sha}"
    if not (dest / "mergesearch").is_dir():
        tmp = cache / f".code-{sha}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "mergesearch"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
        tmp.rename(dest)
    os.environ["BENCH_CODE_LABEL"] = f"commit {sha}, extracted with --rev {rev}"
    return dest


def code_revision() -> dict:
    """Which mergesearch the children import: its folder, a digest of its sources, and the git
    commit when that folder is this checkout (plus whether it has uncommitted changes)."""
    spec = importlib.util.find_spec("mergesearch")
    pkg = Path(spec.origin).parent if spec and spec.origin else ROOT / "mergesearch"
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode())
        h.update(f.read_bytes())
    info = {"package": str(pkg), "source_digest": h.hexdigest(), "commit": None, "dirty": None}
    if pkg.resolve() == (ROOT / "mergesearch").resolve():
        try:
            git = ["git", "-C", str(ROOT)]
            info["commit"] = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            check=True).stdout.strip()
            info["dirty"] = bool(subprocess.run(git + ["status", "--porcelain", "--", "mergesearch"],
                                                capture_output=True, text=True, check=True).stdout.strip())
        except (OSError, subprocess.CalledProcessError):
            pass
    where = f"commit {info['commit']}" + (" with uncommitted changes" if info["dirty"] else "") if info["commit"] \
        else os.environ.get("BENCH_CODE_LABEL", "not this checkout")
    info["describe"] = f"{pkg} ({where}; source digest {info['source_digest']})"
    return info


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _merged_seconds(log: Path) -> float | None:
    """The merge loop's own seconds from mergesearch's summary line ("... in 12.3s -> out")."""
    import re
    m = re.search(r" in ([0-9.]+)s -> ", log.read_text()) if log.exists() else None
    return float(m.group(1)) if m else None


def _inmem_need(method: str, side: str, n_params: int) -> int:
    """A rough upper bound on the child's memory, to skip instead of pushing the machine into OOM."""
    module = 2 * n_params
    if side == "mergekit":
        return module + (N_MODELS + 1) * 2 * n_params + 3 * module
    f32 = 4 * n_params
    if method == "linear":
        return module + (N_MODELS + 1) * f32 + 2 * f32
    if method == "ties":
        return module + (1 + 2 * N_MODELS) * f32 + 2 * f32
    return module + (1 + N_MODELS) * f32 + 2 * f32


def render(res: dict, methods: list[str], use_mk: bool) -> str:
    fam = res["family"]
    lines = [
        f"family: base + {fam['n_models']} fine-tunes, hidden {fam['hidden']}, {fam['layers']} layers, "
        f"intermediate {fam['intermediate']}, vocab {fam['vocab']}, bf16, {fam['params'] / 1e9:.3f}B params, "
        f"{fam['model_bytes'] / 1e6:.0f} MB per model; weight {res['weight']}, density {res['density']}",
        f"machine: {res['env']['machine']}; torch {res['env']['torch']}, mergekit {res['env']['mergekit'] or '-'}",
        f"mergesearch: {res['env']['mergesearch']['describe']}",
    ]
    floor = res.get("floor")
    if floor:
        fl = floor["seconds"] if floor["rc"] == 0 else None
        lines += ["", "Streamed export, whole processes (wall time, peak RSS in GB)", "",
                  "| method | mergesearch | / floor | target | mergekit | mergesearch / mergekit | RSS mergesearch | RSS target | RSS mergekit |",
                  "|---|---:|---:|---|---:|---:|---:|---|---:|",
                  f"| floor (read 4, weighted sum, write) | {fmt_run(floor)} | 1.00x | | | | {fmt_gb(floor['peak_rss'])} | | |"]
        for m in methods:
            r = res["stream"].get(m)
            if not r:
                continue
            ms, mk = r.get("mergesearch", {}), r.get("mergekit")
            t = ms.get("seconds") if ms.get("rc") == 0 else None
            tk = mk.get("seconds") if mk and mk.get("rc") == 0 else None
            ratio = t / fl if t and fl else None
            lines.append(
                f"| {m} | {fmt_run(ms) if ms else 'not run'} | {fmt_x(ratio)} | {passfail(ratio, TARGETS['stream_vs_floor'].get(m))} | "
                f"{fmt_run(mk) if use_mk else 'not run'} | {fmt_x(t / tk) if t and tk else '-'} | "
                f"{fmt_gb(ms.get('peak_rss') if t else None)} | "
                f"{passfail(ms['peak_rss'] / GB if t else None, TARGETS['stream_peak_rss_gb'])} | "
                f"{fmt_gb(mk.get('peak_rss') if tk else None)} |")
        checks = []
        for m in methods:
            r = res["stream"].get(m, {})
            c = r.get("vs_mergekit_output")
            if c and c.get("same_dtypes"):
                checks.append(f"- {m}: mergesearch vs mergekit output: max |diff| {c['max_abs_diff']:.3g}, "
                              f"{100 * c['differing_share']:.4f}% of elements differ, relative L2 {c['rel_l2']:.3g}")
            elif c:
                checks.append(f"- {m}: mergesearch vs mergekit output: {c}")
            c = r.get("vs_floor_output")
            if c and c.get("same_dtypes"):
                checks.append(f"- {m}: mergesearch vs the floor's output: max |diff| {c['max_abs_diff']:.3g}, "
                              f"{100 * c['differing_share']:.4f}% of elements differ")
            if r.get("mergesearch", {}).get("loop_s") is not None:
                checks.append(f"- {m}: mergesearch's own merge-loop time (its summary line): {r['mergesearch']['loop_s']:.1f}s "
                              f"of {r['mergesearch']['seconds']:.1f}s")
            for side in ("mergesearch", "mergekit"):
                p = r.get(side)
                if p and p.get("rc") == 0:
                    checks.append(f"- {m}: {side} CPU time {p['user_s'] + p['sys_s']:.1f}s (user {p['user_s']:.1f}, "
                                  f"sys {p['sys_s']:.1f}); other processes used {p['other_cores']:.2f} cores meanwhile")
        if checks:
            lines += ["", *checks]
    if any(res["inmemory"].values()):
        lines += ["", "One in-memory candidate (median of the timed runs after a warm-up; setup = loading and "
                      "precomputation, not timed in the candidate)", "",
                  "| method | mergesearch | target | mergekit | mergesearch / mergekit | setup ms | setup mk | "
                  "resident ms (GB) | resident mk (GB) | peak RSS ms | peak RSS mk |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in methods:
            r = res["inmemory"].get(m)
            if not r:
                continue
            ms, mk = r.get("mergesearch", {}), r.get("mergekit", {})
            t, tk = ms.get("candidate_median_s"), mk.get("candidate_median_s")
            lines.append(
                f"| {m} | {fmt_run(ms, 'candidate_median_s') if t is not None else (ms.get('skipped', 'failed') if ms else 'not run')} | "
                f"{passfail(t, TARGETS['candidate_s'].get(m))} | "
                f"{fmt_run(mk, 'candidate_median_s') if tk is not None else (mk.get('skipped', 'failed') if use_mk else 'not run')} | "
                f"{fmt_x(t / tk) if t and tk else '-'} | {fmt_s(ms.get('setup_s'))} | {fmt_s(mk.get('setup_s'))} | "
                f"{fmt_gb(ms.get('resident_bytes'))} | {fmt_gb(mk.get('resident_bytes'))} | "
                f"{fmt_gb(ms.get('process', {}).get('peak_rss') if t is not None else None)} | "
                f"{fmt_gb(mk.get('process', {}).get('peak_rss') if tk is not None else None)} |")
        notes = []
        for m in methods:
            r = res["inmemory"].get(m, {})
            ms, mk = r.get("mergesearch", {}), r.get("mergekit", {})
            if "candidate_s" in ms:
                notes.append(f"- {m}: mergesearch runs {', '.join(f'{x:.2f}' for x in ms['candidate_s'])}s "
                             f"({ms['candidate_cpu_s']:.2f} CPU s each; other processes {ms['other_cores']:.2f} cores), warm-up "
                             f"{ms['warmup_s']:.2f}s, RSS after setup {fmt_gb(ms['rss_after_setup'])} GB"
                             + (f"; bit-equal to the streamed export: {ms['bit_equal_to_stream']}"
                                if "bit_equal_to_stream" in ms else ""))
            if "candidate_s" in mk:
                notes.append(f"- {m}: mergekit runs {', '.join(f'{x:.2f}' for x in mk['candidate_s'])}s "
                             f"({mk['candidate_cpu_s']:.2f} CPU s each; other processes {mk['other_cores']:.2f} cores) "
                             f"(merge_state_dicts alone: median {mk['merge_only_median_s']:.2f}s, then load_state_dict), "
                             f"warm-up {mk['warmup_s']:.2f}s, RSS after setup {fmt_gb(mk['rss_after_setup'])} GB")
        if notes:
            lines += ["", *notes]
    if any(c.endswith("*") or "s* |" in c for c in lines):
        lines += ["", f"* other processes used more than {CONTENDED_CORES} cores on average during this timing "
                      f"(the machine was shared), so it overstates the time."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
