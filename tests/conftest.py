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

from mergesearch.zoo.synthetic import make_family  # noqa: E402


class _CurrentStderr:
    """Whatever sys.stderr is now (pytest swaps it per test)."""

    def write(self, s):
        return __import__("sys").stderr.write(s)

    def flush(self):
        __import__("sys").stderr.flush()


def _transformers_logs_to_the_current_stderr() -> None:
    # transformers binds its log handler to sys.stderr when first used, in this process a
    # test's captured stream that is closed later: every later warning of its would print
    # "--- Logging error ---" into the stderr another test reads
    import transformers.utils.logging as tl

    tl._configure_library_root_logger()
    if tl._default_handler is not None:
        tl._default_handler.setStream(_CurrentStderr())


_transformers_logs_to_the_current_stderr()


RAY_ENV = ("MERGESEARCH_RAY_ADDRESS", "RAY_AUTH_MODE")


def own_ray_env(env: dict | None = None) -> dict:
    """The environment for a CLI run in a subprocess that starts its own local Ray (the
    process and crash tests look at that instance's processes)."""
    env = dict(os.environ if env is None else env)
    for k in RAY_ENV:
        env.pop(k, None)
    return env


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the session's in-process runs. Each run joins it through
    MERGESEARCH_RAY_ADDRESS (the cluster path of ``ray_session``) instead of starting and
    stopping an instance of its own, which saves about 4 s a run. Runs in subprocesses
    still start their own (:func:`own_ray_env`)."""
    import re
    import signal
    import subprocess
    import sys
    import time

    temp = Path(__import__("tempfile").mkdtemp(prefix="msray-tests-", dir="/tmp"))
    exe = Path(sys.executable).parent / "ray"
    out = subprocess.run([str(exe), "start", "--head", "--num-cpus=2", "--num-gpus=0", "--port=0",
                          "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                         capture_output=True, text=True, env=own_ray_env(), timeout=120)
    found = re.search(r"--address='([^']+)'", out.stdout + out.stderr)
    if out.returncode != 0 or not found:
        raise RuntimeError(f"ray start failed: {(out.stdout + out.stderr)[-2000:]}")
    address = found.group(1)
    probe = subprocess.run([sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1]); ray.shutdown()",
                            address], capture_output=True, text=True, timeout=120,
                           env={**own_ray_env(), "MERGESEARCH_RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"})
    try:
        if probe.returncode != 0:  # each run then starts a local instance of its own, as users' runs do
            import warnings
            warnings.warn(f"the session's Ray cluster cannot be joined: {probe.stderr.strip()[-300:]}")
            address = None
        yield address
    finally:
        # stop this cluster's processes only (`ray stop` would stop every cluster here)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
            pids = [int(line.split(None, 1)[0]) for line in ps.splitlines() if str(temp) in line]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if not pids:
                break
            time.sleep(2)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _join_the_session_ray(request, monkeypatch):
    """Tests on the zoo run searches and soups in this process: they join the session's
    cluster."""
    if "zoo" in request.fixturenames:
        address = request.getfixturevalue("ray_cluster")
        if address:
            monkeypatch.setenv("MERGESEARCH_RAY_ADDRESS", address)
            monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the cluster's token is in ~/.ray
    yield


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
    from mergesearch.engine.checkpoint import Checkpoint
    c = Checkpoint(folder)
    return {n: c.get(n).clone() for n in c.names()}
