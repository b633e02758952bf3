"""Hub model references, offline, from a Hugging Face cache the test builds in the cache's
own layout (``models--org--name/{blobs,snapshots/<commit>,refs}``): pinning to commits, a
search of Hub IDs and a Hub LoRA adapter end to end, the plan, merges equal to the same
merge of local folders, and the one-line errors (docs/ERRORS.md)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mergesearch.cli import main
from mergesearch import sources

from conftest import load_weights, rewrite_tensor

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json")


def commit_of(label: str) -> str:
    """A fixed 40-hex commit for a label (as the Hub's git commits look)."""
    return hashlib.sha1(label.encode()).hexdigest()


def add_snapshot(cache: Path, repo: str, files: dict[str, Path | bytes], commit: str, refs=("main",),
                 missing: tuple[str, ...] = ()) -> Path:
    """One commit of ``repo`` in the cache, as huggingface_hub leaves it after a download:
    each file a blob named by its sha256 under ``blobs/``, the snapshot's files relative
    symlinks to them, each ref (a branch or tag name) a file holding the commit, and the
    commit's tree listing. ``missing`` files are listed but not in the snapshot."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    write_tree(root, commit, files)
    for name in missing:  # listed in the commit's tree, not in the snapshot (an interrupted or partial download)
        (snap / name).unlink()
    return snap


def write_tree(root: Path, commit: str, files: dict[str, Path | bytes]) -> None:
    """The commit's tree listing, ``trees/<commit>.json``, as huggingface_hub >= 1.x caches
    it beside the snapshots (offline, it tells a complete snapshot from a partial one)."""
    entries = {}
    for name, src in files.items():
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        info = {"size": len(data), "blob_id": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if name.endswith(".safetensors"):
            info.update(lfs_sha256=hashlib.sha256(data).hexdigest(), lfs_size=len(data))
        entries[name] = info
    (root / "trees").mkdir(exist_ok=True)
    (root / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": entries}, indent=2))


def model_files(folder: Path) -> dict[str, Path]:
    return {f: folder / f for f in MODEL_FILES if (folder / f).exists()}


def adapter_files(folder: Path, base_repo: str = "org/base") -> dict[str, Path | bytes]:
    """A PEFT adapter folder's files as its Hub repository holds them: its recorded base
    is the Hub ID (PEFT writes the path the base was loaded from)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_repo
    return {"adapter_config.json": json.dumps(cfg, indent=2).encode(),
            "adapter_model.safetensors": folder / "adapter_model.safetensors"}


def local_copy(folder: Path, files: dict[str, Path | bytes]) -> Path:
    """A local folder holding the same files as a repository."""
    folder.mkdir(parents=True)
    for name, src in files.items():
        (folder / name).write_bytes(src if isinstance(src, bytes) else Path(src).read_bytes())
    return folder


def peft_adapter(base_dir: Path | None, out: Path, config, seed: int, model=None, mts_scale: float = 0.0) -> Path:
    """A PEFT adapter made with peft on the base, its lora_B (and any modules_to_save copy)
    randomized so it is a real change of the base."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = model if model is not None else AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "modules_to_save" in name and mts_scale:
                p.add_(torch.randn(p.shape, generator=g) * mts_scale)
    peft_model.save_pretrained(out)
    return out


class Hub:
    """The test's Hub cache and the local folders each of its repositories holds."""

    def __init__(self, cache: Path, local: dict[str, Path], commits: dict[str, str]):
        self.cache = cache
        self.local = local  # repo or repo@tag -> the local folder with the same files
        self.commits = commits  # repo or repo@tag -> commit

    def pinned(self, name: str) -> str:
        return f"{name.partition('@')[0]}@{self.commits[name]}"


_BUILT: dict[str, Hub] = {}


def build_hub(root: Path, zoo: Path) -> Hub:
    """The cache: org/base at two commits (tag v1: a base whose final norm differs, so a
    merge tells which commit it read; main: the zoo's base), two zoo fine-tunes, and PEFT
    adapters: a LoRA, one with ``modules_to_save`` (lm_head), a DoRA, an IA3 and a LoRA of
    another architecture."""
    from peft import IA3Config, LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    cache, folders = root / "hub", root / "local"
    cache.mkdir(parents=True)
    folders.mkdir()
    commits, local = {}, {}
    v1 = shutil.copytree(zoo / "base", folders / "base-v1")
    rewrite_tensor(v1, "model.norm.weight", lambda x: x + 0.01)
    commits["org/base@v1"] = commit_of("org/base v1")
    add_snapshot(cache, "org/base", model_files(v1), commits["org/base@v1"], refs=("v1",))
    commits["org/base"] = commit_of("org/base main")
    readme = b"---\nlicense: mit\n---\n# base\n"
    add_snapshot(cache, "org/base", {**model_files(zoo / "base"), "README.md": readme}, commits["org/base"])
    local["org/base"], local["org/base@v1"] = zoo / "base", v1
    for task in ("add", "max"):
        repo = f"org/ft-{task}"
        commits[repo] = commit_of(f"{repo} main")
        add_snapshot(cache, repo, model_files(zoo / f"ft_{task}"), commits[repo])
        local[repo] = zoo / f"ft_{task}"
    # a pull request's ref (huggingface_hub keeps it as refs/refs/pr/1)
    commits["org/ft-max@refs/pr/1"] = commit_of("org/ft-max pr 1")
    add_snapshot(cache, "org/ft-max", model_files(zoo / "ft_max"), commits["org/ft-max@refs/pr/1"],
                 refs=("refs/pr/1",))
    targets = ["q_proj", "v_proj", "up_proj"]
    made = {
        "org/lora": (LoraConfig(r=4, lora_alpha=8, target_modules=targets), 0.0),
        "org/lora-mts": (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]), 0.02),
        "org/lora-dora": (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True), 0.0),
        "org/ia3": (IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), 0.0),
    }
    for i, (repo, (config, mts)) in enumerate(made.items()):
        made_dir = peft_adapter(zoo / "base", folders / "peft" / repo.replace("/", "--"), config, seed=i,
                                mts_scale=mts)
        commits[repo] = commit_of(f"{repo} main")
        local[repo] = local_copy(folders / repo.replace("/", "--"), adapter_files(made_dir))
        add_snapshot(cache, repo, adapter_files(made_dir), commits[repo])
    # an older commit of the LoRA that no ref names any more (downloaded by its commit)
    commits["org/lora@old"] = commit_of("org/lora old")
    add_snapshot(cache, "org/lora", adapter_files(local["org/lora"]), commits["org/lora@old"], refs=())
    # a LoRA of another Llama: hidden size 64 where the zoo's is 96
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    made_dir = peft_adapter(None, folders / "peft" / "org--lora-other",
                            LoraConfig(r=4, lora_alpha=8, target_modules=targets), seed=9, model=other)
    commits["org/lora-other"] = commit_of("org/lora-other main")
    add_snapshot(cache, "org/lora-other", adapter_files(made_dir, "org/other-base"), commits["org/lora-other"])
    # a download interrupted before the weights arrived
    commits["org/partial"] = commit_of("org/partial main")
    add_snapshot(cache, "org/partial", model_files(zoo / "ft_add"), commits["org/partial"],
                 missing=("model.safetensors",))
    # a repository that also holds what a merge never reads (Mistral's consolidated copy of the
    # weights, an original/ folder), downloaded without them: complete for a merge
    commits["org/ft-extra"] = commit_of("org/ft-extra main")
    weights = (zoo / "ft_add" / "model.safetensors").read_bytes()
    add_snapshot(cache, "org/ft-extra", {**model_files(zoo / "ft_add"), "consolidated.safetensors": weights,
                                         "original/params.json": b"{}"}, commits["org/ft-extra"],
                 missing=("consolidated.safetensors", "original/params.json"))
    # pickle weights only (older repositories): complete, and one whose download stopped before them
    from safetensors.torch import load_file
    pickle = folders / "pytorch_model.bin"
    torch.save(load_file(zoo / "ft_add" / "model.safetensors"), pickle)
    bin_files = {**{f: p for f, p in model_files(zoo / "ft_add").items() if f != "model.safetensors"},
                 "pytorch_model.bin": pickle}
    for repo, missing in (("org/ft-bin", ()), ("org/bin-partial", ("pytorch_model.bin",))):
        commits[repo] = commit_of(f"{repo} main")
        add_snapshot(cache, repo, bin_files, commits[repo], missing=missing)
    return Hub(cache, local, commits)


