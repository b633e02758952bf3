"""FastLM: lm-eval's ``LM`` interface computed on the worker's in-memory model.

lm-eval builds the requests (prompts, few-shot examples, chat template, target delimiter,
choices) and computes the metrics; this class only computes what a request asks for, as
lm-eval's ``HFLM`` would, with three differences that cost nothing in the numbers:

- **Tokenized once.** A worker scores the same requests for every candidate, so each
  request's tokens (and the packed batches built from them) are kept, keyed by the
  request's arguments; the second candidate skips the tokenizer entirely.
- **Batched by length.** Sequences are sorted by length and cut into batches of at most
  ``batch_size`` sequences, so padding stays small.
- **Shared contexts scored once.** The choices of a multiple-choice document share their
  context. Their continuations are packed behind one copy of it: each continuation
  attends to the context and to itself (a block-causal 4D mask, positions restarting
  after the context), so the context's tokens go through the model once per document
  instead of once per choice. That is the same arithmetic as one sequence per choice
  (checked on the first batch of every model: where a model's attention ignores 4D masks
  the packing is switched off and each choice is its own sequence, as in ``HFLM``).

Tokenization is ``HFLM``'s own (``tok_encode``, ``_encode_pair``, the empty-context
prefix token, left truncation to the model's length), inherited from it; so is the chat
template. Rolling log-likelihoods use lm-eval's rolling windows. Generation is greedy
with a KV cache, in batches sorted by length, stopping a row at EOS or once its decoded
text holds a stop sequence, then cut at the first stop sequence as ``HFLM`` cuts it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM

log = logging.getLogger(__name__)


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor | None  # [B, T], None for plain rows (no packing in the batch)
    # per row: the context's length, the (start, length) of each packed continuation and the
    # row's length; None for plain rows. The 4D mask is built from it per forward pass
    # (B x T x T booleans would make a kept plan as large as the model for long prompts)
    layout: list | None
    flat: torch.Tensor  # scored positions, flat indices into B * T
    targets: torch.Tensor  # the token each scored position must predict
    requests: list[int]  # the request (its index in the call) of each scored run of positions
    lengths: list[int]  # how many scored positions each run has


def _plan_sequences(rows: list[tuple[list[int], list[int]]], max_length: int, share: bool):
    """Packed sequences for (context, continuation) token rows, truncated as HFLM does:
    (tokens, positions, segments, scored) where ``segments`` are (start, length) of each
    packed continuation and ``scored`` lists (request, position, target) triples."""
    groups: dict[tuple, list] = {}
    order = []
    for r, (ctx, cont) in enumerate(rows):
        n = len(cont)
        if not ctx or not 0 < n <= max_length:
            raise ValueError(f"a request's continuation has {n} tokens (the model's length is {max_length})")
        inp = (ctx + cont)[-(max_length + 1):][:-1]
        head = len(inp) - n + 1  # the tokens up to the one that predicts cont[0]
        prefix, suffix = inp[:head], inp[head:]
        key = ("ctx", tuple(prefix)) if share else ("row", r)
        if key not in groups:
            groups[key] = [prefix, []]
            order.append(key)
        groups[key][1].append((r, suffix, cont))
    seqs = []
    for key in order:
        prefix, members = groups[key]
        tokens = list(prefix)
        positions = list(range(len(prefix)))
        segments, scored = [], []
        for r, suffix, targets in members:
            start = len(tokens)
            tokens += suffix
            positions += range(len(prefix), len(prefix) + len(suffix))
            segments.append((start, len(suffix)))
            scored.append((r, [len(prefix) - 1] + list(range(start, start + len(suffix))), targets))
        seqs.append((tokens, positions, segments, scored, len(members) > 1))
    return seqs


def _batches(seqs: list, batch_size: int, pad: int) -> list[_Batch]:
    seqs = sorted(seqs, key=lambda s: len(s[0]))
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        T = max(len(c[0]) for c in chunk)
        B = len(chunk)
        ids = torch.full((B, T), pad, dtype=torch.long)
        packed = any(c[4] for c in chunk)
        pos = torch.zeros((B, T), dtype=torch.long) if packed else None
        layout = [] if packed else None
        flat, targets, requests, lengths = [], [], [], []
        for b, (tokens, positions, segments, scored, _) in enumerate(chunk):
            L = len(tokens)
            ids[b, :L] = torch.tensor(tokens)
            if packed:
                pos[b, :L] = torch.tensor(positions)
                pos[b, L:] = torch.arange(T - L) + (positions[-1] + 1 if positions else 0)
                layout.append((segments[0][0] if segments else L, segments, L))
            for r, positions_, tgt in scored:
                flat += [b * T + p for p in positions_]
                targets += tgt
                requests.append(r)
                lengths.append(len(tgt))
        out.append(_Batch(ids, pos, layout, torch.tensor(flat), torch.tensor(targets), requests, lengths))
    return out


def _mask(layout: list, T: int, device) -> torch.Tensor:
    """The block-causal mask [B, 1, T, T] of packed rows: the context is causal, each
    continuation sees the context and itself causally, padding sees only itself."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    mask = torch.zeros((len(layout), 1, T, T), dtype=torch.bool, device=device)
    for b, (head, segments, L) in enumerate(layout):
        mask[b, 0, :head, :head] = causal[:head, :head]
        for start, n in segments:
            mask[b, 0, start:start + n, :head] = True
            mask[b, 0, start:start + n, start:start + n] = causal[:n, :n]
        idx = torch.arange(L, T, device=device)
        mask[b, 0, idx, idx] = True  # no empty softmax row
    return mask


