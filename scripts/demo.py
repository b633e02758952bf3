"""`make demo`: merge a small generated model family with several methods.

Until the search lands this shows the merge engine end to end: a generated Llama
family (base + 3 fine-tunes), one recipe per method merged with `mergesearch merge`,
the mergekit YAML export, and a reload of each output with transformers.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergesearch.cli import main as cli  # noqa: E402
from mergesearch.checkpoint import Checkpoint  # noqa: E402
from mergesearch.recipe import from_dict  # noqa: E402
from mergesearch.synthetic import make_family  # noqa: E402


def distance(a: Checkpoint, b: Checkpoint) -> float:
    num = den = 0.0
    for n in a.names():
        x, y = a.get(n).float(), b.get(n).float()
        num += float((x - y).square().sum())
        den += float(y.square().sum())
    return (num / den) ** 0.5


def main() -> int:
    run = ROOT / "results" / "demo"
    fam = make_family(run / "family", n_models=3, hidden=128, layers=6, intermediate=256, vocab=128,
                      dtype="bfloat16", noise=0.004, seed=0)
    base, fts = str(fam["base"]), [str(fam[f"ft{k}"]) for k in range(3)]
    print(f"family: {run / 'family'} (base + 3 fine-tunes, "
          f"{sum(Checkpoint(base).numel(n) for n in Checkpoint(base).names()) / 1e6:.2f}M params, bfloat16)")
    recipes = {
        "linear": dict(models=[{"path": p, "parameters": {"weight": 1.0}} for p in fts]),
        "task_arithmetic": dict(models=[{"path": p, "parameters": {"weight": 0.5}} for p in fts],
                                parameters={"lambda": 1.0}),
        "ties": dict(models=[{"path": p, "parameters": {"weight": 0.5, "density": [0.2, 0.6]}} for p in fts]),
        "dare_ties": dict(models=[{"path": p, "parameters": {"weight": 0.5, "density": 0.4}} for p in fts]),
        "breadcrumbs_ties": dict(models=[{"path": p, "parameters": {"weight": 0.5}} for p in fts],
                                 parameters={"density": 0.5, "gamma": 0.02}),
        "model_stock": dict(models=[{"path": p} for p in fts]),
        "slerp": dict(models=[{"path": fts[0]}],
                      parameters={"t": [{"filter": "self_attn", "value": [0.2, 0.8]}, {"value": 0.5}]}),
    }
    out_root = run / "merged"
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir(parents=True)
    cks = {k: Checkpoint(fam[k]) for k in fam}
    print(f"\n{'method':<18}{'time':>8}  {'dist→base':>9}  {'dist→ft0':>9}  {'dist→ft1':>9}  {'dist→ft2':>9}")
    for method, body in recipes.items():
        recipe = from_dict({"method": method, "base": base, "seed": 0, **body})
        rpath = out_root / f"{method}.yaml"
        recipe.save(rpath)
        t0 = time.perf_counter()
        code = cli(["merge", str(rpath), "-o", str(out_root / method)])
        if code != 0:
            return code
        dt = time.perf_counter() - t0
        merged = Checkpoint(out_root / method)
        d = [distance(merged, cks[k]) for k in ("base", "ft0", "ft1", "ft2")]
        print(f"{method:<18}{dt:>7.2f}s  " + "  ".join(f"{x:>9.4f}" for x in d))
    cli(["convert", str(out_root / "ties.yaml"), "-o", str(out_root / "ties_mergekit.yaml")])
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out_root / "ties")
    tok = AutoTokenizer.from_pretrained(out_root / "ties")
    with torch.no_grad():
        logits = model(tok("merge", return_tensors="pt").input_ids).logits
    print(f"\nreloaded {out_root / 'ties'} with transformers: logits {tuple(logits.shape)}, finite={bool(torch.isfinite(logits).all())}")
    print(f"recipes and mergekit YAML: {out_root}/*.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
