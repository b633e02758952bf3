"""Training loops for the zoo: a brief generic pretraining, then AdamW fine-tunes (full, or
of a PEFT LoRA model's factors: only the parameters that require gradients are trained);
the zoos' model construction and saving (both zoos, :mod:`.build` and :mod:`.hard`)."""

from __future__ import annotations

import json
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from mergesearch.progress import Step, step as progress_step
from mergesearch.zoo.synthetic import CHARS, SPECIALS, write_tokenizer

PAD, BOS, EOS = 0, 1, 2
VOCAB = {t: i for i, t in enumerate(SPECIALS + CHARS)}


def encode(text: str) -> list[int]:
    """Char-level ids, identical to the zoo tokenizer's encoding (no special tokens)."""
    return [VOCAB[c] for c in text]


def make_batch(pairs: list[tuple[str, str]], loss_on_context: bool) -> tuple[torch.Tensor, torch.Tensor]:
    seqs, labels = [], []
    for ctx, ans in pairs:
        c, a = encode(ctx), encode(ans) + [EOS]
        seqs.append(c + a)
        labels.append((c if loss_on_context else [-100] * len(c)) + a)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    for k, (s, l) in enumerate(zip(seqs, labels)):
        ids[k, :len(s)] = torch.tensor(s)
        lab[k, :len(l)] = torch.tensor(l)
    return ids, lab


def train(
    model: torch.nn.Module,
    sample: Callable[[random.Random], tuple[str, str]],
    steps: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    loss_on_context: bool = False,
    warmup: int = 20,
    on_step: Callable[[int, torch.optim.Optimizer], bool | None] | None = None,
    optimizer: str = "adamw",
    progress: str | None = None,
    parent: Step | None = None,
) -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum 0.9: ``optimizer="sgd"``) with linear warmup and
    cosine decay; ``sample(rng)`` draws one (context, answer). ``on_step(step, opt)``
    runs after every step; when it returns True, training stops there. ``progress``:
    the description of a progress line for this training (mergesearch.progress),
    counted in ``parent``'s line too."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]  # a LoRA model trains its factors only
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(s / steps * 3.14159)).item()))
    model.train()
    with progress_step(progress, total=steps, parent=parent) if progress else nullcontext() as line:
        for step in range(1, steps + 1):
            ids, lab = make_batch([sample(rng) for _ in range(batch_size)], loss_on_context)
            loss = model(input_ids=ids, attention_mask=(ids != PAD) | (lab != -100), labels=lab).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if line is not None:
                line.advance()
            if on_step and on_step(step, opt):  # a true return stops training here
                if line is not None:
                    line.update(total=step)  # fewer steps than planned: the ETAs follow
                break
    model.eval()
    return opt


@torch.no_grad()
def mc_accuracy(model: torch.nn.Module, items: list[dict], batch_size: int = 256) -> float:
    """Multiple-choice accuracy by summed continuation log-likelihood (for training checks)."""
    rows = [(it["context"], ch) for it in items for ch in it["choices"]]
    scores = []
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        seqs = [encode(c) + encode(a) for c, a in chunk]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, :len(s)] = torch.tensor(s)
        logp = model(input_ids=ids).logits.float().log_softmax(-1)
        for j, (c, a) in enumerate(chunk):
            start, end = len(c), len(c) + len(a)
            tgt = ids[j, start:end]
            scores.append(float(logp[j, start - 1:end - 1].gather(-1, tgt[:, None]).sum()))
    correct = 0
    for n, it in enumerate(items):
        s = scores[4 * n:4 * n + 4]
        correct += int(max(range(4), key=lambda i: (s[i], -i)) == it["answer"])
    return correct / len(items)


def init_model(shape: dict, seed: int):
    """(config, model): a randomly initialized Llama of ``shape`` for the char tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(seed)
    return cfg, LlamaForCausalLM(cfg)


def save_model(model, path: Path, opt: torch.optim.Optimizer | None = None) -> None:
    """An HF model folder with the zoo tokenizer; with ``opt``, its Adam second moments
    (``exp_avg_sq.safetensors``, under the parameter names, bias-correction data in the metadata)."""
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, model.config.vocab_size)
    if opt is not None:
        from safetensors.torch import save_file
        moments = {n: opt.state[p]["exp_avg_sq"].contiguous() for n, p in model.named_parameters()
                   if "exp_avg_sq" in opt.state.get(p, {})}
        group = opt.param_groups[0]
        step = int(next(iter(opt.state.values()))["step"])
        # what bias correction needs, in one metadata key: safetensors writes a
        # multi-key metadata map in random order, and builds must be byte-identical
        info = json.dumps({"step": step, "beta2": group["betas"][1], "eps": group["eps"]}, sort_keys=True)
        save_file(moments, str(path / "exp_avg_sq.safetensors"), metadata={"adam": info})
