"""Device memory of a gradient refinement (:mod:`.refine`), planned before the search
starts, beside what the placement plan (:mod:`mergesearch.engine.plan`) holds.

A refinement holds, for its whole run, each model's pruned task vector in float32 and the
base in float32 (a copy unless the base is already float32 in place) -- or, with
``hold_inputs`` False, nothing: each tensor's inputs are read again whenever its merge is
computed -- and its trainable multipliers (per group, and with ``rows`` per output row of
every matrix, each with its gradient, Adam's two moments, the average and the best copy).
A training step adds:

- the merge: each tensor's merge is recomputed in the backward (a checkpoint on its
  small inputs), so the graph keeps the merged weights (the model's dtype) and, once the
  model's backward has run, their gradients; one tensor's merge at a time adds its
  transients (its scaled task vectors and sums, the float32 tensors its graph saves: the
  mixed task vector, with ``normalize`` its quotient, with sign election the divisor, the
  quotient and the agreement masks; read again, its base, deltas and pruned parts), which
  count only where they exceed the activations and logits (the merge runs before the
  forward and after the model's backward);
- activations for the batch: sequences x width tokens (the batch's items' sequences,
  padded to the longest), per token the decoder layers' saved tensors (in the model's
  dtype, RMSNorm's float32 upcasts for narrower dtypes), the attention mask, and the
  logits (vocabulary x 12 bytes: the float32 log-softmax kept for the backward, then its
  gradient and the gather's); with gradient checkpointing only each layer's input is kept
  and one layer is recomputed at a time, once the logits' gradients are gone (so it counts
  only where it is larger than they are).

A held-out check runs without gradients on chunks of ``check_batch`` items of one task: the
merged weights, the forward's logits (8 bytes a vocabulary entry, plus the model dtype's
copy) and a few hidden-size buffers per token.

The constants were measured on the CPU with ``tests/memtrack.py`` (every storage an
operation creates, until its last tensor is gone) on Llama models of 2-4 layers, hidden 64-256,
vocabularies 128-8192, float32 and bfloat16, on 2026-12-06 (the merge's, held and read
again, after it was recomputed in the backward, the same day); each is rounded up, so the
plan bounds the measured peak (``tests/test_refine_memory.py``: planned / measured between
1 and 1.35 on the zoo, between 1 and 1.3 for a step on the synthetic shapes).

The sequences and widths are the dev items' own, tokenized as the refinement tokenizes them
(the evaluator's requests on a model built on the ``meta`` device: no weights are read):
a batch is the worst ``batch_size`` items the refinement can draw (each task's share of
the batch, its items with the most sequences, all padded to the longest sequence).
Generation items under ``loss: distill`` get a teacher's output, bounded by the model's
maximum length.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

from mergesearch.errors import MergeSearchError

log = logging.getLogger("mergesearch.search")

LOGIT_TRAIN = 12  # bytes a vocabulary entry of a training token's logits keeps at the peak
LOGIT_CHECK = 8  # without gradients: the logits and their float32 log-softmax (+ a narrower copy)
LAYER_H, LAYER_I = 13, 3  # elements a decoder layer saves per token and hidden / intermediate unit
LAYER_F32_H = 1.5  # float32 elements per hidden unit a layer adds for a narrower dtype (RMSNorm)
TOKEN_H = 4  # float32 elements per hidden unit outside the layers (embedding output, final norm)
MASK = 4  # bytes per token and key position a layer's attention mask costs (x 3 x heads: eager)
CHECK_HI = 2  # float32 elements per token and hidden + intermediate unit of a no-grad forward
ADAM_COPIES = 7  # a multiplier: itself, its gradient, Adam's two moments, the average, the best, a check's copy
MERGE_F32 = 4  # float32 tensors (of one tensor's size) its merge adds beside its scaled task vectors
READ_F32 = 2  # float32 tensors per model (and for the base) its inputs add when read again
CHECK_CHUNK = 32  # items of one task a held-out check scores at once (refine.py's default)


@dataclass
class Dims:
    """What the formula reads of the model (headers and config only)."""

    numel: int  # elements of the float tensors a refinement trains
    largest: int  # elements of the largest of them
    rows: int  # output rows of every matrix (the row multipliers, per model)
    itemsize: int  # bytes per element of the model's weights (the evaluation dtype)
    base_copied: bool  # whether the float32 base is a copy (else read in place)
    hidden: int
    intermediate: int
    vocab: int
    layers: int
    heads: int
    attn: str  # the attention implementation (sdpa, eager, flash_attention_2, ...)
    max_length: int
    checkpointing: bool = True  # whether the model supports activation checkpointing


@dataclass
class RefineMemory:
    """A refinement's planned device bytes and the options it runs with."""

    batch_size: int
    steps: int
    eval_every: int
    average: float
    check_batch: int
    checkpointing: bool
    train_seqs: int  # sequences of the worst training batch
    check_seqs: int  # sequences of the worst held-out chunk
    width: int  # tokens of the longest sequence
    parts: dict[str, int]  # what the total is made of, in bytes
    total: int
    budget: int | None = None  # the device budget it was planned against
    beside: int = 0  # what the placement holds on the device beside it (its reserve left out)
    notes: list[str] = field(default_factory=list)
    hold_inputs: bool = True  # False: nothing held, each tensor's inputs read again in the forward and the backward

    def options(self, cfg: dict) -> dict:
        """``cfg`` (the refine section as a dict) with the sizes this plan chose."""
        return {**cfg, "batch_size": self.batch_size, "steps": self.steps, "eval_every": self.eval_every,
                "average": self.average, "check_batch": self.check_batch, "checkpointing": self.checkpointing,
                "hold_inputs": self.hold_inputs, "planned_bytes": self.total}

    def line(self) -> str:
        from mergesearch.engine.plan import fmt_bytes
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.parts.items() if v)
        ckpt = ", gradient checkpointing" if self.checkpointing else ""
        ckpt += "" if self.hold_inputs else ", inputs read again (none held)"
        return (f"refinement: batch {self.batch_size} ({self.train_seqs} sequences) x {self.width} tokens{ckpt}: "
                f"{fmt_bytes(self.total)} ({parts})")

    def render(self) -> str:
        return "\n".join([self.line(), *(f"note: {n}" for n in self.notes)])

    def to_json(self) -> dict:
        return {"batch_size": self.batch_size, "steps": self.steps, "eval_every": self.eval_every,
                "average": self.average, "check_batch": self.check_batch, "checkpointing": self.checkpointing,
                "hold_inputs": self.hold_inputs, "train_seqs": self.train_seqs, "check_seqs": self.check_seqs, "width": self.width,
                "parts": dict(self.parts), "total": self.total, "budget": self.budget, "beside": self.beside,
                "notes": list(self.notes)}


