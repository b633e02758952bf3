"""What a refinement trains on (:mod:`.refine`): the evaluator's dev items as rows of
token sequences, split into train and holdout; the losses per output type (multiple
choice, a target continuation, generation teacher-forced on its gold or its teacher's
output, rolling log-likelihood); the distill teachers' targets; and the most a
refinement can cost, in trials, which the budget reserves before the search starts."""

from __future__ import annotations

import logging
import random

import torch


log = logging.getLogger("mergesearch.search.refine")

TRAIN_COST = 3.0  # a training sequence, in forward passes (forward + backward)


def task_counts(ev) -> dict[str, tuple[int, int, bool]]:
    """Per task of ``ev``: its items, the sequences they make, and whether it is a generation
    task; what :func:`estimate_cost` reads, known before any model is loaded."""
    counts, types = ev.request_counts(), ev.output_types()
    return {t: (len(v), counts[t], "generate_until" in types[t]) for t, v in ev.items.items()}


def estimate_cost(cfg: dict, tasks: dict[str, tuple[int, int, bool]], n_models: int = 0) -> float:
    """The most a refinement can cost, in trials (the sequences one trial scores): every
    step and every check run, and for ``loss: distill`` each of the ``n_models`` source
    models scored once on every item. ``tasks``: :func:`task_counts`.

    A batch draws the tasks in turn, so a step costs up to the largest task's sequences per
    item; each task holds out round(share x items), up to half an item more than its share;
    under ``distill`` a generation item also trains and is checked on its teacher's output,
    one sequence more."""
    per = {t: (q + (n if gen and cfg["loss"] == "distill" else 0)) / max(n, 1) for t, (n, q, gen) in tasks.items()}
    per_item = max(per.values(), default=0.0)
    holdout_seqs = sum((n * cfg["holdout"] + 0.5) * per[t] for t, (n, _, _) in tasks.items())
    n_seqs = sum(q for _, q, _ in tasks.values())
    checks = cfg["steps"] // cfg["eval_every"] + 1
    teachers = n_models if cfg["loss"] == "distill" else 0
    restarts = int(cfg.get("restarts", 1))  # each restart trains and checks again; the teachers score once
    once = (cfg["steps"] * cfg["batch_size"] * per_item * TRAIN_COST + checks * holdout_seqs) / max(n_seqs, 1)
    return restarts * once + teachers


class Row:
    """One item as a refinement trains on it (see ``training_items`` of the evaluator)."""

    __slots__ = ("seqs", "answer", "kind", "target", "norm", "gen", "gold")

    def __init__(self, item: dict):
        self.seqs = list(item["seqs"])
        self.answer = int(item.get("answer", 0))
        self.kind = item["kind"]
        self.target = None  # distill: the teacher's choice distribution (mc)
        self.norm = torch.tensor(item["norm"]) if item.get("norm") else None
        self.gen = {"context": item["context"], "gen_args": item["gen_args"]} if item["kind"] == "gen" else None
        self.gold = len(self.seqs)  # gen: how many of ``seqs`` are the gold target's (the rest a teacher's)


def untrainable(output_types: dict[str, set[str]], cfg: dict) -> dict[str, str]:
    """Tasks a refinement with ``cfg`` cannot train on, and why (one line each)."""
    loss, mix = cfg["loss"], float(cfg.get("distill_mix", 1.0))
    out = {}
    for task, types in output_types.items():
        why = []
        for t in sorted(types):
            if t in ("multiple_choice", "loglikelihood_rolling"):
                break
            if t == "loglikelihood" and loss == "entropy":
                why.append("its items have no choices for the entropy loss (use choice or loglik)")
            elif t == "loglikelihood" and loss == "distill" and mix >= 1.0:
                why.append("its items have no choices to distill, and distill_mix 1 leaves no label "
                           "(use distill_mix below 1, or loss: loglik)")
            elif t == "generate_until" and loss == "entropy":
                why.append("generation has no choice distribution for the entropy loss (use distill: the "
                           "teachers' own outputs, or choice: the gold targets)")
            elif t not in ("loglikelihood", "generate_until"):
                why.append(f"lm-eval output type '{t}' has no training signal")
            else:
                break
        else:
            out[task] = "; ".join(why) or "it has nothing to train on"
    return out


