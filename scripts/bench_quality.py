"""Search quality on the zoo: does the search beat what a person or an evolve-style
CMA-ES would find, on test items it never scored? And which lever buys what?

Contenders, each with the same budget of evaluations (default 100; a refinement counts
its trial-equivalents) and 3 seeds:

- **hand-tuned TIES**: the best on dev of a 12-point grid (density 0.3/0.5/0.7 x lambda
  1/1.5/2/3, weight 1), as a person tuning by hand would pick it (no seed: deterministic);
- **evolve-style CMA-ES**: what mergekit-evolve searches: TIES with a weight and a density
  per model and per 2 layer groups, normalized, no lambda, CMA-ES from the centre, the
  plain mean as objective;
- the evolve-style search with one lever of search_spaces/demo.yaml added: **+ lambda**
  (a searched global scale), **+ warm start** (the baselines first, CMA-ES from the best),
  **+ coarse-to-fine** (whole models, then 2 layer groups), **+ refine** (gradient
  refinement of the best candidate);
- **mergesearch**: search_spaces/demo.yaml, every lever and the normalized objective
  (its refinement per tensor and per output row, distilled from the source models, each
  task from the one most accurate on it); ``--defaults FILE`` adds another space as
  **new defaults**, ``--extra NAME=FILE`` more; the
  same with the refinement per tensor only (``rows: false``); with the refinement's
  loss set to ``choice`` (the labels); and through the zoo's JSONL files instead of its
  lm-eval YAML tasks (``evaluator: loglik``: the same engine, so the same result).

For each: the test mean, the normalized test mean (each task over the best source
model's test score on it) and the worst task of the best-on-dev candidate, as mean and
standard error over the seeds; the dev mean of the best candidate so far after 10, 25,
50 and 100 evaluations; and the differences the issue sets as targets: mergesearch minus
hand-tuned (target +0.10) and minus evolve-style (target +0.05). Writes
results/bench_quality.json; docs/BENCHMARKS.md keeps the table.

``--zoo hard``: the 8-task hard zoo (results/zoo_hard, built when missing), 5 seeds, the
searched contenders moved onto it, and its targets (+0.30 over both, no task below the
base, a spread over the seeds of at most 0.04). Runs go seed by seed and are saved after
each; they record a fingerprint of the zoo's weights (another CPU builds another zoo), and
``--resume`` keeps only runs of the same build.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from mergesearch.evaluate import EvalConfig, build_evaluator  # noqa: E402
from mergesearch.engine.materialize import Materializer  # noqa: E402
from mergesearch.engine.models import load_model  # noqa: E402
from mergesearch.recipe import from_dict  # noqa: E402
from mergesearch.search.controller import Controller, SearchOptions  # noqa: E402
from mergesearch.search.space import SearchSpace  # noqa: E402
from mergesearch.runs.store import find_trial, load_run  # noqa: E402
from mergesearch.zoo.build import ZOO_TASKS, build_zoo  # noqa: E402


def evolve_space(demo: SearchSpace, seed: int, lever: str | None = None) -> SearchSpace:
    """The evolve-style space, or it with one of demo.yaml's levers."""
    data = demo.model_dump(mode="json")
    for k in ("schedule", "refine", "scale"):
        data.pop(k, None)
    data.update(parameters={"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.1, "high": 1.0}},
                granularity={"level": "groups", "n_groups": 2}, objective={"kind": "mean"},
                sampler={"name": "cmaes"}, initial_trials=False, seed=seed)
    data["budget"] = {"n_trials": demo.budget.n_trials}
    if lever == "lambda":
        data["scale"] = demo.scale.model_dump(mode="json")
    elif lever == "warm start":
        data.update(sampler={"name": "cmaes", "x0": "best_baseline"}, initial_trials=True)
    elif lever == "coarse-to-fine":
        data["schedule"] = list(demo.schedule)
    elif lever == "refine":
        data["refine"] = demo.refine.model_dump(mode="json")
    return SearchSpace.model_validate(data).check(f"evolve-style space + {lever}")


CHECKPOINTS = (10, 25, 50, 100)


def best_so_far(study, storage) -> dict[int, float | None]:
    """The dev mean of the best candidate (by the run's own objective) after each of
    CHECKPOINTS evaluations, in the order they finished; a refinement counts its cost."""
    from mergesearch.runs.store import trial_records

    done = sorted((r for r in trial_records(study, storage) if r.complete), key=lambda r: r.completed)
    out: dict[int, float | None] = {}
    spent, best, k = 0.0, None, 0
    for r in done:
        spent += float(r.cost if r.cost is not None else 1.0)
        while k < len(CHECKPOINTS) and spent > CHECKPOINTS[k] + 1e-9:
            out[CHECKPOINTS[k]] = best[1] if best else None
            k += 1
        key = (r.feasible, r.value)
        if best is None or key > best[0]:
            scores = r.scores
            best = (key, sum(scores.values()) / len(scores))
    for c in CHECKPOINTS[k:]:
        out[c] = best[1] if best else None
    return out


def zoo_fingerprint(zoo: Path) -> str:
    """The sha256 of the zoo's weight files: builds on other CPUs or thread counts train
    other weights (float rounding), and runs on two builds must not share a table."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(zoo.glob("*/model.safetensors")):
        h.update(f.parent.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def for_zoo(space: SearchSpace, zoo: Path, tasks: list[str]) -> SearchSpace:
    """``space`` moved to another zoo: its base, one fine-tune per task, its tasks."""
    data = space.model_dump(mode="json")
    data.update(base=str(zoo / "base"), models=[str(zoo / f"ft_{t}") for t in tasks])
    data["evaluator"].update(tasks=list(tasks), task_dir=str(zoo))
    return SearchSpace.model_validate(data).check(f"{space} on {zoo}")


def load_space(path: str, args, zoo: Path, tasks: list[str]) -> SearchSpace:
    """A search space file at the benchmark's budget, on the benchmark's zoo."""
    space = SearchSpace.load(path).resolved(Path(path).parent).check(path)
    space = space.model_copy(update={"budget": space.budget.model_copy(update={"n_trials": args.trials,
                                                                             "timeout": None})})
    return for_zoo(space, zoo, tasks) if args.zoo == "hard" else space


def setup(args):
    """The demo space at the benchmark's budget on the benchmark's zoo, and
    ``score(recipe)``: the recipe's dev and test scores (mean, worst task, per task, and on
    test the mean normalized by the best source model's test score per task); with that
    reference, the base's test scores and each source model's scores."""
    zoo = ROOT / "results" / ("zoo_hard" if args.zoo == "hard" else "zoo")
    manifest = build_zoo(zoo, preset="hard" if args.zoo == "hard" else "bundled")
    tasks = list(manifest["tasks"]) if args.zoo == "hard" else ZOO_TASKS
    demo = load_space(args.space, args, zoo, tasks)
    fts = list(demo.models)
    mat = Materializer(demo.base, fts, methods=["ties", "task_arithmetic", "linear", "tsv", "iso_c", "iso_cts"])
    model, tok = load_model(Path(demo.base))
    evs = {s: build_evaluator(EvalConfig(tasks=tasks, task_dir=str(zoo), split=s)) for s in ("dev", "test")}

    ref: dict[str, float] = {}  # the best source model's test score per task
    ready = []  # set once ref holds every source model
    def score(recipe) -> dict:
        mat.write_into(model, recipe)
        out = {}
        for split, ev in evs.items():
            s = ev.score(model, tok)
            out[split] = {"mean": sum(s.values()) / len(s), "worst": min(s.values()), "tasks": s}
        if ready:
            out["test"]["normalized"] = sum(v / ref[t] for t, v in out["test"]["tasks"].items()) / len(ref)
        return out

    sources = {}
    for p in fts:
        sources[p] = s = score(from_dict(dict(method="linear", base=demo.base,
                                              models=[{"path": p, "parameters": {"weight": 1.0}}])))
        for t, v in s["test"]["tasks"].items():
            ref[t] = max(ref.get(t, 0.0), v)
    ready.append(True)
    for s in sources.values():
        s["test"]["normalized"] = sum(v / ref[t] for t, v in s["test"]["tasks"].items()) / len(ref)
    base_test = score(from_dict(dict(method="task_arithmetic", base=demo.base, parameters={"lambda": 0.0},
                                     models=[{"path": fts[0], "parameters": {"weight": 1.0}}])))["test"]["tasks"]
    print("best source per task (test): " + ", ".join(f"{t} {v:.3f}" for t, v in ref.items()), flush=True)
    print("base (test): " + ", ".join(f"{t} {v:.3f}" for t, v in base_test.items()), flush=True)
    return demo, score, ref, base_test, sources


def grid_best(score, recipes: dict) -> tuple:
    """(key, scores) of the best on dev among ``recipes`` (key -> Recipe)."""
    return max(((k, score(r)) for k, r in recipes.items()), key=lambda x: x[1]["dev"]["mean"])


def hand_tuned_ties(demo, score) -> tuple:
    """Hand-tuned TIES: the best on dev of a 12-point grid (density x lambda, weight 1)."""
    fts = list(demo.models)
    grid = {(density, lam): from_dict(dict(method="ties", base=demo.base, parameters={"lambda": lam},
                                           models=[{"path": p, "parameters": {"weight": 1.0, "density": density}}
                                                   for p in fts]))
            for density in (0.3, 0.5, 0.7) for lam in (1.0, 1.5, 2.0, 3.0)}
    (d, lam), hand = grid_best(score, grid)
    print(f"hand-tuned TIES (density {d}, lambda {lam:g}): dev {hand['dev']['mean']:.3f} test {hand['test']['mean']:.3f}",
          flush=True)
    return (d, lam), hand


def run_contenders(spaces: dict, args, score, results: dict, save) -> dict:
    """Each contender's search over ``args.seeds`` seeds, its winner scored on dev and test.
    Runs already in ``results`` (``--resume``) are kept; ``save()`` after every run."""
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        root = Path(tmp)
        for seed, (name, make) in ((sd, nm) for sd in range(args.seeds) for nm in spaces.items()):
            runs = results.setdefault(name, [])  # seed by seed: a stopped benchmark stays balanced
            if any(r["seed"] == seed for r in runs):
                continue
            run = "".join(c if c.isalnum() else "-" for c in name.lower()) + f"-{seed}"
            t0 = time.perf_counter()
            summary = Controller(make(seed), SearchOptions(run=run, workers=args.workers, root=root,
                                                           progress=False)).run()
            study, storage = load_run(run, root=root)
            best = find_trial(study, storage, None)
            s = score(from_dict(best.recipe))
            runs.append({"seed": seed, "best": best.role or best.baseline or "search", "method": best.method,
                         "wall_s": time.perf_counter() - t0, "trials": summary["trials"],
                         "best_so_far": best_so_far(study, storage), **s})
            runs.sort(key=lambda r: r["seed"])
            save()
            print(f"{name} seed {seed}: dev {s['dev']['mean']:.3f} test {s['test']['mean']:.3f} "
                  f"(worst task {s['test']['worst']:.3f}; winner: {runs[-1]['best']}, {best.method}; "
                  f"{time.perf_counter() - t0:.0f}s)", flush=True)
    return results


def stat(runs, split="test", key="mean"):
    v = [r[split][key] for r in runs]
    return statistics.mean(v), (statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else 0.0)


def cell(runs, split="test", key="mean") -> str:
    m, se = stat(runs, split, key)
    return f"{m:.3f} ± {se:.3f}"


def spread(runs) -> str:
    """max - min of the test mean over the seeds."""
    v = [r["test"]["mean"] for r in runs]
    return f"{max(v) - min(v):.3f}" if len(v) > 1 else "-"


def curve(runs) -> str:
    cells = []
    for c in CHECKPOINTS:
        v = [x for r in runs if (x := r["best_so_far"].get(c, r["best_so_far"].get(str(c)))) is not None]
        cells.append(f"{statistics.mean(v):.3f}" if len(v) == len(runs) else "-")
    return " | ".join(cells)


def fixed_row(label: str, res: dict, n: int) -> str:
    """A table row for a contender with no seed (a grid's best on dev, or a source model)."""
    return (f"| {label} | {res['test']['mean']:.3f} | {res['test']['normalized']:.3f} | {res['test']['worst']:.3f} | "
            f"- | - | - | - | {res['dev']['mean']:.3f} ({n}) |")


def report(results: dict, spaces: dict, hand: dict, single: tuple, base_test: dict, args) -> None:
    """The table and the targets (the hard zoo's for ``--zoo hard``, the bundled zoo's else)."""
    name, best_single = single
    print("\n| contender | test mean | normalized test mean | test worst task | spread over seeds | dev best at 10 | "
          "25 | 50 | 100 evaluations |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(fixed_row(f"best single fine-tune ({name}, best on dev)", best_single, len(results["sources"])))
    print(fixed_row("hand-tuned TIES (grid of 12, best on dev)", hand, 12))
    for name in spaces:
        runs = results[name]
        if runs:
            print(f"| {name} ({len(runs)} seed{'s' if len(runs) > 1 else ''}) | {cell(runs)} | {cell(runs, key='normalized')} | {cell(runs, key='worst')} | "
                  f"{spread(runs)} | {curve(runs)} |")
    hard = args.zoo == "hard"
    ours_name = next((n for n in ("new defaults", "mergesearch") if results.get(n)), None)
    if ours_name is None:
        return
    ours = stat(results[ours_name])[0]
    want_hand, want_evo = (0.30, 0.30) if hard else (0.10, 0.05)
    results["margin_vs_hand_tuned"] = ours - hand["test"]["mean"]
    print(f"\n{ours_name} - hand-tuned TIES: {ours - hand['test']['mean']:+.3f} on the test mean "
          f"(target +{want_hand:.2f})")
    if results.get("evolve-style CMA-ES"):
        evo = stat(results["evolve-style CMA-ES"])[0]
        results["margin_vs_evolve"] = ours - evo
        print(f"{ours_name} - evolve-style CMA-ES: {ours - evo:+.3f} on the test mean (target +{want_evo:.2f})")
    if results.get("mergesearch, JSONL tasks"):
        jsonl = stat(results["mergesearch, JSONL tasks"])[0]
        results["jsonl_minus_lmeval"] = jsonl - ours
        print(f"JSONL tasks - lm-eval YAML tasks: {jsonl - ours:+.4f} on the test mean (target within 0.01: "
              f"{'met' if abs(jsonl - ours) <= 0.01 else 'MISSED'})")
    if hard:
        print(f"{ours_name}: spread of the test mean over {len(results[ours_name])} seeds "
              f"{spread(results[ours_name])} (target at most 0.04)")
    below = [(r["seed"], t) for r in results[ours_name] for t, v in r["test"]["tasks"].items() if v < base_test[t]]
    print("tasks below the base model's score: " + (", ".join(f"seed {s} {t}" for s, t in below) or "none"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", choices=["bundled", "hard"], default="bundled",
                    help="bundled: results/zoo; hard: the 8-task benchmark zoo (results/zoo_hard, built when missing)")
    ap.add_argument("--space", default=str(ROOT / "search_spaces" / "demo.yaml"))
    ap.add_argument("--defaults", help="a search space file run as the contender 'new defaults'")
    ap.add_argument("--extra", nargs="*", default=[], metavar="NAME=SPACE",
                    help="more contenders: search space files, each under its name (one lever at a time)")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=None, help="default 3, or 5 with --zoo hard")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="default results/bench_quality.json (bench_quality_hard.json)")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out and run the rest")
    ap.add_argument("--only", nargs="*", help="contenders to run (default: all)")
    ap.add_argument("--data-free", action="store_true",
                    help="the singular-value methods: a grid each, a search over [ties, tsv, iso_cts] against TIES "
                         "alone, and the demo space started from the best of them")
    ap.add_argument("--report", action="store_true", help="print the table of the runs in --out and run nothing")
    ap.add_argument("--doc", help="with --report: also write it into this page, between <!-- ZOO-quality-table --> "
                                  "markers")
    args = ap.parse_args()
    hard = args.zoo == "hard"
    args.seeds = args.seeds or (5 if hard else 3)
    args.out = args.out or str(ROOT / "results" / ("bench_quality_hard.json" if hard else "bench_quality.json"))
    if args.report:
        results = json.loads(Path(args.out).read_text())
        single = max(results["sources"].items(), key=lambda kv: kv[1]["dev"]["mean"])
        names = [k for k, v in results.items() if isinstance(v, list)]
        import contextlib
        import io
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            report(results, dict.fromkeys(names), results["hand_tuned"], single, results["base_test"], args)
        print(buf.getvalue(), end="")
        if args.doc:  # the table and the targets, into the page between its markers
            from doc_markers import write_between
            write_between(Path(args.doc), f"<!-- {args.zoo}-quality-table -->", f"<!-- /{args.zoo}-quality-table -->",
                          buf.getvalue().strip())
        return 0
    demo, score, ref, base_test, sources = setup(args)
    zoo, tasks = Path(demo.evaluator.task_dir), list(demo.evaluator.tasks)
    results: dict = {"zoo": args.zoo, "zoo_weights": zoo_fingerprint(zoo), "cpu": torch.backends.cpu.get_cpu_capability(),
                     "trials": args.trials, "seeds": args.seeds,
                     "source_test": ref, "base_test": base_test,
                     "sources": {Path(p).name: s for p, s in sources.items()}}
    if args.resume and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        if old.get("zoo_weights") != results["zoo_weights"]:  # runs on another build of the zoo do not mix
            print(f"bench_quality: {args.out}: its runs are on another build of {zoo} (other weights); "
                  "run without --resume, or rename it", file=sys.stderr)
            return 2
        results.update({k: v for k, v in old.items() if isinstance(v, list)})

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(args.out)

    single = max(results["sources"].items(), key=lambda kv: kv[1]["dev"]["mean"])
    print(f"best single fine-tune on dev: {single[0]}: dev {single[1]['dev']['mean']:.3f} "
          f"test {single[1]['test']['mean']:.3f}", flush=True)
    (d, lam), hand = hand_tuned_ties(demo, score)
    results["hand_tuned"] = {"density": d, "lambda": lam, **hand}
    if args.data_free:
        from bench_quality_data_free import run as data_free
        return data_free(args, demo, score, results)

    spaces = {"evolve-style CMA-ES": lambda seed: evolve_space(demo, seed)}
    if not hard:
        for lever in ("lambda", "warm start", "coarse-to-fine", "refine"):
            spaces[f"evolve-style + {lever}"] = lambda seed, lever=lever: evolve_space(demo, seed, lever)
    spaces["mergesearch"] = lambda seed: demo.model_copy(update={"seed": seed})
    if not hard:
        # the same without the per-row multipliers (the refinement per tensor only)
        spaces["mergesearch, refine per tensor only"] = lambda seed: demo.model_copy(
            update={"seed": seed, "refine": demo.refine.model_copy(update={"rows": False})})
        # the same, its refinement trained on the labels (the correct choice) instead
        spaces["mergesearch, refine loss choice"] = lambda seed: demo.model_copy(
            update={"seed": seed, "refine": demo.refine.model_copy(update={"loss": "choice"})})
        # the same space read through the zoo's JSONL files instead of its lm-eval YAML tasks:
        # one engine, so the two must agree (within 0.01 on the test mean)
        spaces["mergesearch, JSONL tasks"] = lambda seed: demo.model_copy(
            update={"seed": seed, "evaluator": demo.evaluator.model_copy(update={"evaluator": "loglik"})})
    files = dict(x.split("=", 1) for x in args.extra)
    if args.defaults:
        files["new defaults"] = args.defaults
    for name, path in files.items():
        space = load_space(path, args, zoo, tasks)
        spaces[name] = lambda seed, space=space: space.model_copy(update={"seed": seed})
    if args.only:
        spaces = {k: v for k, v in spaces.items() if k in args.only}
    run_contenders(spaces, args, score, results, save)
    report(results, spaces, hand, single, base_test, args)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
