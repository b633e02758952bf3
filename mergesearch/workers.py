"""The Ray worker pool.

Each worker is a Ray actor holding a Materializer (the base and the task vectors
resident on its device), the evaluation model and an Evaluator. A candidate is an
in-place weight write followed by an evaluation; nothing is written to disk. The
actor returns per-task scores and timings.

Failures never stop a search: an exception, a non-finite score, a dead actor or
a trial past its timeout fails that trial with its reason, and a dead or hung
actor is replaced.

Fault hook (for tests and drills): set ``MERGESEARCH_FAULT`` in the environment
of the search process to ``<kind>@<trial>[,<kind>@<trial>...]``, where kind is
``raise_materialize``, ``raise_eval``, ``exit`` (``os._exit``), ``kill`` (SIGKILL),
``nan``, ``inf``, ``hang`` or ``oom``;
the worker injects that fault when it runs that trial number.
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

log = logging.getLogger(__name__)


@contextmanager
def ray_session(run_dir: Path, num_cpus: int, address: str | None = None):
    """A Ray instance for one run: a local one sized to ``num_cpus`` with its temp dir
    under the run folder, or the cluster at ``address``. Always shut down on exit."""
    import ray

    link = None
    if address:
        ray.init(address=address, log_to_driver=False)
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


def parse_faults(text: str | None) -> dict[int, str]:
    faults = {}
    for part in (text or "").split(","):
        if "@" in part:
            kind, _, number = part.strip().partition("@")
            faults[int(number)] = kind
    return faults


class Worker:
    """The actor body (wrapped with ``ray.remote`` by the pool)."""

    def __init__(self, worker_id: int, base: str | None, models: list[str], methods: list[str], eval_cfg: dict,
                 threads: int = 1, faults: dict[int, str] | None = None, side: dict | None = None):
        import torch

        from mergesearch.cli import load_model
        from mergesearch.evaluate import EvalConfig, build_evaluator
        from mergesearch.materialize import Materializer

        torch.set_num_threads(max(1, threads))
        self.worker_id = worker_id
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.perf_counter()
        # compatibility was checked once by the controller, before Ray started
        side = side or {}
        self.mat = Materializer(base, models, methods=methods, device=self.device, check=False,
                                metrics={m: f for m, f in (side.get("metrics") or {}).items() if f},
                                grams=side.get("grams"), base_metric=side.get("base_metric"))
        self.model, self.tokenizer = load_model(Path(base if base is not None else models[0]), device=self.device,
                                                trust_remote_code=bool(eval_cfg.get("trust_remote_code")))
        self.eval_cfg = EvalConfig.model_validate(eval_cfg)
        self.evaluators = {self.eval_cfg.split: build_evaluator(self.eval_cfg, device=self.device)}
        self.setup_s = time.perf_counter() - t0
        self.faults = faults or {}

    def info(self) -> dict:
        return {"worker": self.worker_id, "pid": os.getpid(), "device": self.device, "setup_s": self.setup_s}

    def run(self, number: int, recipe: dict, split: str | None = None) -> dict:
        """Materialize ``recipe`` in place and score it (on the configured split, or
        ``split``: soups report their final candidates on test)."""
        from mergesearch.evaluate import build_evaluator
        from mergesearch.recipe import from_dict

        split = split or self.eval_cfg.split
        if split not in self.evaluators:
            self.evaluators[split] = build_evaluator(self.eval_cfg.model_copy(update={"split": split}),
                                                     device=self.device)

        fault = self.faults.get(number)
        r = from_dict(recipe, f"trial {number}")
        t0 = time.perf_counter()
        if fault == "raise_materialize":
            raise RuntimeError("injected fault in materialize")
        if fault == "oom":
            raise MemoryError("injected out-of-memory")
        self.mat.write_into(self.model, r)
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
        scores = self.evaluators[split].score(self.model, self.tokenizer)
        if fault in ("nan", "inf"):
            scores = {k: float(fault) for k in scores}
        t2 = time.perf_counter()
        return {"scores": scores, "materialize_s": t1 - t0, "eval_s": t2 - t1, "worker": self.worker_id,
                "pid": os.getpid()}


@dataclass
class Result:
    number: int
    ok: bool
    scores: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    worker: int | None = None
    reason: str | None = None
    retryable: bool = False  # the worker died under it (not the candidate's fault)


class WorkerPool:
    """Ray actors, one trial each at a time; replaces dead and hung actors."""

    def __init__(self, n: int, base: str | None, models: list[str], methods: list[str], eval_cfg: dict,
                 trial_timeout: float, faults: dict[int, str] | None = None, side: dict | None = None):
        import ray

        self.ray = ray
        gpus = ray.cluster_resources().get("GPU", 0)
        cpus = ray.cluster_resources().get("CPU", 1)
        self.num_gpus = 1 if gpus >= 1 else 0
        self.threads = max(1, int(cpus // max(n, 1)))
        self.cls = ray.remote(num_cpus=1, num_gpus=self.num_gpus, max_restarts=0)(Worker)
        self.args = (base, models, methods, eval_cfg, self.threads, faults or {}, side)
        self.trial_timeout = trial_timeout
        self.next_id = 0
        self.actors: dict[int, object] = {}
        self.busy: dict[object, tuple[int, object, float]] = {}  # ref -> (number, actor id, start)
        for _ in range(n):
            self._spawn()
        # wait for set-up so a broken environment fails fast and timings exclude it
        infos = ray.get([a.info.remote() for a in self.actors.values()])
        self.infos = {i["worker"]: i for i in infos}
        self.replaced = 0

    def _spawn(self) -> int:
        wid = self.next_id
        self.next_id += 1
        self.actors[wid] = self.cls.remote(wid, *self.args)
        return wid

    def _replace(self, wid: int) -> None:
        actor = self.actors.pop(wid, None)
        if actor is not None:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.replaced += 1
        self._spawn()

    @property
    def size(self) -> int:
        return len(self.actors)

    @property
    def idle(self) -> list[int]:
        busy = {w for _, w, _ in self.busy.values()}
        return [w for w in self.actors if w not in busy]

    def submit(self, number: int, recipe: dict, split: str | None = None) -> None:
        wid = self.idle[0]
        ref = self.actors[wid].run.remote(number, recipe, split)
        self.busy[ref] = (number, wid, time.monotonic())

    def wait(self, timeout: float = 1.0) -> list[Result]:
        """Results that finished (or failed, or timed out) within ``timeout`` seconds."""
        if not self.busy:
            return []
        ready, rest = self.ray.wait(list(self.busy), num_returns=1, timeout=timeout)
        if ready and rest:  # whatever else finished meanwhile
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        out = []
        for ref in ready:
            number, wid, _ = self.busy.pop(ref)
            out.append(self._collect(ref, number, wid))
        now = time.monotonic()
        for ref, (number, wid, start) in list(self.busy.items()):
            if now - start > self.trial_timeout:
                self.busy.pop(ref)
                self._replace(wid)
                out.append(Result(number, False, worker=wid,
                                  reason=f"timeout: no result after {self.trial_timeout:.0f}s (worker replaced)"))
        return out

    def _collect(self, ref, number: int, wid: int) -> Result:
        ray = self.ray
        try:
            r = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._replace(wid)
            cause = str(e).splitlines()[0][:200]
            return Result(number, False, worker=wid, reason=f"worker died ({cause}); replaced", retryable=True)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            reason = f"{type(cause).__name__}: {str(cause).splitlines()[0][:300] if str(cause) else ''}"
            if isinstance(cause, MemoryError):
                self._replace(wid)  # its memory may be in a bad state
                reason += " (worker replaced)"
            return Result(number, False, worker=wid, reason=reason)
        bad = [t for t, v in r["scores"].items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
        timings = {"materialize_s": r["materialize_s"], "eval_s": r["eval_s"]}
        if bad:
            return Result(number, False, r["scores"], timings, wid, f"non-finite score for {', '.join(bad)}")
        return Result(number, True, r["scores"], timings, wid)

    def run_batch(self, jobs: dict[int, tuple[dict, str | None]], max_retries: int = 0,
                  stop: Callable[[], bool] | None = None):
        """Run recipes ({number: (recipe, split)}) on the idle workers; yields each final
        Result. A job whose worker died is retried up to ``max_retries`` times. A
        consumer that stops early, or ``stop()`` turning true, leaves the rest unrun or
        in flight (``cancel_all`` ends them)."""
        queue = list(jobs)
        retries: dict[int, int] = {}
        while (queue or self.busy) and not (stop and stop()):
            while queue and self.idle:
                n = queue.pop(0)
                self.submit(n, *jobs[n])
            for res in self.wait(0.5):
                if not res.ok and res.retryable and retries.get(res.number, 0) < max_retries:
                    retries[res.number] = retries.get(res.number, 0) + 1
                    log.info("trial %d: %s; retrying (%d/%d)", res.number, res.reason, retries[res.number],
                             max_retries)
                    queue.insert(0, res.number)
                    continue
                yield res

    def cancel_all(self) -> list[int]:
        """Abandon in-flight trials (their actors are killed); returns their numbers."""
        numbers = []
        for ref, (number, wid, _) in list(self.busy.items()):
            numbers.append(number)
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
