"""The base of every file a user writes (recipes, search spaces, evaluator options):
a pydantic model that refuses unknown keys, YAML loading, and validation errors turned
into one line that names the file and the key."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mergesearch.errors import MergeSearchError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


def load_yaml(path: Path) -> dict:
    if not path.exists():
        raise MergeSearchError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise MergeSearchError(f"{path}: invalid YAML{line}") from None
    if not isinstance(data, dict):
        raise MergeSearchError(f"{path}: expected a mapping at the top level")
    return data


def load_validated(cls, path: Path):
    """A user YAML file validated into the pydantic class ``cls``; errors name the file and key."""
    data = load_yaml(path)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise pydantic_error(e, str(path)) from None


def pydantic_error(e: ValidationError, where: str) -> MergeSearchError:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("function-", "union[", "list[", "lax-")))
    if err["type"] == "extra_forbidden":
        return MergeSearchError(f"{where}: unknown key '{loc}'")
    if err["type"] == "missing":
        return MergeSearchError(f"{where}: missing key '{loc}'")
    return MergeSearchError(f"{where}: bad value for '{loc}': {err['msg']}")