def hub_for(tmp_path_factory, zoo: Path) -> Hub:
    """The session's Hub cache, built once (the bad-input catalog uses it too)."""
    if "hub" not in _BUILT:
        _BUILT["hub"] = build_hub(tmp_path_factory.mktemp("hubcache"), zoo)
    return _BUILT["hub"]


def zoo_dir() -> Path:
    """The zoo, as the session fixture ``zoo`` builds it (without asking for that fixture,
    which joins every test to the session's Ray cluster)."""
    from mergesearch.zoo.build import build_zoo
    path = Path(os.environ.get("MERGESEARCH_ZOO", Path(__file__).resolve().parents[1] / "results" / "zoo"))
    build_zoo(path)
    return path


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> Hub:
    return hub_for(tmp_path_factory, zoo_dir())


@pytest.fixture
def hub(hub_cache, monkeypatch) -> Hub:
    """The cache, as this test's HF_HUB_CACHE (offline: tests/conftest.py sets HF_HUB_OFFLINE)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache.cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sources, "_RESOLVED", {})  # what this process resolved: as in a fresh one
    return hub_cache


def cache_listing(cache: Path) -> list[tuple[str, str]]:
    """Every path in the cache with what it is (a link's target): to check nothing changed."""
    return sorted((str(p.relative_to(cache)), os.readlink(p) if p.is_symlink() else p.stat().st_size if p.is_file()
                   else "dir") for p in cache.rglob("*"))


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- pinning ------------------------------------------------------------------------------

def test_pin_resolves_hub_ids_branches_tags_and_commits(hub, tmp_path, monkeypatch):
    main_c, v1 = hub.commits["org/base"], hub.commits["org/base@v1"]
    assert main_c != v1
    assert sources.pin("org/base") == f"org/base@{main_c}"
    assert sources.pin("org/base@main") == f"org/base@{main_c}"
    assert sources.pin("org/base@v1") == f"org/base@{v1}"
    assert sources.pin(f"org/base@{v1}") == f"org/base@{v1}"
    # the snapshot read is the commit's: the tag's base has its own final norm
    snap = sources.local_dir(sources.parse_part(sources.pin("org/base@v1")))
    assert snap == hub.cache / "models--org--base" / "snapshots" / v1
    assert load_weights(snap)["model.norm.weight"].equal(load_weights(hub.local["org/base@v1"])["model.norm.weight"])
    # a local path becomes absolute: relative to the file that names it, else to the working folder
    zoo = hub.local["org/base"].parent
    assert sources.pin("base", folder=zoo) == str(zoo / "base")  # a folder named base, not the keyword
    assert sources.pin("base", folder=zoo, where="tokenizer_source") == "base"  # the keyword: the merge's base
    monkeypatch.chdir(zoo)
    assert sources.pin("ft_add") == str(zoo / "ft_add")
    assert sources.pin("./ft_add") == str(zoo / "ft_add")
    # an adapter listed alone becomes BASE+ADAPTER (the base pinned already); a model stays itself
    base = sources.pin("org/base")
    assert sources.pin("org/lora", base=base) == f"{base}+org/lora@{hub.commits['org/lora']}"
    assert sources.pin(str(hub.local["org/lora"]), base=base) == f"{base}+{hub.local['org/lora']}"
    assert sources.pin("org/ft-add", base=base) == f"org/ft-add@{hub.commits['org/ft-add']}"
    assert sources.pin("org/lora") == f"org/lora@{hub.commits['org/lora']}"  # no base: the merge refuses it
    assert sources.pin("org/base@v1+org/lora") == f"org/base@{v1}+org/lora@{hub.commits['org/lora']}"
    # HF_HOME (its hub/ folder) and the older HUGGINGFACE_HUB_CACHE are honoured too, read when asked
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(hub.cache.parent))
    assert sources.pin("org/ft-max") == f"org/ft-max@{hub.commits['org/ft-max']}"
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(hub.cache))
    assert sources.pin("org/ft-add") == f"org/ft-add@{hub.commits['org/ft-add']}"
    assert sources.hub_env()["HF_HUB_CACHE"] == str(hub.cache)  # what Ray workers are given


