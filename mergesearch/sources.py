"""Where a model comes from: a local folder, a Hugging Face Hub ID, or a LoRA adapter.

A model reference, as recipes, spaces, soups and ``--mergekit`` configs write it::

    /path/to/folder            a local model folder (or a PEFT adapter folder)
    org/name                   a Hub model, at its ``main`` branch
    org/name@revision          at a branch, tag or commit
    BASE+ADAPTER               the LoRA adapter ADAPTER applied to BASE (mergekit's form)

A string that names an existing path is a local folder; otherwise ``org/name`` with one
slash is a Hub ID. Hub models resolve through ``huggingface_hub`` into its cache (only
the weights, config and tokenizer files), honouring ``HF_HUB_OFFLINE``, ``HF_HOME`` and
``HF_HUB_CACHE``.

:func:`pin` runs once where a file is loaded: local paths become absolute, Hub IDs
become ``org/name@<commit>``, and an adapter listed alone becomes ``BASE+ADAPTER``. So
every stored recipe, run and model card names the exact commit, and a search is
reproducible after a branch moves. Everything downstream reads pinned references:
:func:`mergesearch.engine.adapter.open_model` gives a Checkpoint or an Adapter, :func:`key`
the identity to compare. This module knows references only (strings, folders and the Hub
cache), so recipes can pin them; opening the weights is the engine's.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mergesearch.errors import MergeSearchError

log = logging.getLogger(__name__)

# What a Hub snapshot needs for a merge: weights, config, tokenizer (and an adapter's files),
# at the top of the repository (subfolders such as original/ hold other formats), never
# Mistral's consolidated*.safetensors (a second copy of the weights in another layout).
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                "adapter_config.json"]
HUB_IGNORE = ["*/*", "consolidated*"]
# pickle weights (read with weights_only=True), fetched only for a repository without safetensors
BIN_PATTERNS = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json", "adapter_model.bin"]
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_ID = re.compile(rf"{_NAME}/{_NAME}")
REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
COMMIT = re.compile(r"[0-9a-f]{40}")

# pinned Hub references resolved in this process -> what was asked and where it lies
_RESOLVED: dict[str, dict] = {}


@dataclass(frozen=True)
class Part:
    """One side of a reference: a local folder or a Hub repository at a revision."""

    text: str
    hub: bool
    repo: str | None = None
    revision: str | None = None

    @property
    def pinned(self) -> bool:
        return not self.hub or bool(self.revision and COMMIT.fullmatch(self.revision))


def _is_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(text))


def parse_part(text: str, where: str = "model") -> Part:
    text = text.strip()
    if not text:
        raise MergeSearchError(f"{where}: empty model reference")
    if _is_path(text):
        return Part(str(Path(os.path.expanduser(text))), hub=False)
    repo, at, revision = text.partition("@")
    # two names around slashes (``org/name``; ``org//name`` is a malformed Hub ID, not a
    # folder), or anything with an '@': a Hub ID, to be validated
    if re.fullmatch(r"[^/]+/+[^/]+", repo) or at:
        if not HUB_ID.fullmatch(repo) or "--" in repo or ".." in repo:
            raise MergeSearchError(f"{text}: malformed Hub ID (expected org/name or org/name@revision, with letters, "
                                   "digits, '-', '_' and '.')")
        if at and not revision:
            raise MergeSearchError(f"{text}: empty Hub revision after '@' (write {repo}@REVISION: a branch, tag or "
                                   f"commit, or {repo} for main)")
        if at and (not REVISION.fullmatch(revision) or ".." in revision):
            raise MergeSearchError(f"{text}: malformed Hub revision '{revision}' (a branch, tag or commit)")
        return Part(text, hub=True, repo=repo, revision=revision or None)
    return Part(text, hub=False)  # a local path that does not exist: Checkpoint names it


def split(ref: str, where: str = "model") -> tuple[Part, Part | None]:
    """(model, adapter or None) of ``MODEL`` or ``MODEL+ADAPTER``."""
    if "+" in ref and not os.path.exists(ref):
        left, _, right = ref.partition("+")
        if "+" in right:
            raise MergeSearchError(f"{ref}: more than one '+' (write BASE+ADAPTER)")
        return parse_part(left, where), parse_part(right, where)
    return parse_part(ref, where), None


def hub_cache() -> Path:
    """The Hub cache, as huggingface_hub finds it (read now: tests and users may set it late)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # the second: huggingface_hub's older name
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_env() -> dict[str, str]:
    """The Hub settings of this process, for processes that resolve pinned references
    elsewhere (Ray workers): the cache folder, and offline mode when it is set."""
    env = {"HF_HUB_CACHE": str(hub_cache())}
    if offline():
        env["HF_HUB_OFFLINE"] = "1"
    return env


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    """Whether Hub lookups are off: HF_HUB_OFFLINE set now, or set when huggingface_hub
    was imported (it reads the variable once, and stays offline)."""
    import sys
    hub = sys.modules.get("huggingface_hub.constants")
    return _offline_env() or bool(hub is not None and getattr(hub, "HF_HUB_OFFLINE", False))


