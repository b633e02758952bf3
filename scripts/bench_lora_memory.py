"""Memory of a LoRA family against the same family as full fine-tunes.

On the base of the bench family of ``scripts/bench_merge.py`` (Llama-shaped, hidden 1536,
12 layers, vocab 32000, bf16, 0.44B parameters, cached under ``results/bench_cache/``),
it writes four LoRA adapters (rank ``--rank``, every linear projection of every block,
bf16 factors) and their dense twins: full fine-tunes holding base + (B @ A) * scaling,
the checkpoints PEFT's ``merge_and_unload`` would write. For each family, in its own
process, with a declared budget so that every input is held in private memory (the
"device" of a CPU worker), it reports:

- the plan's input tier (bytes) and the disk size of the four fine-tunes;
- the process's resident memory once the Materializer has placed the inputs, as a
  rise over the process before it (the base and the evaluation model are loaded first
  and are the same in both families);
- the peak resident memory over that baseline during TIES candidates written into a
  bf16 evaluation model, and the candidate times (the first, then the median of the
  next ``--repeat``);
- whether the adapter family's candidate equals the dense family's (it holds the same
  task vectors up to the bf16 rounding of base + delta in the dense twins, so the figure
  is the largest difference, not a bit-equality claim).

    .venv/bin/python scripts/bench_lora_memory.py            # full run (about 5 minutes)
    .venv/bin/python scripts/bench_lora_memory.py --small    # quick smoke run
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
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench_merge import FULL, SMALL, family_dir  # noqa: E402

N = 4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rss() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def build(cache: Path, shape: dict, rank: int) -> dict:
    import torch

    from mergesearch.engine.adapter import Adapter
    from mergesearch.engine.checkpoint import Checkpoint
    from mergesearch.engine.writer import StreamingWriter
    from mergesearch.zoo.synthetic import llama_config, make_family, write_adapter

    fam = make_family(family_dir(cache, shape), n_models=1, dtype="bfloat16", noise=0.002, seed=0, **shape)
    base = fam["base"]
    root = cache / f"lora_r{rank}_{family_dir(cache, shape).name}"
    cfg = llama_config(shape["hidden"], shape["layers"], shape["intermediate"], shape["vocab"], shape["heads"],
                       "bfloat16")
    out = {"base": str(base), "adapters": [], "dense": []}
    for k in range(N):
        a = root / f"lora{k}"
        if not (a / "adapter_config.json").exists():
            g = torch.Generator().manual_seed(100 + k)
            write_adapter(a, cfg, str(base), lambda key, s: torch.randn(s, generator=g) * 0.02, r=rank,
                          alpha=2 * rank, targets=TARGETS, dtype="bfloat16")
        d = root / f"dense{k}"
        if not (d / "config.json").exists():
            b = Checkpoint(base)
            ad = Adapter(a, b)
            layout = [(n, b.shape(n), b.dtype(n)) for n in b.names()]
            with StreamingWriter(d, layout, force=True) as w:
                for n, _, dt in layout:
                    w.write(n, ad.get(n))  # base + delta in bf16, as merge_and_unload stores it
                w.copy_side_files(base, None, {})
        out["adapters"].append(str(a))
        out["dense"].append(str(d))
    return out


def measure(family: dict, which: str, repeat: int) -> dict:
    import torch

    from mergesearch.engine.materialize import Materializer
    from mergesearch.engine.models import load_model
    from mergesearch.engine.plan import make_plan
    from mergesearch.sources import pin
    from mergesearch.recipe import from_dict

    torch.set_num_threads(os.cpu_count() or 1)
    base = family["base"]
    models = [pin(m, base=base) for m in family[which]]
    model, _ = load_model(base, dtype="bfloat16")
    before = rss()
    plan = make_plan(base, models, ["ties"], budget=10**12, bandwidth={"device": 1.0, "link": 1.0, "source": "-"})
    t0 = time.perf_counter()
    mat = Materializer(base, models, methods=["ties"], placement=plan, check=False)
    setup = time.perf_counter() - t0
    placed = rss()
    reset_peak()
    recipe = from_dict(dict(method="ties", base=base, dtype="bfloat16", models=[
        {"path": m, "parameters": {"weight": 0.5 + 0.1 * i, "density": 0.4}} for i, m in enumerate(models)]))
    times = []
    for _ in range(1 + repeat):
        t0 = time.perf_counter()
        mat.write_into(model, recipe)
        times.append(time.perf_counter() - t0)
    peak = rss()
    sample = {n: p.detach().float().clone() for n, p in model.named_parameters() if "layers.1." in n}
    mat.close()
    inputs = sum(i.nbytes for i in plan.inputs if i.role == "model")
    disk = sum(f.stat().st_size for m in family[which] for f in Path(m).iterdir() if f.suffix == ".safetensors")
    return {"family": which, "plan_model_inputs": inputs, "plan_scratch": plan.scratch, "disk": disk,
            "held": mat.resident_bytes - plan.input("base").nbytes,
            "rss_placed": placed["VmRSS"] - before["VmRSS"], "peak_over_placed": peak["VmHWM"] - placed["VmRSS"],
            "peak_over_before": peak["VmHWM"] - before["VmRSS"], "setup_s": setup, "first_s": times[0],
            "next_s": statistics.median(times[1:]), "sample": {k: v.tolist() for k, v in sample.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=ROOT / "results" / "bench_cache")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", nargs=2, default=None)
    a = ap.parse_args()
    shape = SMALL if a.small else FULL
    if a.child:
        fam = json.loads(a.child[0])
        print(json.dumps(measure(fam, a.child[1], a.repeat)))
        return
    family = build(a.cache, shape, a.rank)
    rows = {}
    for which in ("dense", "adapters"):
        env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
        res = subprocess.run([sys.executable, __file__, "--child", json.dumps(family), which, "--repeat",
                              str(a.repeat)] + (["--small"] if a.small else []),
                             capture_output=True, text=True, env=env, timeout=3600)
        if res.returncode != 0:
            raise SystemExit(res.stderr[-3000:])
        rows[which] = json.loads(res.stdout.strip().splitlines()[-1])
    import torch

    from mergesearch.engine.checkpoint import Checkpoint
    b = Checkpoint(family["base"])
    num = den = 0.0
    for k, v in rows["dense"]["sample"].items():
        dense, lora, base = torch.tensor(v), torch.tensor(rows["adapters"]["sample"][k]), b.get(k).float()
        num += float((lora - dense).square().sum())
        den += float((dense - base).square().sum())
    diff = (num / den) ** 0.5
    for r in rows.values():
        r.pop("sample")
    mb = 1e6
    print(f"{N} fine-tunes of the bench base ({shape}), LoRA rank {a.rank} on {', '.join(TARGETS)}; TIES candidates")
    print(f"{'':<28}{'full fine-tunes':>18}{'LoRA adapters':>18}{'ratio':>10}")
    for key, label in (("disk", "on disk"), ("plan_model_inputs", "plan: model inputs"),
                       ("held", "held by the Materializer"), ("rss_placed", "resident rise, placed"),
                       ("peak_over_before", "peak rise, with candidates"), ("plan_scratch", "plan: merge scratch")):
        d, l = rows["dense"][key], rows["adapters"][key]
        print(f"{label:<28}{d / mb:>15.1f} MB{l / mb:>15.1f} MB{l / d if d else float('nan'):>10.4f}")
    for key, label in (("setup_s", "set-up"), ("first_s", "first candidate"), ("next_s", "next candidates")):
        d, l = rows["dense"][key], rows["adapters"][key]
        print(f"{label:<28}{d:>16.2f} s{l:>16.2f} s{l / d:>10.2f}")
    print(f"layer 1's merged task vector, adapters vs dense twins: relative L2 difference {diff:.3g} (the dense "
          "twins round base + delta to bf16, which moves TIES's top-k cut)")
    result = {"date": time.strftime("%Y-%m-%d"), "shape": shape, "rank": a.rank, "targets": TARGETS,
              "cpus": os.cpu_count(), "rows": rows, "rel_diff_layer1": diff}
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