def test_describe_records_the_revision_asked_for_and_its_commit(hub):
    v1, lora = hub.commits["org/base@v1"], hub.commits["org/lora"]
    pinned = sources.pin("org/base@v1+org/lora")
    assert sources.describe(pinned) == {"model": {"repo": "org/base", "requested": "v1", "commit": v1},
                                        "adapter": {"repo": "org/lora", "requested": "main", "commit": lora}}
    ft = hub.commits["org/ft-add"]  # asked for by its commit (or pinned already): the commit says it all
    assert sources.describe(sources.pin(f"org/ft-add@{ft}")) == {"model": {"repo": "org/ft-add", "commit": ft}}
    local = str(hub.local["org/ft-add"])
    assert sources.describe(sources.pin(local)) == {"model": {"path": local}}
    # a pinned reference read again keeps what it was first asked as
    assert sources.describe(sources.pin(pinned)) == sources.describe(pinned)
    assert sources.short(pinned) == f"+org/lora@{lora[:8]}"


# -- merges ---------------------------------------------------------------------------------

def hub_recipe(hub: Hub) -> dict:
    """Fine-tunes at a branch and a commit, and the LoRA adapter on the base's v1 tag."""
    return {"method": "task_arithmetic", "base": "org/base@v1",
            "models": [{"path": "org/ft-add", "parameters": {"weight": 0.6}},
                       {"path": f"org/ft-max@{hub.commits['org/ft-max']}", "parameters": {"weight": 0.4}},
                       {"path": "org/base@v1+org/lora", "parameters": {"weight": 0.8}}]}


