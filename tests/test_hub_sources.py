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
from mergesearch.engine import sources

from conftest import load_weights, own_ray_env, rewrite_tensor

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json")


def commit_of(label: str) -> str:
    """A fixed 40-hex commit for a label (as the Hub's git commits look)."""
    return hashlib.sha1(label.encode()).hexdigest()


def add_snapshot(cache: Path, repo: str, files: dict[str, Path | bytes], commit: str, refs=("main",)) -> Path:
    """One commit of ``repo`` in the cache, as huggingface_hub leaves it after a download:
    each file a blob named by its sha256 under ``blobs/``, the snapshot's files relative
    symlinks to them, and each ref (a branch or tag name) a file holding the commit."""
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
    return snap


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
    # a LoRA of another Llama: hidden size 64 where the zoo's is 96
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    made_dir = peft_adapter(None, folders / "peft" / "org--lora-other",
                            LoraConfig(r=4, lora_alpha=8, target_modules=targets), seed=9, model=other)
    commits["org/lora-other"] = commit_of("org/lora-other main")
    add_snapshot(cache, "org/lora-other", adapter_files(made_dir, "org/other-base"), commits["org/lora-other"])
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
    # HF_HOME (its hub/ folder) is honoured too, read when asked
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(hub.cache.parent))
    assert sources.pin("org/ft-max") == f"org/ft-max@{hub.commits['org/ft-max']}"


def test_describe_records_the_revision_asked_for_and_its_commit(hub):
    v1, lora = hub.commits["org/base@v1"], hub.commits["org/lora"]
    pinned = sources.pin("org/base@v1+org/lora")
    assert sources.describe(pinned) == {"model": {"repo": "org/base", "requested": "v1", "commit": v1},
                                        "adapter": {"repo": "org/lora", "requested": "main", "commit": lora}}
    ft = hub.commits["org/ft-add"]
    assert sources.describe(sources.pin(f"org/ft-add@{ft}")) == {
        "model": {"repo": "org/ft-add", "requested": ft, "commit": ft}}
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
