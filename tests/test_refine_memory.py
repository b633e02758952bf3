"""A refinement's device memory (mergesearch.search.refine_memory), planned before the
search starts: the formula against the peak of real refinements on the zoo (tests/memtrack.py,
on the CPU), and the decision under declared budgets (kept, gradient checkpointing, a
smaller batch with the steps scaled, a one-line refusal)."""

import math
from dataclasses import asdict, replace

import optuna
import pytest
import torch
import yaml

from memtrack import LiveBytes
from mergesearch.cli import main
from mergesearch.engine.materialize import Materializer
from mergesearch.engine.models import load_model
from mergesearch.engine.plan import space_plan
from mergesearch.evaluate import EvalConfig, build_evaluator
from mergesearch.recipe import from_dict
from mergesearch.runs.store import load_run
from mergesearch.search.refine import refine
from mergesearch.search.refine_memory import batch_shape, estimate, input_budget, item_shapes, plan_refinement
from mergesearch.search.space import SearchSpace
from mergesearch.search.variables import Granularity, make_groups

from test_zoo_eval import zoo  # noqa: F401  (session fixture)

TASKS = ["reverse", "shift", "max", "add"]
# the plan bounds the measured peak, at most this much above it (zoo refinements, 2026-12-06)
TOLERANCE = 1.35


def space_of(zoo, method="ties", dtype=None, **refine_over):
    fts = [str(zoo / f"ft_{t}") for t in TASKS]
    data = {"base": str(zoo / "base"), "models": fts,
            "evaluator": {"tasks": TASKS, "task_dir": str(zoo), "limit": 16}, "methods": [method],
            "parameters": {"weight": {"low": 0.0, "high": 1.0}},
            "refine": {"steps": 4, "batch_size": 16, "eval_every": 2, "level": "layer", "n_groups": 2, "rows": True,
                       **refine_over}}
    if dtype:
        data["dtype"] = dtype
    return SearchSpace.model_validate(data)


@pytest.fixture(scope="module")
def shapes(zoo):
    return item_shapes(space_of(zoo))


def test_batch_shape_is_the_worst_draw():
    """Each task's share of the batch (the first tasks one more), its items with the most
    sequences, all as wide as the longest; a held-out chunk is one task's worst items."""
    per_task = {"a": [(4, 10), (2, 30), (3, 5)], "b": [(5, 7)], "c": [(1, 3), (1, 2)]}
    # batch 5: a gets 2 (4 + 3), b 2 (its one item twice), c 1
    assert batch_shape(per_task, 5, 32) == (4 + 3 + 5 + 5 + 1, 4 + 2 + 3, 30)
    assert batch_shape(per_task, 1, 1) == (4, 5, 30)


@pytest.mark.parametrize("method,dtype,ckpt,hold", [("ties", None, False, True), ("task_arithmetic", None, False, True),
                                                    ("ties", "bfloat16", True, True), ("ties", None, False, False),
                                                    ("dare_ties", "bfloat16", True, False)])
def test_plan_bounds_the_measured_refinement(zoo, shapes, method, dtype, ckpt, hold):
    """Every storage the refinement creates (terms, multipliers, graph, activations),
    measured with tests/memtrack.py: the plan is above it, by less than TOLERANCE; with
    gradient checkpointing, or with nothing held (each tensor's inputs read again), the
    refinement learns exactly what it learns with neither (the same operations on the same
    values: the recomputed merge is bit for bit the held one's)."""
    space = space_of(zoo, method, dtype)
    per_task, d = shapes
    if dtype:  # the same shapes; the weights in bfloat16, the float32 base a copy
        d = replace(d, itemsize=2, base_copied=True)
    planned = estimate(space, 16, per_task, d, checkpointing=ckpt, hold=hold)
    r, mat, model, tok = _zoo_candidate(zoo, method, dtype)
    ev = build_evaluator(EvalConfig(tasks=TASKS, task_dir=str(zoo), split="dev", limit=16))
    ev.training_items(model, tok)  # the requests, built once per model (not the refinement's)
    cfg = dict(space.refine.model_dump(), average=0.0, checkpointing=ckpt, steps=2, hold_inputs=hold)
    groups = [asdict(g) for g in make_groups(Granularity(level="layer", n_groups=2), 4, "model.layers.")]
    probe = LiveBytes()
    with probe:
        out, stats = refine(mat, model, tok, ev, r, dict(cfg, planned_bytes=planned.total), groups)
    print(f"{method} {dtype} ckpt={ckpt} hold={hold}: planned / measured {planned.total / probe.peak:.3f}")
    assert probe.peak <= planned.total <= TOLERANCE * probe.peak, (probe.peak, planned.line())
    assert stats["memory"] == {"planned": planned.total, "batch_size": 16, "steps_planned": 2, "check_batch": 32,
                               "checkpointing": ckpt, "hold_inputs": hold, "peak": None}  # no CUDA peak on the CPU
    if ckpt or not hold:
        plain, _ = refine(mat, model, tok, ev, r, dict(cfg, checkpointing=False, hold_inputs=True), groups)
        assert out.to_dict() == plain.to_dict()
        for mine, theirs in zip(out.row_scales(), plain.row_scales()):
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
        assert planned.total < estimate(space, 16, per_task, d).total