def test_merge_of_hub_ids_equals_the_merge_of_local_folders(hub, tmp_path, capsys):
    before = cache_listing(hub.cache)
    L = hub.local
    r = hub_recipe(hub)
    local = {"method": "task_arithmetic", "base": str(L["org/base@v1"]),
             "models": [{"path": str(L["org/ft-add"]), "parameters": {"weight": 0.6}},
                        {"path": str(L["org/ft-max"]), "parameters": {"weight": 0.4}},
                        {"path": f"{L['org/base@v1']}+{L['org/lora']}", "parameters": {"weight": 0.8}}]}
    for name, data in (("hub", r), ("local", local)):
        code, out, err = run_cli(capsys, "merge", write(tmp_path / f"{name}.yaml", data), "-o", tmp_path / name)
        assert code == 0, err
    # the same merge from a mergekit config naming the Hub IDs
    mk = {"merge_method": "task_arithmetic", "base_model": "org/base@v1",
          "models": [{"model": m["path"], "parameters": m["parameters"]} for m in r["models"]], "dtype": "float32"}
    code, out, err = run_cli(capsys, "merge", "--mergekit", write(tmp_path / "mk.yaml", mk), "-o", tmp_path / "mk")
    assert code == 0, err
    want = load_weights(tmp_path / "local")
    for name in ("hub", "mk"):
        got = load_weights(tmp_path / name)
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want), name
    # the base read is the tag's (its final norm differs from main's), and the adapter changed q_proj
    base_main = load_weights(L["org/base"])
    v1_norm = load_weights(L["org/base@v1"])["model.norm.weight"]
    assert not torch.equal(v1_norm, base_main["model.norm.weight"])
    assert cache_listing(hub.cache) == before  # offline: nothing fetched or written


