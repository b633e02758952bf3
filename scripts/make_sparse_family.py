"""Write a Llama-3-70B-shaped family (base + fine-tunes) as sparse safetensors shards.

    python scripts/make_sparse_family.py OUT [--models 4] [--layers 80] [--dtype bfloat16]

Headers are complete and data regions are holes: `mergesearch plan` reads the sizes of a
141 GB-per-model family from a few MB of disk. Never merge or evaluate these files.
"""

from __future__ import annotations

import argparse
import subprocess

from mergesearch.zoo.sparse_family import LLAMA_70B, sparse_family


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--layers", type=int, default=LLAMA_70B["layers"])
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    fam = sparse_family(a.out, n_models=a.models, dtype=a.dtype, layers=a.layers)
    for k, p in fam.items():
        print(f"{k}: {p}")
    print(subprocess.run(["du", "-sh", "--apparent-size", a.out], capture_output=True, text=True).stdout.strip(),
          "apparent;", subprocess.run(["du", "-sh", a.out], capture_output=True, text=True).stdout.strip(), "on disk")


if __name__ == "__main__":
    main()
