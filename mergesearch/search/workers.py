"""The Ray worker pool.

Each worker is a Ray actor holding a Materializer (the base and the task vectors
resident on its device), the evaluation model and an Evaluator. A candidate is an
in-place weight write followed by an evaluation; nothing is written to disk. The
actor returns per-task scores and timings.

Failures never stop a search: an exception, a non-finite score, a dead actor or
a trial past its timeout fails that trial with its reason, and a dead or hung
actor is replaced.

Placement: each worker plans where its inputs live (:mod:`mergesearch.engine.plan`) from the
space's ``resources``: device-resident, or memory-mapped on the host (one copy per
node, shared by its workers) and streamed per tensor. Workers ask Ray for
``gpus_per_worker`` GPUs, a fraction when several share one GPU.

Clocks: a trial's timeout runs from when its worker is ready, so a replacement
worker's loading never counts against ``trial_timeout``; loading has its own limit,
``resources.setup_timeout``.

Out of memory (``torch.OutOfMemoryError`` on CUDA, ``MemoryError`` on the host)
fails the trial with reason ``oom: ...``. The worker empties the CUDA cache and
keeps going when it can still allocate its merge scratch; otherwise it is replaced.

Fault hook (for tests and drills): set ``MERGESEARCH_FAULT`` in the environment
of the search process to ``<kind>@<trial>[,<kind>@<trial>...]``, where kind is
``raise_materialize``, ``raise_eval``, ``exit`` (``os._exit``), ``kill`` (SIGKILL),
``nan``, ``inf``, ``hang`` or ``oom`` (raises ``torch.OutOfMemoryError``);
the worker injects that fault when it runs that trial number. ``setup_sleep@S``
makes every worker sleep S seconds while it loads.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mergesearch.runs.records import Job

log = logging.getLogger(__name__)


@contextmanager
def ray_session(run_dir: Path, num_cpus: int, address: str | None = None):
    """A Ray instance for one run: a local one sized to ``num_cpus`` with its temp dir
    under the run folder, or the cluster at ``address`` (by default the one named by
    ``MERGESEARCH_RAY_ADDRESS``, when set). Always shut down on exit (for a cluster:
    this driver disconnects, and the run's actors end with it)."""
    import ray

    address = address or os.environ.get("MERGESEARCH_RAY_ADDRESS") or None
    link = None
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            from mergesearch.errors import MergeSearchError
            raise MergeSearchError(f"--ray-address {address}: cannot join the Ray cluster "
                                   f"({(str(e).strip() or type(e).__name__).splitlines()[0][:200]})") from None
    else:
        temp, link = _ray_temp_dir(run_dir)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _temp_dir=temp,
                 configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if link is not None and link.is_symlink():
            link.unlink()


def _ray_temp_dir(run_dir: Path) -> tuple[str, Path | None]:
    """Ray's temp dir, under the run folder. Ray's socket paths must stay under
    107 bytes, so a deep run folder is reached through a short symlink in /tmp."""
    import hashlib
    import tempfile

    real = (run_dir / "ray").resolve()
    real.mkdir(parents=True, exist_ok=True)
    if len(str(real)) <= 40:
        return str(real), None
    link = Path(tempfile.gettempdir()) / f"msray-{hashlib.sha1(str(real).encode()).hexdigest()[:8]}"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(real, target_is_directory=True)
    return str(link), link


def parse_faults(text: str | None) -> dict[int | str, str | float]:
    faults: dict = {}
    for part in (text or "").split(","):
        if "@" in part:
            kind, _, number = part.strip().partition("@")
            if kind == "setup_sleep":
                faults["setup_sleep"] = float(number)
            else:
                faults[int(number)] = kind
    return faults




class Worker:
    """The actor body (wrapped with ``ray.remote`` by the pool)."""

    def __init__(self, worker_id: int, base: str | None, models: list[str], methods: list[str], eval_cfg: dict,
                 threads: int = 1, faults: dict | None = None, side: dict | None = None,
                 placement: dict | None = None, hub: dict | None = None):
        """``placement``: budget (bytes or None), eval_reserve, stream, share (GPUs per
        worker) and dtype (of the evaluation model and the export) for the plan. ``hub``:
        the controller's Hugging Face cache settings (this environment is the Ray node's)."""
        import torch

        os.environ.update(hub or {})

        from mergesearch.evaluate import EvalConfig, build_evaluator
        from mergesearch.engine.materialize import Materializer
        from mergesearch.engine.models import load_model
        from mergesearch.engine.multi_gpu import worker_plan

        torch.set_num_threads(max(1, threads))
        self.worker_id = worker_id
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.faults = faults or {}
        self.held: int | None = None  # the trial whose candidate the model holds between rungs
        self.kept: tuple = (None, 0, {})  # (trial, rungs, per-document metrics) of the trial being scored in rungs
        t0 = time.perf_counter()
        if self.faults.get("setup_sleep"):
            time.sleep(self.faults["setup_sleep"])
        # compatibility was checked once by the controller, before Ray started
        side = side or {}
        metrics = {m: f for m, f in (side.get("metrics") or {}).items() if f}
        opts = placement or {}
        # on 2 or more GPUs: sharded, each tensor merged on the GPU that holds its parameter
        self.plan = worker_plan(base, models, methods, self.device, opts, {
            "metrics": metrics, "grams": side.get("grams") or {}, "base_metric": side.get("base_metric")},
            trust_remote_code=bool(eval_cfg.get("trust_remote_code")))
        self.mat = Materializer(base, models, methods=methods, device=self.device, check=False, metrics=metrics,
                                grams=side.get("grams"), base_metric=side.get("base_metric"), placement=self.plan)
        self.model, self.tokenizer = load_model(base if base is not None else models[0], device=self.device,
                                                trust_remote_code=bool(eval_cfg.get("trust_remote_code")),
                                                dtype=opts.get("dtype"),
                                                device_map=getattr(self.plan, "device_map", None))
        self.eval_cfg = EvalConfig.model_validate(eval_cfg)
        self.evaluators = {self.eval_cfg.split: build_evaluator(self.eval_cfg, device=self.device)}
        self.setup_s = time.perf_counter() - t0

    def info(self) -> dict:
        return {"worker": self.worker_id, "pid": os.getpid(), "device": self.device, "setup_s": self.setup_s,
                "resident": self.plan.resident, "host": self.plan.host}

    def _recover(self) -> bool:
        """After an out-of-memory error: free what the failed candidate held and say
        whether the worker can still allocate its merge scratch."""
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
        try:
            probe = torch.empty(self.plan.scratch, dtype=torch.uint8, device=self.device)
            del probe
            return True
        except (torch.OutOfMemoryError, MemoryError, RuntimeError):
            return False

    def run(self, job: Job) -> dict:
        """Materialize the job's recipe in place and score it (on the configured split, or
        ``job.split``: soups report their final candidates on test). With ``job.refine``
        (the options and the coefficient groups) the recipe is first refined by gradient
        descent (:mod:`mergesearch.search.refine`), and the refined recipe is what is scored and
        returned. With ``job.rung`` ({"k": rung, "items": {task: item indices}}) only those
        items are scored, per item; the candidate stays materialized for the trial's next
        rung, so a later rung of the same trial skips the write."""
        number, recipe, split, refine, rung = job.number, job.recipe, job.split, job.refine, job.rung
        from mergesearch.evaluate import build_evaluator
        from mergesearch.recipe import from_dict

        entered, started_at = time.perf_counter(), time.time()
        split = split or self.eval_cfg.split
        if split not in self.evaluators:
            self.evaluators[split] = build_evaluator(self.eval_cfg.model_copy(update={"split": split}),
                                                     device=self.device)

        import torch

        fault = self.faults.get(number) if job.kind == "trial" else None
        r = from_dict(recipe, f"trial {number}")
        extra: dict = {}
        if refine is not None:
            self.held = None  # refinement writes its own weights into the model
        try:
            if refine is not None:
                from mergesearch.search.refine import refine as run_refine
                t0 = time.perf_counter()
                r, stats = run_refine(self.mat, self.model, self.tokenizer, self.evaluators[self.eval_cfg.split], r,
                                      refine["options"], refine["groups"], seed=refine.get("seed", 0))
                extra = {"recipe": r.to_dict(), "refine": stats, "refine_s": time.perf_counter() - t0}
                if r.has_row_scales:  # tensors, written to files by the controller
                    extra["rows"] = r.row_scales()
        except (torch.OutOfMemoryError, MemoryError) as e:
            first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            return {"oom": first, "usable": self._recover(), "worker": self.worker_id}
        t0 = time.perf_counter()
        try:
            if fault == "raise_materialize":
                raise RuntimeError("injected fault in materialize")
            if fault == "oom":
                raise torch.OutOfMemoryError("injected out-of-memory")
            if rung is None or rung["k"] == 0 or self.held != number:
                self.held = None
                # from_dict checked the recipe; compile it once without checking again
                self.mat.write_into(self.model, r, validate=False)
                self.held = number if rung is not None else None
                extra["wrote"] = True
            t1 = time.perf_counter()
            if fault == "raise_eval":
                raise RuntimeError("injected fault in evaluate")
            if fault == "exit":
                os._exit(1)
            if fault == "kill":
                import signal
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "hang":
                time.sleep(10**6)
            if rung is not None:
                # a trial's rungs share their per-document metrics here, so its scores so
                # far are lm-eval's aggregates over all its items (a perplexity is not a mean)
                if rung["k"] == 0 or self.kept[0] != number or self.kept[1] != rung["k"]:
                    self.kept = (number, 0, {})
                start = self.kept[1]
                items, so_far = self.evaluators[split].score_subset(self.model, self.tokenizer, rung["items"],
                                                                    keep=self.kept[2])
                self.kept = (number, rung["k"] + 1, self.kept[2])
                extra["item_scores"] = items
                if start == rung["k"]:  # the kept metrics cover every rung of the trial
                    extra["task_scores"] = so_far
                scores = so_far
            else:
                scores = self.evaluators[split].score(self.model, self.tokenizer)
        except (torch.OutOfMemoryError, MemoryError) as e:  # reported as a result: the actor may live on
            first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            return {"oom": first, "usable": self._recover(), "worker": self.worker_id}
        if fault in ("nan", "inf"):
            scores = {k: float(fault) for k in scores}
        t2 = time.perf_counter()
        return {"scores": scores, "materialize_s": t1 - t0, "eval_s": t2 - t1, "worker_s": time.perf_counter() - entered,
                "started_at": started_at, "ended_at": time.time(), "worker": self.worker_id,
                "device": self.device, "pid": os.getpid(), "moved_bytes": self.mat.last_moved, **extra}


@dataclass
class Result:
    job: Job
    ok: bool
    scores: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    worker: int | None = None
    reason: str | None = None
    retryable: bool = False  # the worker died under it (not the candidate's fault)
    extra: dict = field(default_factory=dict)  # a refinement's recipe and statistics
    device: str | None = None  # where the candidate was materialized and scored (cpu, cuda)

    @property
    def number(self) -> int:
        return self.job.number


class Retries:
    """The one retry rule: a trial whose worker died (a retryable failure) runs again,
    at most ``limit`` times; a trial that failed on its own merits does not."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used: dict[int, int] = {}

    def again(self, res: "Result") -> bool:
        key = res.job.id
        if res.ok or not res.retryable or self.used.get(key, 0) >= self.limit:
            return False
        self.used[key] = self.used.get(key, 0) + 1
        log.info("%s %d: %s; retrying (%d/%d)", res.job.kind, res.number, res.reason, self.used[key], self.limit)
        return True


class WorkerPool:
    """Ray actors, one trial each at a time; replaces dead and hung actors."""

    def __init__(self, n: int, base: str | None, models: list[str], methods: list[str], eval_cfg: dict,
                 trial_timeout: float, faults: dict | None = None, side: dict | None = None,
                 resources: dict | None = None, dtype: str | None = None):
        import ray

        from mergesearch.errors import MergeSearchError
        from mergesearch.engine.plan import gpu_shares, parse_size

        self.ray = ray
        res = resources or {}
        cluster = ray.cluster_resources()
        gpus, cpus = cluster.get("GPU", 0), cluster.get("CPU", 1)
        self.num_gpus = gpu_shares(n, gpus, res.get("gpus_per_worker"))
        if n > cpus:
            raise MergeSearchError(f"--workers {n}: the Ray cluster has {cpus:g} CPU(s) and each worker takes one")
        self.threads = max(1, int(cpus // max(n, 1)))
        self.cls = ray.remote(num_cpus=1, num_gpus=self.num_gpus, max_restarts=0)(Worker)
        placement = {"budget": parse_size(res["device_memory"], "resources.device_memory")
                     if res.get("device_memory") is not None else None,
                     "eval_reserve": parse_size(res["eval_memory"], "resources.eval_memory")
                     if res.get("eval_memory") is not None else None,
                     "stream": res.get("stream", "auto"), "share": self.num_gpus or 1.0, "dtype": dtype}
        from mergesearch.sources import hub_env
        self.args = (base, models, methods, eval_cfg, self.threads, faults or {}, side, placement, hub_env())
        self.trial_timeout = trial_timeout
        self.setup_timeout = float(res.get("setup_timeout") or 1800.0)
        self.next_id = 0
        self.actors: dict[int, object] = {}
        self.spawned: dict[int, float] = {}  # worker -> when it was started
        self.ready_at: dict[int, float] = {}  # worker -> when its set-up finished
        self.loading: dict[object, int] = {}  # info ref -> worker still loading
        self.busy: dict[object, tuple[Job, int, float, float]] = {}  # ref -> (job, worker, submitted, sent at)
        self.infos: dict[int, dict] = {}
        self.replaced = 0
        for _ in range(n):
            self._spawn()
        # wait for set-up so a broken environment fails fast and timings exclude it
        refs = list(self.loading)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=self.setup_timeout)
        if len(done) < len(refs):
            self.shutdown()
            raise MergeSearchError(
                f"{len(refs) - len(done)} of {n} worker(s) did not start within {self.setup_timeout:.0f}s "
                f"(resources.setup_timeout); each asks for 1 CPU and {self.num_gpus:g} GPU, the cluster has "
                f"{cpus:g} CPU and {gpus:g} GPU")
        try:
            self._poll_ready(0, strict=True)
        except ray.exceptions.RayActorError as e:
            self.shutdown()
            cause = getattr(e, "cause", None) or e
            raise MergeSearchError(f"worker set-up failed: {str(cause).strip().splitlines()[-1][:300]}") from None

    def _spawn(self) -> int:
        wid = self.next_id
        self.next_id += 1
        actor = self.cls.remote(wid, *self.args)
        self.actors[wid] = actor
        self.spawned[wid] = time.monotonic()
        self.loading[actor.info.remote()] = wid
        return wid

    def _poll_ready(self, timeout: float = 0, strict: bool = False) -> None:
        """Note the workers whose set-up finished. A worker whose set-up failed raises
        when ``strict`` (at start); later, its queued trial fails as "worker died"."""
        if not self.loading:
            return
        done, _ = self.ray.wait(list(self.loading), num_returns=len(self.loading), timeout=timeout)
        now = time.monotonic()
        for ref in done:
            wid = self.loading.pop(ref)
            self.ready_at[wid] = now
            try:
                self.infos[wid] = self.ray.get(ref)
            except self.ray.exceptions.RayActorError:
                if strict:
                    raise

    def _replace(self, wid: int) -> None:
        actor = self.actors.pop(wid, None)
        if actor is not None:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:
                pass
        for ref, w in list(self.loading.items()):
            if w == wid:
                self.loading.pop(ref)
        self.replaced += 1
        self._spawn()

    @property
    def size(self) -> int:
        return len(self.actors)

    @property
    def idle(self) -> list[int]:
        busy = {w for _, w, *_ in self.busy.values()}
        return [w for w in self.actors if w not in busy]

    def submit(self, job: Job, worker: int | None = None) -> None:
        """Run on an idle worker: ``worker`` when given (a trial's next rung goes to the
        worker that holds its candidate), if it is still there and idle."""
        idle = self.idle
        wid = worker if worker in idle else idle[0]
        ref = self.actors[wid].run.remote(job)
        self.busy[ref] = (job, wid, time.monotonic(), time.time())  # the epoch time for the Ray latency

    def wait(self, timeout: float = 1.0) -> list[Result]:
        """Results that finished (or failed, or timed out) within ``timeout`` seconds.
        A trial's clock starts when its worker is ready (submit time or set-up end,
        whichever is later); a worker still loading has ``setup_timeout``."""
        if not self.busy:
            return []
        ready, rest = self.ray.wait(list(self.busy), num_returns=1, timeout=timeout)
        if ready and rest:  # whatever else finished meanwhile
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        out = []
        for ref in ready:
            job, wid, _, sent_at = self.busy.pop(ref)
            out.append(self._collect(ref, job, wid, sent_at))
        self._poll_ready(0)
        now = time.monotonic()
        for ref, (job, wid, submitted, _) in list(self.busy.items()):
            if wid not in self.ready_at:
                if now - self.spawned[wid] > self.setup_timeout:
                    self.busy.pop(ref)
                    self._replace(wid)
                    out.append(Result(job, False, worker=wid, retryable=True,
                                      reason=f"setup timeout: the worker did not load within "
                                             f"{self.setup_timeout:.0f}s (replaced)"))
                continue
            limit = self.trial_timeout * max(1.0, job.trials)  # a refinement is worth many trials
            if now - max(submitted, self.ready_at[wid]) > limit:
                self.busy.pop(ref)
                self._replace(wid)
                out.append(Result(job, False, worker=wid,
                                  reason=f"timeout: no result after {limit:.0f}s (worker replaced)"))
        return out

    def _collect(self, ref, job: Job, wid: int, sent_at: float | None = None) -> Result:
        ray = self.ray
        try:
            r = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._replace(wid)
            cause = str(e).splitlines()[0][:200]
            return Result(job, False, worker=wid, reason=f"worker died ({cause}); replaced", retryable=True)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            reason = f"{type(cause).__name__}: {str(cause).splitlines()[0][:300] if str(cause) else ''}"
            return Result(job, False, worker=wid, reason=reason)
        if "oom" in r:
            reason = f"oom: {r['oom']}"
            if not r["usable"]:  # it cannot even allocate its merge scratch any more
                self._replace(wid)
                reason += " (worker replaced)"
            return Result(job, False, worker=wid, reason=reason)
        bad = [t for t, v in r["scores"].items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
        timings = {"materialize_s": r["materialize_s"], "eval_s": r["eval_s"], "worker_s": r["worker_s"]}
        if sent_at is not None:  # the Ray call's own latency, each way (one machine's clock)
            timings.update(ray_in_s=r["started_at"] - sent_at, ray_out_s=time.time() - r["ended_at"])
        if "refine_s" in r:
            timings["refine_s"] = r["refine_s"]
        extra = {k: r[k] for k in ("recipe", "refine", "rows", "item_scores", "task_scores", "wrote") if k in r}
        if bad:
            return Result(job, False, r["scores"], timings, wid, f"non-finite score for {', '.join(bad)}", extra=extra,
                          device=r.get("device"))
        return Result(job, True, r["scores"], timings, wid, extra=extra, device=r.get("device"))

    def run_batch(self, jobs: list[Job], max_retries: int = 0, stop: Callable[[], bool] | None = None):
        """Run jobs on the idle workers; yields each final Result. A job whose worker died
        is retried up to ``max_retries`` times. A consumer that stops early, or
        ``stop()`` turning true, leaves the rest unrun or in flight (``cancel_all`` ends them)."""
        queue = list(jobs)
        retries = Retries(max_retries)
        while (queue or self.busy) and not (stop and stop()):
            while queue and self.idle:
                self.submit(queue.pop(0))
            for res in self.wait(0.5):
                if retries.again(res):
                    queue.insert(0, res.job)
                    continue
                yield res

    def cancel_all(self) -> list[Job]:
        """Abandon in-flight jobs (their actors are killed); returns them."""
        numbers = []
        for ref, (job, wid, *_) in list(self.busy.items()):
            numbers.append(job)
            try:
                self.ray.kill(self.actors[wid], no_restart=True)
            except Exception:
                pass
        self.busy.clear()
        return numbers

    def shutdown(self) -> None:
        for a in self.actors.values():
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors.clear()