def _cached_revisions(repo: str) -> list[str]:
    """The revisions of ``repo`` the cache can resolve offline: its refs (branches and
    tags, ``refs/pr/1`` included, as nested files) and the commits of snapshots no ref
    names."""
    root = hub_cache() / f"models--{repo.replace('/', '--')}"
    refs = {p.relative_to(root / "refs").as_posix(): p.read_text().strip()
            for p in (root / "refs").rglob("*") if p.is_file()} if (root / "refs").is_dir() else {}
    snaps = sorted(p.name for p in (root / "snapshots").iterdir()
                   if p.is_dir()) if (root / "snapshots").is_dir() else []
    return sorted(refs) + [c for c in snaps if c not in refs.values()]


def _complete(snap: Path) -> bool:
    """Whether a cached snapshot holds every file a merge reads that its commit's tree
    listing (``trees/<commit>.json``, kept by huggingface_hub >= 1.x) names; without a
    listing, as huggingface_hub does, the folder is taken as it is."""
    import json

    from huggingface_hub.utils import filter_repo_objects

    try:
        files = json.loads((snap.parent.parent / "trees" / f"{snap.name}.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    return all((snap / f).exists() for f in filter_repo_objects(list(files), allow_patterns=_patterns(snap),
                                                                ignore_patterns=HUB_IGNORE))


def _patterns(snap: Path | None) -> list[str]:
    """The files to fetch: the pickle weights too where the snapshot has no safetensors weights."""
    return HUB_PATTERNS if snap is not None and any((snap / f).exists() for f in WEIGHTS) else \
        HUB_PATTERNS + BIN_PATTERNS


