"""Diagonal curvature estimates, Gram matrices and Adam second moments, cached.

Kinds (``mergesearch curvature MODEL --kind K``):

- ``fisher``: the Fisher information diagonal, E_x E_{y ~ p(.|x)} [(d log p(y|x))^2].
  For each example the continuation tokens are sampled from the model's own
  predictive distribution at every continuation position (the prefix is the true
  text), and the per-example squared gradients are averaged.
- ``empirical_fisher``: the same with the true continuation instead of samples.
- ``squared_grad``: squared mini-batch gradients of the mean loss, times the batch
  size, averaged over batches: a cheaper estimate of the same diagonal (with batch
  size 1 it equals ``empirical_fisher``).
- ``gram``: for every linear layer, the mean over tokens of x x^T of its inputs
  (RegMean), under the layer's weight name.
- ``adam``: the bias-corrected second moments v_hat = v / (1 - beta2^step) an Adam
  optimizer saved beside the model: ``exp_avg_sq.safetensors`` (the zoo's layout,
  under the parameter names) or HF Trainer's ``optimizer.pt`` (loaded with
  ``weights_only=True`` and mapped to parameter names by order and shape).

Estimates are per example (a mean); the methods scale them by data size where the
math asks for it. Files carry the model's own tensor names, so a metric lines up
with the weights it describes.

Every result is cached under ``$MERGESEARCH_CACHE`` (default
``~/.cache/mergesearch``) by a content hash of the model's weights, the data (or
the optimizer file), the kind and the options: a search computes each estimate
once, and every candidate on every worker reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import torch

from mergesearch.engine.checkpoint import Checkpoint
from mergesearch.fsutil import atomic_file
from mergesearch.errors import MergeSearchError

log = logging.getLogger("mergesearch.search.curvature")
KINDS = ("fisher", "empirical_fisher", "squared_grad", "gram", "adam")
VERSION = 1  # bump when an estimator changes, so cached files are recomputed


# -- data ----------------------------------------------------------------------------

def resolve_data(data: str, task_dir: str | None) -> Path:
    """A JSONL file, or ``TASK:SPLIT`` under ``task_dir`` (the zoo layout)."""
    from mergesearch.evaluate import EvalConfig
    from mergesearch.evaluate.jsonl import task_file

    if data.endswith(".jsonl"):
        p = Path(data)
        if not p.is_file():
            raise MergeSearchError(f"{p}: data file not found")
        return p
    task, sep, split = data.partition(":")
    if not sep or not task or not split:
        raise MergeSearchError(f"--data: '{data}' is neither a .jsonl file nor TASK:SPLIT")
    return task_file(EvalConfig(tasks=[task], task_dir=task_dir), task, split)


def load_examples(path: Path, n: int) -> list[tuple[str, str]]:
    """(context, true continuation) pairs: the first ``n`` items of the file."""
    from mergesearch.evaluate.jsonl import read_items

    items = read_items(path)
    if n > len(items):
        raise MergeSearchError(f"{path}: --n-examples {n} but the file has {len(items)} items")
    out = []
    for it in items[:n]:
        out.append((it["context"], it["choices"][it["answer"]] if "choices" in it else it["target"]))
    return out


def _encode(tokenizer, examples: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Token ids of context + continuation and the continuation length, split as the
    evaluator splits them."""
    from mergesearch.evaluate.jsonl import encode_pair

    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out = []
    for ctx, cont in examples:
        c, k = encode_pair(tokenizer, ctx, cont)
        out.append(((c or [prefix]) + k, len(k)))
    return out


def _batch(rows: list[tuple[list[int], int]], pad: int):
    width = max(len(ids) for ids, _ in rows) - 1
    inp = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    tgt = torch.zeros((len(rows), width), dtype=torch.long)
    tmask = torch.zeros((len(rows), width), dtype=torch.bool)
    for j, (ids, n) in enumerate(rows):
        L = len(ids) - 1
        inp[j, :L] = torch.tensor(ids[:-1])
        mask[j, :L] = 1
        tgt[j, :L] = torch.tensor(ids[1:])
        tmask[j, L - n:L] = True
    return inp, mask, tgt, tmask


# -- estimators ----------------------------------------------------------------------------