# -- the formula -----------------------------------------------------------------------------

def graph_f32(n_models: int, normalize: bool, consensus: bool) -> float:
    """Float32 tensors per element the merge's autograd graph saves (see the module docstring)."""
    return 1.0 + float(normalize) + (1.0 + 0.25 * n_models if consensus else 0.0)


def layer_token_bytes(d: Dims, width: int) -> float:
    """Bytes one decoder layer saves for the backward, per token of a ``width`` batch."""
    narrow = LAYER_F32_H * d.hidden * 4 if d.itemsize < 4 else 0.0
    attn = MASK * width * (3 * d.heads if d.attn == "eager" else 1)
    return (LAYER_H * d.hidden + LAYER_I * d.intermediate) * d.itemsize + narrow + attn


def refine_bytes(d: Dims, n_models: int, train_seqs: int, check_seqs: int, width: int, *, rows: bool,
                 normalize: bool = True, consensus: bool = True, checkpointing: bool = False,
                 hold: bool = True) -> dict[str, int]:
    """Device bytes a refinement needs beside the evaluation model, by part: the held
    float32 tensors (none with ``hold`` False) and multipliers, then the worse of a
    training step and a held-out check."""
    held = {"float32 task vectors": d.numel * 4 * n_models if hold else 0,
            "float32 base": d.numel * 4 if d.base_copied and hold else 0,
            "multipliers": ADAM_COPIES * 4 * (d.rows * n_models if rows else 0)}
    one = d.largest * 4  # bytes of one float32 tensor, the largest
    transient = (n_models + MERGE_F32) * one  # one tensor's merge: its scaled task vectors and sums
    if not hold:  # its inputs read again: the float32 base, each model's delta and pruned part
        transient += (READ_F32 * n_models + READ_F32) * one
    # the merged weights and their gradients (the model's dtype), and one tensor's merge
    # recomputed in the backward: the float32 tensors its graph saves beside its transients
    recompute = transient + int(graph_f32(n_models, normalize, consensus) * one)
    tokens = train_seqs * width
    if checkpointing:  # one layer recomputed at a time, after the logits' gradients are gone
        per_token = d.layers * d.hidden * d.itemsize + max(0.0, layer_token_bytes(d, width) - d.vocab * LOGIT_TRAIN)
    else:
        per_token = d.layers * layer_token_bytes(d, width)
    act, logits = int(tokens * (per_token + TOKEN_H * d.hidden * 4)), int(tokens * d.vocab * LOGIT_TRAIN)
    # a tensor's merge runs before the forward and again after the model's backward, when the
    # activations and logits are gone: it counts only where it is larger than they are
    train = {"merge graph": int(d.numel * 2 * d.itemsize + max(0, recompute - act - logits)),
             "activations": act, "logits": logits}
    narrow = d.itemsize if d.itemsize < 4 else 0
    c_tokens = check_seqs * width
    check = {"merge graph": int(d.numel * d.itemsize + transient),
             "activations": int(c_tokens * (CHECK_HI * (d.hidden + d.intermediate) * 4 + MASK * width)),
             "logits": int(c_tokens * d.vocab * (LOGIT_CHECK + narrow))}
    step = train if sum(train.values()) >= sum(check.values()) else {f"{k} (check)": v for k, v in check.items()}
    return {**held, **step}


