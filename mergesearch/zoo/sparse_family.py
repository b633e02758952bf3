"""Header-only model families in real shards: sizes of a 70B family without its disk.

Each model is a folder of ``model-0000k-of-0000n.safetensors`` shards with
``model.safetensors.index.json`` and ``config.json``, as the Hub ships large models.
Every shard has a complete safetensors header; its data region is a hole
(``truncate`` after the header), so the files report their full sizes and take almost
no disk. Anything that reads headers only (``mergesearch plan``) works on them; their
tensors are zeros when read and must never be merged or evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path

from mergesearch.zoo.synthetic import llama_config, llama_layout, write_sparse_safetensors

# Llama 3 70B: 70,553,706,496 parameters, 141.1 GB in bfloat16 (untied embeddings).
LLAMA_70B = dict(hidden=8192, layers=80, intermediate=28672, vocab=128256, heads=64, kv_heads=8)


def write_sharded_sparse_model(out: Path, cfg: dict, dtype: str = "bfloat16", max_shard_bytes: int = 5 * 10**9) -> Path:
    """One model folder of sparse shards of at most ``max_shard_bytes`` each (a tensor
    larger than that gets a shard of its own)."""
    from mergesearch.engine.checkpoint import DTYPES

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype]
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    used = 0
    for name, shape in llama_layout(cfg):
        n = torch_dtype.itemsize
        for d in shape:
            n *= d
        if shards[-1] and used + n > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = shape
        used += n
    weight_map, total = {}, 0
    for k, shapes in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_sparse_safetensors(out / file, shapes, torch_dtype)
        for name, shape in shapes.items():
            weight_map[name] = file
            n = torch_dtype.itemsize
            for d in shape:
                n *= d
            total += n
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps({**cfg, "torch_dtype": dtype}, indent=2) + "\n")
    return out


def sparse_family(out: str | Path, n_models: int = 4, dtype: str = "bfloat16", **shape) -> dict[str, Path]:
    """``base`` and ``ft0..ft{n-1}``: sharded header-only models of ``shape`` (default LLAMA_70B)."""
    shape = {**LLAMA_70B, **shape}
    cfg = llama_config(shape["hidden"], shape["layers"], shape["intermediate"], shape["vocab"], shape["heads"],
                       dtype, tie=shape.get("tie", False), kv_heads=shape.get("kv_heads"))
    out = Path(out)
    return {k: write_sharded_sparse_model(out / k, cfg, dtype)
            for k in ["base", *[f"ft{i}" for i in range(n_models)]]}
