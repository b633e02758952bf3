"""The placement plan: sizes from headers, tiers under a budget, refusals, `mergesearch plan`."""

import json

import pytest
import yaml

from mergesearch.cli import main
from mergesearch.errors import MergeSearchError
from mergesearch.engine.plan import GB, make_plan, parse_size
from mergesearch.zoo.synthetic import shaped_family
from test_zoo_eval import zoo  # noqa: F401  (session fixture)

BW = {"device": 2.0e12, "link": 2.5e10, "source": "test"}


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory):
    """An 8B-Llama-shaped bf16 family with 4 fine-tunes: headers only (sparse files)."""
    return shaped_family(tmp_path_factory.mktemp("shaped"), n_models=4)


def space_file(tmp_path, fam, **extra) -> str:
    (tmp_path / "data" / "t").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "t" / "dev.jsonl").write_text(json.dumps({"context": "a", "choices": ["b", "c"],
                                                                   "answer": 0}) + "\n")
    data = {"base": str(fam["base"]), "models": [str(fam[f"ft{i}"]) for i in range(len(fam) - 1)],
            "evaluator": {"tasks": ["t"], "task_dir": str(tmp_path)}, "methods": ["ties"],
            "parameters": {"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.1, "high": 1.0}},
            "dtype": "bfloat16", **extra}
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_sizes_come_from_headers(family):
    from mergesearch.engine.checkpoint import Checkpoint
    p = make_plan(str(family["base"]), [str(family["ft0"]), str(family["ft1"])], ["ties"], bandwidth=BW)
    c = Checkpoint(family["base"])
    floats = [n for n in c.names() if c.dtype(n).is_floating_point]
    assert p.inputs[0].nbytes == sum(c.get(n).numel() * 4 for n in floats)
    assert [i.key for i in p.inputs] == ["base", "m0", "m1"]
    assert p.eval_bytes == sum(c.get(n).numel() * 4 for n in c.names())  # float32, as stored
    big = max(floats, key=c.numel)
    assert p.largest == (big, c.numel(big))
    # the evaluation model in bf16 is half the size
    half = make_plan(str(family["base"]), [str(family["ft0"])], ["ties"], eval_dtype="bfloat16", bandwidth=BW)
    assert half.eval_bytes == p.eval_bytes // 2 and half.eval_dtype == "bfloat16"


def test_llama_8b_with_four_finetunes_fits_an_80gb_device(llama8b):
    p = make_plan(str(llama8b["base"]), [str(llama8b[f"ft{i}"]) for i in range(4)], ["ties", "task_arithmetic"],
                  device="cuda", budget=parse_size("80GB"), bandwidth=BW)
    n_params = 8_030_261_248  # Llama 3 8B
    assert p.eval_bytes == 2 * n_params and all(i.nbytes == 2 * n_params for i in p.inputs)
    assert p.stream == "copy" and p.device_bytes <= 80 * GB
    assert p.resident[0] == "base" and len(p.resident) + len(p.host) == 5
    assert p.moved_per_candidate == sum(p.input(k).nbytes for k in p.host)
    # copies overlap the merge: the prediction is the slower of the two
    assert p.predicted_s == pytest.approx(max(p.moved_per_candidate / BW["link"], p.predicted_s))
    assert p.predicted_s >= p.moved_per_candidate / BW["link"]
    # with room for everything, nothing moves
    big = make_plan(str(llama8b["base"]), [str(llama8b[f"ft{i}"]) for i in range(4)], ["ties"], device="cuda",
                    budget=parse_size("1TB"), bandwidth=BW)
    assert big.host == [] and big.moved_per_candidate == 0 and big.staging == 0


def test_a_budget_below_the_evaluation_model_is_refused_with_the_sizes(llama8b):
    with pytest.raises(MergeSearchError) as e:
        make_plan(str(llama8b["base"]), [str(llama8b["ft0"])], ["ties"], device="cuda", budget=parse_size("24GB"),
                  bandwidth=BW)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("device memory: the evaluation model (16.06 GB, bfloat16)")
    assert msg.endswith("more than the budget of 24.00 GB (declared)")


def test_plan_command_prints_and_writes_json(tmp_path, llama8b, capsys):
    space = space_file(tmp_path, llama8b)
    assert main(["plan", space, "--device-memory", "80GB", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "device cuda: budget 80.00 GB (declared)" in out and "evaluation model          16.06 GB" in out
    assert "per candidate: reads" in out and "predicted" in out
    assert main(["plan", space, "--device-memory", "80GB", "--device", "cuda", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["budget"] == 80 * 10**9 and data["tiers"]["device"] <= data["budget"]
    assert data["resident"][0] == "base" and len(data["resident"]) + len(data["host"]) == 5
    assert data["moved_per_candidate"] > 0 and data["predicted_s"] > 0
    # too small a budget: one line, exit 2, before anything starts
    assert main(["plan", space, "--device-memory", "20GB", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "more than the budget of 20.00 GB" in err
    assert main(["plan", space, "--device-memory", "lots"]) == 2
    assert "--device-memory: cannot parse 'lots'" in capsys.readouterr().err


def test_search_refuses_before_ray_starts(tmp_path, family, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fam = {"base": family["base"], "ft0": family["ft0"], "ft1": family["ft1"]}
    space = space_file(tmp_path, fam, dtype=None)
    assert main(["search", space, "--run", "tiny", "--device-memory", "100kB"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "more than the budget of 100.00 kB (declared)" in err
    assert not (tmp_path / "results" / "tiny").exists()  # no run folder, no Ray temp dir


@pytest.mark.parametrize("resources,message", [
    ({"gpus_per_worker": 1.5}, "use a fraction below 1 or a whole number"),
    ({"device_memory": "eighty"}, "resources.device_memory: cannot parse 'eighty'"),
    ({"stream": "teleport"}, "resources.stream"),
    ({"device_memory": 0}, "resources.device_memory: must be positive"),
])
def test_bad_resources(tmp_path, family, capsys, resources, message):
    fam = {"base": family["base"], "ft0": family["ft0"]}
    space = space_file(tmp_path, fam, resources=resources)
    assert main(["plan", space]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "space.yaml" in err


def test_parse_size():
    assert parse_size("80GB") == 80 * 10**9 and parse_size("80GiB") == 80 * 1024**3
    assert parse_size("512MiB") == 512 * 1024**2 and parse_size("1.5e9") == 1_500_000_000
    assert parse_size(4096) == 4096
    with pytest.raises(MergeSearchError, match="must be positive"):
        parse_size("0")


def test_plan_command_shows_the_refinement_it_would_run(tmp_path, zoo, capsys):
    """A space with a refine section: `mergesearch plan` prints the refinement's planned
    bytes and the sizes chosen under the budget, in text and JSON, and refuses in one line
    where not even batch 1 fits (as the search would, before anything starts)."""
    tasks = ["reverse", "shift", "max", "add"]
    data = {"base": str(zoo / "base"), "models": [str(zoo / f"ft_{t}") for t in tasks],
            "evaluator": {"tasks": tasks, "task_dir": str(zoo)}, "methods": ["ties"],
            "parameters": {"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.1, "high": 1.0}},
            "refine": {"steps": 240, "batch_size": 32, "eval_every": 10}}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    assert main(["plan", str(space)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("refinement: batch 32 (128 sequences) x 16 tokens: ")
    assert main(["plan", str(space), "--device-memory", "30MB", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["refinement"]
    assert (r["batch_size"], r["steps"], r["eval_every"], r["checkpointing"], r["hold_inputs"]) == (16, 480, 20, True,
                                                                                                   True)
    assert r["budget"] == 30 * 10**6 and r["total"] + r["beside"] <= r["budget"]
    assert main(["plan", str(space), "--device-memory", "8MB"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(
        f"error: {space}: refine: even batch 1 (4 sequences x 16 tokens) with gradient checkpointing, nothing held, needs")
