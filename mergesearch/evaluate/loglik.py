"""LoglikEvaluator: a fast built-in scorer for multiple-choice and target JSONL.

Each JSONL line is one item:
- multiple choice: ``{"context": str, "choices": [str, ...], "answer": int}``;
  accuracy is 1 when the correct choice has the highest summed log-likelihood
  (the first one wins a tie), as lm-eval's ``acc`` for ``multiple_choice``;
- target: ``{"context": str, "target": str}``; accuracy is 1 when the target is
  the greedy continuation (lm-eval's ``acc`` for ``loglikelihood``).

Context and continuation are tokenized the way lm-eval does it (trailing spaces
of the context move to the continuation; the continuation tokens are those of
``context + continuation`` past the context's own tokens), so accuracies agree
with lm-eval's. Everything is tokenized and padded once; ``score`` only runs
batched forward passes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mergesearch.errors import MergeSearchError
from mergesearch.evaluate.base import EvalConfig, check_tokenizer_fits, weighted_mean


def task_file(cfg: EvalConfig, task: str, split: str) -> Path:
    """Where a task's split lives: a .jsonl path, or under task_dir in the zoo layout
    (``data/<task>/<split>.jsonl``), ``<task>/<split>.jsonl`` or ``<task>_<split>.jsonl``."""
    if task.endswith(".jsonl"):
        p = Path(task)
        if not p.exists():
            raise MergeSearchError(f"{p}: task file not found")
        return p
    root = Path(cfg.task_dir or ".")
    candidates = [root / "data" / task / f"{split}.jsonl", root / task / f"{split}.jsonl",
                  root / f"{task}_{split}.jsonl"]
    for c in candidates:
        if c.exists():
            return c
    raise MergeSearchError(f"{candidates[0]}: task file not found (task '{task}', split '{split}')")


def read_items(path: Path, limit: int | None = None) -> list[dict]:
    items = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                raise MergeSearchError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            where = f"{path}:{lineno}"
            if not isinstance(item, dict) or not isinstance(item.get("context"), str):
                raise MergeSearchError(f"{where}: item needs a string 'context'")
            if "target" in item and "choices" not in item:
                if not isinstance(item["target"], str) or not item["target"]:
                    raise MergeSearchError(f"{where}: 'target' must be a non-empty string")
            else:
                choices = item.get("choices")
                if not isinstance(choices, list) or not choices:
                    raise MergeSearchError(f"{where}: item has no answer choices")
                if not all(isinstance(c, str) and c for c in choices):
                    raise MergeSearchError(f"{where}: answer choices must be non-empty strings")
                ans = item.get("answer")
                if not isinstance(ans, int) or isinstance(ans, bool) or not 0 <= ans < len(choices):
                    raise MergeSearchError(f"{where}: 'answer' must be an index into the {len(choices)} choices")
            items.append(item)
            if limit and len(items) >= limit:
                break
    if not items:
        raise MergeSearchError(f"{path}: no items")
    return items


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split as lm-eval splits them."""
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped):] + continuation
        context = stripped
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