class Items:
    """The evaluator's dev items, tokenized once (as they are scored), split into train and
    holdout."""

    def __init__(self, evaluator, model, tokenizer, holdout: float, seed: int, device, skip=()):
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = device
        self.train: dict[str, list] = {}
        self.holdout: dict[str, list] = {}
        self.n_seqs = 0
        self.n_items = 0
        self.rows: dict[str, list] = {}
        self.share, self.seed = holdout, seed
        for task, items in evaluator.training_items(model, tokenizer).items():
            rows = [Row(it) for it in items]
            self.n_items += len(rows)
            self.n_seqs += sum(max(1, len(r.seqs)) for r in rows)
            if task not in skip:
                self.rows[task] = rows
        self.fold(0)

    def fold(self, r: int) -> None:
        """Hold out the r-th share of each task's items (a seeded order cut into consecutive
        shares, wrapping around): fold 0 is the first share; a refinement's restarts hold
        out folds 0, 1, ... so their held-out sets tile the items."""
        for task, rows in self.rows.items():
            order = list(range(len(rows)))
            random.Random(f"refine:{self.seed}:{task}").shuffle(order)
            k = max(1, int(round(self.share * len(rows)))) if len(rows) > 1 else 0
            start = (r * k) % len(rows) if rows else 0
            order = order[start:] + order[:start]
            self.holdout[task] = [rows[i] for i in order[:k]]
            self.train[task] = [rows[i] for i in order[k:]] or self.holdout[task]

    def batch(self, rows: list) -> tuple:
        from mergesearch.search.curvature import _batch

        seqs = [s for r in rows for s in r.seqs]
        if not seqs:
            return None
        d = self.device
        return (*(t.to(d) for t in _batch(seqs, self.pad)), len(seqs))