def test_modules_to_save_is_merged_as_its_full_copy(hub, tmp_path, capsys):
    """An adapter with modules_to_save (lm_head) holds a full fine-tuned copy of that tensor:
    the merge reads it as such, as PEFT's merge_and_unload does."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    r = {"method": "linear", "base": "org/base", "models": [{"path": "org/lora-mts", "parameters": {"weight": 1.0}}]}
    code, out, err = run_cli(capsys, "merge", write(tmp_path / "r.yaml", r), "-o", tmp_path / "out")
    assert code == 0, err
    got = load_weights(tmp_path / "out")
    saved = load_file(hub.local["org/lora-mts"] / "adapter_model.safetensors")["base_model.model.lm_head.weight"]
    base = load_weights(hub.local["org/base"])
    assert not torch.equal(saved, base["lm_head.weight"])
    assert torch.equal(got["lm_head.weight"], saved)  # the saved tensor, exactly
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hub.local["org/base"]),
                                     hub.local["org/lora-mts"]).merge_and_unload().state_dict()
    for k in got:
        torch.testing.assert_close(got[k], peft[k], rtol=0, atol=1e-6, msg=k)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_the_cache_lists_what_it_can_resolve(hub):
    pr = hub.commits["org/ft-max@refs/pr/1"]
    assert sources.pin("org/ft-max@refs/pr/1") == f"org/ft-max@{pr}"
    assert sources.pin(f"org/lora@{hub.commits['org/lora@old']}") == f"org/lora@{hub.commits['org/lora@old']}"
    assert sources._cached_revisions("org/base") == ["main", "v1"]
    assert sources._cached_revisions("org/ft-max") == ["main", "refs/pr/1"]
    assert sources._cached_revisions("org/lora") == ["main", hub.commits["org/lora@old"]]
    assert sources._cached_revisions("org/missing") == []


def test_a_snapshot_is_complete_with_the_files_a_merge_reads(hub, tmp_path, capsys):
    """What a merge never reads (a consolidated copy, subfolders) may be missing from a
    snapshot; a repository with pickle weights only is read through them."""
    extra = sources.pin("org/ft-extra")
    assert extra == f"org/ft-extra@{hub.commits['org/ft-extra']}"
    assert sources.pin(extra) == extra  # the pinned form, checked against the tree listing too
    assert sources.pin("org/ft-bin") == f"org/ft-bin@{hub.commits['org/ft-bin']}"
    want = load_weights(hub.local["org/ft-add"])
    for repo in ("org/ft-extra", "org/ft-bin"):
        got = load_weights(sources.model_dir(sources.pin(repo)))
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want), repo
    r = write(tmp_path / "r.yaml", {"method": "task_arithmetic", "base": "org/base", "models": [
        {"path": "org/ft-bin", "parameters": {"weight": 0.5}}, {"path": "org/ft-extra", "parameters": {"weight": 0.5}}]})
    code, out, err = run_cli(capsys, "merge", r, "-o", tmp_path / "out")
    assert code == 0, err


# -- one-line errors (docs/ERRORS.md) ------------------------------------------------------

RESOLVED = __import__("re").compile(r"\S+: resolved to commit [0-9a-f]{40}")


def refused(capsys, *argv) -> str:
    """The one error line of a refused command (the Hub resolutions before it logged aside)."""
    code, out, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if not RESOLVED.fullmatch(line)]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0][len("error: "):]


def bad_recipe(tmp: Path, base: str = "org/base", model: str = "org/ft-max") -> Path:
    return write(tmp / "r.yaml", {"method": "task_arithmetic", "base": base,
                                  "models": [{"path": "org/ft-add", "parameters": {"weight": 0.5}},
                                             {"path": model, "parameters": {"weight": 0.5}}]})


MALFORMED = "malformed Hub ID (expected org/name or org/name@revision, with letters, digits, '-', '_' and '.')"
ADVICE = "merge it into its base with PEFT (merge_and_unload) and list the result as a full fine-tune"
# case -> (recipe's base and model, the message: a function of the hub, the recipe file, the cache)
BAD_REFERENCES = {
    "unknown-revision": (("org/base@nope", "org/ft-max"), lambda h, r, c: (
        f"{r}: org/base@nope: revision 'nope' is not in the Hugging Face cache ({c}; cached: main, v1); "
        "fetch it online with `hf download org/base --revision nope`")),
    "unknown-revision-pr": (("org/base", "org/ft-max@refs/pr/2"), lambda h, r, c: (
        f"{r}: org/ft-max@refs/pr/2: revision 'refs/pr/2' is not in the Hugging Face cache ({c}; cached: main, "
        "refs/pr/1); fetch it online with `hf download org/ft-max --revision refs/pr/2`")),
    "malformed-double-slash": (("org/base", "org//x"), lambda h, r, c: f"{r}: org//x: {MALFORMED}"),
    "malformed-space": (("org/base", "org/na me"), lambda h, r, c: f"{r}: org/na me: {MALFORMED}"),
    "malformed-dashes": (("org/base", "org/a--b"), lambda h, r, c: f"{r}: org/a--b: {MALFORMED}"),
    "empty-revision": (("org/base", "org/name@"), lambda h, r, c: (
        f"{r}: org/name@: empty Hub revision after '@' (write org/name@REVISION: a branch, tag or commit, "
        "or org/name for main)")),
    "malformed-revision": (("org/base", "org/name@a..b"), lambda h, r, c: (
        f"{r}: org/name@a..b: malformed Hub revision 'a..b' (a branch, tag or commit)")),
    "not-cached-offline": (("org/base", "org/missing"), lambda h, r, c: (
        f"{r}: org/missing: not in the Hugging Face cache ({c}) and HF_HUB_OFFLINE is set; fetch it online first "
        "with `hf download org/missing`")),
    "incomplete-snapshot": (("org/base", "org/partial"), lambda h, r, c: (
        f"{r}: org/partial: the cached snapshot of org/partial at 'main' is incomplete (1 file(s) are missing "
        "(model.safetensors)); complete it online with `hf download org/partial`")),
    # pinned already (a stored recipe) to a commit whose snapshot lost a file: refused here, not by the reader
    "incomplete-snapshot-pinned": (("org/base", f"org/partial@{commit_of('org/partial main')}"), lambda h, r, c: (
        f"{r}: org/partial@{h.commits['org/partial']}: the cached snapshot of org/partial at "
        f"'{h.commits['org/partial']}' is incomplete (1 file(s) are missing (model.safetensors)); complete it online "
        f"with `hf download org/partial --revision {h.commits['org/partial']}`")),
    "incomplete-pickle-weights": (("org/base", "org/bin-partial"), lambda h, r, c: (
        f"{r}: org/bin-partial: the cached snapshot of org/bin-partial at '{h.commits['org/bin-partial']}' is "
        "incomplete (1 file(s) are missing (pytorch_model.bin)); complete it online with "
        "`hf download org/bin-partial`")),
    "adapter-other-architecture": (("org/base", "org/lora-other"), lambda h, r, c: (
        f"org/lora-other@{h.commits['org/lora-other']}: LoRA factors of 'model.layers.0.mlp.up_proj' ([128, 4] @ "
        "[4, 64]) do not make the base's 'model.layers.0.mlp.up_proj.weight' [256, 96] (an adapter for another "
        "architecture?)")),
    "adapter-dora": (("org/base", "org/lora-dora"), lambda h, r, c: (
        f"org/lora-dora@{h.commits['org/lora-dora']}: a DoRA adapter (use_dora: true)", ADVICE)),
    "adapter-ia3": (("org/base", "org/ia3"), lambda h, r, c: (
        f"org/ia3@{h.commits['org/ia3']}: a", "IA3 adapter; only LoRA adapters can be merged", ADVICE)),
}


@pytest.mark.parametrize("case", list(BAD_REFERENCES))
def test_bad_references_are_refused_in_one_line(hub, tmp_path, capsys, case):
    (base, model), message = BAD_REFERENCES[case]
    r = bad_recipe(tmp_path, base, model)
    before = cache_listing(hub.cache)
    line = refused(capsys, "merge", r, "-o", tmp_path / "out")
    want = message(hub, r, hub.cache)
    if isinstance(want, str):
        assert line == want
    else:  # key phrases, in order (the wording between them is adapter.py's)
        at = 0
        for phrase in want:
            assert phrase in line[at:], (phrase, line)
            at = line.index(phrase, at) + len(phrase)
        assert line.startswith(want[0])
    assert not (tmp_path / "out").exists()
    assert cache_listing(hub.cache) == before


def test_an_adapter_without_a_base_is_refused(hub, tmp_path, capsys):
    """A soup's ingredients have no base unless --base names one: an adapter alone is not a model."""
    zoo = hub.local["org/base"].parent
    ev = write(tmp_path / "e.yaml", {"tasks": ["add"], "task_dir": str(zoo)})
    line = refused(capsys, "soup", "org/lora", "org/ft-add", "--eval", ev, "--run", "s")
    assert line == (f"org/lora@{hub.commits['org/lora']}: a LoRA adapter needs a base model: give the space or recipe "
                    "a base (a soup: --base), or write BASE+ADAPTER")
    # and a recipe without a base (a method that needs none) says the same
    r = write(tmp_path / "r.yaml", {"method": "linear", "models": [
        {"path": "org/ft-add", "parameters": {"weight": 0.5}}, {"path": "org/lora", "parameters": {"weight": 0.5}}]})
    line = refused(capsys, "merge", r, "-o", tmp_path / "out")
    assert line.startswith(f"org/lora@{hub.commits['org/lora']}: a LoRA adapter needs a base model")
    assert not (tmp_path / "results").exists() and not (tmp_path / "out").exists()