# -- the shapes ------------------------------------------------------------------------------

def batch_shape(per_task: dict[str, list[tuple[int, int]]], batch_size: int, chunk: int) -> tuple[int, int, int]:
    """(sequences of the worst training batch, of the worst held-out chunk, the longest
    sequence's width) for items given per task as (sequences, longest width): the draw takes
    ``batch_size`` items in turn from each task (the first tasks one more when it does not
    divide), each task's worst being its items with the most sequences."""
    tasks = list(per_task)
    if not tasks:
        return 0, 0, 0
    q, r = divmod(batch_size, len(tasks))
    train, check, width = 0, 0, 0
    for j, t in enumerate(tasks):
        counts = sorted((n for n, _ in per_task[t]), reverse=True)
        share = q + (1 if j < r else 0)
        # a task with fewer items than its share draws some again (its pool refills)
        train += sum(counts[k % len(counts)] for k in range(share)) if counts else 0
        check = max(check, sum(counts[:chunk]))
        width = max([width, *(w for _, w in per_task[t])])
    return train, check, width


def item_shapes(space, evaluator=None) -> tuple[dict[str, list[tuple[int, int]]], "Dims"]:
    """Per trainable task, each dev item's (sequences, longest sequence's width in
    tokens), tokenized as the refinement does on a model built on the meta device; and the
    model's dimensions."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mergesearch import sources
    from mergesearch.evaluate import build_evaluator
    from mergesearch.search.refine_data import untrainable

    ev = evaluator or build_evaluator(space.scoring())
    if not hasattr(ev, "training_items"):
        return {}, dims(space, None)
    ref = space.base if space.base is not None else space.models[0]
    part, _ = sources.split(str(ref))
    folder = sources.local_dir(part)
    trust = bool(getattr(space.evaluator, "trust_remote_code", False))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    cfg = space.refine.model_dump()
    skip = untrainable(ev.output_types(), cfg)
    skip.update({t: "monitor" for t in getattr(ev.cfg, "monitor", [])})
    d = dims(space, model)
    distill = cfg["loss"] == "distill"
    out: dict[str, list[tuple[int, int]]] = {}
    for task, items in ev.training_items(model, tokenizer).items():
        if task in skip:
            continue
        shapes = []
        for it in items:
            widths = [len(ids) - 1 for ids, _ in it["seqs"]]
            if it["kind"] == "gen" and distill:  # the teacher's output, at most the model's length
                widths.append(d.max_length)
            shapes.append((max(1, len(widths)), max(widths, default=1)))
        out[task] = shapes
    return out, d


def dims(space, model) -> Dims:
    """The refinement's sizes for ``space``'s base (headers) and ``model`` (its config)."""
    from mergesearch.engine.adapter import open_model
    from mergesearch.engine.checkpoint import parse_dtype

    ref = open_model(space.base if space.base is not None else space.models[0])
    floats = [n for n in ref.names() if ref.dtype(n).is_floating_point]
    stored = next((ref.dtype(n) for n in floats), None)
    edtype = parse_dtype(space.dtype) or stored
    shapes = {n: ref.shape(n) for n in floats}
    c = model.config.get_text_config() if model is not None and hasattr(model.config, "get_text_config") else \
        (model.config if model is not None else None)

    def get(*keys, default=0):
        for k in keys:
            v = getattr(c, k, None) if c is not None else None
            if v:
                return int(v)
        return default

    hidden = get("hidden_size", "n_embd", "d_model")
    return Dims(numel=sum(ref.numel(n) for n in floats), largest=max(ref.numel(n) for n in floats),
                rows=sum(s[0] for s in shapes.values() if len(s) == 2), itemsize=edtype.itemsize,
                base_copied=not (edtype.itemsize == 4 and stored is not None and stored.itemsize == 4),
                hidden=hidden, intermediate=get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
                vocab=get("vocab_size"), layers=get("num_hidden_layers", "n_layer", "num_layers"),
                heads=get("num_attention_heads", "n_head", default=1),
                attn=str(getattr(c, "_attn_implementation", None) or "sdpa"),
                max_length=get("max_position_embeddings", "n_positions", default=2048),
                checkpointing=bool(getattr(model, "supports_gradient_checkpointing", False)))


# -- the decision ----------------------------------------------------------------------------

def _kinds(space) -> tuple[bool, bool]:
    """(normalize, sign election) at their costliest among the space's task-vector methods."""
    from mergesearch.methods import REGISTRY
    from mergesearch.methods.task_arithmetic import TASK_VECTOR_METHODS
    tv = [m for m in space.methods if m in TASK_VECTOR_METHODS]
    consensus = any(TASK_VECTOR_METHODS[m][1] for m in tv)
    normalize = any(p.name == "normalize" and p.default for m in tv for p in REGISTRY[m].params) or \
        "normalize" in (space.parameters or {})
    return normalize, consensus


