"""The ``mergesearch`` command line."""

from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import click
import typer

from mergesearch.errors import MergeSearchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Search for the best merge of fine-tuned checkpoints.")
_state = {"debug": False}


def interactive() -> bool:
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("true", "1")


@contextmanager
def tensor_progress(description: str):
    """Yields a callback(done, total, name); a rich bar on a TTY, log lines otherwise."""
    if interactive():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task(description, total=None)

            def cb(done, total, name):
                bar.update(task, completed=done, total=total)
            yield cb
    else:
        import time
        last = {"t": time.monotonic()}

        def cb(done, total, name):
            now = time.monotonic()
            if done == total or now - last["t"] >= 10:
                logging.getLogger("mergesearch").info("%s: %d/%d tensors", description, done, total)
                last["t"] = now
        yield cb


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not m:
        raise MergeSearchError(f"--shard-size: cannot parse '{text}' (use e.g. 2GB, 500MB or a byte count)")
    value = float(m.group(1))
    unit = (m.group(2) or "").rstrip("b").rstrip("i")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[unit]
    if "i" in (m.group(2) or ""):
        scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[unit]
    size = int(value * scale)
    if size <= 0:
        raise MergeSearchError(f"--shard-size: must be positive, got '{text}'")
    return size


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
):
    """Merge checkpoints as a recipe says and write an HF model folder."""
    from mergesearch.merge import open_plan, stream_merge
    from mergesearch.recipe import Recipe, load_mergekit

    if (recipe is None) == (mergekit_config is None):
        raise MergeSearchError("merge: give a recipe file or --mergekit CONFIG (one of them)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise MergeSearchError(f"--device: unknown device '{device}' (use cpu or cuda)")
    max_bytes = parse_size(shard_size)
    if out.exists() and not force:
        raise MergeSearchError(f"{out}: output path exists (pass --force to replace it)")
    r = load_mergekit(mergekit_config) if mergekit_config else Recipe.load(recipe)
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
    try:
        app(args=argv, standalone_mode=False)
        return 0
    except MergeSearchError as e:
        if _state["debug"]:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except click.ClickException as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