def test_budgets_keep_checkpoint_or_halve(zoo, shapes):
    """As configured when it fits beside the plan; gradient checkpointing when only that
    fits; else the batch halved until it fits, steps x batch and eval_every x batch kept,
    the average's decay per step the same per item."""
    per_task, d = shapes
    space = space_of(zoo, steps=30, eval_every=5, average=0.9)
    p = space_plan(space, device="cpu", budget=10**9)
    beside = p.budget_for(0) - p.eval_reserve
    plain, ckpt = estimate(space, 16, per_task, d), estimate(space, 16, per_task, d, checkpointing=True)
    m = plan_refinement(space, p, "s.yaml", shapes=shapes)
    assert (m.batch_size, m.steps, m.checkpointing, m.notes) == (16, 30, False, [])
    assert m.total == plain.total and m.budget == 10**9 and m.beside == beside
    p = space_plan(space, device="cpu", budget=beside + ckpt.total)
    m = plan_refinement(space, p, "s.yaml", shapes=shapes)
    assert (m.batch_size, m.steps, m.checkpointing, m.hold_inputs) == (16, 30, True, True) and m.total == ckpt.total
    # nothing held (each tensor's inputs read again) where only that fits
    bare = estimate(space, 16, per_task, d, checkpointing=True, hold=False)
    assert bare.total < ckpt.total - bare.parts["multipliers"]
    for budget in (beside + bare.total, beside + ckpt.total - 1):
        m = plan_refinement(space, space_plan(space, device="cpu", budget=budget), "s.yaml", shapes=shapes)
        assert (m.batch_size, m.steps, m.checkpointing, m.hold_inputs) == (16, 30, True, False) and m.total == bare.total
        assert m.parts["float32 task vectors"] == m.parts["float32 base"] == 0
        assert "inputs read again (none held)" in m.line() and m.to_json()["hold_inputs"] is False
        assert m.options({})["hold_inputs"] is False
    assert m.notes == [f"nothing held: {ckpt.total / 1e6:.2f} MB with gradient checkpointing and the float32 task "
                       f"vectors and base held does not fit the {(budget - beside) / 1e6:.2f} MB left beside the "
                       "evaluation model; each tensor's inputs are read again in every step's forward and backward "
                       "(slower steps)"]
    four = estimate(space, 4, per_task, d, checkpointing=True, check_batch=4, hold=False)
    eight = [estimate(space, 8, per_task, d, checkpointing=True, check_batch=8, hold=h) for h in (True, False)]
    four_held = estimate(space, 4, per_task, d, checkpointing=True, check_batch=4)
    assert min(x.total for x in eight) > four.total and four_held.total > four.total
    p = space_plan(space, device="cpu", budget=beside + four.total)
    m = plan_refinement(space, p, "s.yaml", shapes=shapes)
    assert (m.batch_size, m.steps, m.eval_every, m.check_batch, m.checkpointing, m.hold_inputs) == \
        (4, 120, 20, 4, True, False)
    assert m.average == pytest.approx(0.9 ** 0.25)
    assert m.notes == [f"batch 16 does not fit ({bare.total / 1e6:.2f} MB with gradient checkpointing, nothing held; "
                       f"{four.total / 1e6:.2f} MB left beside the evaluation model): batch 4, nothing held, "
                       "120 steps instead of 30"]
    # the workers' plan keeps the refinement's room free: inputs resident only beside it
    for budget in (10**9, beside + four.total, beside + four.total + 3 * 10**6):
        p = space_plan(space, device="cpu", budget=budget)
        m2 = plan_refinement(space, p, "s.yaml", shapes=shapes)
        q = space_plan(space, device="cpu", budget=input_budget(m2, p))
        assert q.device_bytes - q.eval_reserve + m2.total <= budget
    assert p.resident == ["base", "m0", "m1", "m2", "m3"] and q.resident == []
    opts = m.options(space.refine.model_dump())
    assert (opts["batch_size"], opts["steps"], opts["planned_bytes"]) == (4, 120, four.total)
    # batch 3 would fit a 10-step refinement: steps x batch rounded up
    assert estimate(space_of(zoo, steps=10), 3, per_task, d).steps == math.ceil(10 * 16 / 3)


