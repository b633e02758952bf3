"""accelerate's device_map for a sharded evaluation model, and what it places where.

The map is accelerate's own (``infer_auto_device_map`` within ``get_balanced_memory``'s
per-GPU limits) on a model built from the config on the meta device, without weights;
a tensor belongs to the GPU of its longest module prefix, as accelerate dispatches it.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch

from mergesearch.errors import MergeSearchError


def describe_modules(modules: list[str]) -> str:
    """``model.embed_tokens, layers 0-39 (40)``: the decoder layers as runs."""
    out, run = [], []

    def flush():
        if run:
            out.append(f"layers {run[0]}-{run[-1]} ({len(run)})" if len(run) > 1 else f"layer {run[0]}")
            run.clear()
    for m in modules:
        n = layer_index(m)
        if n is not None and (not run or n == run[-1] + 1):
            run.append(n)
            continue
        flush()
        if n is not None:
            run.append(n)
        else:
            out.append(m or "the whole model")
    flush()
    return ", ".join(out) or "nothing"


def layer_index(module: str) -> int | None:
    parts = module.split(".")
    return int(parts[-1]) if len(parts) >= 2 and parts[-2] in ("layers", "h", "blocks", "layer") \
        and parts[-1].isdigit() else None


def tensor_gpus(names, device_map: dict[str, int | str]) -> dict[str, int | str]:
    """Each tensor name -> the device of its longest module prefix in ``device_map``
    (accelerate's convention: ``""`` is the whole model)."""
    out = {}
    for n in names:
        parts = n.split(".")
        for k in range(len(parts), -1, -1):
            prefix = ".".join(parts[:k])
            if prefix in device_map:
                out[n] = device_map[prefix]
                break
        else:
            raise MergeSearchError(f"tensor '{n}' belongs to no module of the device map "
                                   f"({', '.join(list(device_map)[:3])}, ...)")
    return out


@lru_cache(maxsize=8)
def _device_map(folder: str, max_memory: tuple, dtype: str, trust_remote_code: bool) -> tuple:
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    torch_dtype = getattr(torch, dtype)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with init_empty_weights(), no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise MergeSearchError(f"{folder}: cannot build the model from its config.json to shard it over GPUs "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    limits = dict(max_memory)
    quiet = logging.getLogger("accelerate")
    level, quiet.level = quiet.level, logging.ERROR  # "Device 0 is not available" where no GPU is visible
    try:
        balanced = get_balanced_memory(model, max_memory=limits, no_split_module_classes=no_split, dtype=torch_dtype)
        dm = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=torch_dtype)
    finally:
        quiet.level = level
    return tuple(dm.items())


def infer_device_map(model_ref: str, max_memory: dict[int, int], dtype: torch.dtype,
                     trust_remote_code: bool = False) -> dict[str, int | str]:
    """accelerate's device_map for ``model_ref`` in ``dtype`` within ``max_memory``
    (GPU index -> bytes for weights), balanced over the GPUs as
    ``get_balanced_memory`` balances them. Modules that fit on no GPU map to "cpu" or
    "disk", as accelerate maps them."""
    from mergesearch import sources
    folder = str(sources.local_dir(sources.split(str(model_ref))[0]))
    return dict(_device_map(folder, tuple(sorted(max_memory.items())), str(dtype).replace('torch.', ''), trust_remote_code))
