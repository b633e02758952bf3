"""`mergesearch merge` refuses bad input: one line naming the file and the problem,
exit code 2, nothing at the output path."""

import errno
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mergesearch.engine import compat
from mergesearch.engine import writer
from mergesearch.cli import main

from conftest import copy_model, edit_config, rewrite_tensor


def run(args, capsys):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_refused(tmp_path, capsys, recipe, expect, *extra):
    out = tmp_path / "out"
    code, err = run(["merge", recipe, "-o", out, *extra], capsys)
    lines = [l for l in err.splitlines() if not l.startswith("merging")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for e in expect:
        assert e in lines[0], lines[0]
    assert not out.exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())
    return lines[0]


def models(*paths, **params):
    return [{"path": str(p), "parameters": {"weight": 0.5, **params}} for p in paths]


def test_missing_path(tmp_path, capsys, recipe_file, family):
    missing = tmp_path / "nope"
    r = recipe_file(method="task_arithmetic", models=models(family["ft0"], missing))
    assert_refused(tmp_path, capsys, r, [str(missing), "no such file or directory"])


def test_folder_that_is_not_a_model(tmp_path, capsys, recipe_file, family):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    r = recipe_file(method="task_arithmetic", models=models(family["ft0"], empty))
    assert_refused(tmp_path, capsys, r, [str(empty), "not a model folder"])


def test_corrupt_safetensors_header(tmp_path, capsys, recipe_file, family):
    bad = copy_model(family["ft1"], tmp_path / "bad")
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:8] + b"{not json" + data[17:])
    r = recipe_file(method="task_arithmetic", models=models(family["ft0"], bad))
    assert_refused(tmp_path, capsys, r, [str(f), "corrupt safetensors header"])


def test_truncated_safetensors(tmp_path, capsys, recipe_file, family):
    bad = copy_model(family["ft1"], tmp_path / "bad")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    r = recipe_file(method="task_arithmetic", models=models(bad))
    assert_refused(tmp_path, capsys, r, [str(f), "corrupt safetensors header", "past the end"])


def test_shape_mismatch(tmp_path, capsys, recipe_file, family):
    bad = copy_model(family["ft1"], tmp_path / "bad")
    rewrite_tensor(bad, "model.layers.1.mlp.up_proj.weight", lambda t: t[:-1].clone())
    r = recipe_file(method="ties", models=models(family["ft0"], bad, density=0.5))
    assert_refused(tmp_path, capsys, r, [str(bad), "shape mismatch", "model.layers.1.mlp.up_proj.weight"])


def test_vocab_size_mismatch(tmp_path, capsys, recipe_file, family):
    bad = copy_model(family["ft1"], tmp_path / "bad")
    edit_config(bad, vocab_size=130)
    r = recipe_file(method="ties", models=models(bad, density=0.5))
    assert_refused(tmp_path, capsys, r, [str(bad), "vocab size 130"])


