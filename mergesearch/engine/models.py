"""Loading evaluation models: an HF causal LM and its tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mergesearch.errors import MergeSearchError


def source_dtype(model_dir: Path) -> torch.dtype:
    """The dtype of a checkpoint's floating-point tensors, as stored (read from headers)."""
    from mergesearch.engine.checkpoint import Checkpoint
    c = Checkpoint(model_dir)
    return next((c.dtype(n) for n in c.names() if c.dtype(n).is_floating_point), torch.float32)


def load_model(model_dir: str | Path, device: str = "cpu", trust_remote_code: bool = False,
               dtype: torch.dtype | str | None = None, device_map: dict | None = None):
    """An HF causal LM and its tokenizer, in ``dtype`` (default: the dtype its weights
    are stored in, never a library default, so a scored model is the stored one).
    Safetensors weights only, and a model's own Python code (``auto_map``) only when
    the user passed ``trust_remote_code``.

    ``model_dir`` is a model reference (:mod:`mergesearch.sources`): a folder, a
    Hub ID, or BASE+ADAPTER, which loads the base with the adapter's changes added, as
    PEFT's ``merge_and_unload`` does (in the base's dtype).

    ``device_map`` (accelerate's: module name -> GPU index) shards the model over
    several GPUs, as ``from_pretrained`` does when given a ``device_map``, instead of moving it to
    ``device`` (a sharded worker's, :mod:`mergesearch.engine.multi_gpu`)."""
    from mergesearch import sources
    from mergesearch.engine.adapter import open_model

    model, adapter = sources.split(str(model_dir))
    if adapter is None:
        folder = sources.local_dir(model)
        if sources.is_adapter_dir(folder):
            raise MergeSearchError(f"{model_dir}: a LoRA adapter alone is not a model; write BASE+ADAPTER")
        return _load(folder, device, trust_remote_code, dtype, device_map)
    lm, tok = _load(sources.local_dir(model), "cpu", trust_remote_code, dtype)
    apply_adapter(lm, open_model(str(model_dir)))
    if device_map is not None:
        from accelerate import dispatch_model
        skip = getattr(lm, "_skip_keys_device_placement", None)  # as transformers dispatches
        return dispatch_model(lm, device_map=device_map, skip_keys=skip).eval(), tok
    return lm.to(device), tok


@torch.no_grad()
def apply_adapter(lm: torch.nn.Module, adapter) -> None:
    """Add a LoRA adapter's changes to a loaded base model's parameters, in place."""
    params = dict(lm.named_parameters())
    params.update(dict(lm.named_buffers()))
    for name in [*adapter.factors, *adapter.dense]:
        if name not in params:
            raise MergeSearchError(f"{adapter.path}: the loaded model has no parameter '{name}'")
        p = params[name]
        p.copy_(adapter.get(name).to(p.dtype))
    adapter.release()


def _load(model_dir: Path, device: str, trust_remote_code: bool, dtype, device_map: dict | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from mergesearch.engine.checkpoint import parse_dtype

    model_dir = Path(model_dir)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    dtype = dtype or source_dtype(model_dir)
    hf_logging.disable_progress_bar()
    # transformers' warnings while loading are held back: a model we refuse gets our one
    # error line only; a model that loads gets them afterwards, as transformers wrote them
    hf_root = hf_logging.get_logger("transformers")
    held = _Held()
    handlers, hf_root.handlers = hf_root.handlers, [held]
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        sharded = {"device_map": device_map} if device_map is not None else {}
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype=dtype,
                                                     trust_remote_code=trust_remote_code, **sharded)
    except Exception as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise MergeSearchError(f"{model_dir}: cannot load model: it needs its own Python code (auto_map); "
                                   "pass --trust-remote-code (or trust_remote_code: true) if you trust it") from None
        raise MergeSearchError(f"{model_dir}: cannot load model ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    finally:
        hf_root.handlers = handlers
    for record in held.records:
        hf_root.handle(record)
    return (model if device_map is not None else model.to(device)).eval(), tokenizer


class _Held(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