def _forward_args(model) -> tuple[str, bool]:
    """The forward argument that takes a KV cache (``cache`` in newer transformers,
    ``past_key_values`` before) and whether it can keep only the last logits."""
    import inspect
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class FastLM(HFLM):
    """See the module docstring. ``model``: a causal LM module, evaluated in place (its
    weights may change between calls); ``batch_size``: sequences per forward pass."""

    def __init__(self, model, tokenizer, batch_size: int = 32, device: str | None = None,
                 share_context: bool = True):
        device = device or str(next(model.parameters()).device)
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        self._tokens: dict = {}  # request arguments -> token ids
        self._plans: dict = {}  # a call's request arguments -> its batches
        self._share = share_context
        self._checked = not share_context
        self.forward_tokens = 0  # tokens run through the model (for the benchmarks)

    # -- tokens, once ----------------------------------------------------------------------
    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        key = ("ll", context, continuation)
        hit = self._tokens.get(key)
        if hit is None:
            if context == "":  # as TemplateLM.loglikelihood: BOS/EOS as the context
                cont = self.tok_encode(continuation, add_special_tokens=False)
                hit = ([self.prefix_token_id], cont) if self.prefix_token_id != cont[0] else (cont[:1], cont[1:])
            else:
                hit = self._encode_pair(context, continuation)
            self._tokens[key] = hit
        return hit

    def _windows(self, string: str) -> list[tuple[list[int], list[int]]]:
        key = ("rolling", string)
        hit = self._tokens.get(key)
        if hit is None:
            from lm_eval import utils
            hit = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            self._tokens[key] = hit
        return hit

    # -- log-likelihoods ---------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        return self.loglikelihood_pairs([r.args for r in requests])

    def loglikelihood_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        key = ("ll", tuple(pairs))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan([self._pair(c, x) for c, x in pairs])
        return self._run(plan, len(pairs))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = True) -> list[float]:
        return self.rolling_strings([r.args[0] for r in requests])

    def rolling_strings(self, strings: list[str]) -> list[float]:
        key = ("rolling", tuple(strings))
        plan = self._plans.get(key)
        if plan is None:
            rows, owner = [], []
            for i, s in enumerate(strings):
                for ctx, cont in self._windows(s):
                    rows.append((list(ctx), list(cont)))
                    owner.append(i)
            plan = self._plans[key] = (self._plan(rows, share=False), owner, len(rows))
        batches, owner, n = plan
        out = [0.0] * len(strings)
        for i, (ll, _) in zip(owner, self._run(batches, n)):
            out[i] += ll
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """HFLM's token-level entry point, for any caller of the base class's paths."""
        return self._run(self._plan([(list(c), list(x)) for _, c, x in requests]), len(requests))

    def _plan(self, rows: list, share: bool | None = None) -> list[_Batch]:
        share = self._share if share is None else share
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if share and not self._checked:
            self._check_packing(rows, pad)
            share = self._share
        return _batches(_plan_sequences(rows, self.max_length, share), int(self.batch_size), pad)

    def _check_packing(self, rows: list, pad: int) -> None:
        """Packing is the same arithmetic only where the model honours a 4D mask: compare
        packed and plain scores on up to 16 requests that share contexts."""
        self._checked = True
        seen: dict = {}
        for ctx, cont in rows:
            seen.setdefault(tuple(ctx), []).append((ctx, cont))
        sample = [r for g in seen.values() if len(g) > 1 for r in g][:16]
        if not sample:
            return
        plain = self._run(_batches(_plan_sequences(sample, self.max_length, False), len(sample), pad), len(sample))
        try:
            packed = self._run(_batches(_plan_sequences(sample, self.max_length, True), len(sample), pad),
                               len(sample))
        except Exception as e:  # an attention implementation that refuses 4D masks (flash attention)
            log.warning("the model's attention takes no packed contexts (%s); scoring every choice with its own copy "
                        "of the context", str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            self._share = False
            return
        worst = max(abs(a[0] - b[0]) / max(1.0, abs(b[0])) for a, b in zip(packed, plain))
        if worst > 1e-4 or any(a[1] != b[1] for a, b in zip(packed, plain)):
            log.warning("the model's attention does not honour packed contexts (differs by %.2g); scoring every "
                        "choice with its own copy of the context", worst)
            self._share = False

    @torch.no_grad()
    def _run(self, batches: list[_Batch], n: int) -> list[tuple[float, bool]]:
        model = self.model
        device = next(model.parameters()).device
        sums = [0.0] * n
        greedy = [True] * n
        for b in batches:
            kwargs = {}
            if b.layout is not None:
                kwargs = {"attention_mask": _mask(b.layout, b.input_ids.shape[1], device),
                          "position_ids": b.position_ids.to(device)}
            logits = model(input_ids=b.input_ids.to(device), **kwargs).logits
            self.forward_tokens += b.input_ids.numel()
            rows = logits.reshape(-1, logits.shape[-1]).index_select(0, b.flat.to(device))
            logp = F.log_softmax(rows, dim=-1, dtype=self.softmax_dtype)
            tgt = b.targets.to(device)
            tok = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            hit = logp.argmax(-1) == tgt
            # each request's tokens are contiguous: summed in the model's dtype, as HFLM sums them
            per = torch.stack([x.sum() for x in tok.split(b.lengths)]).double().tolist()
            ok = torch.stack([x.all() for x in hit.split(b.lengths)]).tolist()
            for r, v, g in zip(b.requests, per, ok):
                sums[r] += v  # a request split into several rows (rolling windows) adds up here
                greedy[r] = greedy[r] and g
        return list(zip(sums, greedy))

    # -- generation -------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = True) -> list[str]:
        return self.generate_strings([r.args for r in requests])

    def generate_strings(self, args: list[tuple[str, dict]]) -> list[str]:
        return [text for text, _, _ in self.generate_with_tokens(args)]

    def generate_with_tokens(self, args: list[tuple[str, dict]]) -> list[tuple[str, list[int], list[int]]]:
        """Per request: the text (cut at its first stop sequence, as HFLM cuts it), the
        context's token ids, and the generated token ids before the stop (what a
        sequence-level distillation trains on: decoding and encoding again need not give
        the same tokens)."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        out: list = [None] * len(args)
        by_kwargs: dict = {}
        for i, (ctx, gen) in enumerate(args):
            by_kwargs.setdefault(repr(sorted(gen.items())), []).append(i)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        for members in by_kwargs.values():
            kwargs = normalize_gen_kwargs(dict(args[members[0]][1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if kwargs.get("do_sample"):
                raise ValueError("mergesearch scores generation greedily (do_sample: false)")
            enc = {i: self._context(args[i][0], self.max_length - max_gen) for i in members}
            members = sorted(members, key=lambda i: len(enc[i]))
            for s in range(0, len(members), int(self.batch_size)):
                chunk = members[s:s + int(self.batch_size)]
                for i, toks in zip(chunk, self._greedy([enc[i] for i in chunk], max_gen, until)):
                    text = postprocess_generated_text(self.tok_decode(toks), until, None)
                    out[i] = (text, enc[i], self._kept(toks, until))
        return out

    def _kept(self, toks: list[int], until: list[str]) -> list[int]:
        """The generated tokens before EOS and before the first token at which the decoded
        text holds a stop sequence."""
        eos = self.tokenizer.eos_token_id
        stops = [u for u in until if u]
        for k in range(len(toks)):
            if toks[k] == eos or (stops and any(u in self.tok_decode(toks[:k + 1]) for u in stops)):
                return toks[:k]
        return list(toks)

    def _context(self, string: str, max_ctx: int) -> list[int]:
        key = ("gen", string, max_ctx)
        hit = self._tokens.get(key)
        if hit is None:  # as HFLM.tok_batch_encode encodes one string
            special = {}
            bos = getattr(self.tokenizer, "bos_token", None)
            if bos and string.startswith(bos):
                special = {"add_special_tokens": False}
            elif self.add_bos_token is not None:
                special = {"add_special_tokens": self.add_bos_token}
            hit = self._tokens[key] = self.tokenizer(string, **special)["input_ids"][-max_ctx:]
        return hit

    @torch.no_grad()
    def _greedy(self, contexts: list[list[int]], max_gen: int, until: list[str]) -> list[list[int]]:
        model = self.model
        device = next(model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos_ids = set()
        cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for e in (cfg_eos if isinstance(cfg_eos, list) else [cfg_eos]):
            if e is not None:
                eos_ids.add(int(e))
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(int(self.tokenizer.eos_token_id))
        B, T = len(contexts), max(len(c) for c in contexts)
        ids = torch.full((B, T), pad, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, c in enumerate(contexts):  # left padding, as HFLM pads for generation
            ids[b, T - len(c):] = torch.tensor(c)
            mask[b, T - len(c):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        from transformers import DynamicCache
        key, keep = _forward_args(model)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                    **{key: DynamicCache()}, **({"logits_to_keep": 1} if keep else {}))
        self.forward_tokens += ids.numel()
        cache = _cache_of(out)
        gen: list[list[int]] = [[] for _ in range(B)]
        live = list(range(B))
        nxt = out.logits[:, -1].argmax(-1)
        last_pos = pos[:, -1]
        stops = [u for u in until if u]
        for step in range(max_gen):
            toks = nxt.tolist()
            still = []
            for b in live:
                gen[b].append(toks[b])
                if toks[b] in eos_ids:
                    continue
                if stops and any(u in self.tok_decode(gen[b]) for u in stops):
                    continue
                still.append(b)
            live = still
            if not live or step == max_gen - 1:
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
            last_pos = last_pos + 1
            out = model(input_ids=nxt.unsqueeze(-1), attention_mask=mask, position_ids=last_pos.unsqueeze(-1),
                        use_cache=True, **{key: cache})
            self.forward_tokens += B
            cache = _cache_of(out)
            nxt = out.logits[:, -1].argmax(-1)
        return gen
