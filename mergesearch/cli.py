"""The ``mergesearch`` command line."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from mergesearch.console import (ABORTS, CLICK_ERRORS, EXITS, print_export, print_leaderboard, show_click_error,
                                 tensor_progress)
from mergesearch.errors import MergeSearchError
from mergesearch.progress import interactive, quiet_libraries

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Search for the best merge of fine-tuned checkpoints.")
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
          verbose: bool = typer.Option(False, "-v", "--verbose", help="more log output")):
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


@app.command()
def merge(
    recipe: Optional[Path] = typer.Argument(None, help="mergesearch recipe YAML"),
    out: Path = typer.Option(..., "-o", "--out", help="output model folder"),
    mergekit_config: Optional[Path] = typer.Option(None, "--mergekit", help="a mergekit YAML config instead of a recipe"),
    dtype: Optional[str] = typer.Option(None, help="output dtype: float32, bfloat16 or float16"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    shard_size: str = typer.Option("2GB", help="maximum shard size"),
    force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
    allow_unrelated: bool = typer.Option(False, "--allow-unrelated",
                                         help="merge models that look unrelated to the base"),
    strict: bool = typer.Option(False, "--strict", help="--mergekit: refuse parameters the method does not use "
                                                        "(by default they are ignored with a warning, as mergekit does)"),
):
    """Merge checkpoints as a recipe says and write an HF model folder."""
    from mergesearch.engine.merge import open_plan, stream_merge
    from mergesearch.recipe import Recipe, load_mergekit

    if (recipe is None) == (mergekit_config is None):
        raise MergeSearchError("merge: give a recipe file or --mergekit CONFIG (one of them)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise MergeSearchError(f"--device: unknown device '{device}' (use cpu or cuda)")
    from mergesearch.engine.plan import parse_size
    max_bytes = parse_size(shard_size, "--shard-size")
    if out.exists() and not force:
        raise MergeSearchError(f"{out}: output path exists (pass --force to replace it)")
    r = load_mergekit(mergekit_config, strict=strict) if mergekit_config else Recipe.load(recipe)
    plan = open_plan(r, allow_unrelated=allow_unrelated)
    with tensor_progress(f"merging ({r.method})") as cb:
        summary = stream_merge(plan, out, dtype=dtype, device=device, max_shard_bytes=max_bytes,
                               force=force, progress=cb)
    n_inputs = len(r.models) + (1 if r.base and r.spec.uses_base != "no" else 0)
    typer.echo(f"merged {n_inputs} inputs with {r.method}: {summary['tensors']} tensors, "
               f"{summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f}s -> {out}")


@app.command()
def convert(
    source: Path = typer.Argument(..., help="recipe or mergekit YAML"),
    out: Path = typer.Option(..., "-o", "--out", help="where to write the converted YAML"),
    to: str = typer.Option("mergekit", help="mergekit or mergesearch"),
    force: bool = typer.Option(False, "--force"),
):
    """Convert between mergesearch recipes and mergekit configs."""
    from mergesearch.recipe import Recipe, load_mergekit, save_mergekit

    if out.exists() and not force:
        raise MergeSearchError(f"{out}: output path exists (pass --force to replace it)")
    if to == "mergekit":
        save_mergekit(Recipe.load(source), out)
    elif to == "mergesearch":
        load_mergekit(source).save(out)
    else:
        raise MergeSearchError(f"--to: unknown format '{to}' (use mergekit or mergesearch)")
    typer.echo(f"wrote {out}")


zoo_app = typer.Typer(no_args_is_help=True, help="The bundled tiny model zoo.")
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def zoo_build(
    out: Optional[Path] = typer.Option(None, "--out", help="where to build the zoo (default results/zoo, "
                                       "or results/zoo_hard for --preset hard)"),
    force: bool = typer.Option(False, "--force", help="rebuild even when a finished build is there"),
    scale: float = typer.Option(1.0, "--scale", max=1.0, help="shrink every training's step count by this "
                                "factor (tests; a scaled zoo's models are too weak to search on)"),
    preset: str = typer.Option("bundled", "--preset", help="bundled: the demo's zoo; hard: the 8-task benchmark "
                               "zoo (docs/ZOO.md), for benchmarks"),
):
    """Build the zoo: a tiny base, task fine-tunes, checkpoints, a sweep, data (cached)."""
    from mergesearch.zoo.build import build_zoo

    if scale <= 0:
        raise MergeSearchError(f"--scale: use a factor above 0 and at most 1, got {scale:g}")
    manifest = build_zoo(out, scale=scale, force=force, preset=preset)
    out = out or Path(manifest["root"])
    n = len(manifest["models"])
    took = manifest.get("build_seconds")
    typer.echo(f"zoo at {out}: {n} models, tasks {', '.join(manifest['tasks'])}"
               + (f" (built in {took:.0f}s)" if took is not None else ""))


@app.command("eval")
def eval_cmd(
    model_dir: str = typer.Argument(..., metavar="MODEL", help="HF model folder, Hub ID (org/name[@revision]) "
                                    "or BASE+ADAPTER"),
    tasks: Optional[str] = typer.Option(None, help="comma-separated task names"),
    config: Optional[Path] = typer.Option(None, "--config", help="evaluation YAML (tasks, split, limit, ...)"),
    split: Optional[str] = typer.Option(None, help="dev or test"),
    evaluator: Optional[str] = typer.Option(None, help="loglik, lmeval or python"),
    task_dir: Optional[Path] = typer.Option(None, "--task-dir", help="zoo root, JSONL folder or lm-eval task folder"),
    limit: Optional[int] = typer.Option(None, help="items per task"),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON output (default results/eval/<model>-<split>.json)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="run the model folder's own Python code (off by default)"),
):
    """Score a model on held-out tasks: prints a per-task table and writes JSON."""
    import json
    import time

    from mergesearch.fsutil import atomic_file
    from mergesearch.evaluate import EvalConfig, build_evaluator
    from mergesearch.config import pydantic_error

    from pydantic import ValidationError

    from mergesearch.engine.adapter import open_model
    from mergesearch.sources import pin, short
    model_dir = pin(model_dir)
    open_model(model_dir)  # a clear error for a missing or non-model folder, before any work
    if config:
        cfg = EvalConfig.load(config)
    elif tasks:
        cfg = EvalConfig(tasks=[t for t in tasks.split(",") if t], task_dir=str(task_dir or "results/zoo"))
    else:
        raise MergeSearchError("eval: give --tasks or --config")
    updates = {k: v for k, v in {"split": split, "evaluator": evaluator, "limit": limit,
                                 "trust_remote_code": trust_remote_code or None,
                                 "task_dir": str(task_dir) if task_dir else None}.items() if v is not None}
    try:
        cfg = EvalConfig.model_validate({**cfg.model_dump(), **updates})
    except ValidationError as e:
        raise pydantic_error(e, "eval options") from None
    cfg.check("eval options")
    ev = build_evaluator(cfg)
    from mergesearch.engine.models import load_model
    model, tokenizer = load_model(model_dir, trust_remote_code=cfg.trust_remote_code)
    t0 = time.perf_counter()
    scores = ev.score(model, tokenizer)
    seconds = time.perf_counter() - t0
    agg = ev.aggregate(scores)
    width = max(len(t) for t in scores)
    typer.echo(f"{'task':<{width}}  {cfg.split} acc")
    for t, v in scores.items():
        typer.echo(f"{t:<{width}}  {v:.4f}")
    typer.echo(f"{'mean':<{width}}  {agg:.4f}   ({cfg.evaluator}, {seconds:.2f}s)")
    out = out or Path("results") / "eval" / f"{short(model_dir).strip('+').replace('/', '--')}-{cfg.split}.json"
    with atomic_file(out) as f:
        json.dump({"model": model_dir, "split": cfg.split, "evaluator": cfg.evaluator,
                   "scores": scores, "aggregate": agg, "seconds": seconds, "config": cfg.model_dump()}, f, indent=2)
    typer.echo(f"wrote {out}")


@app.command()
def search(
    space_file: Path = typer.Argument(..., metavar="SPACE.yaml", help="search space"),
    run: Optional[str] = typer.Option(None, "--run", help="run name (default: the space file's name)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run with its sampler state"),
    workers: int = typer.Option(2, "--workers", min=1, help="Ray workers (local Ray is sized to this)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="join an existing Ray cluster"),
    storage: Optional[str] = typer.Option(None, "--storage", help="SQLAlchemy URL (default results/<run>/study.db)"),
    n_trials: Optional[int] = typer.Option(None, "--n-trials", min=1, help="override the space's trial budget"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="override the wall-time budget (s)"),
    no_export: bool = typer.Option(False, "--no-export", help="skip the export at the end"),
    device_memory: Optional[str] = typer.Option(None, "--device-memory", metavar="SIZE",
                                                help="each worker's device memory budget, e.g. 80GB "
                                                     "(overrides resources.device_memory)"),
):
    """Search merges: propose with Optuna, score on Ray workers, rank, export the winner."""
    from mergesearch.engine.plan import parse_size
    from mergesearch.search.controller import Controller, SearchOptions
    from mergesearch.search.space import SearchSpace

    sp = SearchSpace.load(space_file)
    name = run or space_file.stem
    _check_run_name(name)
    budget = parse_size(device_memory, "--device-memory") if device_memory is not None else None
    opts = SearchOptions(run=name, resume=resume, workers=workers, ray_address=ray_address, storage=storage,
                         n_trials=n_trials, timeout=timeout, progress=interactive(), device_memory=budget)
    summary = Controller(sp, opts, str(space_file)).run()
    pruned = f", {summary['pruned']} pruned" if summary.get("pruned") else ""
    items = f", {summary['items']} dev items scored" if summary.get("items") else ""
    typer.echo(f"run {name}: {summary['complete']} complete, {summary['failed']} failed{pruned} trials{items} in "
               f"{summary['elapsed_s']:.0f}s" + (" (interrupted)" if summary["interrupted"] else ""))
    if not no_export and summary["complete"]:
        _export_and_print(name, None, storage)
    from mergesearch.runs.report import refresh
    if refresh(name, storage):
        typer.echo(f"report: results/{name}/report.html")
    if summary["interrupted"]:
        raise typer.Exit(130)


@app.command("plan")
def plan_cmd(
    space_file: Path = typer.Argument(..., metavar="SPACE.yaml", help="search space"),
    device_memory: Optional[str] = typer.Option(None, "--device-memory", metavar="SIZE",
                                                help="device memory budget per worker, e.g. 80GB"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when visible)"),
    as_json: bool = typer.Option(False, "--json", help="print the placement as JSON"),
    gpus_per_worker: Optional[int] = typer.Option(None, "--gpus-per-worker", metavar="K", min=1,
                                                  help="GPUs per worker (2 or more shards the evaluation model; "
                                                       "--device-memory is then each GPU's budget)"),
):
    """Show where each worker's inputs would live: bytes per tier, bytes moved and the
    predicted time per candidate, and what a refinement needs beside them. Reads file
    headers (and, with a refine section, tokenizes the dev items)."""
    from mergesearch.engine.multi_gpu import space_placement
    from mergesearch.engine.plan import dumps, parse_size
    from mergesearch.search.space import SearchSpace

    if device is not None and device.split(":")[0] not in ("cpu", "cuda"):
        raise MergeSearchError(f"--device: use cpu or cuda, got '{device}'")
    sp = SearchSpace.load(space_file)
    gpus = gpus_per_worker or sp.resources.gpus_per_worker or 1
    if gpus >= 2:  # a sharded worker: its GPUs, each with the declared budget
        if device is not None and not device.startswith("cuda"):
            raise MergeSearchError(f"--device {device}: a worker on {gpus:g} GPUs shards over CUDA devices")
        device = "cuda"
    budget = parse_size(device_memory, "--device-memory") if device_memory is not None else None
    side = _planned_side(sp)
    p = space_placement(sp, device=device, budget=budget, side=side, gpus=gpus_per_worker)
    if side is None and (sp.curvature is not None or sp.gram is not None):
        p.notes.append("curvature/gram files are computed when the search starts; they are not counted here")
    from mergesearch.search.refine_memory import plan_refinement
    rm = plan_refinement(sp, p, str(space_file))  # the dev items' shapes; refused here as the search would
    if as_json:
        d = json.loads(dumps(p))
        if rm is not None:
            d["refinement"] = rm.to_json()
        typer.echo(json.dumps(d, indent=2))
    else:
        typer.echo(p.render() + ("\n" + rm.render() if rm is not None else ""))


def _planned_side(space) -> dict | None:
    """Side files a space names directly (curvature kind 'files'); None otherwise."""
    c = space.curvature
    if c is None or c.kind != "files":
        return None
    return {"metrics": {m: f for m, f in zip(space.models, c.files) if f}, "grams": {},
            "base_metric": c.base_file}


def _export_and_print(run: str, trial, storage, device: str | None = None) -> None:
    from mergesearch.runs.export import export_run

    print_export(export_run(run, trial, storage, device=device))


@app.command()
def curvature(
    model_dir: str = typer.Argument(..., metavar="MODEL", help="HF model folder, Hub ID or BASE+ADAPTER"),
    data: Optional[str] = typer.Option(None, "--data", help="a .jsonl file, or TASK:SPLIT under --task-dir"),
    kind: str = typer.Option("fisher", "--kind", help="fisher, empirical_fisher, squared_grad, gram or adam"),
    n_examples: int = typer.Option(128, "--n-examples", help="examples to average over"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="also write the estimate here (safetensors)"),
    task_dir: str = typer.Option("results/zoo", "--task-dir", help="where TASK:SPLIT is looked up"),
    batch_size: int = typer.Option(16, "--batch-size", help="batch size (squared_grad, gram)"),
    seed: int = typer.Option(0, "--seed", help="sampling seed (fisher)"),
    device: str = typer.Option("cpu", "--device"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="run the model folder's own Python code (off by default)"),
):
    """Diagonal curvature (or Gram matrices, or Adam second moments) of a model, cached
    by content hash; the geometry-aware merge methods read these files."""
    import shutil
    import time

    from mergesearch.search.curvature import curvature as compute

    t0 = time.perf_counter()
    with tensor_progress(f"curvature {kind}", "examples") as cb:
        path, cached = compute(model_dir, kind, data, task_dir, n_examples, batch_size, seed, device,
                               progress=lambda done, total: cb(done, total, ""), trust_remote_code=trust_remote_code)
    if out is not None:
        tmp = out.parent / f".{out.name}.tmp"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, tmp)
        os.replace(tmp, out)
    typer.echo(f"{kind} of {model_dir}: {'cached' if cached else 'computed'} in {time.perf_counter() - t0:.2f}s "
               f"-> {out or path}")


@app.command()
def soup(
    models: Optional[list[str]] = typer.Argument(None, metavar="MODELS...",
                                                 help="ingredient folders (a folder of checkpoint-* stands for all)"),
    glob_pattern: Optional[str] = typer.Option(None, "--glob", help="ingredients by pattern, e.g. 'run/checkpoint-*'"),
    strategy: str = typer.Option("greedy", "--strategy", help="greedy, uniform or last-n"),
    n: Optional[int] = typer.Option(None, "--n", help="last-n: how many of the last checkpoints"),
    eval_file: Path = typer.Option(..., "--eval", metavar="EVAL.yaml", help="evaluation config (split: dev)"),
    run: Optional[str] = typer.Option(None, "--run", help="run name (default soup-<folder of the ingredients>)"),
    workers: int = typer.Option(2, "--workers", min=1, help="Ray workers"),
    base: Optional[str] = typer.Option(None, "--base", help="the common base: checks every ingredient against it"),
    resume: bool = typer.Option(False, "--resume", help="continue a soup run; scored candidates are reused"),
    storage: Optional[str] = typer.Option(None, "--storage", help="SQLAlchemy URL (default results/<run>/study.db)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="join an existing Ray cluster"),
    allow_unrelated: bool = typer.Option(False, "--allow-unrelated", help="skip the shared-base distance check"),
    trial_timeout: float = typer.Option(600.0, "--trial-timeout", help="seconds per candidate on a worker"),
    max_retries: int = typer.Option(1, "--max-retries", min=0, help="re-runs of a candidate whose worker died"),
    no_export: bool = typer.Option(False, "--no-export", help="skip writing the final soup's checkpoint"),
    no_speculate: bool = typer.Option(False, "--no-speculate",
                                      help="greedy: one candidate at a time instead of scoring ahead on idle workers"),
):
    """Model soups: score every ingredient on dev, build the greedy (or uniform, or
    last-N) soup, report it on test beside the best ingredient and the uniform soup."""
    from mergesearch.search.soup_run import SoupOptions, SoupRunner, resolve_ingredients

    if not models and not glob_pattern:
        raise MergeSearchError("soup: give ingredient folders or --glob PATTERN")
    ingredients = resolve_ingredients(models or [], glob_pattern)
    name = run or f"soup-{Path(ingredients[0]).resolve().parent.name}"
    _check_run_name(name)
    opts = SoupOptions(run=name, strategy=strategy, n=n, base=base, workers=workers, resume=resume,
                       storage=storage, ray_address=ray_address, allow_unrelated=allow_unrelated,
                       trial_timeout=trial_timeout, max_retries=max_retries, speculate=not no_speculate)
    report = SoupRunner(ingredients, eval_file, opts).run()
    rows = report["rows"]
    typer.echo(f"soup run {name}: {strategy}, {len(report['members'])} of {len(report['ingredients'])} ingredients, "
               f"{report['evaluations']} evaluations ({report['reused_from_store']} reused, {report['failed']} failed) "
               f"in {report['seconds']:.0f}s")
    fmt = (lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "-")
    typer.echo(f"{'':<16}{'members':>8}{'dev':>9}{'test':>9}")
    for k, r in rows.items():
        typer.echo(f"{k:<16}{r['members']:>8}{fmt(r['dev']):>9}{fmt(r['test']):>9}")
    if not no_export:
        _export_and_print(name, str(report["final_trial"]), storage)
    from mergesearch.runs.report import refresh
    if refresh(name, storage):
        typer.echo(f"report: results/{name}/report.html")


def _check_run_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise MergeSearchError(f"--run: '{name}' must use letters, digits, '.', '_' or '-'")


@app.command()
def leaderboard(
    run: str = typer.Argument(..., help="run name"),
    top: int = typer.Option(10, "--top", min=1),
    csv: Optional[Path] = typer.Option(None, "--csv", help="write the whole table as CSV"),
    parquet: Optional[Path] = typer.Option(None, "--parquet", help="write the whole table as Parquet"),
    storage: Optional[str] = typer.Option(None, "--storage"),
    failed: bool = typer.Option(False, "--failed", help="include failed trials"),
    pruned: bool = typer.Option(False, "--pruned", help="include pruned trials (partial scores)"),
):
    """Rank a run's trials: aggregate, per-task dev scores, key parameters."""
    from mergesearch.fsutil import atomic_file
    from mergesearch.runs.store import leaderboard as board, load_run, run_counts

    study, st = load_run(run, storage)
    df = board(study, st, include_failed=failed, include_pruned=pruned)
    if csv:
        with atomic_file(csv) as f:
            df.to_csv(f, index=False)
    if parquet:
        tmp = parquet.parent / f".{parquet.name}.tmp"
        df.to_parquet(tmp, index=False)
        os.replace(tmp, parquet)
    if df.empty:
        typer.echo(f"run {run}: no completed trials")
        return
    print_leaderboard(run, df, study, run_counts(study, st), top, pruned)


