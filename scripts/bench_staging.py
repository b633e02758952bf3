"""Staging bandwidth: host tensors mapped from a safetensors file into the Stager's slots.

On CUDA it measures the pinned host-to-device bandwidth (the link, as the plan measures
it) and the Stager's end-to-end bandwidth from a memory-mapped file whose pages are in
the page cache, with 1 copy thread and with N, as a ratio against the link (the target:
at least 0.8). On the CPU (``stream: copy``) it measures mapped file -> slot
with 1 and N threads, against one thread's memcpy bandwidth.

    python scripts/bench_staging.py [--threads N] [--gb 1.2] [--json out.json]

Every figure is measured in this run; ratios compare figures of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergesearch.engine.bandwidth import measure_bandwidth  # noqa: E402
from mergesearch.engine.checkpoint import mapped_safetensors  # noqa: E402
from mergesearch.engine.plan import slot_bytes  # noqa: E402
from mergesearch.engine.staging import Stager, staging_threads  # noqa: E402


def write_tensors(folder: Path, total_bytes: int, tensor_bytes: int) -> Path:
    """A safetensors file of bf16 tensors of ``tensor_bytes`` each, ``total_bytes`` in all
    (its pages stay in the page cache after the write)."""
    from safetensors.torch import save_file

    n = max(1, total_bytes // tensor_bytes)
    numel = tensor_bytes // 2
    g = torch.Generator().manual_seed(0)
    row = torch.randn(1 << 16, generator=g).to(torch.bfloat16)
    tensors = {f"t{k:03d}": row.repeat(-(-numel // row.numel()))[:numel].roll(k) for k in range(n)}
    file = folder / "staging.safetensors"
    save_file(tensors, str(file))
    return file


def jobs_of(views: dict[str, torch.Tensor], per_job: int) -> list[tuple[str, list[torch.Tensor]]]:
    """Consecutive tensors grouped ``per_job`` at a time (one output tensor's host inputs)."""
    names = sorted(views)
    return [(names[k], [views[n] for n in names[k:k + per_job]]) for k in range(0, len(names), per_job)]


def measure_stager(device: str, jobs: list[tuple[str, list[torch.Tensor]]], threads: int,
                   passes: int = 3) -> dict:
    """Bytes per second through a Stager of ``threads`` copy threads over ``jobs``
    (after one warm-up pass that touches every mapped page), as a consumer that reads
    nothing sees them: from the first job's request to the last copy landed."""
    dev = torch.device(device)
    capacity = max(sum(slot_bytes(t.numel() * t.element_size()) for t in ts) for _, ts in jobs)
    moved = sum(t.numel() * t.element_size() for _, ts in jobs for t in ts)
    st = Stager(dev, capacity, threads=threads)
    times = []
    try:
        for p in range(passes + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for _name, _staged in st.run(jobs):
                pass
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if p:  # the first pass maps the pages in
                times.append(time.perf_counter() - t0)
    finally:
        st.close()
        st.slots = st.pinned = None  # the slots go now, before the next stager's
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    best = min(times)
    return {"threads": threads, "bytes": moved, "seconds": times, "best_s": best, "bytes_per_s": moved / best,
            "slot_bytes": capacity}


def host_copy(views: list[torch.Tensor], threads: int, pinned: bool, passes: int = 3) -> dict:
    """Mapped tensors -> one host buffer (pinned on CUDA machines), by the Stager's copy."""
    from concurrent.futures import ThreadPoolExecutor

    from mergesearch.engine.staging import parallel_copy
    big = max(t.numel() * t.element_size() for t in views)
    buf = torch.empty(big, dtype=torch.uint8, pin_memory=pinned)
    pool = ThreadPoolExecutor(threads - 1) if threads > 1 else None
    times = []
    for p in range(passes + 1):
        t0 = time.perf_counter()
        for t in views:
            n = t.numel() * t.element_size()
            parallel_copy([buf[:n].view(t.dtype).view(t.shape)], [t], pool, threads)
        if p:
            times.append(time.perf_counter() - t0)
    if pool is not None:
        pool.shutdown()
    moved = sum(t.numel() * t.element_size() for t in views)
    return {"threads": threads, "bytes": moved, "best_s": min(times), "bytes_per_s": moved / min(times)}


def memcpy_bandwidth(nbytes: int = 256 << 20, passes: int = 5) -> float:
    """One thread's memmove between two in-memory buffers (bytes copied per second)."""
    import ctypes
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)
    t0 = time.perf_counter()
    for _ in range(passes):
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)
    return passes * nbytes / (time.perf_counter() - t0)


def run(device: str, threads: int, total_bytes: int, tensor_bytes: int, per_job: int, passes: int,
        folder: Path | None = None) -> dict:
    out: dict = {"device": device, "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                 "threads_default": staging_threads(), "total_bytes": total_bytes, "tensor_bytes": tensor_bytes,
                 "per_job": per_job}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
        out["link"] = measure_bandwidth("cuda")["link"]
    else:
        out["memcpy"] = memcpy_bandwidth()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        file = write_tensors(Path(tmp), total_bytes, tensor_bytes)
        views = mapped_safetensors(file)
        jobs = jobs_of(views, per_job)
        out["stager"] = [measure_stager(device, jobs, k, passes) for k in sorted({1, threads})]
        out["host_copy"] = [host_copy(list(views.values()), k, device == "cuda", passes) for k in sorted({1, threads})]
        del views, jobs
    ref = out["link"] if device == "cuda" else out["memcpy"]
    for r in out["stager"] + out["host_copy"]:
        r["ratio"] = r["bytes_per_s"] / ref
    return out


def report(out: dict) -> str:
    ref_name = "pinned H2D link" if out["device"] == "cuda" else "1-thread in-memory memcpy"
    ref = out["link"] if out["device"] == "cuda" else out["memcpy"]
    lines = [f"staging on {out.get('gpu', 'cpu')} ({out['cpus']} CPUs), {out['date']}: "
             f"{out['total_bytes'] / 1e9:.2f} GB mapped, jobs of {out['per_job']} x "
             f"{out['tensor_bytes'] / 1e6:.1f} MB; {ref_name} {ref / 1e9:.1f} GB/s"]
    for kind, label in (("stager", "Stager end to end"), ("host_copy", "mapped -> host buffer")):
        for r in out[kind]:
            lines.append(f"  {label:24s} {r['threads']:2d} thread(s): {r['bytes_per_s'] / 1e9:7.2f} GB/s"
                         f"  = {r['ratio']:.2f} x {ref_name}")
    s = out["stager"]
    if len(s) > 1:
        lines.append(f"  {s[-1]['threads']} threads / 1 thread: {s[-1]['bytes_per_s'] / s[0]['bytes_per_s']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="N (default: the Stager's default)")
    ap.add_argument("--gb", type=float, default=None, help="bytes mapped (default: 1.6 on CUDA, 0.4 on the CPU)")
    ap.add_argument("--tensor-mb", type=float, default=48.0, help="bytes per tensor (a 3B MLP matrix: 50 MB)")
    ap.add_argument("--per-job", type=int, default=4, help="tensors per job (host inputs of one output tensor)")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where the mapped file is written")
    ap.add_argument("--json", type=Path, default=None, help="write the raw results here")
    a = ap.parse_args(argv)
    threads = a.threads or max(2, staging_threads())
    gb = a.gb if a.gb is not None else (1.6 if a.device == "cuda" else 0.4)
    out = run(a.device, threads, int(gb * 1e9), int(a.tensor_mb * 1e6), a.per_job, a.passes, a.dir)
    print(report(out))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