def write_space(tmp_path, zoo, budget: int, **over):
    data = {"base": str(zoo / "base"), "models": [str(zoo / "ft_add"), str(zoo / "ft_max")],
            "evaluator": {"tasks": ["add", "max"], "task_dir": str(zoo), "limit": 24},
            "methods": ["task_arithmetic"], "parameters": {"weight": {"low": 0.0, "high": 1.0}},
            "budget": {"n_trials": 12}, "refine": {"steps": 2, "batch_size": 16, "eval_every": 1, "patience": 9},
            "resources": {"device_memory": budget}, "seed": 1, **over}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.slow
def test_a_search_refines_with_the_smaller_batch(tmp_path, zoo, monkeypatch, caplog):
    """Through the CLI: the halved batch and scaled steps are what the refinement ran with,
    counted in the refine reserve and recorded in the refined trial's attributes."""
    monkeypatch.chdir(tmp_path)
    p = write_space(tmp_path, zoo, 10**9)
    space = SearchSpace.load(p)
    sh = item_shapes(space)
    plan = space_plan(space, device="cpu", budget=10**9)
    beside = plan.budget_for(0) - plan.eval_reserve
    four = estimate(space, 4, *sh, checkpointing=True, check_batch=4, hold=False)
    assert estimate(space, 8, *sh, checkpointing=True, check_batch=8).total > four.total
    p = write_space(tmp_path, zoo, beside + four.total)
    caplog.set_level("INFO", logger="mergesearch")
    assert main(["search", str(p), "--run", "r", "--workers", "1", "--no-export"]) == 0
    assert "refine: batch 16 does not fit" in caplog.text and "batch 4, nothing held, 8 steps instead of 2" in caplog.text
    _, storage = load_run("r", root=tmp_path / "results")
    (t,) = optuna.load_study(study_name="r.refine", storage=storage).trials
    stats = t.user_attrs["refine"]
    assert stats["memory"] == {"planned": four.total, "batch_size": 4, "steps_planned": 8, "check_batch": 4,
                               "checkpointing": True, "hold_inputs": False, "peak": None}
    assert [h["step"] for h in stats["history"]] == [0, 4, 8]  # eval_every 1 x 4