def test_an_unreachable_hub_falls_back_to_the_cache(hub, tmp_path):
    """Online (HF_HUB_OFFLINE unset) with the Hub unreachable: cached models resolve from
    the cache's refs; a model not cached is refused in one line that says how to fetch it."""
    exe = Path(sys.executable).parent / "mergesearch"
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(hub.cache),
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens: connection refused at once
    ok = subprocess.run([str(exe), "merge", bad_recipe(tmp_path), "-o", str(tmp_path / "out")], env=env,
                        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "r.yaml").unlink()
    bad = subprocess.run([str(exe), "merge", bad_recipe(tmp_path, model="org/missing"), "-o", str(tmp_path / "o2")],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in bad.stderr.splitlines() if not RESOLVED.fullmatch(line)]
    assert bad.returncode == 2 and lines == [
        f"error: {tmp_path / 'r.yaml'}: org/missing: cannot reach the Hub and the model is not in the cache "
        f"({hub.cache}); fetch it with `hf download org/missing`"], bad.stderr


# -- plan and search -------------------------------------------------------------------------

def hub_space(hub: Hub, **over) -> dict:
    """A tiny search over Hub IDs: the base at a branch, fine-tunes at a branch and at a
    commit, and a Hub LoRA adapter listed alone (pinned to base+adapter)."""
    zoo = hub.local["org/base"].parent
    return {"base": "org/base@main",
            "models": ["org/ft-add", f"org/ft-max@{hub.commits['org/ft-max']}", "org/lora"],
            "evaluator": {"tasks": ["add"], "task_dir": str(zoo), "limit": 10},
            "methods": ["task_arithmetic"], "parameters": {"weight": {"low": 0.2, "high": 1.0}},
            "granularity": {"level": "model"}, "sampler": {"name": "random"}, "budget": {"n_trials": 2},
            "initial_trials": False, "seed": 0, **over}