def estimate(space, batch_size: int, per_task: dict, d: Dims, checkpointing: bool = False,
             check_batch: int = CHECK_CHUNK, hold: bool = True) -> RefineMemory:
    """The refinement of ``space`` at ``batch_size`` (steps scaled to see as many items)."""
    cfg = space.refine
    normalize, consensus = _kinds(space)
    train, check, width = batch_shape(per_task, batch_size, check_batch)
    parts = refine_bytes(d, len(space.models), train, check, width, rows=cfg.rows, normalize=normalize,
                         consensus=consensus, checkpointing=checkpointing, hold=hold)
    f = cfg.batch_size / batch_size
    steps = math.ceil(cfg.steps * f - 1e-9)
    eval_every = max(1, math.ceil(cfg.eval_every * f - 1e-9))
    average = cfg.average ** (1.0 / f) if f != 1 else cfg.average  # the same horizon in items
    return RefineMemory(batch_size=batch_size, steps=steps, eval_every=eval_every, average=average,
                        check_batch=check_batch, checkpointing=checkpointing, train_seqs=train, check_seqs=check,
                        width=width, parts=parts, total=sum(parts.values()), hold_inputs=hold)


def plan_refinement(space, placement, space_path: str, evaluator=None, shapes=None) -> RefineMemory | None:
    """The refinement's memory plan beside ``placement``: as configured when it fits the
    device budget beside the evaluation model and the merge's scratch; else with gradient
    checkpointing (where the model supports it); else holding nothing (each tensor's inputs
    read again in the forward and the backward); else with the batch halved until it fits,
    the inputs held where it leaves room for them (steps, the checks' spacing and
    the average's decay scaled so as many items are seen between them); refused in one line
    when batch 1 with nothing held does not fit. Without a budget (the CPU, none declared) the configured
    sizes are planned and kept. None when the space has no refinement."""
    from mergesearch.engine.plan import fmt_bytes

    cfg = space.refine
    if cfg is None:
        return None
    per_task, d = shapes if shapes is not None else item_shapes(space, evaluator)
    if placement is not None and placement.stream == "copy":
        # a staged base is copied out of its slot (and the base may leave the device to make room)
        d = replace(d, base_copied=True)
    budget = placement.budget if placement is not None else None
    first = estimate(space, cfg.batch_size, per_task, d)
    if budget is None or not hasattr(placement, "budget_for"):  # none, or a sharded worker's per GPU
        return first
    # the plan's fixed part, nothing resident; the refinement uses the evaluation reserve's room
    beside = placement.budget_for(0) - placement.eval_reserve
    room = budget - beside

    def done(m: RefineMemory, *why: str) -> RefineMemory:
        m.budget, m.beside = budget, beside
        m.notes += list(why)
        return m

    if first.total <= room:
        return done(first)
    ck = d.checkpointing  # the model's own activation checkpointing, where it has one
    with_ck = " with gradient checkpointing" if ck else ""
    ckpt = estimate(space, cfg.batch_size, per_task, d, checkpointing=ck)
    if ck and ckpt.total <= room:
        return done(ckpt, f"gradient checkpointing: {fmt_bytes(first.total)} without it does not fit the "
                          f"{fmt_bytes(room)} left beside the evaluation model")
    bare = estimate(space, cfg.batch_size, per_task, d, checkpointing=ck, hold=False)
    if bare.total <= room:
        return done(bare, f"nothing held: {fmt_bytes(ckpt.total)}{with_ck} and the float32 task vectors and base "
                          f"held does not fit the {fmt_bytes(room)} left beside the evaluation model; each tensor's "
                          "inputs are read again in every step's forward and backward (slower steps)")
    b = cfg.batch_size
    while b > 1:
        b = max(1, b // 2)
        for hold in (True, False):  # the inputs held where the smaller batch leaves room for them
            m = estimate(space, b, per_task, d, checkpointing=ck, check_batch=min(CHECK_CHUNK, b), hold=hold)
            if m.total <= room:
                held = "" if hold else ", nothing held"
                return done(m, f"batch {cfg.batch_size} does not fit ({fmt_bytes(bare.total)}{with_ck}, nothing held; "
                               f"{fmt_bytes(room)} left beside the evaluation model): batch {b}{held}, "
                               f"{m.steps} steps instead of {cfg.steps}")
    m = estimate(space, 1, per_task, d, checkpointing=ck, check_batch=1, hold=False)
    parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in m.parts.items() if v)
    raise MergeSearchError(
        f"{space_path}: refine: even batch 1 ({m.train_seqs} sequences x {m.width} tokens){with_ck}, nothing held, "
        f"needs {fmt_bytes(m.total)} ({parts}) beside the evaluation model and the merge scratch "
        f"({fmt_bytes(beside)}), more than the device budget of {fmt_bytes(budget)} ({placement.budget_source}); "
        "refine fewer or smaller models, or declare more resources.device_memory")


def input_budget(m: RefineMemory | None, placement) -> int | None:
    """The device budget the workers' placement may fill with resident inputs (side files
    included) so that the refinement ``m`` still fits at the end of the search, or None
    when the evaluation's reserve alone holds it."""
    if m is None or m.budget is None or placement is None:
        return None
    extra = m.total - placement.eval_reserve  # what the refinement needs beyond the evaluation's reserve
    return m.budget - extra if extra > 0 else None