class LoglikEvaluator:
    def __init__(self, cfg: EvalConfig, device: str = "cpu", tokenizer=None):
        self.cfg = cfg
        self.tasks = list(cfg.tasks)
        self.device = device
        from mergesearch.evaluate import items as item_split
        self.items, self.item_record = {}, {}
        for t in self.tasks:
            every = read_items(task_file(cfg, t, cfg.split))
            chosen = item_split.choose(len(every), cfg, cfg.split, t, f"evaluator: task '{t}'", own_split=True)
            self.items[t] = [every[i] for i in chosen]
            self.item_record[t] = item_split.record(chosen, len(every), cfg, cfg.split, "its own split file")
        self._prepared_for = None

    def aggregate(self, scores: dict[str, float]) -> float:
        return weighted_mean(scores, self.cfg.weights)

    def _prepare(self, tokenizer, model) -> None:
        """Tokenize every (context, continuation) row once and pack padded batches."""
        check_tokenizer_fits(model, tokenizer, "evaluator")
        vocab = model.get_input_embeddings().weight.shape[0]
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        rows = []  # (task, item index, choice index, ids, n_cont)
        for task, items in self.items.items():
            for k, it in enumerate(items):
                conts = it["choices"] if "choices" in it else [it["target"]]
                for c, cont in enumerate(conts):
                    ctx, cont_ids = encode_pair(tokenizer, it["context"], cont)
                    if not ctx:
                        ctx = [prefix]
                    ids = ctx + cont_ids
                    if max(ids) >= vocab:
                        raise MergeSearchError(f"tokenizer produces id {max(ids)} but the model has {vocab} embeddings")
                    rows.append((task, k, c, ids, len(cont_ids)))
        rows.sort(key=lambda r: len(r[3]))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.rows = rows
        self.batches = self._pack(rows)
        self._subsets: dict = {}
        self._prepared_for = (id(tokenizer), next(model.parameters()).device)

    def _pack(self, rows: list) -> list:
        pad = self.pad
        batches = []
        bs = self.cfg.batch_size * 4
        for s in range(0, len(rows), bs):
            chunk = rows[s:s + bs]
            width = max(len(r[3]) - 1 for r in chunk)
            inp = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            tgt = torch.zeros((len(chunk), width), dtype=torch.long)
            tmask = torch.zeros((len(chunk), width), dtype=torch.bool)
            for j, (_, _, _, ids, n) in enumerate(chunk):
                L = len(ids) - 1
                inp[j, :L] = torch.tensor(ids[:-1])
                mask[j, :L] = 1
                tgt[j, :L] = torch.tensor(ids[1:])
                tmask[j, L - n:L] = True
            batches.append(([r[:3] for r in chunk], inp, mask, tgt, tmask))
        return batches

    @torch.no_grad()
    def score(self, model, tokenizer) -> dict[str, float]:
        loglik = self._run(model, tokenizer, None)
        return {task: sum(self._correct(task, k, it, loglik) for k, it in enumerate(items)) / len(items)
                for task, items in self.items.items()}

    @torch.no_grad()
    def score_items(self, model, tokenizer, subset: dict[str, list[int]]) -> dict[str, list[float]]:
        """Per-item scores (1.0 right, 0.0 wrong) of ``subset`` (task -> item indices),
        in its order; only those items are run through the model."""
        loglik = self._run(model, tokenizer, subset)
        return {task: [self._correct(task, k, self.items[task][k], loglik) for k in ks] for task, ks in subset.items()}

    @staticmethod
    def _correct(task: str, k: int, it: dict, loglik: dict) -> float:
        if "choices" in it:
            lls = [loglik[(task, k, c)][0] for c in range(len(it["choices"]))]
            best = max(range(len(lls)), key=lambda i: (lls[i], -i))
            return float(best == it["answer"])
        return float(loglik[(task, k, 0)][1])

    def _run(self, model, tokenizer, subset: dict[str, list[int]] | None) -> dict:
        device = next(model.parameters()).device
        if self._prepared_for != (id(tokenizer), device):
            self._prepare(tokenizer, model)
        batches = self.batches
        if subset is not None:  # a run's rungs are the same subsets for every trial: packed once
            key = tuple((t, tuple(ks)) for t, ks in subset.items())
            batches = self._subsets.get(key)
            if batches is None:
                wanted = {(t, k) for t, ks in subset.items() for k in ks}
                batches = self._subsets[key] = self._pack([r for r in self.rows if (r[0], r[1]) in wanted])
        was_training = model.training
        model.eval()
        loglik: dict[tuple[str, int, int], tuple[float, bool]] = {}
        for keys, inp, mask, tgt, tmask in batches:
            logits = model(input_ids=inp.to(device), attention_mask=mask.to(device)).logits.float()
            logp = logits.log_softmax(-1)
            tgt_d, tmask_d = tgt.to(device), tmask.to(device)
            tok_lp = logp.gather(-1, tgt_d.unsqueeze(-1)).squeeze(-1)
            sums = (tok_lp * tmask_d).sum(-1).cpu()
            greedy = ((logp.argmax(-1) == tgt_d) | ~tmask_d).all(-1).cpu()
            for key, s, g in zip(keys, sums.tolist(), greedy.tolist()):
                loglik[key] = (s, g)
        if was_training:
            model.train()
        return loglik