def sequence_loglik(model, params: dict, batch) -> torch.Tensor:
    if batch is None:
        return torch.zeros(0)
    inp, mask, tgt, tmask, _ = batch
    logits = torch.func.functional_call(model, params, args=(), kwargs={"input_ids": inp, "attention_mask": mask,
                                                                        "use_cache": False}).logits
    logp = logits.float().log_softmax(-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return (logp * tmask).sum(-1)


def item_losses(rows: list, ll: torch.Tensor, kind: str, mix: float = 1.0) -> tuple[torch.Tensor, int]:
    """Mean loss over the rows and the number of multiple-choice rows they got right (the
    first best choice wins). Per kind of item: multiple choice by ``kind`` (below); a
    target's negative log-likelihood; a generation's per-token negative log-likelihood of
    its gold target, or under ``distill`` of its teacher's greedy output (mixed with the
    gold target's by ``distill_mix``); a text's per-token rolling negative log-likelihood."""
    out, correct, k = [], 0, 0
    for r in rows:
        v = ll[k:k + len(r.seqs)]
        k += len(r.seqs)
        if not r.seqs:
            continue
        if r.kind == "mc":
            scores = v / r.norm.to(v.device) if r.norm is not None else v  # acc_norm: per character
            vals = scores.detach().tolist()
            best = max(range(len(vals)), key=lambda i: (vals[i], -i))
            correct += int(best == r.answer)
            logp = scores.log_softmax(-1)
            labelled = r.answer >= 0
            if kind == "choice" and labelled:
                out.append(-logp[r.answer])
            elif kind == "loglik" and labelled:
                out.append(-v[r.answer])
            elif kind == "distill" and r.target is not None:  # the teacher's distribution, mixed with the label
                kl = (r.target * (r.target.clamp_min(1e-12).log() - logp)).sum()
                out.append(mix * kl + ((1.0 - mix) * -logp[r.answer] if labelled else 0.0))
            elif kind == "entropy":  # entropy of the choice distribution: no label needed
                out.append(-(logp.exp() * logp).sum())
        elif r.kind == "target":
            if kind == "distill":  # a continuation item has no choices to distill: its label's share only
                if mix < 1.0:
                    out.append((1.0 - mix) * -v[0])
            elif kind != "entropy":
                out.append(-v[0])
        elif r.kind == "gen":
            per_tok = [-v[j] / max(1, r.seqs[j][1]) for j in range(len(r.seqs))]
            gold, taught = per_tok[:r.gold], per_tok[r.gold:]
            if kind == "distill":  # the teacher's output (none when it generated nothing)
                if taught:
                    out.append(mix * taught[0] + ((1.0 - mix) * gold[0] if gold and mix < 1.0 else 0.0))
            elif kind != "entropy" and gold:
                out.append(gold[0])
        elif r.kind == "rolling":  # label-free: every loss trains on the text itself
            out.append(-v.sum() / max(1, sum(n for _, n in r.seqs)))
    loss = torch.stack([torch.as_tensor(x) for x in out]).mean() if out else ll.sum() * 0.0
    return loss, correct


def teacher_targets(mat, model, recipe, names: list[str], targets: dict, items: "Items", device,
                     rule: str, lm=None, chunk: int = 32) -> dict:
    """For ``loss: distill``: each task's teacher is one source model, chosen by ``rule``:
    ``confidence``, the model surest of its answers on the task's items (no label needed: a
    fine-tune is surest on its own task): the lowest mean entropy of its choice
    distributions, or for generation the highest mean per-token log-likelihood of its own
    greedy outputs; or ``accuracy``, the most accurate on the task's training items (for
    generation: its output equals the gold target). Multiple-choice rows get their
    teacher's choice distribution, generation rows its greedy output (decoded by ``lm``,
    the evaluator's FastLM, with the teacher's weights written into the model).
    Returns {task: model index}."""
    tasks = list(items.train)
    probs: dict[int, list] = {}
    outputs: dict[int, list] = {}
    stat: dict[tuple[int, str], float] = {}
    with torch.no_grad():
        for i in range(len(recipe.models)):
            params = {name: x.tensor(i).to(device=device, dtype=targets[name].dtype)
                      for name, x in mat.inputs(recipe, names) if not isinstance(x, torch.Tensor)}
            if lm is not None and any(r.kind == "gen" for task in tasks for r in items.train[task] + items.holdout[task]):
                for name, p in params.items():  # generation runs the module itself: the teacher's weights in it
                    targets[name].copy_(p)
            for task in tasks:
                train = {id(r) for r in items.train[task]}
                rows = items.train[task] + [r for r in items.holdout[task] if id(r) not in train]
                right, ent, n_mc = 0, 0.0, 0
                mc = [r for r in rows if r.kind == "mc"]
                for s in range(0, len(mc), chunk):
                    rows_ = mc[s:s + chunk]
                    ll = sequence_loglik(model, params, items.batch(rows_))
                    k = 0
                    for r in rows_:
                        v = ll[k:k + len(r.seqs)]
                        k += len(r.seqs)
                        v = v / r.norm.to(v.device) if r.norm is not None else v
                        logp = v.log_softmax(-1)
                        probs.setdefault(id(r), [None] * len(recipe.models))[i] = logp.exp()
                        ent += float(-(logp.exp() * logp).sum())
                        n_mc += 1
                        right += int(id(r) in train and int(v.argmax()) == r.answer)
                gens = [r for r in rows if r.kind == "gen"]
                sure, n_gen = 0.0, 0
                if gens and lm is not None:
                    made = lm.generate_with_tokens([r.gen["gen_args"] for r in gens])
                    rows_ = [(list(c) or [lm.prefix_token_id], list(x)) for _, c, x in made if x]
                    scored = iter(lm._run(lm._plan(rows_, share=False), len(rows_)) if rows_ else [])
                    for r, (text, c, x) in zip(gens, made):
                        seq = None
                        if x:  # the teacher's own tokens, as it generated them
                            seq = ((list(c) or [lm.prefix_token_id]) + list(x))[-(lm.max_length + 1):], len(x)
                            sure += next(scored)[0] / len(x)
                            n_gen += 1
                        outputs.setdefault(id(r), [None] * len(recipe.models))[i] = (seq, text)
                        if id(r) in train and r.gold and text.strip() == lm.tok_decode(r.seqs[0][0][-r.seqs[0][1]:]).strip():
                            right += 1
                n_scored = n_mc + n_gen
                stat[(i, task)] = (right / max(len(items.train[task]), 1) if rule == "accuracy"
                                   else (-ent + sure) / max(n_scored, 1))
            del params
    chosen = {}
    for task in tasks:
        i = max(range(len(recipe.models)), key=lambda m: (stat[(m, task)], -m))
        chosen[task] = i
        for r in items.train[task] + items.holdout[task]:
            if r.kind == "mc" and r.target is None:
                r.target = probs[id(r)][i]
            elif r.kind == "gen" and id(r) in outputs and len(r.seqs) == r.gold:
                seq, _ = outputs[id(r)][i]
                if seq is not None:
                    r.seqs.append(seq)
    shared = {}
    for task, i in chosen.items():
        shared.setdefault(i, []).append(task)
    for i, ts in shared.items():
        if rule == "confidence" and len(ts) > 1 and len(tasks) <= len(recipe.models):
            log.warning("refine: %s is the surest source model on tasks %s, and teaches them all; when tasks share "
                        "an input format a model can be sure and wrong (check the teachers, or set refine.teachers: "
                        "accuracy)", recipe.models[i].path, ", ".join(ts))
    return chosen