def test_tokenizer_vocabulary_mismatch(tmp_path, capsys, recipe_file, family):
    import json
    bad = copy_model(family["ft1"], tmp_path / "bad")
    tj = json.loads((bad / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    r = recipe_file(method="ties", models=models(bad, density=0.5))
    assert_refused(tmp_path, capsys, r, [str(bad), "tokenizer vocabulary differs"])


def test_different_architecture(tmp_path, capsys, recipe_file, family):
    bad = copy_model(family["ft1"], tmp_path / "bad")
    edit_config(bad, architectures=["MistralForCausalLM"], model_type="mistral")
    r = recipe_file(method="ties", models=models(bad, density=0.5))
    assert_refused(tmp_path, capsys, r, [str(bad), "architecture MistralForCausalLM differs"])


def test_unrelated_base(tmp_path, capsys, recipe_file, family, other_family):
    r = recipe_file(method="ties", models=models(family["ft0"], other_family["ft0"], density=0.5))
    msg = assert_refused(tmp_path, capsys, r, [str(other_family["ft0"]), "not a fine-tune of", "--allow-unrelated"])
    assert "relative distance 1." in msg  # independently initialised: about sqrt(2)
    # the override lets it through
    code, _ = run(["merge", r, "-o", tmp_path / "out", "--allow-unrelated"], capsys)
    assert code == 0 and (tmp_path / "out" / "model.safetensors").exists()


def test_nan_weights(tmp_path, capsys, recipe_file, family):
    bad = copy_model(family["ft1"], tmp_path / "bad")
    rewrite_tensor(bad, "model.layers.3.self_attn.v_proj.weight", lambda t: t.index_fill(0, torch.tensor([2]), float("nan")))
    r = recipe_file(method="ties", models=models(family["ft0"], bad, density=0.5))
    assert_refused(tmp_path, capsys, r, [str(bad), "model.layers.3.self_attn.v_proj.weight", "NaN or Inf"])


def test_inf_weights_found_in_streamed_pass(tmp_path, capsys, recipe_file, family, monkeypatch):
    # beyond the pre-check sample, the streamed pass still refuses non-finite inputs
    monkeypatch.setattr(compat, "CHECK_SAMPLE_ELEMENTS", 1)
    bad = copy_model(family["ft1"], tmp_path / "bad")
    rewrite_tensor(bad, "model.layers.0.self_attn.q_proj.weight", lambda t: t.index_fill(0, torch.tensor([0]), float("inf")))
    r = recipe_file(method="task_arithmetic", models=models(family["ft0"], bad))
    assert_refused(tmp_path, capsys, r, [str(bad), "model.layers.0.self_attn.q_proj.weight", "NaN or Inf"])


def test_unknown_method(tmp_path, capsys, recipe_file):
    r = recipe_file(method="frankenmerge")
    assert_refused(tmp_path, capsys, r, [str(r), "unknown merge method 'frankenmerge'"])


def test_unknown_parameter(tmp_path, capsys, recipe_file, family):
    r = recipe_file(method="ties", models=models(family["ft0"], density=0.5, dencity=0.3))
    assert_refused(tmp_path, capsys, r, [str(r), "models[0].parameters.dencity", "unknown parameter"])


def test_out_of_range_parameter(tmp_path, capsys, recipe_file, family):
    r = recipe_file(method="ties", models=models(family["ft0"], density=[0.5, 1.5]))
    assert_refused(tmp_path, capsys, r, [str(r), "density", "1.5", "outside its valid range"])


def test_unknown_recipe_key(tmp_path, capsys, recipe_file):
    r = recipe_file(method="ties", merge_method="ties")
    assert_refused(tmp_path, capsys, r, [str(r), "unknown key 'merge_method'"])


def test_bad_value_type(tmp_path, capsys, recipe_file, family):
    r = recipe_file(method="ties", models=models(family["ft0"], density="lots"))
    assert_refused(tmp_path, capsys, r, [str(r), "models.0.parameters.density"])


def test_slerp_needs_two_models(tmp_path, capsys, recipe_file, family):
    r = recipe_file(method="slerp", models=[{"path": str(family["ft0"])}, {"path": str(family["ft1"])}],
                    parameters={"t": 0.5})
    assert_refused(tmp_path, capsys, r, [str(r), "slerp merges exactly 2 models", "got 3"])


def test_missing_required_parameter(tmp_path, capsys, recipe_file, family):
    r = recipe_file(method="ties", models=[{"path": str(family["ft0"]), "parameters": {"density": 0.5}}])
    assert_refused(tmp_path, capsys, r, [str(r), "needs parameter 'weight'"])


def test_output_exists_without_force(tmp_path, capsys, recipe_file):
    r = recipe_file(method="ties")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run(["merge", r, "-o", out], capsys)
    assert code == 2 and err == f"error: {out}: output path exists (pass --force to replace it)"
    assert (out / "keep.txt").read_text() == "precious"
    code, _ = run(["merge", r, "-o", out, "--force"], capsys)
    assert code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


class FullDisk(io.FileIO):
    budget = 50_000

    def write(self, b):
        FullDisk.budget -= len(memoryview(b).cast("B"))
        if FullDisk.budget < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


def test_write_fails_midway(tmp_path, capsys, recipe_file, monkeypatch):
    def fake_open(path, mode="r", *a, **k):
        if mode == "wb" and str(path).endswith(".safetensors"):
            return FullDisk(path, "wb")
        return open(path, mode, *a, **k)
    monkeypatch.setattr(writer, "open", fake_open, raising=False)
    r = recipe_file(method="ties")
    assert_refused(tmp_path, capsys, r, [str(tmp_path / "out"), "write failed", "No space left on device"])


def test_existing_output_survives_failed_forced_merge(tmp_path, capsys, recipe_file, family):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    r = recipe_file(method="ties", models=models(family["ft0"], tmp_path / "missing", density=0.5))
    code, err = run(["merge", r, "-o", out, "--force"], capsys)
    assert code == 2 and (out / "keep.txt").read_text() == "old"


def test_cli_exit_code_in_real_process(tmp_path, recipe_file):
    r = recipe_file(method="frankenmerge")
    exe = Path(sys.executable).parent / "mergesearch"
    p = subprocess.run([str(exe), "merge", str(r), "-o", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"error: {r}: unknown merge method 'frankenmerge' (known: "
                                             "arcee_fusion, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, "
                                             "della, della_linear, fisher, gradient_matching, iso_c, iso_cts, karcher, "
                                             "linear, model_stock, multislerp, nearswap, nuslerp, passthrough, "
                                             "preconditioned, ram, ramplus_tl, regmean, sce, slerp, task_arithmetic, "
                                             "ties, tsv)"]
