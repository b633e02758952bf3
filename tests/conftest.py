import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# curvature estimates are cached per session, never in the user's cache
os.environ["MERGESEARCH_CACHE"] = __import__("tempfile").mkdtemp(prefix="mergesearch-cache-")

from mergesearch.synthetic import make_family  # noqa: E402


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """A float32 tiny Llama family: base + 3 fine-tunes (4 layers, hidden 64)."""
    return make_family(tmp_path_factory.mktemp("family"), n_models=3, noise=0.01, seed=1, init_std=0.1)


@pytest.fixture(scope="session")
def other_family(tmp_path_factory) -> dict[str, Path]:
    """Same shapes, independently initialised: unrelated to ``family``."""
    return make_family(tmp_path_factory.mktemp("other"), n_models=1, noise=0.01, seed=99, init_std=0.1)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **updates) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(updates)
    (folder / "config.json").write_text(json.dumps(cfg))


def rewrite_tensor(folder: Path, name: str, fn) -> None:
    from safetensors.torch import load_file, save_file
    f = folder / "model.safetensors"
    sd = load_file(f)
    sd[name] = fn(sd[name])
    save_file(sd, f, metadata={"format": "pt"})


@pytest.fixture
def recipe_file(tmp_path, family):
    def make(method="ties", models=None, parameters=None, **extra):
        import yaml
        models = models if models is not None else [
            {"path": str(family["ft0"]), "parameters": {"weight": 0.5, "density": 0.5}},
            {"path": str(family["ft1"]), "parameters": {"weight": 0.3, "density": 0.7}},
        ]
        data = {"method": method, "base": str(family["base"]), "models": models,
                "parameters": parameters or {}, **extra}
        p = tmp_path / f"recipe-{method}.yaml"
        p.write_text(yaml.safe_dump(data))
        return p
    return make


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from mergesearch.checkpoint import Checkpoint
    c = Checkpoint(folder)
    return {n: c.get(n).clone() for n in c.names()}