def test_plan_reads_sizes_from_the_cached_headers(hub, tmp_path, capsys):
    L = hub.local
    hub_file = write(tmp_path / "hub.yaml", hub_space(hub, methods=["ties"], parameters={
        "weight": {"low": 0.2, "high": 1.0}, "density": {"low": 0.1, "high": 1.0}}))
    local_file = write(tmp_path / "local.yaml", {**yaml.safe_load(hub_file.read_text()), "base": str(L["org/base"]),
                                                 "models": [str(L["org/ft-add"]), str(L["org/ft-max"]),
                                                            str(L["org/lora"])]})
    plans = {}
    for name, f in (("hub", hub_file), ("local", local_file)):
        code, out, err = run_cli(capsys, "plan", f, "--device", "cpu", "--device-memory", "1GB", "--json")
        assert code == 0, err
        plans[name] = json.loads(out)
    paths = [i.pop("path") for i in plans["hub"]["inputs"]]
    local_paths = [i.pop("path") for i in plans["local"]["inputs"]]
    for p in plans.values():
        p.pop("bandwidth"), p.pop("predicted_s")  # measured here, each time
    assert plans["hub"] == plans["local"]  # the same sizes, tiers and scratch
    base = f"org/base@{hub.commits['org/base']}"
    assert paths == [base, f"org/ft-add@{hub.commits['org/ft-add']}", f"org/ft-max@{hub.commits['org/ft-max']}",
                     f"{base}+org/lora@{hub.commits['org/lora']}"]
    assert local_paths[3] == f"{L['org/base']}+{L['org/lora']}"
    from mergesearch.engine.checkpoint import Checkpoint
    ck = Checkpoint(L["org/base"])
    assert [i["nbytes"] for i in plans["hub"]["inputs"][:3]] == [sum(ck.numel(n) * 4 for n in ck.names())] * 3
    lora = plans["hub"]["inputs"][3]
    assert lora["adapter"] and lora["nbytes"] < plans["hub"]["inputs"][0]["nbytes"] / 10  # factors, not dense
    code, out, err = run_cli(capsys, "plan", hub_file, "--device", "cpu", "--device-memory", "1GB")
    assert code == 0 and f"{base}+org/lora@{hub.commits['org/lora']}  (LoRA factors)" in out