@app.command()
def export(
    run: str = typer.Argument(..., help="run name"),
    trial: Optional[str] = typer.Option(None, "--trial", help="trial number (default: the best); b0 for a baseline"),
    storage: Optional[str] = typer.Option(None, "--storage"),
    device: Optional[str] = typer.Option(None, "--device",
                                         help="cpu or cuda (default: where the trial was scored)"),
):
    """Write the best (or a chosen) trial's recipe, checkpoint, model card and test scores."""
    if device is not None and device.split(":")[0] not in ("cpu", "cuda"):
        raise MergeSearchError(f"--device: use cpu or cuda, got '{device}'")
    _export_and_print(run, trial, storage, device)


@app.command()
def report(
    run: str = typer.Argument(..., help="run name (a search or a soup)"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="HTML file (default: results/RUN/report.html)"),
    storage: Optional[str] = typer.Option(None, "--storage"),
):
    """Write the run's report: one self-contained HTML file that works offline."""
    from mergesearch.runs.report import write_report

    path = write_report(run, storage, out=out)
    if out is None:  # the run's own report: the dashboard's note and chart are refreshed too
        from mergesearch.runs.report import dashboard_extras
        from mergesearch.runs.store import load_run
        study, st = load_run(run, storage)
        if study.user_attrs.get("kind") != "soup":
            dashboard_extras(study, st)
    typer.echo(f"wrote {path}")


@app.command()
def methods():
    """List the merge methods and their parameters."""
    from mergesearch.methods import REGISTRY

    for name, spec in sorted(REGISTRY.items()):
        typer.echo(f"{name}: {spec.description}")
        for p in spec.params:
            default = "required" if p.required else f"default {p.default}"
            rng = "" if p.kind is bool or (p.low == float("-inf") and p.high == float("inf")) else f", range [{p.low}, {p.high}]"
            typer.echo(f"    {p.name} ({p.scope}, {p.kind.__name__}, {default}{rng}){' - ' + p.help if p.help else ''}")


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    try:
        rv = app(args=argv, standalone_mode=False)
        return rv if isinstance(rv, int) else 0  # click returns typer.Exit's code here
    except MergeSearchError as e:
        if _state["debug"]:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EXITS as e:
        return e.exit_code
    except ABORTS:
        print("aborted", file=sys.stderr)
        return 130
    except CLICK_ERRORS as e:  # a usage mistake: click's usage line and one error line
        if _state["debug"]:
            raise
        return show_click_error(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
