"""The evaluation engine: lm-eval defines every task, mergesearch computes.

One evaluator serves every task: an lm-eval task or group by name, a local lm-eval YAML in
``task_dir``, a dev/test pair of lm-eval tasks, or the project's JSONL format (read as an
inline lm-eval task, :mod:`mergesearch.evaluate.jsonl`). lm-eval builds the requests
(prompts, few-shot examples, chat template, target delimiter, choices) and computes the
metrics (``process_results``, filters, aggregation, groups); :class:`FastLM` computes the
log-likelihoods, rolling log-likelihoods and greedy generations on the worker's model.

**Once per worker.** The tasks are loaded and their documents split in the constructor;
the requests are built the first time a model is scored (few-shot examples drawn with
``fewshot_seed``, so every candidate sees the same prompts) and tokenized once by FastLM.
A candidate then costs its forward passes, the filters and the metrics.

**Items.** A task with one evaluation split (gsm8k, arc_challenge, mmlu) is split by
items (:mod:`mergesearch.evaluate.items`): a seeded permutation of its documents, cut into
disjoint dev and test sets. A group's counts are shared among its subtasks by size. The
zoo's tasks, JSONL files and ``{dev: ..., test: ...}`` pairs keep their own dev and test
documents, and counts cap them. ``dev_from: validation`` scores dev on a task's
validation split and test on its test split. A task's items are numbered in one flat
order over its subtasks (``items``), so a rung of a multi-fidelity search is any subset
of them, for every output type.

**Metrics.** Per task ``metrics: {task: "metric,filter"}``; by default the task's first
metric with its first filter. A metric whose ``higher_is_better`` is false (perplexity,
bits per byte) is negated, so every score is maximized; ``directions`` says which.

**Generation.** ``generate_until`` tasks decode greedily (``do_sample: false``), up to
``max_gen_toks``.
"""

from __future__ import annotations

import logging

from mergesearch.errors import MergeSearchError
from mergesearch.evaluate import items as item_split
from mergesearch.evaluate.base import EvalConfig, check_tokenizer_fits, weighted_mean
from mergesearch.evaluate.lmeval_setup import (
    gold_index, groups_and_tasks, include_path, keep_compiled_templates, quiet_lm_eval, slug, target_text, task_manager,
    task_name,
)

log = logging.getLogger(__name__)