@pytest.mark.slow
def test_search_of_hub_ids_runs_offline_and_records_the_commits(hub, tmp_path, monkeypatch, capsys, ray_cluster):
    """A space of Hub IDs and a Hub adapter: the search, its store and its export name the
    commits each input resolved to, and the revision it was asked for. It runs on the
    session's Ray cluster, started before this test set HF_HUB_CACHE: the workers find the
    cache through the controller's settings, not their own environment."""
    import optuna

    monkeypatch.chdir(tmp_path)
    if ray_cluster:
        monkeypatch.setenv("MERGESEARCH_RAY_ADDRESS", ray_cluster)
        monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the cluster's token is in ~/.ray

    c = hub.commits
    assert main(["search", str(write(tmp_path / "hub.yaml", hub_space(hub))), "--run", "hub", "--workers", "1"]) == 0
    run = tmp_path / "results" / "hub"
    assert not ray_cluster or not (run / "ray").exists()  # it joined the cluster, no local instance
    study = optuna.load_study(study_name="hub", storage=f"sqlite:///{run / 'study.db'}")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE"]
    base = f"org/base@{c['org/base']}"
    ft_add, ft_max = f"org/ft-add@{c['org/ft-add']}", f"org/ft-max@{c['org/ft-max']}"
    lora = f"{base}+org/lora@{c['org/lora']}"
    assert study.user_attrs["sources"] == {
        base: {"model": {"repo": "org/base", "requested": "main", "commit": c["org/base"]}},
        ft_add: {"model": {"repo": "org/ft-add", "requested": "main", "commit": c["org/ft-add"]}},
        ft_max: {"model": {"repo": "org/ft-max", "commit": c["org/ft-max"]}},  # asked for by its commit
        lora: {"model": {"repo": "org/base", "requested": "main", "commit": c["org/base"]},
               "adapter": {"repo": "org/lora", "requested": "main", "commit": c["org/lora"]}},
    }
    assert study.user_attrs["space"]["base"] == base and study.user_attrs["space"]["models"] == [ft_add, ft_max, lora]
    # the export: recipe, mergekit config, scores and model card name the commits
    recipe = yaml.safe_load((run / "best_recipe.yaml").read_text())
    assert recipe["base"] == base and [m["path"] for m in recipe["models"]] == [ft_add, ft_max, lora]
    mk = yaml.safe_load((run / "best_mergekit.yaml").read_text())
    assert mk["base_model"] == base and [m["model"] for m in mk["models"]] == [ft_add, ft_max, lora]
    scores = json.loads((run / "scores.json").read_text())
    assert scores["provenance"][lora] == study.user_attrs["sources"][lora]
    assert scores["dev"]["verified"] is True
    card = (run / "model" / "README.md").read_text()
    assert f"- base: `{base}` (model from the Hub: org/base at commit {c['org/base']}, asked for as `main`)" in card
    assert (f"- `{ft_max}` (model from the Hub: org/ft-max at commit {c['org/ft-max']})") in card
    assert (f"- `{lora}` (model from the Hub: org/base at commit {c['org/base']}, asked for as `main`; adapter from "
            f"the Hub: org/lora at commit {c['org/lora']}, asked for as `main`)") in card
    # the exported weights: the merge of the same models as local folders, bit for bit
    L = hub.local
    local = yaml.safe_load((run / "best_recipe.yaml").read_text())
    local["base"] = str(L["org/base"])
    for m, p in zip(local["models"], [L["org/ft-add"], L["org/ft-max"], f"{L['org/base']}+{L['org/lora']}"]):
        m["path"] = str(p)
    assert main(["merge", str(write(tmp_path / "local.yaml", local)), "-o", str(tmp_path / "local")]) == 0
    want, got = load_weights(tmp_path / "local"), load_weights(run / "model")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    # the branch moves (main now at v1's commit): --resume refuses in one line instead of
    # continuing the run on other weights than its trials were scored on
    ref = hub.cache / "models--org--base" / "refs" / "main"
    ref.write_text(c["org/base@v1"])
    try:
        capsys.readouterr()
        err = refused(capsys, "search", tmp_path / "hub.yaml", "--run", "hub", "--workers", "1", "--resume",
                      "--n-trials", "3")
        assert err == (f"{tmp_path / 'hub.yaml'}: org/base@{c['org/base@v1']} is not the {base} that run "
                       "'hub' started with (a branch moved?); name that revision in the space to resume")
    finally:
        ref.write_text(c["org/base"])


def test_offline_when_huggingface_hub_was_imported_offline(hub, tmp_path):
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: unset later, it stays offline,
    and the refusal says so rather than blaming the network."""
    code = ("import os, huggingface_hub.constants; del os.environ['HF_HUB_OFFLINE']\n"
            "from mergesearch import sources\n"
            "print(sources.pin('org/base'))\n"
            "print(sources.hub_env()['HF_HUB_OFFLINE'])\n"
            "sources.pin('org/missing')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub.cache)}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert p.stdout.split() == [f"org/base@{hub.commits['org/base']}", "1"], p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"mergesearch.errors.MergeSearchError: org/missing: not in the Hugging Face cache ({hub.cache}) and "
        "huggingface_hub is offline (HF_HUB_OFFLINE was set when it was imported); fetch it online first with "
        "`hf download org/missing`")


def test_a_soup_refuses_one_commit_given_twice(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    zoo = hub.local["org/base"].parent
    ev = write(tmp_path / "ev.yaml", {"tasks": ["add"], "task_dir": str(zoo), "split": "dev", "limit": 10})
    err = refused(capsys, "soup", "org/ft-add", "org/ft-add@main", "org/ft-max", "--eval", ev, "--base", "org/base")
    assert err == (f"org/ft-add@main: the same model as ingredient org/ft-add "
                   f"(org/ft-add@{hub.commits['org/ft-add']})")
    assert not (tmp_path / "results").exists()
