"""Device check of a worker sharded over several GPUs (resources.gpus_per_worker >= 2).

    python scripts/check_multi_gpu.py [--gpus 2] [--out DIR] [--cpu]

On a machine with ``--gpus`` CUDA devices: writes a small real Llama-shaped bf16
family, plans it over the GPUs with a per-GPU budget small enough that every placement
path runs (inputs resident, inputs staged through each GPU's slots, the largest tensors
merged on the host), loads the evaluation model with the plan's device_map (as a worker
does), writes TIES and task-arithmetic candidates into it in place, and checks that every
parameter is bit-equal to the streamed export of the same recipe and that a forward pass
through the sharded model gives the single-device logits. Prints one JSON summary
(``$OUT/multi_gpu.json`` too when OUT is set). ``--cpu`` runs the same checks with every
"GPU" the CPU (what tests/test_multi_gpu_plan.py covers).
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--cpu", action="store_true", help="every 'GPU' the CPU (no CUDA needed)")
    a = ap.parse_args()
    from mergesearch.engine.materialize import Materializer
    from mergesearch.engine.merge import open_plan, stream_merge
    from mergesearch.engine.models import load_model
    from mergesearch.engine.multi_gpu import make_multi_plan
    from mergesearch.recipe import from_dict
    from mergesearch.zoo.synthetic import make_family

    device = "cpu" if a.cpu else "cuda"
    if not a.cpu and torch.cuda.device_count() < a.gpus:
        print(json.dumps({"ok": False, "why": f"{torch.cuda.device_count()} CUDA device(s), {a.gpus} needed"}))
        return 1
    work = Path(tempfile.mkdtemp(prefix="multi_gpu_"))
    fam = make_family(work / "fam", n_models=3, hidden=256, layers=4, intermediate=512, vocab=8192, heads=4,
                      dtype="bfloat16", noise=0.01, seed=5, init_std=0.05)
    base, fts = str(fam["base"]), [str(fam[f"ft{i}"]) for i in range(3)]
    layers = 4
    per = max(1, layers // a.gpus)
    dm = {"model.embed_tokens": 0, **{f"model.layers.{i}": min(i // per, a.gpus - 1) for i in range(layers)},
          "model.norm": a.gpus - 1, "model.rotary_emb": a.gpus - 1, "lm_head": a.gpus - 1}
    methods = ["linear", "task_arithmetic", "ties"]
    report: dict = {"device": device, "gpus": a.gpus, "torch": torch.__version__, "checks": {}}
    # the smallest per-GPU budget at which the plan still places every tensor: the
    # embedding and lm_head host-merged, some inputs staged
    budget, plan = None, None
    for b in range(40_000_000, 4_000_000, -250_000):
        try:
            p = make_multi_plan(base, fts, methods, gpus=a.gpus, device=device, budget=b, device_map=dm,
                                stream="copy", bandwidth={"device": 1.0, "link": 1.0, "source": "check"})
        except Exception:
            break
        if p.host_merged and any(g.resident for g in p.gpus) and any(g.host for g in p.gpus):
            budget, plan = b, p
            break
    if plan is None:
        plan = make_multi_plan(base, fts, methods, gpus=a.gpus, device=device, budget=40_000_000, device_map=dm,
                               stream="copy", bandwidth={"device": 1.0, "link": 1.0, "source": "check"})
    report["plan"] = {"budget": budget, "resident": plan.resident, "host_merged": sorted(plan.host_merged),
                      "staged": {g.index: g.host for g in plan.gpus}}
    t0 = time.perf_counter()
    mat = Materializer(base, fts, device=device, placement=plan)
    model, tok = load_model(base, device=device, device_map=None if a.cpu else plan.device_map)
    report["setup_s"] = time.perf_counter() - t0
    where = {n: str(p.device) for n, p in model.named_parameters()}
    report["checks"]["parameters_on_their_gpus"] = all(where[n] == plan.tensor_device(n) for n in where)
    ok = report["checks"]["parameters_on_their_gpus"]
    ref_model, _ = load_model(base, device="cpu")
    for name, data in {
        "ties": {"method": "ties", "base": base, "models": [
            {"path": fts[0], "parameters": {"weight": 0.5, "density": 0.3}},
            {"path": fts[1], "parameters": {"weight": 0.4, "density": 0.6}},
            {"path": fts[2], "parameters": {"weight": 0.3, "density": 0.5}}]},
        "task_arithmetic": {"method": "task_arithmetic", "base": base, "parameters": {"lambda": 0.8}, "models": [
            {"path": f, "parameters": {"weight": w}} for f, w in zip(fts, (0.5, -0.2, 0.4))]},
    }.items():
        recipe = from_dict(data)
        ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
        t0 = time.perf_counter()
        mat.write_into(model, recipe)
        if not a.cpu:
            torch.cuda.synchronize()
        took = time.perf_counter() - t0
        out = work / f"export_{name}"
        stream_merge(open_plan(recipe), out)
        from safetensors.torch import load_file
        exported = {}
        for f in sorted(out.glob("*.safetensors")):
            exported.update(load_file(f))
        equal = all(torch.equal(p.detach().cpu(), exported[n]) for n, p in model.named_parameters() if n in exported)
        in_place = all(p.data_ptr() == ptrs[n] for n, p in model.named_parameters())
        ref_model.load_state_dict(exported, strict=False)
        ids = torch.tensor([[1, 5, 9, 13, 21, 34, 55, 89]])
        with torch.no_grad():
            sharded = model(ids.to(plan.tensor_device("model.embed_tokens.weight"))).logits.float().cpu()
            single = ref_model(ids).logits.float()
        close = torch.allclose(sharded, single, atol=2e-2, rtol=2e-2)
        report["checks"][name] = {"bit_equal_to_export": equal, "in_place": in_place, "logits_close": close,
                                  "max_logit_diff": float((sharded - single).abs().max()), "write_s": took,
                                  "moved_bytes": mat.last_moved}
        ok = ok and equal and in_place and close
    mat.close()
    report["ok"] = bool(ok)
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "multi_gpu.json").write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