def resolve_hub(part: Part) -> tuple[Path, str]:
    """(snapshot folder, commit) of a Hub part, from the cache or downloaded."""
    import huggingface_hub
    from huggingface_hub import errors

    cache = hub_cache()
    if part.pinned:  # a commit already in the cache, complete: no request at all
        snap = cache / f"models--{part.repo.replace('/', '--')}" / "snapshots" / part.revision
        if snap.is_dir() and _complete(snap):
            # nothing recorded: a reference pinned earlier keeps the revision it was asked as, and one pinned
            # already (a stored recipe) does not claim it was asked for by its commit
            return snap, part.revision
    rev = part.revision or "main"
    fetch = f"hf download {part.repo}" + (f" --revision {part.revision}" if part.revision else "")
    try:
        path = Path(huggingface_hub.snapshot_download(part.repo, revision=rev, cache_dir=str(cache),
                                                      allow_patterns=HUB_PATTERNS, ignore_patterns=HUB_IGNORE,
                                                      local_files_only=offline()))
        if _patterns(path) != HUB_PATTERNS:  # no safetensors weights: the same commit's pickle weights
            rev = path.name
            path = Path(huggingface_hub.snapshot_download(part.repo, revision=rev, cache_dir=str(cache),
                                                          allow_patterns=_patterns(path),
                                                          ignore_patterns=HUB_IGNORE, local_files_only=offline()))
    except errors.RevisionNotFoundError:
        raise MergeSearchError(f"{part.text}: the Hub has no revision '{rev}' of {part.repo}") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        raise MergeSearchError(f"{part.text}: no such model on the Hub, or no access to it "
                               f"({type(e).__name__})") from None
    except errors.IncompleteSnapshotError as e:  # the cache's tree listing names files the snapshot lacks
        missing = re.search(r"is incomplete: (.*?\))\. ", str(e))
        raise MergeSearchError(f"{part.text}: the cached snapshot of {part.repo} at '{rev}' is incomplete"
                               f"{f' ({missing.group(1)})' if missing else ''}; complete it online with "
                               f"`{fetch}`") from None
    except errors.LocalEntryNotFoundError:
        known = _cached_revisions(part.repo)
        if known:
            raise MergeSearchError(f"{part.text}: revision '{rev}' is not in the Hugging Face cache ({cache}; cached: "
                                   f"{', '.join(known)}); fetch it online with `{fetch}`") from None
        if offline():
            why = "HF_HUB_OFFLINE is set" if _offline_env() else \
                "huggingface_hub is offline (HF_HUB_OFFLINE was set when it was imported)"
            raise MergeSearchError(f"{part.text}: not in the Hugging Face cache ({cache}) and {why}; "
                                   f"fetch it online first with `{fetch}`") from None
        raise MergeSearchError(f"{part.text}: cannot reach the Hub and the model is not in the cache ({cache}); "
                               f"fetch it with `{fetch}`") from None
    except errors.HFValidationError as e:
        raise MergeSearchError(f"{part.text}: malformed Hub ID ({str(e).splitlines()[0]})") from None
    except (OSError, errors.HfHubHTTPError) as e:
        raise MergeSearchError(f"{part.text}: cannot fetch from the Hub ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None
    commit = path.name
    if part.revision != commit:
        log.info("%s: resolved to commit %s", part.text, commit)
    _RESOLVED[f"{part.repo}@{commit}"] = {"repo": part.repo, "requested": part.revision or "main",
                                          "commit": commit, "snapshot": str(path)}
    return path, commit


def local_dir(part: Part) -> Path:
    """The folder a part's files lie in (a Hub part resolved through the cache)."""
    return resolve_hub(part)[0] if part.hub else Path(part.text)


def is_adapter_dir(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and not any(
        (folder / f).exists() for f in ("model.safetensors", "model.safetensors.index.json"))


def _pin_part(text: str, folder: Path | None, where: str) -> Part:
    if folder is not None and not os.path.isabs(os.path.expanduser(text)):
        candidate = folder / text
        if candidate.exists():  # relative to the file that names it
            return Part(str(candidate.resolve()), hub=False)
    part = parse_part(text, where)
    if not part.hub:  # an absolute path stays as written (a run's identity names it so)
        p = Path(part.text)
        return Part(str(p if p.is_absolute() else p.resolve() if p.exists() else (folder or Path.cwd()) / p),
                    hub=False)
    _, commit = resolve_hub(part)
    return Part(f"{part.repo}@{commit}", hub=True, repo=part.repo, revision=commit)


def pin(ref: str | None, folder: str | os.PathLike | None = None, base: str | None = None,
        where: str = "model") -> str | None:
    """``ref`` as every later step reads it: local paths absolute (relative ones taken
    from ``folder``), Hub IDs at their commit, and an adapter folder listed alone as
    ``base+adapter`` (``base`` pinned already). Resolves Hub IDs through the cache."""
    if ref is None or (ref == "base" and where == "tokenizer_source"):  # the keyword: the merge's base
        return ref
    folder = Path(folder) if folder is not None else None
    if "+" in ref and not (folder is not None and (folder / ref).exists()) and not os.path.exists(ref):
        left, _, right = ref.partition("+")
        if "+" in right:
            raise MergeSearchError(f"{ref}: more than one '+' (write BASE+ADAPTER)")
        return f"{_pin_part(left, folder, where).text}+{_pin_part(right, folder, where).text}"
    part = _pin_part(ref, folder, where)
    if base is not None and is_adapter_dir(local_dir(part)):
        return f"{base}+{part.text}"
    return part.text


def key(ref: str) -> str:
    """The identity of a pinned reference, for comparisons (no Hub lookups)."""
    model, adapter = split(ref)
    one = (lambda p: p.text if p.hub else str(Path(p.text).resolve()))
    return one(model) + (f"+{one(adapter)}" if adapter is not None else "")


def short(ref: str) -> str:
    """A short display name: a folder's name, a Hub ID with its commit's first 8 digits,
    and BASE+ADAPTER as its adapter's name with a '+' (the base is the merge's)."""
    model, adapter = split(ref)

    def one(p: Part) -> str:
        if p.hub:
            return f"{p.repo}@{p.revision[:8]}" if p.pinned and p.revision else p.text
        return Path(p.text).name or p.text
    return f"+{one(adapter)}" if adapter is not None else one(model)


def describe(ref: str) -> dict:
    """What a run records about a pinned reference: the Hub repository, the revision asked
    for and the commit it resolved to, for each Hub part; the folder for a local one."""
    model, adapter = split(ref)
    out = {}
    for role, part in (("model", model), ("adapter", adapter)):
        if part is None:
            continue
        if part.hub:
            info = _RESOLVED.get(part.text) or {"repo": part.repo, "commit": part.revision}
            out[role] = {k: info[k] for k in ("repo", "requested", "commit") if k in info}
        else:
            out[role] = {"path": part.text}
    return out


def model_dir(ref: str) -> Path:
    """The local folder of a reference that is a full model (not an adapter)."""
    model, adapter = split(ref)
    if adapter is not None:
        raise MergeSearchError(f"{ref}: a LoRA adapter is not a model folder here")
    return local_dir(model)