def estimate(model, tokenizer, examples: list[tuple[str, str]], kind: str, batch_size: int = 16, seed: int = 0,
             progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """The diagonal estimate (or Gram matrices) of ``model`` on ``examples``."""
    if kind == "gram":
        return _grams(model, tokenizer, examples, batch_size, progress)
    rows = _encode(tokenizer, examples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    model.eval()  # no dropout: the curvature of the model as it is scored
    per_example = kind in ("fisher", "empirical_fisher")
    step = 1 if per_example else batch_size
    done = 0
    for s in range(0, len(rows), step):
        chunk = rows[s:s + step]
        inp, mask, tgt, tmask = (t.to(next(model.parameters()).device) for t in _batch(chunk, pad))
        logits = model(input_ids=inp, attention_mask=mask).logits.float()
        logp = logits.log_softmax(-1)
        if kind == "fisher":
            with torch.no_grad():
                sampled = torch.multinomial(logp.exp().reshape(-1, logp.shape[-1]), 1, generator=gen)
            tgt = torch.where(tmask, sampled.reshape(tgt.shape), tgt)
        tok = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        loss = -(tok * tmask).sum() / len(chunk)  # mean over the chunk's examples
        model.zero_grad(set_to_none=True)
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                acc[n].addcmul_(p.grad.float(), p.grad.float(), value=float(len(chunk)))
        done += len(chunk)
        if progress:
            progress(done, len(rows))
    model.zero_grad(set_to_none=True)
    return {n: (a / len(rows)).contiguous() for n, a in acc.items()}


@torch.no_grad()
def _grams(model, tokenizer, examples, batch_size, progress) -> dict[str, torch.Tensor]:
    rows = _encode(tokenizer, examples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums: dict[str, torch.Tensor] = {}
    count = {"tokens": 0}
    current = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(module, args, name=name):
                x = args[0].float()[current["mask"]]  # [tokens, in]
                g = x.T @ x
                sums[name + ".weight"] = g if name + ".weight" not in sums else sums[name + ".weight"] + g
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        done = 0
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            inp, mask, _, _ = (t.to(next(model.parameters()).device) for t in _batch(chunk, pad))
            current["mask"] = mask.bool()
            count["tokens"] += int(mask.sum())
            model(input_ids=inp, attention_mask=mask)
            done += len(chunk)
            if progress:
                progress(done, len(rows))
    finally:
        for h in hooks:
            h.remove()
    return {n: (g / count["tokens"]).contiguous() for n, g in sums.items()}


# -- Adam second moments --------------------------------------------------------------------

def adam_second_moments(model_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Bias-corrected v_hat under the parameter names, and what was read."""
    from safetensors import safe_open

    zoo = model_dir / "exp_avg_sq.safetensors"
    if zoo.is_file():
        with safe_open(str(zoo), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("adam", "{}"))
            v = {n: f.get_tensor(n) for n in f.keys()}
        return _bias_correct(v, meta.get("step"), meta.get("beta2"), zoo), {"source": str(zoo), **meta}
    opt = model_dir / "optimizer.pt"
    if not opt.is_file():
        raise MergeSearchError(f"{model_dir}: no Adam second moments (exp_avg_sq.safetensors or optimizer.pt)")
    try:
        state = torch.load(opt, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MergeSearchError(f"{opt}: cannot load optimizer state safely ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise MergeSearchError(f"{opt}: not an optimizer state dict")
    names = _map_optimizer_ids(model_dir, state, opt)
    v, steps = {}, set()
    for pid, name in names.items():
        s = state["state"].get(pid) or {}
        if "exp_avg_sq" not in s:
            raise MergeSearchError(f"{opt}: parameter {name} has no exp_avg_sq (not an Adam optimizer?)")
        v[name] = s["exp_avg_sq"]
        steps.add(int(s["step"]))
    group = state["param_groups"][0]
    beta2 = group.get("betas", (0.9, 0.999))[1]
    step = max(steps) if steps else None
    return _bias_correct(v, step, beta2, opt), {"source": str(opt), "step": step, "beta2": beta2,
                                                 "eps": group.get("eps")}


def _bias_correct(v: dict, step, beta2, where: Path) -> dict[str, torch.Tensor]:
    if step is None or beta2 is None:
        log.warning("%s: no step/beta2 recorded; second moments used without bias correction", where)
        return {n: t.float().contiguous() for n, t in v.items()}
    c = 1.0 - float(beta2) ** int(step)
    return {n: (t.float() / c).contiguous() for n, t in v.items()}


def _map_optimizer_ids(model_dir: Path, state: dict, where: Path) -> dict[int, str]:
    """Optimizer parameter ids -> parameter names. Optimizers number parameters in the
    order their groups list them; the candidates are the model's own parameter order
    in one group, and HF Trainer's two groups (weight decay, then no decay: biases and
    norms). The first candidate whose group sizes and every shape match is taken."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    groups = [list(g["params"]) for g in state["param_groups"]]
    shapes = {pid: tuple(s["exp_avg_sq"].shape) for pid, s in state["state"].items() if "exp_avg_sq" in s}

    def no_decay(n: str) -> bool:
        low = n.lower()
        return "bias" in low or "norm" in low
    candidates = [[params], [[p for p in params if not no_decay(p[0])], [p for p in params if no_decay(p[0])]]]
    for cand in candidates:
        cand = [g for g in cand if g] if len(groups) < len(cand) else cand
        if [len(g) for g in cand] != [len(g) for g in groups]:
            continue
        mapping = {}
        ok = True
        for ids, named in zip(groups, cand):
            for pid, (name, shape) in zip(ids, named):
                if pid in shapes and shapes[pid] != shape:
                    ok = False
                    break
                mapping[pid] = name
            if not ok:
                break
        if ok:
            return mapping
    raise MergeSearchError(f"{where}: cannot map the optimizer's {sum(map(len, groups))} parameters in "
                           f"{len(groups)} group(s) to the model's {len(params)} parameters by order and shape")


# -- cache ----------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("MERGESEARCH_CACHE", Path.home() / ".cache" / "mergesearch")) / "curvature"


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) so repeated runs
    do not re-read large weights."""
    st = path.stat()
    index = cache_dir() / "digests.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    known[key] = h.hexdigest()
    index.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(index) as f:
        json.dump(known, f)
    return known[key]


def _weights_digest(model_dir: str | Path) -> str:
    """The digest of a model's weight files (a base's and its adapter's for BASE+ADAPTER)."""
    from mergesearch.engine.adapter import open_model
    from mergesearch.engine.adapter import Adapter
    ck = open_model(str(model_dir))
    files = sorted({f for f in (ck.base if isinstance(ck, Adapter) else ck).files.values()})
    if isinstance(ck, Adapter):
        files.append(ck._file)
    return hashlib.sha256("".join(file_digest(f) for f in files).encode()).hexdigest()


def curvature(model_dir: str | Path, kind: str, data: str | None = None, task_dir: str | None = None,
              n_examples: int = 128, batch_size: int = 16, seed: int = 0, device: str = "cpu",
              progress: Callable[[int, int], None] | None = None,
              trust_remote_code: bool = False) -> tuple[Path, bool]:
    """The cached estimate's path, computing it if needed; returns (path, was cached)."""
    from mergesearch import sources
    from mergesearch.engine.adapter import open_model
    if kind not in KINDS:
        raise MergeSearchError(f"--kind: '{kind}' is not one of {', '.join(KINDS)}")
    ref = sources.pin(str(model_dir))
    opened = open_model(ref)  # a clear error for a missing or non-model folder
    if kind == "adam" and not isinstance(opened, Checkpoint):
        raise MergeSearchError(f"{ref}: --kind adam reads a full fine-tune's optimizer state; a LoRA adapter has "
                               "none here (use fisher or squared_grad)")
    model_dir = opened.path if kind == "adam" else ref
    if n_examples < 1 or batch_size < 1:
        raise MergeSearchError("--n-examples and --batch-size must be at least 1")
    if kind == "adam":
        src = Path(model_dir) / "exp_avg_sq.safetensors"
        src = src if src.is_file() else Path(model_dir) / "optimizer.pt"
        if not src.is_file():
            raise MergeSearchError(f"{model_dir}: no Adam second moments (exp_avg_sq.safetensors or optimizer.pt)")
        key = {"kind": kind, "source": file_digest(src), "weights": _weights_digest(model_dir), "v": VERSION}
    else:
        if not data:
            raise MergeSearchError(f"--kind {kind} needs --data (a .jsonl file or TASK:SPLIT)")
        path = resolve_data(data, task_dir)
        key = {"kind": kind, "data": file_digest(path), "weights": _weights_digest(model_dir), "n": n_examples,
               "batch": batch_size if kind in ("squared_grad", "gram") else None,
               "seed": seed if kind == "fisher" else None, "v": VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    out = cache_dir() / f"{kind}-{digest}.safetensors"
    if out.is_file():
        return out, True
    from safetensors.torch import save_file

    from mergesearch.engine.models import load_model

    t0 = time.perf_counter()
    if kind == "adam":
        tensors, info = adam_second_moments(model_dir)
        _check_names(tensors, model_dir)
    else:
        model, tok = load_model(model_dir, device=device, trust_remote_code=trust_remote_code)
        examples = load_examples(path, n_examples)
        tensors = estimate(model, tok, examples, kind, batch_size, seed, progress)
        info = {"data": str(path), "n_examples": n_examples}
    meta = json.dumps({"kind": kind, "model": str(model_dir), "seconds": round(time.perf_counter() - t0, 3), **info},
                      sort_keys=True, default=str)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file({n: t.cpu().contiguous() for n, t in tensors.items()}, str(tmp), metadata={"mergesearch": meta})
    os.replace(tmp, out)
    return out, False


def _check_names(tensors: dict, model_dir: Path) -> None:
    ck = Checkpoint(model_dir)
    missing = [n for n in ck.names() if ck.dtype(n).is_floating_point and n not in tensors]
    if missing:
        raise MergeSearchError(f"{model_dir}: the optimizer state has no second moments for '{missing[0]}' "
                               f"({len(missing)} missing)")


# -- a search space's side inputs ---------------------------------------------------------

def mean_estimate(files: list[Path]) -> Path:
    """The elementwise mean of several cached estimates (cached too)."""
    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256("|".join(sorted(p.name for p in files)).encode()).hexdigest()[:24]
    out = cache_dir() / f"mean-{digest}.safetensors"
    if not out.is_file():
        parts = [load_file(str(p)) for p in files]
        mean = {k: (sum(p[k] for p in parts) / len(parts)).contiguous() for k in parts[0]}
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        save_file(mean, str(tmp))
        os.replace(tmp, out)
    return out
