"""scripts/rehearsal_gpu.py end to end on the CPU with the tiny shape: every phase runs as
on a GPU machine (a generated family, plan, a 2-worker search with rungs and a refinement
with rows, the export, the staging bandwidth), its figures land in $OUT/rehearsal.json,
and a phase that runs out of time is recorded as such, the phases before it kept."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import own_ray_env

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rehearsal_gpu.py"
TINY = ["--shape", "tiny", "--items", "90", "--trials", "8", "--refine-steps", "3"]


def _run(tmp_path: Path, name: str, *extra: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    out, work = tmp_path / f"{name}-out", tmp_path / f"{name}-work"
    env = {**own_ray_env(), "OUT": str(out), "CI": "true"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    r = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--work", str(work), *extra], env=env,
                       capture_output=True, text=True, timeout=600)
    return r, out, work


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_rehearsal_tiny_end_to_end(tmp_path):
    r, out, work = _run(tmp_path, "full", "--keep")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "rehearsal.json").read_text())
    assert list(doc["phases"]) == ["generate", "plan", "search", "export", "staging"]
    for name, p in doc["phases"].items():
        assert p["status"] == "ok" and _positive(p["wall_s"]), (name, p)
        assert (out / f"{name}.log").exists()
        assert p["memory"]["host_used_peak"] > 0
    assert doc["phases"]["generate"]["models"] == 5 and _positive(doc["phases"]["generate"]["bytes"])
    assert _positive(doc["phases"]["plan"]["predicted_s"])
    f = doc["figures"]
    assert f["scored_on"] == ["cpu"] and f["states"].get("COMPLETE", 0) >= 2
    for value in (f["merge_s"]["median"], f["merge_bound_s"], f["merge_vs_bound"], f["eval_s_per_item"],
                  f["refine_step_s"], f["plan_memory"]["device_per_worker"]):
        assert _positive(value), f
    assert f["refine"][0]["state"] == "COMPLETE" and f["refine"][0]["steps"] >= 1
    # the CPU budget leaves the fine-tunes on the host, staged as on a GPU
    assert f["plan_memory"]["resident"] == ["base"] and len(f["plan_memory"]["host"]) == 4
    assert f["memory_attrs"] == "not recorded" or isinstance(f["memory_attrs"], dict)
    st = doc["staging"]
    assert _positive(st["bytes_per_s"]) and all(_positive(x["bytes_per_s"]) for x in st["runs"])
    assert [x["threads"] for x in st["runs"]][0] == 1 and len(st["runs"]) == 2
    # the space as the GPU machine gets it, but without GPU fields here
    import yaml
    space = yaml.safe_load((out / "space.yaml").read_text())
    assert space["methods"] == ["ties"] and space["refine"]["rows"] is True and space["fidelity"]["rungs"][-1] == 1.0
    assert "gpus_per_worker" not in space["resources"] and space["resources"]["stream"] == "copy"
    # the summary names every figure
    text = (out / "summary.txt").read_text()
    for word in ("candidate merge", "x the bound", "per item", "a step", "staging", "export: ok"):
        assert word in text, text
    # the export loads, and its weights give finite logits
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(doc["phases"]["export"]["model"])
    cfg = json.loads((Path(doc["phases"]["export"]["model"]) / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0 and cfg["tie_word_embeddings"] and cfg["num_key_value_heads"] == 2
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 12]])).logits
    assert torch.isfinite(logits).all()
    assert (out / "scores.json").exists()


@pytest.mark.slow
def test_a_phase_out_of_time_keeps_the_phases_before_it(tmp_path):
    r, out, work = _run(tmp_path, "short", "--timeout", "search=4")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "rehearsal.json").read_text())
    ph = doc["phases"]
    assert ph["generate"]["status"] == "ok" and ph["plan"]["status"] == "ok" and _positive(ph["plan"]["predicted_s"])
    assert ph["search"]["status"] == "timeout" and ph["search"]["timeout_s"] == 4
    assert 4 <= ph["search"]["wall_s"] < 60
    assert ph["export"]["status"] == "skipped"
    assert ph["staging"]["status"] == "ok"  # it needs only the family
    assert (out / "plan.json").exists() and "timeout" in (out / "summary.txt").read_text()
    assert not work.exists()  # cleaned up without --keep
    # the search's process group (its Ray processes with it) is gone
    deadline = time.time() + 30
    while time.time() < deadline:
        ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
        left = [line for line in ps.splitlines() if str(work) in line and str(os.getpid()) != line.split()[0]]
        if not left:
            break
        time.sleep(1)
    assert not left, left


@pytest.mark.slow
def test_a_refinement_the_device_cannot_hold_is_the_refusal_the_fallback_reads(tmp_path):
    """The rehearsal's fallback: a search refused in one line for its refinement's memory
    (as the 3B family's is on half a GPU: 47.6 GB planned with nothing held, against 39.5 GB) is recognised,
    and the space is written again without the refinement, the rest unchanged."""
    import yaml
    sys.path.insert(0, str(SCRIPT.parent))
    import rehearsal_gpu as R
    from mergesearch.engine.plan import make_plan
    work = tmp_path / "w"
    env = {**own_ray_env(), "CI": "true"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--items", "60", "--work", str(work),
                        "--step", "generate"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    fam = work / "family"
    reserve = 4096  # no room for the refinement's float32 copies
    p = make_plan(str(fam / "base"), [str(fam / f"ft{k}") for k in range(4)], ["linear", "task_arithmetic", "ties"],
                  stream="copy", eval_dtype="bfloat16", eval_reserve=reserve,
                  bandwidth={"device": 1.0, "link": 1.0, "source": "test"})
    space = yaml.safe_load((work / "space.yaml").read_text())
    space["resources"] = {"device_memory": p.budget_for(1), "eval_memory": reserve, "stream": "copy"}
    (work / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    log = tmp_path / "search.log"
    with open(log, "w") as f:
        r = subprocess.run(R.cli("search", "space.yaml", "--run", "x", "--workers", "1", "--no-export"), cwd=work,
                           env=env, stdout=f, stderr=subprocess.STDOUT, timeout=300)
    assert r.returncode == 2, log.read_text()[-2000:]
    refused = R._refused(log)
    assert refused is not None and "refine" in refused, log.read_text()[-2000:]
    R._without_refine(work / "space.yaml", work / "space_norefine.yaml")
    without = yaml.safe_load((work / "space_norefine.yaml").read_text())
    assert "refine" not in without and without["resources"] == space["resources"]
    assert {k: v for k, v in without.items() if k != "refine"} == {k: v for k, v in space.items() if k != "refine"}
    # on a GPU the first fallback keeps the refinement and gives one worker the whole GPU
    R._whole_gpu(work / "space.yaml", work / "space_wholegpu.yaml")
    whole = yaml.safe_load((work / "space_wholegpu.yaml").read_text())
    assert whole["refine"] == space["refine"] and whole["resources"] == {**space["resources"], "gpus_per_worker": 1}
    assert {k: v for k, v in whole.items() if k != "resources"} == {k: v for k, v in space.items() if k != "resources"}
