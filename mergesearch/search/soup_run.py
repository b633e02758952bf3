"""Running a soup: ingredients scored on the Ray workers, candidates recorded in the store.

Every evaluation is a trial of a run of kind ``soup``: its recipe (linear, equal
weights over the members), its members, its role (``ingredient``, ``candidate``,
``uniform`` or ``final``) and its dev scores. The ingredients and the uniform soup
of all of them are scored in parallel; the greedy pass is sequential by nature
(each step depends on the last). At the end the final soup, the best ingredient
and the uniform soup are scored on the test split on the same workers; the study
records the final trial, which ``export`` then writes out like any search winner.

``--resume`` replays the run: candidates already scored are read from the store
(the greedy order is deterministic given the scores), so only what was missing
runs again.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from mergesearch import sources
from mergesearch.engine.adapter import open_model
from mergesearch.engine.checkpoint import is_trainer_checkpoint
from mergesearch.engine.compat import MAX_FINETUNE_DISTANCE, check_compatible, relative_distance, sample_names
from mergesearch.fsutil import atomic_file
from mergesearch.errors import MergeSearchError
from mergesearch.evaluate import EvalConfig, build_evaluator
from mergesearch.evaluate.base import weighted_mean
from mergesearch.search.soup import greedy_soup, last_n_soup, order_ingredients, soup_recipe, uniform_soup
from mergesearch.recipe import Recipe
from mergesearch.search.lifecycle import RunLifecycle
from mergesearch.runs.records import Job
from mergesearch.runs.store import record, run_dir, trial_records
from mergesearch.search.workers import WorkerPool

log = logging.getLogger("mergesearch.soup")
TrialState = optuna.trial.TrialState
STRATEGIES = ("greedy", "uniform", "last-n")


@dataclass
class SoupOptions:
    run: str
    strategy: str = "greedy"
    n: int | None = None  # last-n
    base: str | None = None
    workers: int = 2
    resume: bool = False
    storage: str | None = None
    ray_address: str | None = None
    root: Path = Path("results")
    allow_unrelated: bool = False
    trial_timeout: float = 600.0
    max_retries: int = 1
    speculate: bool = True  # greedy: score the rejection branch ahead on idle workers


def resolve_ingredients(models: list[str], pattern: str | None = None) -> list[str]:
    """Absolute ingredient folders, Trainer checkpoints in step order.

    ``pattern`` is a glob (``run/checkpoint-*``); a folder that holds Trainer
    checkpoints but no weights of its own stands for all of its checkpoints.
    """
    paths: list[str] = []
    if pattern:
        matches = sorted(p for p in glob.glob(pattern) if os.path.isdir(p))
        if not matches:
            raise MergeSearchError(f"--glob: no folder matches '{pattern}'")
        paths += matches
    for m in models:
        p = Path(m)
        if p.is_dir() and not _has_weights(p):
            inner = [str(c) for c in p.iterdir() if c.is_dir() and is_trainer_checkpoint(c) is not None]
            if inner:
                paths += inner
                continue
        paths.append(m)
    seen: dict[str, str] = {}
    for p in paths:
        key = sources.key(p)
        if key in seen:
            raise MergeSearchError(f"{p}: given twice as an ingredient")
        seen[key] = p
    ordered = order_ingredients(list(seen))
    if len(ordered) < 2:
        raise MergeSearchError(f"soup: needs at least 2 ingredients, got {len(ordered)}"
                               + (f" ({ordered[0]})" if ordered else ""))
    return ordered


def _has_weights(p: Path) -> bool:
    return any((p / f).exists() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                          "pytorch_model.bin.index.json"))


def check_ingredients(ingredients: list[str], base: str | None, allow_unrelated: bool = False) -> None:
    """Refuse ingredients that do not share an architecture, a tokenizer and a base,
    before any evaluation. With ``base``, each must be a fine-tune of it; without,
    each must be within the fine-tune distance of the first ingredient."""
    base_ckpt = open_model(base) if base is not None else None
    ckpts = [open_model(p, base_ckpt, allow_unrelated=allow_unrelated) for p in ingredients]
    if base_ckpt is not None:
        check_compatible(base_ckpt, ckpts, allow_unrelated=allow_unrelated)
        return
    check_compatible(None, ckpts)
    if allow_unrelated:
        return
    first = ckpts[0]
    sample = sample_names(first)
    for c in ckpts[1:]:
        d = relative_distance(first, c, sample)
        if d > MAX_FINETUNE_DISTANCE:
            raise MergeSearchError(f"{c.path}: does not share a base with {first.path} (relative distance {d:.3f} > "
                                   f"{MAX_FINETUNE_DISTANCE}; pass --allow-unrelated to soup anyway)")
    for c in ckpts:
        c.release()


@dataclass
class _Eval:
    members: tuple[str, ...]
    role: str
    score: float | None = None  # dev aggregate; None when it failed
    scores: dict = field(default_factory=dict)
    trial: int | None = None
    reason: str | None = None


class SoupRunner(RunLifecycle):
    def __init__(self, ingredients: list[str], eval_path: Path, opts: SoupOptions):
        if opts.strategy not in STRATEGIES:
            raise MergeSearchError(f"--strategy: '{opts.strategy}' is not one of {', '.join(STRATEGIES)}")
        if opts.strategy == "last-n":
            if opts.n is None:
                raise MergeSearchError("--strategy last-n needs --n K")
            if opts.n < 1:
                raise MergeSearchError(f"--n: must be at least 1, got {opts.n}")
        elif opts.n is not None:
            raise MergeSearchError(f"--n applies to --strategy last-n only (got --strategy {opts.strategy})")
        self.opts = opts
        self.ingredients = ingredients
        self.eval_path = eval_path
        self.dir = run_dir(opts.run, opts.root)
        self.cache: dict[tuple, _Eval] = {}
        self.evals: list[_Eval] = []
        self.reused = 0

    # -- before anything is created ---------------------------------------------------
    def preflight(self) -> None:
        cfg = EvalConfig.load(self.eval_path)
        if cfg.split != "dev":
            raise MergeSearchError(f"{self.eval_path}: split: {cfg.split}: soups select on dev and report on test; "
                                   "set split: dev")
        build_evaluator(cfg)  # task files exist
        build_evaluator(cfg.model_copy(update={"split": "test"}))
        self.eval_cfg = cfg
        base = sources.pin(str(self.opts.base), where="--base") if self.opts.base else None
        pinned = [sources.pin(str(p), base=base) for p in self.ingredients]
        seen: dict[str, str] = {}
        for given, ref in zip(self.ingredients, pinned):  # e.g. org/x and org/x@main: one commit
            if sources.key(ref) in seen:
                raise MergeSearchError(f"{given}: the same model as ingredient {seen[sources.key(ref)]} ({ref})")
            seen[sources.key(ref)] = given
        self.ingredients = pinned
        check_ingredients(self.ingredients, base, self.opts.allow_unrelated)
        self.base = base
        if self.opts.strategy == "last-n" and self.opts.n > len(self.ingredients):
            raise MergeSearchError(f"--n: {self.opts.n} is more than the {len(self.ingredients)} ingredients")
        self.claim()

    def spec(self) -> dict:
        return {"strategy": self.opts.strategy, "n": self.opts.n, "base": self.base, "ingredients": self.ingredients,
                "evaluator": self.eval_cfg.model_dump(mode="json")}

    def open_study(self) -> None:
        self.storage_for_study()
        spec = self.spec()
        fp = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        if self.opts.resume:
            study = optuna.load_study(study_name=self.opts.run, storage=self.storage)
            if study.user_attrs.get("kind") != "soup":
                raise MergeSearchError(f"run '{self.opts.run}' is not a soup run")
            if study.user_attrs.get("soup_fingerprint") != fp:
                raise MergeSearchError(f"run '{self.opts.run}': the ingredients, strategy or evaluator changed since it "
                                       "started; start a new run instead of --resume")
            self.resume_checks(study, requeue=False)  # the cache decides what runs again
            for r in trial_records(study, self.storage):
                if not r.complete:
                    continue
                e = _Eval(tuple(r.members), r.role, r.value, r.scores, r.number)
                self.cache[e.members] = e
        else:
            study = optuna.create_study(study_name=self.opts.run, storage=self.storage, direction="maximize")
            study.set_user_attr("kind", "soup")
            study.set_user_attr("soup", spec)
            study.set_user_attr("soup_fingerprint", fp)
            study.set_user_attr("evaluator", spec["evaluator"])
        self.study = study

    # -- the run ---------------------------------------------------------------------
    def make_pool(self, faults: dict) -> WorkerPool:
        return WorkerPool(self.opts.workers, self.base, self.ingredients, ["linear"], self.eval_cfg.model_dump(),
                          self.opts.trial_timeout, faults)

    def work(self) -> dict:
        t0 = time.monotonic()
        # 1. every ingredient, and the uniform soup of all of them, in parallel
        singles = self._evaluate([((i,), "ingredient") for i in self.ingredients]
                                 + [(tuple(self.ingredients), "uniform")])
        uniform = singles.pop()
        ok = {e.members[0]: e.score for e in singles if e.score is not None}
        for e in singles:
            if e.score is None:
                log.warning("ingredient %s failed (%s); left out of the soup", e.members[0], e.reason)
        if not ok:
            raise MergeSearchError(f"soup: every ingredient failed to evaluate (first: {singles[0].reason})")

        def batch_score(candidates: list[list[str]]) -> list[float]:
            evals = self._evaluate([(tuple(c), "candidate") for c in candidates])
            return [e.score if e.score is not None else -math.inf for e in evals]

        def score(members: list[str]) -> float:
            return batch_score([members])[0]

        valid = [i for i in self.ingredients if i in ok]
        t_pass = time.monotonic()

        if self.opts.strategy == "greedy":
            # speculate across the idle workers: same soup, fewer sequential rounds
            width = self.pool.size if self.opts.speculate else 1
            result = greedy_soup(valid, ingredient_scores=ok, batch_score=batch_score, width=width)
        elif self.opts.strategy == "uniform":
            result = uniform_soup(valid, score)
        else:
            result = last_n_soup(valid, self.opts.n, score)
        pass_s = time.monotonic() - t_pass
        final = self.cache.get(tuple(result.members))
        if final is None or final.score is None:
            raise MergeSearchError(f"soup: the final soup failed to evaluate ({final.reason if final else 'not run'})")
        best = self.cache[(max(valid, key=lambda i: (ok[i], -valid.index(i))),)]
        # 2. the report on test: the final soup, the best ingredient, the uniform soup
        report_rows = {"final soup": final, "best ingredient": best, "uniform soup": uniform}
        test = self._test({k: e for k, e in report_rows.items() if e.score is not None})
        report = {
            "strategy": self.opts.strategy,
            "members": list(result.members),
            "final_trial": final.trial,
            "ingredients": [{"path": i, "dev": ok.get(i)} for i in self.ingredients],
            "steps": [{"ingredient": s.ingredient, "dev": s.score, "accepted": s.accepted} for s in result.steps],
            "rows": {k: {"trial": e.trial, "members": len(e.members), "dev": e.score, "dev_scores": e.scores,
                         "test": test.get(k, {}).get("aggregate"), "test_scores": test.get(k, {}).get("scores")}
                     for k, e in report_rows.items()},
            "evaluations": len(self.evals),
            "speculative_unused": result.wasted,
            "reused_from_store": self.reused,
            "failed": sum(1 for e in self.evals if e.score is None),
            "seconds": time.monotonic() - t0,
            "greedy_seconds": pass_s,  # the selection pass alone
        }
        self.study.set_user_attr("final_trial", final.trial)
        self.study.set_user_attr("final_recipe", self._recipe(result.members).to_dict())
        self.study.set_user_attr("report", report)
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.dir / "soup.json") as f:
            json.dump(report, f, indent=2)
        log.info("soup: %d members, dev %.4f (%d evaluations, %d reused)", len(result.members), final.score,
                 report["evaluations"], report["reused_from_store"])
        return report

    def _recipe(self, members) -> Recipe:
        # a linear soup needs no base, but a LoRA adapter's untouched tensors are its base's:
        # a soup with an adapter names that base (mergekit's linear config leaves it out)
        adapters = [sources.split(m)[0].text for m in members if sources.split(m)[1] is not None]
        return soup_recipe(list(members), base=(self.base or adapters[0]) if adapters else None)

    def _evaluate(self, items: list[tuple[tuple[str, ...], str]]) -> list[_Eval]:
        """Dev scores of the uniform soups ``items`` ((members, role)), in parallel;
        member sets scored before (in this run or a resumed one) are not run again."""
        out: list[_Eval] = []
        todo: dict[int, tuple[optuna.Trial, _Eval]] = {}
        for members, role in items:
            cached = self.cache.get(members)
            if cached is not None:
                if cached not in self.evals:
                    self.evals.append(cached)
                    self.reused += 1
                out.append(cached)
                continue
            e = _Eval(members, role)
            recipe = self._recipe(members)
            t = self.study.ask()
            record(t, recipe=recipe.to_dict(), members=list(members), role=role,
                   summary=f"uniform soup of {len(members)}: " + ", ".join(_short(m) for m in members))
            e.trial = t.number
            todo[t.number] = (t, e, Job("trial", t.number, recipe.to_dict()))
            self.cache[members] = e
            self.evals.append(e)
            out.append(e)
        try:
            for res in self.pool.run_batch([job for _, _, job in todo.values()], self.opts.max_retries):
                t, e, _ = todo[res.number]
                ran = dict(worker=res.worker, timings=res.timings, **({"scored_on": res.device} if res.device else {}))
                if res.ok:
                    e.scores = res.scores
                    e.score = weighted_mean(res.scores, self.eval_cfg.weights)
                    record(t, **ran, scores=res.scores, aggregate=e.score)
                    self.study.tell(t, e.score)
                else:
                    e.reason = res.reason
                    record(t, **ran, reason=res.reason, scores=res.scores or None)
                    self.study.tell(t, state=TrialState.FAIL)
                    del self.cache[e.members]  # a resumed run tries it again
                log.info("soup trial %d (%s, %d members): %s", t.number, e.role, len(e.members),
                         f"{e.score:.4f}" if e.score is not None else f"failed ({e.reason})")
        except BaseException:
            # Ctrl-C or a crash: never leave a trial running in the store
            self.pool.cancel_all()
            for t, e, _ in todo.values():
                if e.score is None and e.reason is None:
                    record(t, reason="interrupted")
                    self.study.tell(t, state=TrialState.FAIL)
            raise
        return out

    def _test(self, rows: dict[str, _Eval]) -> dict[str, dict]:
        """Test scores of the report's soups (never used to select anything); those a
        previous attempt of this run already measured are read back."""
        stored = (self.study.user_attrs.get("report") or {}).get("rows", {})
        out: dict[str, dict] = {}
        jobs: dict[tuple, Job] = {}
        keys: dict[int, list[str]] = {}
        for k, e in rows.items():
            prev = stored.get(k)
            if prev and prev.get("trial") == e.trial and prev.get("test_scores"):
                out[k] = {"scores": prev["test_scores"], "aggregate": prev["test"]}
                continue
            if e.members not in jobs:
                jobs[e.members] = Job("test", e.trial if e.trial is not None else -1, self._recipe(e.members).to_dict(), split="test")
            keys.setdefault(jobs[e.members].id, []).append(k)
        for res in self.pool.run_batch(list(jobs.values()), self.opts.max_retries):
            for k in keys[res.job.id]:
                out[k] = ({"scores": res.scores, "aggregate": weighted_mean(res.scores, self.eval_cfg.weights)}
                          if res.ok else {"scores": None, "aggregate": None, "reason": res.reason})
        return out


def _short(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if is_trainer_checkpoint(p) is not None else p.name
