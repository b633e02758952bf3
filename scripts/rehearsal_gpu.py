"""A rehearsal of a real search on a Llama-3.2-3B-shaped family, prepared so that the few
minutes a GPU machine is lent go to measuring, not debugging (targets: docs/BENCHMARKS.md).

Phases, each a subprocess with its own time limit; after each one ``$OUT/rehearsal.json``
is rewritten with everything so far, so a phase that runs out of time keeps the ones
before it (and what its own run stored):

1. ``generate``: base + 4 fine-tunes on local disk (bf16, safetensors shards of at most
   4 GB, an HF config and the zoo's char-level tokenizer): a random base at a trained
   model's init scale, each fine-tune the base plus a low-rank and a sparse delta of its
   own, and a low-rank direction that two fine-tunes move along in opposite signs (so TIES'
   sign election has conflicts to settle); plus a local lm-eval multiple-choice task of
   ``--items`` items and a search space;
2. ``plan``: ``mergesearch plan --json``;
3. ``search``: TIES with per-model weight and density and λ, fidelity rungs, a short
   refinement with ``rows: true``, 2 workers (0.5 GPU each on CUDA; on the CPU a declared
   device budget that leaves the fine-tunes on the host, staged with ``stream: copy``).
   A refinement the device cannot hold is refused in one line before any trial (on half an
   H100 the 3B family's still is: 141 GB planned before the merge was recomputed in the
   backward; since, 96 GB holding the float32 task vectors and base, 47.6 GB holding
   nothing (each tensor's inputs read again), batch 16 or 1 alike, against about 39 GB;
   a whole H100 holds the latter, 2026-12-06): the refusal is kept as a finding, and the
   search runs again as one worker on the whole GPU with the refinement, or, where that is
   refused too (or on the CPU), without the refinement, in the time left;
4. ``export``: the best trial, scored on test items;
5. ``staging``: the Stager's bandwidth over the family's own tensors, 1 thread and N.

It prints per phase its wall time, and from the run's store: the candidate merge time
against its bound (bytes read and written at the device bandwidth, or bytes moved at the
link's, as the plan measured them), evaluation time per item, refinement step time and
peak memory against the plan, the staging bandwidth and the export time. The accuracy of
random weights means nothing; the times and the memory are the point.

    python scripts/rehearsal_gpu.py --shape 3b            # on a GPU machine
    python scripts/rehearsal_gpu.py --shape tiny --items 90 --trials 8 --refine-steps 3   # the CPU test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

SHAPES = {  # Llama-3.2-3B, and a few-layer Llama for the CPU
    "3b": dict(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, vocab=128256, rope_theta=500000.0),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, rope_theta=500000.0),
}
PHASES = ("generate", "plan", "search", "export", "staging")
# seconds per phase: the 3B limits fit scripts/device_rehearsal.sh's 9 minutes on an H100
TIMEOUTS = {"3b": {"generate": 80, "plan": 30, "search": 150, "export": 80, "staging": 30},
            "tiny": {"generate": 60, "plan": 60, "search": 300, "export": 120, "staging": 60}}
RUN = "rehearsal"
# safetensors shards: at most 4 GB on the 3B shape (two per model); several per tiny model,
# so that the CPU test reads sharded models as the GPU machine does
SHARD_BYTES = {"3b": 4 * 10**9, "tiny": 64 * 1024}
# the CPU workers' evaluation reserve: room for the tiny family's refinement
CPU_RESERVE = 256 * 2**20
N_MODELS = 4


# ---------------------------------------------------------------- phase 1: the family

def family_config(shape: str) -> dict:
    from mergesearch.zoo.synthetic import llama_config
    s = SHAPES[shape]
    cfg = llama_config(s["hidden"], s["layers"], s["intermediate"], s["vocab"], s["heads"], "bfloat16", tie=True,
                       kv_heads=s["kv_heads"])
    cfg.update(rope_theta=s["rope_theta"], max_position_embeddings=2048, head_dim=s["hidden"] // s["heads"])
    return cfg


def generate(work: Path, shape: str, items: int) -> dict:
    """Write the family, the task and the space under ``work``; returns what was written."""
    import torch

    from mergesearch.engine.writer import StreamingWriter
    from mergesearch.zoo.synthetic import llama_layout, write_tokenizer
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = family_config(shape)
    layout = llama_layout(cfg)
    layers = cfg["num_hidden_layers"]
    names = ["base", *[f"ft{k}" for k in range(N_MODELS)]]
    fam = work / "family"
    fam.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=dev)
    t0, written = time.perf_counter(), 0
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(StreamingWriter(fam / n, [(t, s, torch.bfloat16) for t, s in layout],
                                                       max_shard_bytes=SHARD_BYTES[shape], force=True))
                   for n in names]
        for k, (name, shape_) in enumerate(layout):
            g.manual_seed(1000 + k)
            if name.endswith("norm.weight"):
                base = 1.0 + 0.05 * torch.randn(shape_, generator=g, device=dev)
            else:  # a trained model's scale; the residual writers scaled down by depth
                std = 0.02 / ((2 * layers) ** 0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0)
                base = torch.randn(shape_, generator=g, device=dev) * std
            scale = float(base.float().std())
            conflict = _low_rank(shape_, g, dev, scale * 0.03)  # ft0 and ft1 along it, opposite signs
            tensors = [base]
            for m in range(N_MODELS):
                d = _low_rank(shape_, g, dev, scale * 0.03)
                mask = torch.rand(shape_, generator=g, device=dev) < 0.02
                d += mask * torch.randn(shape_, generator=g, device=dev) * (scale * 0.2)
                if m < 2:
                    d += conflict if m == 0 else -conflict
                tensors.append(base + d)
            for w, t in zip(writers, tensors):
                w.write(name, t.to(torch.bfloat16).cpu())
                written += t.numel() * 2
            del tensors, base, conflict, d, mask
        for w in writers:
            w.write_file("config.json", json.dumps(cfg, indent=2) + "\n")
            w.write_file("generation_config.json", json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
            write_tokenizer(w.tmp, cfg["vocab_size"])
    seconds = time.perf_counter() - t0
    write_task(work / "tasks", items)
    return {"bytes": written, "models": len(names), "generated_on": dev.type, "write_s": seconds,
            "bytes_per_s": written / seconds, "parameters": sum(_numel(s) for _, s in layout)}


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def _low_rank(shape, g, dev, scale: float, rank: int = 4):
    import torch
    if len(shape) == 1:
        return torch.randn(shape, generator=g, device=dev) * scale
    u = torch.randn(shape[0], rank, generator=g, device=dev)
    v = torch.randn(rank, shape[1], generator=g, device=dev)
    return (u @ v) * (scale / rank ** 0.5)


def write_task(folder: Path, items: int) -> None:
    """A local lm-eval multiple-choice task over the zoo's addition items (YAML + JSONL)."""
    import yaml

    from mergesearch.zoo.tasks import make_items
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "rehearsal_mc.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in make_items("add", items, seed=33)))
    spec = {"task": "rehearsal_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"eval": str(data)}},
            "test_split": "eval", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1}}
    (folder / "rehearsal_mc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def write_space(work: Path, a, cuda: bool) -> Path:
    import yaml
    dev_items = max(8, a.items * 2 // 3)
    space = {
        "base": "family/base", "models": [f"family/ft{k}" for k in range(N_MODELS)],
        "evaluator": {"evaluator": "lmeval", "tasks": ["rehearsal_mc"], "task_dir": "tasks", "dev_items": dev_items,
                      "test_items": a.items - dev_items, "batch_size": 64},
        "methods": ["ties"], "scale": {"low": 0.5, "high": 2.0},
        "parameters": {"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.1, "high": 1.0}},
        "granularity": {"level": "model"}, "objective": {"kind": "mean"},
        "sampler": {"name": "cmaes", "x0": "best_baseline"},
        "fidelity": {"rungs": [0.25, 0.5, 1.0], "pruner": "successive_halving"},
        "refine": {"top": 1, "level": "tensor", "rows": True, "loss": "choice", "steps": a.refine_steps,
                   "batch_size": 16, "eval_every": max(1, a.refine_steps // 2), "patience": 2},
        "budget": {"n_trials": a.trials}, "dtype": "bfloat16", "trial_timeout": 300, "seed": 0,
        "resources": {"gpus_per_worker": 0.5} if cuda else {"device_memory": _cpu_budget(work),
                                                             "eval_memory": CPU_RESERVE, "stream": "copy"},
    }
    path = work / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def _cpu_budget(work: Path) -> int:
    """A device budget under which the base alone is resident: the fine-tunes stay on the
    host and are staged, as a GPU worker's would be. Its evaluation reserve
    (``CPU_RESERVE``) is room for the refinement's float32 copies and activations."""
    from mergesearch.engine.plan import make_plan
    fam = work / "family"
    p = make_plan(str(fam / "base"), [str(fam / f"ft{k}") for k in range(N_MODELS)],
                  ["linear", "task_arithmetic", "ties"], stream="copy", eval_dtype="bfloat16",
                  eval_reserve=CPU_RESERVE, bandwidth={"device": 1.0, "link": 1.0, "source": "not used"})
    return p.budget_for(1)


# ---------------------------------------------------------------- phase 5: staging

def staging(work: Path, max_bytes: int) -> dict:
    """The Stager over the family's tensors, every input on the host (one job per tensor
    name, its five inputs), with 1 copy thread and the default."""
    import torch

    from bench_staging import measure_stager
    from mergesearch.engine.bandwidth import measure_bandwidth
    from mergesearch.engine.checkpoint import Checkpoint
    from mergesearch.engine.staging import staging_threads
    cuda = torch.cuda.is_available()
    ckpts = [Checkpoint(work / "family" / n) for n in ["base", *[f"ft{k}" for k in range(N_MODELS)]]]
    views = [c.mapped() for c in ckpts]
    jobs, total = [], 0
    for name in sorted(views[0], key=lambda n: -views[0][n].numel()):
        if "embed" in name:  # its five copies would take 2 x 3.9 GB of slots (and pinned twins) at 3B
            continue
        ts = [v[name] for v in views]
        jobs.append((name, ts))
        total += sum(t.numel() * t.element_size() for t in ts)
        if total >= max_bytes:
            break
    out = {"device": "cuda" if cuda else "cpu", "threads_default": staging_threads(), "bytes_per_pass": total}
    if cuda:
        out["link"] = measure_bandwidth("cuda")["link"]
    runs = [measure_stager(out["device"], jobs, k, passes=3) for k in sorted({1, max(2, staging_threads())})]
    out["runs"] = [{k: r[k] for k in ("threads", "bytes", "best_s", "bytes_per_s")} for r in runs]
    out["bytes_per_s"] = runs[-1]["bytes_per_s"]
    if cuda:
        out["ratio_to_link"] = out["bytes_per_s"] / out["link"]
    return out


# ---------------------------------------------------------------- phases as subprocesses

class Peaks:
    """Samples the machine's used host memory (MemTotal - MemAvailable: the page cache
    not counted) and, where nvidia-smi answers, the GPU's used memory, while a phase runs."""

    def __init__(self):
        self.host0, self.host, self.gpu = _host_used(), 0, None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while True:
            self.host = max(self.host, _host_used())
            g = _gpu_used()
            if g is not None:
                self.gpu = max(self.gpu or 0, g)
            if self._stop.wait(0.5):
                return

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        return {"host_used_peak": self.host, "host_used_before": self.host0, "gpu_used_peak": self.gpu}


def _host_used() -> int:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":", 1)
        info[k] = int(v.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def _gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                           timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = r.stdout.strip().splitlines() if r.returncode == 0 else []
    return names[0].strip() if names else None


def _gpu_used() -> int | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=5)
        return int(r.stdout.split()[0]) * 2**20 if r.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def run_phase(name: str, cmd: list[str], cwd: Path, out: Path, timeout: float) -> dict:
    """Run ``cmd`` in a session of its own (its Ray processes with it); on timeout the
    whole group gets SIGTERM, then SIGKILL. Output goes to ``$OUT/<name>.log``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":"),
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    log = out / f"{name}.log"
    peaks = Peaks()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except BaseException as e:  # out of time, or this script told to stop: the phase's group goes
            if not isinstance(e, subprocess.TimeoutExpired):
                _kill_group(p, ((signal.SIGINT, 3), (signal.SIGKILL, 5)))
                raise
            status, rc = "timeout", None
            # SIGINT first: a search finishes up (Ray's processes ignore it and go with their driver)
            _kill_group(p, ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 10)))
    wall = time.perf_counter() - t0
    res = {"phase": name, "status": status, "rc": rc, "wall_s": wall, "timeout_s": timeout, "log": str(log),
           "memory": peaks.stop()}
    if status == "failed":
        res["tail"] = log.read_text()[-1500:]
    return res


def _refused(log: Path) -> str | None:
    """The one-line error a command refused its input with, if any."""
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.startswith("error: ")]
    return lines[-1][len("error: "):] if lines else None


def _without_refine(src: Path, dst: Path) -> None:
    import yaml
    space = yaml.safe_load(src.read_text())
    space.pop("refine", None)
    dst.write_text(yaml.safe_dump(space, sort_keys=False))


def _whole_gpu(src: Path, dst: Path) -> None:
    """The space for one worker on a whole GPU (its refinement kept)."""
    import yaml
    space = yaml.safe_load(src.read_text())
    space["resources"] = {**space.get("resources", {}), "gpus_per_worker": 1}
    dst.write_text(yaml.safe_dump(space, sort_keys=False))


def _kill_group(p: subprocess.Popen, steps) -> None:
    """Signal the phase's process group step by step until its leader has exited, then
    SIGKILL whatever of the group is left."""
    for sig, grace in steps:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop(signum, _frame):
    raise SystemExit(128 + signum)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mergesearch.cli", *args]


def _save(out: Path, doc: dict) -> None:
    tmp = out / ".rehearsal.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    tmp.replace(out / "rehearsal.json")


# ---------------------------------------------------------------- figures from the run

def figures(work: Path, plan: dict | None, workers: int) -> dict:
    """What the run stored: merge time against its bound, evaluation time per item,
    refinement step time, peak memory attributes, against the plan."""
    import optuna

    from mergesearch.runs.store import load_run, side_study_names, trial_records
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, storage = load_run(RUN, root=work / "results")
    recs = trial_records(study, storage)
    states: dict = {}
    for r in recs:
        states[r.state] = states.get(r.state, 0) + 1
    out: dict = {"trials": len(recs), "states": states, "scored_on": sorted({r.scored_on for r in recs if r.scored_on})}
    scored = [r for r in recs if r.study_kind != "refine" and r.state in ("COMPLETE", "PRUNED")]
    mats = sorted(r.timings["materialize_s"] for r in scored if r.timings.get("materialize_s"))
    if mats:
        out["merge_s"] = {"median": statistics.median(mats), "min": mats[0], "max": mats[-1], "n": len(mats)}
    if plan:
        bw = plan["bandwidth"]
        written = plan["eval_bytes"]
        compute = (plan["read_per_candidate"] + written) / bw["device"]
        link = plan["moved_per_candidate"] / bw["link"]
        out["merge_bound_s"] = max(compute, link)
        out["merge_bound"] = {"read": plan["read_per_candidate"], "written": written,
                              "moved": plan["moved_per_candidate"], "device_bw": bw["device"], "link_bw": bw["link"],
                              "bandwidth_source": bw.get("source"), "plan_predicted_s": plan["predicted_s"]}
        if mats:
            out["merge_vs_bound"] = out["merge_s"]["median"] / out["merge_bound_s"]
    evals = [(r.timings["eval_s"], r.items) for r in scored if r.timings.get("eval_s") and r.items]
    if evals:
        out["eval_s_per_item"] = sum(e for e, _ in evals) / sum(n for _, n in evals)
        out["eval_items"] = sum(n for _, n in evals)
    refines = [r for r in recs if r.study_kind == "refine"]
    out["refine"] = [{"state": r.state, "reason": r.reason, "refine_s": r.timings.get("refine_s"),
                      "steps": (r.refine or {}).get("steps"), "best_step": (r.refine or {}).get("best_step"),
                      # the refinement's planned device bytes and its measured peak, where it records them
                      "memory": (r.refine or {}).get("memory")}
                     for r in refines]
    steps = [(x["refine_s"], x["steps"]) for x in out["refine"] if x["refine_s"] and x["steps"]]
    if steps:
        out["refine_step_s"] = steps[0][0] / steps[0][1]
    # peak and planned memory, where workers and refinements record them
    mem: dict = {}
    studies = [(None, study)] + [(k, optuna.load_study(study_name=n, storage=storage))
                                 for k, n in side_study_names(RUN, storage)]
    for kind, s in studies:
        for t in s.get_trials(deepcopy=False):
            for k, v in t.user_attrs.items():
                if ("peak" in k or "planned" in k) and isinstance(v, (int, float)):
                    key = f"{kind or 'search'}:{k}"
                    mem[key] = max(mem.get(key, v), v)
    out["memory_attrs"] = mem or "not recorded"
    if plan:
        tiers = plan.get("tiers", {})
        out["plan_memory"] = {"device_per_worker": tiers.get("device"), "pinned_host_per_worker":
                              tiers.get("pinned_host"), "workers": workers, "resident": plan.get("resident"),
                              "host": plan.get("host"), "staging": plan.get("staging"), "budget": plan.get("budget")}
    return out


def _fmt_s(x) -> str:
    return "-" if x is None else (f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.2f} s")


def _gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f} GB"


def summary(doc: dict) -> str:
    lines = [f"rehearsal {doc['shape']} on {doc['device']}, {doc['date']}"]
    lines.append(f"  {'phase':10s} {'status':8s} {'wall':>10s} {'limit':>7s}  peak host used / GPU used")
    for name in PHASES:
        p = doc["phases"].get(name)
        if p is None:
            continue
        m = p.get("memory") or {}
        lines.append(f"  {name:10s} {p['status']:8s} {_fmt_s(p.get('wall_s')):>10s} {p.get('timeout_s', 0):>6.0f}s"
                     f"  {_gb(m.get('host_used_peak'))} / {_gb(m.get('gpu_used_peak'))}")
        for t in p.get("tries") or ([p["first_try"]] if p.get("first_try") else []):
            lines.append(f"    try ({t.get('space') or 'space.yaml'}) {t['status']} in {_fmt_s(t['wall_s'])}: "
                         f"{t['error']}")
        if p.get("tries"):
            lines.append(f"    then ran {p.get('space')} with {p.get('workers')} worker(s)")
    f = doc.get("figures", {})
    if "merge_s" in f:
        lines.append(f"  candidate merge: median {_fmt_s(f['merge_s']['median'])} over {f['merge_s']['n']} "
                     f"(min {_fmt_s(f['merge_s']['min'])}, max {_fmt_s(f['merge_s']['max'])})"
                     + (f"; bound {_fmt_s(f['merge_bound_s'])}: {f['merge_vs_bound']:.1f}x the bound"
                        if "merge_vs_bound" in f else ""))
    if "eval_s_per_item" in f:
        lines.append(f"  evaluation: {_fmt_s(f['eval_s_per_item'])} per item over {f['eval_items']} items")
    for r in f.get("refine", []):
        lines.append(f"  refinement: {r['state']}, {r['steps']} steps in {_fmt_s(r['refine_s'])}"
                     + (f" ({_fmt_s(f['refine_step_s'])} a step)" if "refine_step_s" in f else "")
                     + (f", {r['reason']}" if r.get("reason") else ""))
        rm = r.get("memory") or {}
        lines.append(f"    refinement memory: peak {_gb(rm.get('peak'))} against planned {_gb(rm.get('planned'))}"
                     if rm else "    refinement memory: not recorded")
    if "memory_attrs" in f:
        mem = f["memory_attrs"]
        lines.append("  recorded peak/planned memory: " + (mem if isinstance(mem, str) else
                     ", ".join(f"{k} {_gb(v)}" for k, v in sorted(mem.items()))))
    pm = f.get("plan_memory")
    if pm:
        lines.append(f"  plan per worker: device {_gb(pm['device_per_worker'])} (resident {pm['resident']}, host "
                     f"{pm['host']}), pinned host {_gb(pm['pinned_host_per_worker'])}; x {pm['workers']} workers")
    if "gpu_peak_vs_plan" in f:
        lines.append(f"  GPU memory while searching: {f['gpu_peak_vs_plan']:.2f} x what the workers planned")
    st = doc.get("staging")
    if st:
        runs = ", ".join(f"{r['threads']} thread(s) {r['bytes_per_s'] / 1e9:.1f} GB/s" for r in st["runs"])
        lines.append(f"  staging: {runs}" + (f"; {st['ratio_to_link']:.2f} x the link ({st['link'] / 1e9:.1f} GB/s)"
                                             if "ratio_to_link" in st else ""))
    if "export" in doc["phases"]:
        lines.append(f"  export: {doc['phases']['export']['status']} in {_fmt_s(doc['phases']['export']['wall_s'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def _timeouts(shape: str, given: list[str]) -> dict:
    out = dict(TIMEOUTS[shape])
    for item in given:
        name, _, sec = item.partition("=")
        if name not in out or not sec:
            raise SystemExit(f"--timeout {item}: use PHASE=SECONDS with PHASE one of {', '.join(PHASES)}")
        out[name] = float(sec)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="3b")
    ap.add_argument("--items", type=int, default=300, help="items of the multiple-choice task (2/3 dev)")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--refine-steps", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", action="append", default=[], metavar="PHASE=S", help="a phase's time limit")
    ap.add_argument("--staging-gb", type=float, default=None, help="bytes staged per pass (default 4 on 3b)")
    ap.add_argument("--work", type=Path, default=None, help="where the family goes (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the family and the run")
    ap.add_argument("--out", type=Path, default=None, help="results (default: $OUT, else ./rehearsal-out)")
    ap.add_argument("--step", choices=["generate", "staging"], help=argparse.SUPPRESS)  # a phase's own process
    a = ap.parse_args(argv)
    if a.step == "generate":
        import torch
        res = generate(a.work, a.shape, a.items)
        write_space(a.work, a, torch.cuda.is_available())
        (a.work / "generate.json").write_text(json.dumps(res))
        return 0
    if a.step == "staging":
        (a.work / "staging.json").write_text(json.dumps(staging(a.work, int(a.staging_gb * 1e9))))
        return 0

    signal.signal(signal.SIGTERM, _stop)  # `timeout` around this script: stop the phase, keep what was done
    gpu = _gpu_name()  # nvidia-smi: no CUDA context in this process, whose memory the workers need
    out = (a.out or Path(os.environ.get("OUT") or "rehearsal-out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (a.work or Path(tempfile.mkdtemp(prefix="rehearsal-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    limits = _timeouts(a.shape, a.timeout)
    staging_gb = a.staging_gb if a.staging_gb is not None else (4.0 if a.shape == "3b" else 0.02)
    doc = {"shape": a.shape, "config": family_config(a.shape), "device": gpu or "cpu",
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(), "work": str(work),
           "args": {k: str(v) for k, v in vars(a).items()}, "phases": {}, "figures": {}}
    me = [sys.executable, str(Path(__file__).resolve()), "--shape", a.shape, "--items", str(a.items), "--trials",
          str(a.trials), "--refine-steps", str(a.refine_steps), "--work", str(work)]

    def step(name: str, cmd: list[str], limit: float | None = None) -> dict:
        limit = limits[name] if limit is None else limit
        doc["phases"][name] = {"phase": name, "status": "running", "timeout_s": limit, "wall_s": None}
        _save(out, doc)
        doc["phases"][name] = run_phase(name, cmd, work, out, limit)
        return doc["phases"][name]

    def search(space: str, limit: float, workers: int) -> dict:
        # the search's own budget ends sampling early enough for the refinement and the wrap-up
        return step("search", cli("search", space, "--run", RUN, "--workers", str(workers), "--no-export",
                                  "--timeout", str(max(20.0, 0.6 * limit))), limit)

    plan = None
    try:
        p = step("generate", me + ["--step", "generate"])
        if p["status"] == "ok":
            p.update(json.loads((work / "generate.json").read_text()))
        _save(out, doc)
        if p["status"] != "ok":
            return 1
        shutil.copy(work / "space.yaml", out / "space.yaml")
        import yaml
        cuda = "gpus_per_worker" in yaml.safe_load((work / "space.yaml").read_text())["resources"]

        p = step("plan", cli("plan", "space.yaml", "--json"))
        if p["status"] == "ok":
            lines = (out / "plan.log").read_text().splitlines()  # the JSON, among any warning lines
            first, last = lines.index("{"), len(lines) - 1 - lines[::-1].index("}")
            plan = json.loads("\n".join(lines[first:last + 1]))
            (out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
            p["predicted_s"] = plan.get("predicted_s")
        _save(out, doc)

        shutil.rmtree(work / "results", ignore_errors=True)
        workers, left = a.workers, limits["search"]
        p = search("space.yaml", left, workers)
        tries = []
        # a refinement the device cannot hold is refused before any trial (a finding in itself):
        # on a GPU, one worker on the whole GPU with the refinement (its step time and peak are
        # what the rehearsal is for); else, or if that is refused too, the search without it,
        # in the time left, so that the rest is still measured
        fallbacks = ([("space_wholegpu.yaml", 1, _whole_gpu)] if cuda and workers > 1 else []) + \
            [("space_norefine.yaml", workers, _without_refine)]
        for name, n, rewrite in fallbacks:
            refused = _refused(out / "search.log") if p["status"] == "failed" else None
            if not (refused and "refine" in refused and left - p["wall_s"] > 30):
                break
            tries.append({k: p[k] for k in ("status", "rc", "wall_s")} | {"error": refused, "space": p.get("space")})
            (out / "search.log").rename(out / f"search-refused-{len(tries)}.log")
            rewrite(work / "space.yaml", work / name)
            shutil.rmtree(work / "results", ignore_errors=True)
            left -= p["wall_s"]
            workers = n
            p = search(name, left, workers)
            p["space"] = name
        if tries:
            p["first_try"] = tries[0]
            p["tries"] = tries
            p["workers"] = workers
        try:  # what the run stored, also when it ran out of time
            doc["figures"] = figures(work, plan, workers)
        except Exception as e:  # noqa: BLE001 - a partial run may have no store yet
            doc["figures"] = {"error": f"{type(e).__name__}: {e}"}
        gpu_peak = (p.get("memory") or {}).get("gpu_used_peak")
        if gpu_peak and plan:  # the GPU's peak while the search ran, against what its workers planned
            doc["figures"]["gpu_peak_vs_plan"] = gpu_peak / (workers * plan["tiers"]["device"])
        _save(out, doc)

        if p["status"] == "ok":
            p = step("export", cli("export", RUN, *(["--device", "cuda"] if cuda else [])))
            model = work / "results" / RUN / "model"
            p["model"] = str(model) if model.exists() else None
            if (work / "results" / RUN / "scores.json").exists():
                shutil.copy(work / "results" / RUN / "scores.json", out / "scores.json")
        else:
            doc["phases"]["export"] = {"phase": "export", "status": "skipped", "reason": "the search did not finish",
                                       "wall_s": None, "timeout_s": limits["export"]}
        _save(out, doc)

        p = step("staging", me + ["--step", "staging", "--staging-gb", str(staging_gb)])
        if p["status"] == "ok":
            doc["staging"] = json.loads((work / "staging.json").read_text())
    finally:
        for p in doc["phases"].values():
            if p["status"] == "running":  # this script was stopped during it
                p["status"] = "stopped"
        _save(out, doc)
        text = summary(doc)
        print(text)
        (out / "summary.txt").write_text(text + "\n")
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(p["status"] == "ok" for p in doc["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