class LmEvalEvaluator:
    """See the module docstring. ``score(model, tokenizer)`` -> {task: score};
    ``score_items(model, tokenizer, {task: item indices})`` -> {task: per-item scores}."""

    def __init__(self, cfg: EvalConfig, device: str = "cpu"):
        quiet_lm_eval()
        keep_compiled_templates()

        self.cfg = cfg
        self.tasks = list(cfg.tasks)
        self.device = device
        # local task folders and JSONL files first; lm-eval's own index (slow to build) only
        # for a task found in neither
        inc = include_path(cfg) if any(not t.endswith(".jsonl") for t in self.tasks) else None
        manager = task_manager(inc, defaults=False)
        local = set(manager.all_tasks)
        self.names: dict[str, str] = {}
        specs: list = []
        own: set[str] = set()  # tasks whose documents are this split's already
        for task in self.tasks:
            spec = self._resolve(task, local, own)
            if spec is None:  # one of lm-eval's own tasks
                if manager is task_manager(inc, defaults=False):
                    manager = task_manager(inc)
                pair = cfg.pairs.get(task)
                name = pair[cfg.split] if pair is not None else task
                if name not in set(manager.all_tasks):
                    if pair is not None:
                        raise MergeSearchError(f"evaluator: task '{task}': unknown lm-eval task '{name}' "
                                               f"({cfg.split})" + (f" (not in lm-eval or {include_path(cfg)})"
                                                                   if cfg.task_dir else ""))
                    self._jsonl_or_unknown(task)  # raises
                self.names[task] = spec = name
                if pair is not None:
                    own.add(task)
            specs.append(spec)
        try:
            loaded = manager.load(specs)
        except MergeSearchError:
            raise
        except Exception as e:  # dataset files missing or unreadable
            raise MergeSearchError(f"lm-eval could not load tasks {list(self.names.values())}: {e}") from None
        self.groups, self.leaf_tasks, group_map = groups_and_tasks(loaded)

        def leaves_of(name: str) -> list[str]:
            if name in self.leaf_tasks:
                return [name]
            return [leaf for child in group_map.get(name, []) for leaf in leaves_of(child)]

        self.leaves: dict[str, list] = {}
        for task, name in self.names.items():
            found = leaves_of(name)
            if not found:
                raise MergeSearchError(f"lm-eval task '{task}' has no subtasks to score")
            self.leaves[task] = [self.leaf_tasks[n] for n in found]
        self.samples: dict[str, list[int]] = {}
        self.item_record: dict[str, dict] = {}
        self.metric: dict[str, tuple[str, str, bool]] = {}
        self.items: dict[str, list[tuple[str, int]]] = {}  # task -> (leaf, position in its samples), flat
        for task in self.tasks:
            leaves = self.leaves[task]
            self._configure(leaves, own_split=task in own)
            self._choose_items(task, leaves, own_split=task in own, pair=task in cfg.pairs)
            self.metric[task] = self._metric(task, leaves)
            self.items[task] = [(task_name(t), k) for t in leaves for k in range(len(self.samples[task_name(t)]))]
        self._lm = None
        self._model = None
        self._requests: dict[str, dict[int, list]] = {}  # leaf -> position -> its instances, in order
        self._docs: dict[str, list] = {}  # leaf -> its documents, by position

    # -- set-up --------------------------------------------------------------------------
    def _resolve(self, task: str, local: set, own: set):
        """The lm-eval spec of ``task`` from the local folders or a JSONL file (its name or an
        inline config), or None when only lm-eval's own index can tell."""
        from mergesearch.evaluate.jsonl import lmeval_spec, task_file

        cfg = self.cfg
        pair = cfg.pairs.get(task)
        if pair is not None:  # a dev task and a test task: no split imposed
            if pair[cfg.split] not in local:
                return None
            self.names[task] = pair[cfg.split]
            own.add(task)
            return pair[cfg.split]
        zoo_name = f"zoo_{task}_{cfg.split}"
        jsonl_first = task.endswith(".jsonl") or cfg.evaluator == "loglik"
        for kind in (("jsonl", "zoo", "name") if jsonl_first else ("zoo", "name", "jsonl")):
            if kind == "zoo" and zoo_name in local:
                self.names[task] = zoo_name
                own.add(task)
                return zoo_name
            if kind == "name" and task in local:
                self.names[task] = task
                return task
            if kind == "jsonl":
                try:
                    path = task_file(cfg, task, cfg.split)
                except MergeSearchError:
                    if task.endswith(".jsonl") or (cfg.evaluator == "loglik" and zoo_name not in local
                                                   and task not in local):
                        raise
                    continue
                name = f"jsonl_{slug(task)}_{cfg.split}"
                self.names[task] = name
                own.add(task)
                return lmeval_spec(path, name)
        return None

    def _jsonl_or_unknown(self, task: str) -> None:
        from mergesearch.evaluate.jsonl import task_file
        try:
            task_file(self.cfg, task, self.cfg.split)
        except MergeSearchError as e:
            where = f" or {include_path(self.cfg)}" if self.cfg.task_dir else ""
            raise MergeSearchError(f"unknown task '{task}': not in lm-eval{where}, and {e}") from None

    def _configure(self, leaves: list, own_split: bool) -> None:
        cfg = self.cfg
        for t in leaves:
            if hasattr(t, "set_config"):
                t.set_config(key="num_fewshot", value=cfg.num_fewshot)
                if t.OUTPUT_TYPE == "generate_until":
                    gen = {"do_sample": False, "temperature": 0.0}
                    if cfg.max_gen_toks is not None:
                        gen["max_gen_toks"] = cfg.max_gen_toks
                    t.set_config(key="generation_kwargs", value=gen, update=True)
            if cfg.dev_from == "validation" and not own_split:
                if not t.has_validation_docs():
                    raise MergeSearchError(f"evaluator: dev_from: validation, but lm-eval task '{task_name(t)}' "
                                           "has no validation split")
                if not t.has_test_docs():
                    raise MergeSearchError(f"evaluator: dev_from: validation, but lm-eval task '{task_name(t)}' "
                                           "has no test split to keep for test")
                if cfg.split == "dev":  # score the validation documents
                    t.config.test_split = None

    def _choose_items(self, task: str, leaves: list, own_split: bool, pair: bool = False) -> None:
        cfg = self.cfg
        own = own_split or cfg.dev_from == "validation"  # documents that belong to this split only
        sizes = {task_name(t): len(t.eval_docs) for t in leaves}
        shares = None
        if len(leaves) > 1 and not own:
            shares = item_split.shares(sizes, cfg, f"evaluator: task '{task}'")
        records = {}
        for t in leaves:
            leaf = task_name(t)
            n = sizes[leaf]
            where = f"evaluator: task '{leaf}'"
            chosen = item_split.choose(n, cfg, cfg.split, leaf, where, own, shares[leaf] if shares else None)
            self.samples[leaf] = chosen
            source = (f"its {cfg.split} task" if pair else "its own split file" if own_split
                      else "its validation split" if own and cfg.split == "dev"
                      else "its test split" if own else "an item split of its documents")
            records[leaf] = item_split.record(chosen, n, cfg, cfg.split, source)
        if len(records) == 1:
            self.item_record[task] = next(iter(records.values()))
        else:
            self.item_record[task] = {"split": cfg.split, "count": sum(r["count"] for r in records.values()),
                                      "of": sum(r["of"] for r in records.values()), "subtasks": records}

    def _metric(self, task: str, leaves: list) -> tuple[str, str, bool]:
        t = leaves[0]
        hib = t.higher_is_better()
        metric_names = list(hib) or [m["metric"] for m in (t.config.metric_list or [])]
        filters = [f.name for f in getattr(t, "_filters", [])] or ["none"]
        asked = self.cfg.metrics.get(task)
        if asked:
            metric, _, filt = asked.partition(",")
            filt = filt or filters[0]
        else:
            metric, filt = metric_names[0], filters[0]
        if metric not in metric_names:
            raise MergeSearchError(f"evaluator: metrics.{task}: task '{task}' has no metric '{metric}' "
                                   f"(it has: {', '.join(metric_names)})")
        if filt not in filters:
            raise MergeSearchError(f"evaluator: metrics.{task}: task '{task}' has no filter '{filt}' "
                                   f"(it has: {', '.join(filters)})")
        return metric, filt, bool(hib.get(metric, True))

    @property
    def directions(self) -> dict[str, dict]:
        """Per task: the metric and filter scored, and how the score relates to it."""
        return {task: {"metric": m, "filter": f, "higher_is_better": h,
                       "score": "the metric" if h else "minus the metric (lower is better)"}
                for task, (m, f, h) in self.metric.items()}

    def output_types(self) -> dict[str, set[str]]:
        """Per task, the lm-eval output types of its subtasks."""
        return {task: {t.OUTPUT_TYPE for t in leaves} for task, leaves in self.leaves.items()}

    def request_counts(self) -> dict[str, int]:
        """Per task, the requests its items make (a choice each for multiple choice, one
        otherwise): what a refinement's cost is counted in, before any model is loaded."""
        out = {}
        for task, leaves in self.leaves.items():
            n = 0
            for t in leaves:
                docs = t.eval_docs
                for i in self.samples[task_name(t)]:
                    n += len(t.doc_to_choice(docs[i])) if t.OUTPUT_TYPE == "multiple_choice" else 1
            out[task] = n
        return out

    def aggregate(self, scores: dict[str, float]) -> float:
        return weighted_mean(scores, self.cfg.weights, self.cfg.monitor)

    # -- requests, once per model ------------------------------------------------------------
    def lm(self, model, tokenizer):
        """The FastLM on ``model`` with every request built (once per model object)."""
        if self._model is model:
            return self._lm
        from mergesearch.evaluate.fastlm import FastLM
        check_tokenizer_fits(model, tokenizer, "evaluator")
        self._lm = FastLM(model, tokenizer, batch_size=self.cfg.batch_size)
        self._model = model
        self._build_requests()
        return self._lm

    def _build_requests(self) -> None:
        cfg, lm = self.cfg, self._lm
        chat = bool(cfg.apply_chat_template)
        for leaves in self.leaves.values():
            for t in leaves:
                leaf = task_name(t)
                if hasattr(t, "set_fewshot_seed"):
                    t.set_fewshot_seed(seed=cfg.fewshot_seed)
                t.build_all_requests(samples=self.samples[leaf], rank=0, world_size=1,
                                     system_instruction=cfg.system_instruction, apply_chat_template=chat,
                                     fewshot_as_multiturn=False, chat_template=lm.apply_chat_template if chat else None,
                                     tokenizer_name=lm.tokenizer_name if chat else "")
                by_doc: dict[int, list] = {}
                for inst in t.instances:
                    by_doc.setdefault(inst.doc_id, []).append(inst)
                for v in by_doc.values():
                    v.sort(key=lambda x: x.idx)
                self._requests[leaf] = by_doc
                self._docs[leaf] = [doc for _, doc in t.doc_iterator(rank=0, limit=None, world_size=1,
                                                                     samples=self.samples[leaf])]

    def requests(self, model, tokenizer, task: str) -> list[tuple[str, int, dict, list]]:
        """(leaf, position, document, instances) of every item of ``task``, in item order."""
        self.lm(model, tokenizer)
        return [(leaf, k, self._docs[leaf][k], self._requests[leaf][k]) for leaf, k in self.items[task]]

    # -- training data for refinement ------------------------------------------------------------
    def training_items(self, model, tokenizer) -> dict[str, list[dict]]:
        """Per task, each item as a refinement trains on it, tokenized as it is scored:
        ``kind`` (``mc``, ``target``, ``gen``, ``rolling``), ``seqs`` (token ids of
        context + continuation, and the continuation's length), and per kind: ``answer``
        (the gold choice) and ``norm`` (the choices' lengths in characters when the task's
        metric is acc_norm) for ``mc``; ``context`` and ``gen_args`` (the generation
        request) for ``gen``, whose ``seqs`` hold the gold target (empty without one)."""
        lm = self.lm(model, tokenizer)
        limit = lm.max_length + 1
        out: dict[str, list[dict]] = {}
        for task in self.tasks:
            metric = self.metric[task][0]
            rows = []
            for leaf, _, doc, insts in self.requests(model, tokenizer, task):
                t = self.leaf_tasks[leaf]
                kind = t.OUTPUT_TYPE
                if kind == "multiple_choice":
                    choices = t.doc_to_choice(doc)
                    toks = [lm._pair(*i.args) for i in insts[:len(choices)]]
                    rows.append({"kind": "mc", "seqs": [((c + x)[-limit:], len(x)) for c, x in toks],
                                 "answer": gold_index(t, doc, choices),
                                 "norm": [float(len(c)) for c in choices] if metric == "acc_norm" else None})
                elif kind == "loglikelihood":
                    c, x = lm._pair(*insts[0].args)
                    rows.append({"kind": "target", "seqs": [((c + x)[-limit:], len(x))], "answer": 0})
                elif kind == "generate_until":
                    ctx = insts[0].args[0]
                    target = target_text(t, doc)
                    seqs = []
                    if target:
                        c, x = lm._pair(ctx, target)
                        seqs = [((c + x)[-limit:], len(x))]
                    rows.append({"kind": "gen", "seqs": seqs, "context": ctx, "gen_args": insts[0].args, "answer": 0})
                elif kind == "loglikelihood_rolling":
                    rows.append({"kind": "rolling", "answer": 0,
                                 "seqs": [(list(c) + list(x), len(x)) for c, x in lm._windows(insts[0].args[0])]})
            out[task] = rows
        return out

    # -- scoring -------------------------------------------------------------------------------
    def _respond(self, lm, instances: list) -> None:
        """Compute every instance's response, grouped by request type (one batched call each)."""
        by_type: dict[str, list] = {}
        for inst in instances:
            inst.resps = []
            inst.filtered_resps = {}
            by_type.setdefault(inst.request_type, []).append(inst)
        for kind, reqs in by_type.items():
            if kind == "loglikelihood":
                out = lm.loglikelihood_pairs([r.args for r in reqs])
            elif kind == "loglikelihood_rolling":
                out = lm.rolling_strings([r.args[0] for r in reqs])
            elif kind == "generate_until":
                out = lm.generate_strings([r.args for r in reqs])
            else:
                raise MergeSearchError(f"evaluator: lm-eval request type '{kind}' is not supported")
            for r, x in zip(reqs, out):
                r.resps.extend([x] * r.repeats)

    def _raw_metrics(self, model, tokenizer, subset: dict[str, list[int]]) -> dict:
        """lm-eval's per-document metrics of the ``subset`` items: {leaf: {(metric, filter):
        [value per document]}} and, per task, the (leaf, row) of each asked item."""
        lm = self.lm(model, tokenizer)
        wanted: dict[str, list[int]] = {}
        where: dict[str, list[tuple[str, int]]] = {}
        for task, ks in subset.items():
            where[task] = []
            for k in ks:
                leaf, pos = self.items[task][k]
                rows = wanted.setdefault(leaf, [])
                where[task].append((leaf, len(rows)))
                rows.append(pos)
        instances = [inst for leaf, ps in wanted.items() for p in ps for inst in self._requests[leaf][p]]
        was_training = model.training
        model.eval()
        try:
            self._respond(lm, instances)
        finally:
            if was_training:
                model.train()
        raw: dict[str, dict] = {}
        for leaf, ps in wanted.items():
            t = self.leaf_tasks[leaf]
            mine = [inst for p in ps for inst in self._requests[leaf][p]]
            for f in getattr(t, "_filters", []):
                f.apply(mine)
            metrics: dict = {}
            for p in ps:
                reqs = self._requests[leaf][p]
                for fkey in reqs[0].filtered_resps:
                    for m, v in t.process_results(self._docs[leaf][p], [r.filtered_resps[fkey] for r in reqs]).items():
                        metrics.setdefault((m, fkey), []).append(v)
            raw[leaf] = metrics
        return {"raw": raw, "where": where}

    def combine(self, raw: dict[str, dict]) -> dict[str, float]:
        """Per task, lm-eval's aggregate of the per-document metrics in ``raw`` ({leaf:
        {(metric, filter): values}}): each subtask's aggregation, then its groups'."""
        from collections import defaultdict

        from lm_eval.evaluator_utils import _process_results

        acc = {}
        for leaf, metrics in raw.items():
            d = defaultdict(list)
            for key, vals in metrics.items():
                d[key].extend(vals)
            acc[leaf] = {"task": self.leaf_tasks[leaf], "raw_metrics": d, "logged_samples": []}
        names = set(raw)
        results = _process_results(acc, self.groups, bootstrap_iters=0).metrics
        scores = {}
        for task, name in self.names.items():
            if not any(task_name(t) in names for t in self.leaves[task]):
                continue
            metric, filt, higher = self.metric[task]
            key = f"{metric},{filt}"
            value = (results.get(name) or {}).get(key)
            if not isinstance(value, (int, float)):  # a group without its own aggregate: by size
                parts = [(results[task_name(t)][key], len(raw[task_name(t)][(metric, filt)]))
                         for t in self.leaves[task] if task_name(t) in names]
                value = sum(v * n for v, n in parts) / max(1, sum(n for _, n in parts))
            scores[task] = float(value) if higher else -float(value)
        return scores

    def item_values(self, task: str, leaf: str, values: list) -> list[float]:
        """Per-document scores for pruning: the metric's own value where the task's
        aggregation is a mean, else the aggregation of that one document (a document's
        perplexity), negated where lower is better."""
        metric, _, higher = self.metric[task]
        agg = self.leaf_tasks[leaf].aggregation().get(metric)
        from lm_eval.api.metrics import mean
        sign = 1.0 if higher else -1.0
        if agg is mean or getattr(agg, "__name__", "") == "mean":
            return [sign * float(v) for v in values]
        return [sign * float(agg([v])) for v in values]

    def score(self, model, tokenizer) -> dict[str, float]:
        subset = {task: list(range(len(v))) for task, v in self.items.items()}
        return self.combine(self._raw_metrics(model, tokenizer, subset)["raw"])

    def score_subset(self, model, tokenizer, subset: dict[str, list[int]], keep: dict | None = None
                     ) -> tuple[dict[str, list[float]], dict[str, float]]:
        """Per-item scores of ``subset`` (task -> item indices, in its order), and the
        tasks' lm-eval scores over those items plus any kept in ``keep`` (a dict a trial's
        rungs share: the per-document metrics so far are added to it)."""
        out = self._raw_metrics(model, tokenizer, subset)
        raw, where = out["raw"], out["where"]
        per_item = {}
        for task, locs in where.items():
            metric, filt, _ = self.metric[task]
            per_item[task] = [self.item_values(task, leaf, [raw[leaf][(metric, filt)][row]])[0]
                              for leaf, row in locs]
        if keep is not None:
            for leaf, metrics in raw.items():
                mine = keep.setdefault(leaf, {})
                for key, vals in metrics.items():
                    mine.setdefault(key, []).extend(vals)
            raw = keep
        return per_item, self.combine(raw)

    def score_items(self, model, tokenizer, subset: dict[str, list[int]]) -> dict[str, list[float]]:
        """Per-item scores of ``subset`` (task -> item indices), in its order; only those
        items are run through the model."""
        return self.score_subset(model, tokenizer, subset)[0]
