"""Fused device merge kernels (Triton) against the torch kernels, and against the bandwidth bound.

For tensors of 16M and 64M elements, base + 3 and + 4 models (bf16, and float32 at 16M),
one candidate of each method (task_arithmetic, ties, dare_ties, breadcrumbs; weight 0.4,
density 0.3, inputs resident, written into a preallocated output of the input dtype as
the Materializer does) is timed with the Triton kernels (``MERGESEARCH_TRITON=1``) and
with the torch kernels (``MERGESEARCH_TRITON=0``; eager by default, ``--torch-compiled``
for TorchInductor, which compiles for minutes over this matrix). Synchronized medians of
``--repeat`` after one warm-up. The device copy bandwidth is measured in the same run.

Per method and shape it prints and writes (``--json``):
- bytes: every input read once and the output written once;
- bound: those bytes at the measured copy bandwidth (the target's bound: one read of each input and one write of the output);
- passes: the bytes the Triton path reads and writes, counted from its launches (the
  combine kernel; each selection pass reads a model and the base: the top-16 histogram,
  counted only in the one-shot figure, where no FactorCache keeps it between candidates;
  the bucket gathers; radix and tie-count passes where a bucket is crowded), over the one-pass
  bytes; and the bound scaled by them;
- achieved ms, fraction of each bound, speed-up over torch, and whether the two paths
  gave the same bits.
DARE's masks are torch's generator draws (kept so that exports equal candidates): the
time of drawing them (``dare_mask``) is reported on its own and is part of the candidate.

    python scripts/bench_kernels.py --json $OUT/bench_kernels.json
    python scripts/bench_kernels.py --device cpu --interpret      # smoke run, tiny tensors
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("task_arithmetic", "ties", "dare_ties", "breadcrumbs")
DTYPES = {"bf16": "bfloat16", "f32": "float32"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--interpret", action="store_true", help="Triton's interpreter on CPU tensors (a smoke run)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated NUMEL:MODELS:DTYPE (default 16M and 64M x 3 and 4 models in bf16, "
                        "16M x 3 in f32; with --interpret 4099:3:bf16)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--torch-compiled", action="store_true", help="the torch reference compiled (TorchInductor)")
    p.add_argument("--histogram", choices=("atomics", "radix", "both"), default="both",
                   help="how the selection finds a threshold's bucket (triton_select.HISTOGRAM); both: the "
                        "atomic histogram, and the radix passes as a third Triton figure")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def shapes(args) -> list[tuple[int, int, str]]:
    if args.shapes:
        out = []
        for item in args.shapes.split(","):
            n, k, dt = item.split(":")
            out.append((int(float(n.rstrip("M")) * (1 << 20)) if n.endswith("M") else int(n), int(k), dt))
        return out
    if args.interpret:
        return [(4099, 3, "bf16")]
    m = 1 << 20
    return [(16 * m, 3, "bf16"), (16 * m, 4, "bf16"), (64 * m, 3, "bf16"), (64 * m, 4, "bf16"), (16 * m, 3, "f32")]


def main() -> int:
    args = parse()
    if args.interpret:  # read by triton when it is imported
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["MERGESEARCH_TRITON"] = "force"
    if not args.torch_compiled:
        os.environ["MERGESEARCH_COMPILE"] = "0"
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; run it on a GPU, or `--device cpu --interpret` for a smoke run")
        return 2
    if args.device == "cpu" and not args.interpret:
        print("bench_kernels: on the CPU the Triton kernels run only interpreted; add --interpret")
        return 2
    from mergesearch.engine.bandwidth import measure_bandwidth
    from mergesearch.methods import REGISTRY, TensorInputs, sparsify
    from mergesearch.methods.inputs import FactorCache
    from mergesearch.methods import triton_kernels as tk
    from mergesearch.methods import triton_select as ts

    ts.HISTOGRAM = "radix" if args.histogram == "radix" else "atomics"

    have_triton = tk.jit() is not None
    if not have_triton:
        print("bench_kernels: triton is not installed (or too old): timing the torch kernels only")
    dev = torch.device(args.device)
    bw = measure_bandwidth("cuda" if dev.type == "cuda" else "cpu")["device"]
    info = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__, "triton": _version("triton"), "commit": _commit(),
            "date": time.strftime("%Y-%m-%d"), "copy_bandwidth_Bps": bw, "torch_reference":
            "compiled" if args.torch_compiled else "eager", "repeat": args.repeat, "histogram": args.histogram,
            "rows": []}
    print(f"device {info['device']}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write); triton {info['triton']}; "
          f"torch reference {info['torch_reference']}")
    counts = {"passes": 0, "bytes": 0}

    class Counted:
        """A selection kernel whose launches are counted: each reads its source and base."""

        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(src, base, *a, **kw):
                counts["passes"] += 1
                counts["bytes"] += src.numel() * (src.element_size() + (base.element_size()
                                                                        if kw.get("BASE_KIND", -1) >= 0 else 0))
                return launch(src, base, *a, **kw)
            return run

    if have_triton:
        j = tk.jit()
        for name in ("top16_hist_kernel", "compact_kernel", "radix_hist_kernel", "count_equal_kernel"):
            setattr(j, name, Counted(getattr(j, name)))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    header = (f"{'method':<16} {'shape':<14} {'bytes':>9} {'passes':>6} {'bound ms':>9} {'triton ms':>10} "
              f"{'of bound':>8} {'of counted':>10} {'torch ms':>9} {'speed-up':>8} {'bits':>5}")
    print(header)
    for n, k, dt in shapes(args):
        dtype = getattr(torch, DTYPES[dt])
        g = torch.Generator(device=dev).manual_seed(0)
        base = (torch.randn(n, generator=g, device=dev) * 0.02).to(dtype)
        models = [(base.float() + torch.randn(n, generator=g, device=dev) * 1e-3).to(dtype) for _ in range(k)]
        out = torch.empty_like(base)
        es = base.element_size()
        one_pass = (k + 1) * n * es + n * es
        for method in args.methods.split(","):
            spec = REGISTRY[method]
            gp = {p.name: p.default for p in spec.global_params}
            names = {p.name for p in spec.model_params}
            mp = [{**{p.name: p.default for p in spec.model_params}, "weight": 0.4,
                   **({"density": 0.3} if "density" in names else {})} for _ in range(k)]

            def candidate(cache=None):
                x = TensorInputs("w", base, tensors=models, seed=5, out_dtype=dtype, cache=cache,
                                 ids=[str(i) for i in range(k)])
                x.out = out
                made = spec.fn(x, gp, mp)
                return made if made is out else out.copy_(made)

            row = {"method": method, "numel": n, "models": k, "dtype": dt, "bytes": one_pass,
                   "bound_ms": one_pass / bw * 1e3}
            results = {}
            on = "1" if not args.interpret else "force"
            # torch; Triton with the selection histograms kept between candidates (a FactorCache);
            # Triton making them per candidate (the export, and the Materializer without factors)
            runs = [("torch", "0", False)]
            selects = spec.sparsifier in ("magnitude", "outliers")
            if have_triton:
                runs += [("triton", on, True)] + ([("triton_oneshot", on, False)] if selects else [])
                runs += [("triton_radix", on, False)] if selects and args.histogram == "both" else []
            for label, env, keep in runs:
                os.environ["MERGESEARCH_TRITON"] = env
                ts.HISTOGRAM = "radix" if label == "triton_radix" or args.histogram == "radix" else "atomics"
                cache = FactorCache() if keep else None
                candidate(cache)  # warm-up: compiles (and fills the cache)
                sync()
                times = []
                for _ in range(args.repeat):
                    counts.update(passes=0, bytes=0)
                    t0 = time.perf_counter()
                    candidate(cache)
                    sync()
                    times.append(time.perf_counter() - t0)
                row[f"{label}_ms"] = statistics.median(times) * 1e3
                results[label] = out.clone()
                if label.startswith("triton"):
                    masks = n * k if method.startswith("dare") else 0  # the kernel reads the bool masks
                    moved = one_pass + masks + counts["bytes"]
                    suffix = label[len("triton"):]
                    row.update({f"selection_launches{suffix}": counts["passes"], f"bytes_moved{suffix}": moved,
                                f"passes{suffix}": moved / one_pass})
            if method.startswith("dare"):
                x = TensorInputs("w", base, tensors=models, seed=5)
                sync()
                t0 = time.perf_counter()
                for i in range(k):
                    sparsify.dare_mask(x, i, 0.3, True)
                sync()
                row["dare_mask_ms"] = (time.perf_counter() - t0) * 1e3
            if "triton" in results:
                as_int = torch.int16 if es == 2 else torch.int32
                row["equal_bits"] = all(torch.equal(results[label].view(as_int), results["torch"].view(as_int))
                                        for label in results)
                row["fraction_of_bound"] = row["bound_ms"] / row["triton_ms"]
                row["fraction_of_counted_bound"] = row["bound_ms"] * row["passes"] / row["triton_ms"]
                row["speedup"] = row["torch_ms"] / row["triton_ms"]
            info["rows"].append(row)
            shape = f"{n / (1 << 20):.0f}M" if n >= 1 << 20 else str(n)
            shape = f"{shape}x{k} {dt}"
            if "triton" in results:
                print(f"{method:<16} {shape:<14} {one_pass / 1e6:>7.0f}MB {row['passes']:>6.2f} "
                      f"{row['bound_ms']:>9.3f} {row['triton_ms']:>10.3f} {row['fraction_of_bound']:>8.1%} "
                      f"{row['fraction_of_counted_bound']:>10.1%} {row['torch_ms']:>9.3f} {row['speedup']:>7.1f}x "
                      f"{'same' if row['equal_bits'] else 'DIFF':>5}"
                      + (f"  (dare masks {row['dare_mask_ms']:.2f} ms)" if "dare_mask_ms" in row else "")
                      + (f"  (one-shot: {row['triton_oneshot_ms']:.3f} ms, {row['passes_oneshot']:.2f} passes)"
                         if "triton_oneshot_ms" in row else "")
                      + (f"  (radix buckets: {row['triton_radix_ms']:.3f} ms, {row['passes_radix']:.2f} passes)"
                         if "triton_radix_ms" in row else ""))
            else:
                print(f"{method:<16} {shape:<14} {one_pass / 1e6:>7.0f}MB {'':>6} {row['bound_ms']:>9.3f} "
                      f"{'':>10} {'':>8} {'':>10} {row['torch_ms']:>9.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(info, indent=1))
        print(f"wrote {args.json}")
    return 0


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