def test_batch_1_that_does_not_fit_is_refused_in_one_line(tmp_path, zoo, capsys):
    p = write_space(tmp_path, zoo, 6 * 10**6)
    assert main(["search", str(p), "--run", "r", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {p}: refine: even batch 1 (4 sequences x 12 tokens) with gradient checkpointing, "
                   "nothing held, needs 5.02 MB (merge graph 4.48 MB, activations 463.10 kB, logits 73.73 kB) "
                   "beside the evaluation model and the merge scratch (3.25 MB), more than the device "
                   "budget of 6.00 MB (declared); refine fewer or smaller models, or declare more "
                   "resources.device_memory"]
    assert not (tmp_path / "results" / "r").exists()


@pytest.mark.parametrize("shape,dtype,ckpt", [((128, 256, 2048, 2), "float32", False),
                                              ((128, 256, 8192, 2), "float32", False),
                                              ((256, 1024, 2048, 4), "float32", False),
                                              ((64, 128, 512, 4), "float32", False),
                                              ((256, 1024, 2048, 2), "bfloat16", False),
                                              ((128, 256, 2048, 2), "bfloat16", False),
                                              ((256, 1024, 2048, 4), "float32", True)])
def test_activations_and_logits_bound_a_step(shape, dtype, ckpt):
    """A training step's activations and logits on synthetic Llama shapes (hidden,
    intermediate, vocabulary, layers), half the batch padded: the plan's parts bound the
    measured peak (beside the weights' gradients), by at most 1.3."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergesearch.search.refine import checkpointed
    from mergesearch.search.refine_data import sequence_loglik
    from mergesearch.search.refine_memory import Dims, refine_bytes

    H, I, V, L = shape
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=H, intermediate_size=I, vocab_size=V, num_hidden_layers=L, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    numel = sum(p.numel() for p in params.values())
    S, W = 32, 64
    g = torch.Generator().manual_seed(0)
    inp = torch.randint(0, V, (S, W), generator=g)
    mask = torch.ones_like(inp)
    mask[: S // 2, W // 2:] = 0
    batch = (inp, mask, torch.randint(0, V, (S, W), generator=g), mask.bool(), S)
    probe = LiveBytes()
    with probe:
        if ckpt:
            with checkpointed(model, params):
                sequence_loglik(model, params, batch).sum().backward()
        else:
            sequence_loglik(model, params, batch).sum().backward()
    measured = probe.peak - numel * model.dtype.itemsize  # the leaf weights' gradients
    d = Dims(numel=numel, largest=V * H, rows=0, itemsize=model.dtype.itemsize, base_copied=False, hidden=H,
             intermediate=I, vocab=V, layers=L, heads=4, attn=model.config._attn_implementation, max_length=256)
    parts = refine_bytes(d, 1, S, 1, W, rows=False, checkpointing=ckpt)
    planned = parts["activations"] + parts["logits"]
    assert measured <= planned <= 1.3 * measured, (measured, planned)


def test_a_staged_base_is_copied_out_of_its_slot(zoo):
    """With the inputs on the host read through staging slots (stream: copy), each term's
    float32 base is its own copy, not a view of a slot the next tensor overwrites."""
    from mergesearch.engine.plan import make_plan
    from mergesearch.engine.checkpoint import Checkpoint
    from mergesearch.search.refine import build_terms

    fts = [str(zoo / f"ft_{t}") for t in TASKS[:2]]
    r = from_dict(dict(method="task_arithmetic", base=str(zoo / "base"), parameters={"lambda": 1.0},
                       models=[{"path": p, "parameters": {"weight": 0.5}} for p in fts]))
    plan = make_plan(str(zoo / "base"), fts, ["task_arithmetic"], device="cpu", budget=5 * 10**6, stream="copy")
    assert plan.host == ["base", "m0", "m1"] and plan.staging > 0
    mat = Materializer(zoo / "base", fts, methods=["task_arithmetic"], placement=plan)
    names = [n for n in mat.names if n not in mat.constants]
    groups = [asdict(g) for g in make_groups(Granularity(level="layer", n_groups=2), 4, "model.layers.")]
    terms, _, _ = build_terms(mat, r, groups, names, {n: torch.float32 for n in names}, "cpu")
    base = Checkpoint(zoo / "base")
    for t in terms:
        torch.testing.assert_close(t.base, base.get(t.name).float(), rtol=0, atol=0)
    # nothing held: each tensor's inputs read again through the slots give the same weights and gradients
    from mergesearch.search.refine import merged_params

    bare, _, _ = build_terms(mat, r, groups, names, {n: torch.float32 for n in names}, "cpu", hold=False)
    got = []
    for ts in (terms, bare):
        coef = torch.full((len(groups), 2), 1.1, requires_grad=True)
        scale = torch.ones(len(groups), requires_grad=True)
        params = merged_params(ts, coef, scale)
        sum((w * w).sum() for w in params.values()).backward()
        got.append(({k: v.detach() for k, v in params.items()}, coef.grad, scale.grad))
    assert all(torch.equal(got[0][0][k], got[1][0][k]) for k in got[0][0])
    assert torch.equal(got[0][1], got[1][1]) and torch.equal(got[0][2], got[1][2])


def _zoo_candidate(root, method, dtype=None):
    """A candidate of the zoo's four fine-tunes (its recipe), their Materializer and the
    base loaded as the evaluation model."""
    fts = [str(root / f"ft_{t}") for t in TASKS]
    per = {"weight": 1.0, **({"density": 0.5} if method != "task_arithmetic" else {})}
    r = from_dict(dict(method=method, base=str(root / "base"), parameters={"lambda": 1.1}, seed=5,
                       dtype=dtype or "float32",
                       models=[{"path": p, "parameters": dict(per, weight=0.6 + 0.2 * i)} for i, p in enumerate(fts)]))
    model, tok = load_model(root / "base", dtype=dtype)
    return r, Materializer(root / "base", fts, methods=[method]), model, tok


def _terms_and_model(root, method, hold=True, dtype=None):
    from mergesearch.search.refine import build_terms

    r, mat, model, tok = _zoo_candidate(root, method, dtype)
    targets = dict(model.named_parameters())
    names = [n for n in mat.names if n in targets and targets[n].is_floating_point()]
    groups = [asdict(g) for g in make_groups(Granularity(level="layer", n_groups=2), 4, "model.layers.")]
    terms, _, _ = build_terms(mat, r, groups, names, {n: targets[n].dtype for n in names}, "cpu", hold=hold)
    return terms, model, groups, r, mat, tok


@pytest.mark.parametrize("method,dtype", [("ties", None), ("dare_ties", None), ("dare_linear", "bfloat16")])
def test_the_recomputed_merge_is_the_kept_graph_bit_for_bit(zoo, method, dtype):
    """One training step's merged weights and the gradients of every multiplier (group
    weights, lambda, rows): the merge kept whole in the graph, recomputed in the backward
    (with and without the layers' activation checkpointing), and recomputed from inputs
    read again (no holds) are equal, bit for bit."""
    from mergesearch.search.refine import checkpointed, merged_params
    from mergesearch.search.refine_data import sequence_loglik

    held, model, groups, _, _, _ = _terms_and_model(zoo, method, dtype=dtype)
    again, *_ = _terms_and_model(zoo, method, hold=False, dtype=dtype)
    assert all(t.base is None and t.parts is None for t in again)
    g = torch.Generator().manual_seed(0)
    coef0 = 1.0 + 0.3 * torch.rand(len(groups), len(TASKS), generator=g)
    scale0 = 1.0 + 0.1 * torch.rand(len(groups), generator=g)
    rows0 = {t.name: 1.0 + 0.2 * torch.rand(len(TASKS), t.shape[0], generator=g) for t in held if len(t.shape) == 2}
    V, S, W = model.config.vocab_size, 6, 10
    inp = torch.randint(0, V, (S, W), generator=g)
    mask = torch.ones_like(inp)
    mask[:2, 6:] = 0
    batch = (inp, mask, torch.randint(0, V, (S, W), generator=g), mask.bool(), S)
    results = []
    for terms, recompute, ckpt in [(held, False, False), (held, True, False), (held, True, True),
                                   (again, True, True), (again, True, False)]:
        coef, scale = coef0.clone().requires_grad_(True), scale0.clone().requires_grad_(True)
        rows = {k: v.clone().requires_grad_(True) for k, v in rows0.items()}
        params = merged_params(terms, coef, scale, rows, recompute=recompute)
        if ckpt:
            with checkpointed(model, params):
                sequence_loglik(model, params, batch).sum().backward()
        else:
            sequence_loglik(model, params, batch).sum().backward()
        results.append(({k: v.detach() for k, v in params.items()}, coef.grad, scale.grad,
                        {k: v.grad for k, v in rows.items()}))
    w0, c0, s0, r0 = results[0]
    assert c0.abs().sum() > 0 and all(v.abs().sum() > 0 for v in r0.values())
    for w, c, s, r in results[1:]:
        assert all(torch.equal(w[k], w0[k]) for k in w0) and w.keys() == w0.keys()
        assert torch.equal(c, c0) and torch.equal(s, s0)
        assert all(torch.equal(r[k], r0[k]) for k in r0)


@pytest.mark.slow
def test_a_refinement_gets_trial_timeout_for_each_trial_of_its_reserve(tmp_path, zoo, monkeypatch, caplog):
    """trial_timeout is per trial: a refinement, worth many trials, runs past it (up to its
    reserve times it) and completes."""
    monkeypatch.chdir(tmp_path)
    # 48 steps took 3.1-3.4 s on a 2-core EPYC (24 took 1.87 s in CI): past the 1 s a trial may take
    p = write_space(tmp_path, zoo, 10**9, trial_timeout=1,
                    refine={"steps": 48, "batch_size": 16, "eval_every": 8, "patience": 99})
    data = yaml.safe_load(p.read_text())
    p.write_text(yaml.safe_dump(dict(data, budget={"n_trials": 60})))
    caplog.set_level("INFO", logger="mergesearch")
    assert main(["search", str(p), "--run", "t", "--workers", "1", "--no-export"]) == 0
    study, storage = load_run("t", root=tmp_path / "results")
    refined = optuna.load_study(study_name="t.refine", storage=storage).trials
    assert len(refined) == 1 and refined[0].state.name == "COMPLETE", refined[0].user_attrs.get("reason")
    ua = refined[0].user_attrs
    assert ua["refine"]["steps"] == 48 and ua["refine_s"] > 1  # longer than one trial's limit
