"""Security: weights through safetensors, pickle only with weights_only, YAML only
with safe_load, no model code unless asked for, user code marked as such."""

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest

from mergesearch.cli import main

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "mergesearch").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))


def test_source_loads_only_safely():
    for f in SOURCES:
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{f}: {m.group(0)}"
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(", text), f
        assert not re.search(r"^\s*import pickle|pickle\.loads?\(", text, re.M), f
        for m in re.finditer(r"trust_remote_code=([A-Za-z_.]+)", text):
            assert m.group(1) != "True", f"{f}: {m.group(0)}"
    # every loader of a user's model says what it does about model code
    for f in sorted((ROOT / "mergesearch").rglob("*.py")):
        for m in re.finditer(r"from_pretrained\(([^)]*)\)", f.read_text()):
            assert "trust_remote_code=" in m.group(1), f"{f}: {m.group(0)}"


class Boom:
    def __reduce__(self):
        import os
        return (os.system, ("touch " + str(Boom.marker),))


def test_pickle_weights_that_run_code_are_refused(tmp_path, family, capsys):
    Boom.marker = tmp_path / "pwned"
    bad = tmp_path / "bad"
    shutil.copytree(family["ft0"], bad)
    (bad / "model.safetensors").unlink()
    with open(bad / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": Boom()}, f)
    r = tmp_path / "r.yaml"
    r.write_text(json.dumps({"method": "linear", "models": [{"path": str(family["ft0"]), "parameters": {"weight": 1}},
                                                            {"path": str(bad), "parameters": {"weight": 1}}]}))
    assert main(["merge", str(r), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{bad / 'pytorch_model.bin'}: cannot load pickle weights safely" in err
    assert not Boom.marker.exists() and not (tmp_path / "out").exists()


def test_model_code_runs_only_with_trust_remote_code(tmp_path, family, capsys):
    marker = tmp_path / "imported"
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"context": "ab", "choices": ["c", "d"], "answer": 0}) + "\n")

    def custom(name, model_type):
        m = tmp_path / name
        shutil.copytree(family["ft0"], m)
        cfg = json.loads((m / "config.json").read_text())
        cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
        cfg["model_type"] = model_type
        (m / "config.json").write_text(json.dumps(cfg))
        (m / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
        return m

    # a known architecture that also ships code: the built-in class is used, the code never runs
    m = custom("known", "llama")
    assert main(["eval", str(m), "--tasks", str(data), "--out", str(tmp_path / "e1.json")]) == 0
    assert not marker.exists()
    # an architecture only its own code defines: refused without --trust-remote-code
    m = custom("unknown", "evilnet")
    capsys.readouterr()
    assert main(["eval", str(m), "--tasks", str(data), "--out", str(tmp_path / "e2.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {m}: cannot load model: it needs its own Python code (auto_map); "
                   "pass --trust-remote-code (or trust_remote_code: true) if you trust it")
    assert not marker.exists() and not (tmp_path / "e2.json").exists()


def test_python_evaluator_says_it_runs_user_code(tmp_path, caplog, monkeypatch):
    from mergesearch.evaluate import EvalConfig, build_evaluator
    (tmp_path / "security_probe_score.py").write_text("def score(model, tok, **kw):\n    return {'x': 1.0}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "security_probe_score", raising=False)
    with caplog.at_level("WARNING"):
        build_evaluator(EvalConfig(evaluator="python", tasks=["x"], function="security_probe_score:score"))
    assert "python evaluator: importing and running user code 'security_probe_score:score'" in caplog.text


def test_a_loaded_model_keeps_transformers_warnings(family, capsys, monkeypatch):
    """transformers' warnings are held back while a model loads (a refused model gets our
    one error line only) and written once it has loaded; its handlers are restored."""
    import transformers
    import transformers.utils.logging as tl

    from mergesearch.engine.models import load_model

    original = transformers.AutoTokenizer.from_pretrained

    def warn_then_load(*a, **k):
        tl.get_logger("transformers.tokenization_utils_base").warning("a warning while loading")
        assert "a warning while loading" not in capsys.readouterr().err  # held back
        return original(*a, **k)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", warn_then_load)
    # with transformers' warnings on (the CLI's quiet_libraries(), which earlier tests in
    # this process call, leaves only its errors)
    level = tl.get_verbosity()
    tl.set_verbosity_warning()
    try:
        before = list(tl.get_logger("transformers").handlers)
        capsys.readouterr()
        load_model(family["ft0"])
        assert tl.get_logger("transformers").handlers == before
        assert capsys.readouterr().err.count("a warning while loading") == 1
    finally:
        tl.set_verbosity(level)
