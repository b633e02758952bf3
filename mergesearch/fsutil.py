"""Atomic replacement of files and folders: write beside the final path, then rename."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mergesearch.errors import MergeSearchError


def replace_dir(tmp: Path, final: Path, force: bool) -> None:
    """Move a finished temp folder to its final path; an old one is replaced only with force."""
    if final.exists():
        if not force:
            raise MergeSearchError(f"{final}: output path exists (pass --force to replace it)")
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Write a file to a temp name beside it, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
