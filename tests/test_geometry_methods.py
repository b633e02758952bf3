"""The curvature-based methods against float64 references, their special cases, the
quadratic toy, and the file path (recipe -> streamed export == in-memory candidate)."""

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergesearch.errors import MergeSearchError
from mergesearch.methods import REGISTRY, TensorInputs
from mergesearch.zoo.synthetic import quadratic_toy


def call(method, base, tensors, g=None, m=None, **side):
    spec = REGISTRY[method]
    gp = {p.name: p.default for p in spec.global_params}
    gp.update(g or {})
    mp = [{p.name: p.default for p in spec.model_params} for _ in tensors]
    for i, extra in enumerate(m or []):
        mp[i].update(extra)
    return spec.fn(TensorInputs("t", base, tensors=tensors, **side), gp, mp)


def rand(*shape, seed, pos=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    return (t.abs() + 0.01 if pos else t).to(dtype)


# -- float64 references ----------------------------------------------------------------

def test_fisher_matches_reference():
    thetas = [rand(5, 7, seed=i) for i in range(3)]
    fs = [rand(5, 7, seed=10 + i, pos=True) for i in range(3)]
    fs[1][0, :] = 0  # a row with no information from model 1
    lam, floor = [0.5, 1.0, 2.0], 1e-3
    out = call("fisher", None, thetas, {"floor": floor}, [{"weight": w} for w in lam], metrics=fs)
    d = [t.double() for t in thetas]
    G = [w * (f.double() + floor) for w, f in zip(lam, fs)]
    ref = sum(g * t for g, t in zip(G, d)) / sum(G)
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-7)


def test_fisher_all_zero_falls_back_to_the_weighted_average():
    thetas = [rand(4, seed=i) for i in range(2)]
    zeros = [torch.zeros(4), torch.zeros(4)]
    out = call("fisher", None, thetas, {}, [{"weight": 1.0}, {"weight": 3.0}], metrics=zeros)
    torch.testing.assert_close(out, (thetas[0] + 3 * thetas[1]) / 4)


def test_preconditioned_matches_reference_and_missing_metric_is_identity():
    thetas = [rand(6, 3, seed=i) for i in range(3)]
    vs = [rand(6, 3, seed=20 + i, pos=True) ** 2 for i in range(2)] + [None]  # model 2: plain SGD
    for power, eps in [(0.5, 1e-8), (1.0, 0.0), (0.25, 0.1)]:
        out = call("preconditioned", None, thetas, {"power": power, "epsilon": eps},
                   [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}], metrics=vs)
        G = [1.0 * (vs[0].double() ** power + eps), 2.0 * (vs[1].double() ** power + eps), 0.5 * torch.ones(6, 3, dtype=torch.float64)]
        ref = sum(g * t.double() for g, t in zip(G, thetas)) / sum(G)
        torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-7)


def test_gradient_matching_matches_reference():
    base = rand(8, 4, seed=0)
    thetas = [base + 0.1 * rand(8, 4, seed=i) for i in (1, 2, 3)]
    hs = [rand(8, 4, seed=30 + i, pos=True) for i in range(3)]
    h0 = rand(8, 4, seed=40, pos=True)
    alpha, size, prior, n0 = [0.7, 1.2, 0.4], [100.0, 10.0, 1.0], 0.05, 3.0
    out = call("gradient_matching", base, thetas, {"prior": prior, "base_data_size": n0},
               [{"weight": a, "data_size": s} for a, s in zip(alpha, size)], metrics=hs, base_metric=h0)
    b = base.double()
    H = [s * h.double() for s, h in zip(size, hs)]
    H0 = n0 * h0.double()
    den = prior + H0 + sum(a * h for a, h in zip(alpha, H))
    ref = b + sum(a * (prior + H0 + h) / den * (t.double() - b) for a, h, t in zip(alpha, H, thetas))
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-7)


def test_regmean_matches_reference_and_alpha_zero_is_diagonal():
    ws = [rand(5, 4, seed=i) for i in range(3)]
    xs = [rand(50, 4, seed=50 + i) for i in range(3)]
    grams = [x.T @ x for x in xs]
    lam = [1.0, 0.5, 2.0]
    for alpha in (1.0, 0.9, 0.0):
        out = call("regmean", None, ws, {"alpha": alpha}, [{"weight": w} for w in lam], grams=grams)
        Gs = []
        for g, w in zip(grams, lam):
            g = g.double()
            Gs.append(w * (alpha * g + (1 - alpha) * torch.diag(torch.diag(g))))
        ref = sum(w.double() @ g for w, g in zip(ws, Gs)) @ torch.linalg.inv(sum(Gs))
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    # the least-squares property: with alpha = 1 the merge minimises sum_i |X_i W^T - X_i W_i^T|^2
    out = call("regmean", None, ws, {"alpha": 1.0}, [{"weight": 1.0}] * 3, grams=grams)

    def loss(W):
        return sum(float(((x @ W.T - x @ w.T) ** 2).sum()) for x, w in zip(xs, ws))
    base_loss = loss(out)
    for k in range(5):
        assert loss(out + 1e-3 * rand(5, 4, seed=90 + k)) > base_loss
    # tensors without Gram matrices (embeddings, norms) are averaged with the weights
    out = call("regmean", None, [ws[0], ws[1]], {}, [{"weight": 1.0}, {"weight": 3.0}], grams=[None, None])
    torch.testing.assert_close(out, (ws[0] + 3 * ws[1]) / 4)


def test_regmean_dead_inputs_keep_the_weighted_average():
    ws = [rand(3, 4, seed=i) for i in range(2)]
    xs = [rand(20, 4, seed=60 + i) for i in range(2)]
    for x in xs:
        x[:, 2] = 0  # input 2 never varies: its Gram row and column are 0
    out = call("regmean", None, ws, {"alpha": 1.0}, None, grams=[x.T @ x for x in xs])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 2], (ws[0][:, 2] + ws[1][:, 2]) / 2)


# -- special cases ---------------------------------------------------------------------

def test_equal_curvatures_give_task_arithmetic():
    base = rand(16, seed=0, dtype=torch.float64)
    thetas = [base + rand(16, seed=i, dtype=torch.float64) for i in (1, 2)]
    h = rand(16, seed=5, pos=True, dtype=torch.float64)
    alpha = [0.3, 0.7]  # sum 1: (H0 + H) / (H0 + sum a_s H) = 1 when H0 = H_t = H
    out = call("gradient_matching", base, thetas, {"prior": 0.0}, [{"weight": a} for a in alpha],
               metrics=[h, h], base_metric=h)
    ta = call("task_arithmetic", base, thetas, {}, [{"weight": a} for a in alpha])
    torch.testing.assert_close(out, ta, rtol=0, atol=1e-15)
    # no curvature at all, only a prior: task arithmetic for any weights
    zeros = [torch.zeros(16, dtype=torch.float64)] * 2
    for alpha in ([1.0, 1.0], [0.5, 1.5]):
        out = call("gradient_matching", base, thetas, {"prior": 1.0}, [{"weight": a} for a in alpha], metrics=zeros)
        ta = call("task_arithmetic", base, thetas, {}, [{"weight": a} for a in alpha])
        torch.testing.assert_close(out, ta, rtol=0, atol=1e-15)


def test_zero_base_curvature_and_vanishing_prior_give_fisher_averaging():
    base = rand(32, seed=0, dtype=torch.float64)
    thetas = [base + rand(32, seed=i, dtype=torch.float64) for i in (1, 2, 3)]
    fs = [rand(32, seed=10 + i, pos=True, dtype=torch.float64) for i in range(3)]
    alpha = [0.5, 1.0, 2.0]
    fisher = call("fisher", None, thetas, {}, [{"weight": a} for a in alpha], metrics=fs)
    for prior, tol in [(1e-4, 1e-3), (1e-8, 1e-7), (0.0, 1e-14)]:
        gm = call("gradient_matching", base, thetas, {"prior": prior}, [{"weight": a} for a in alpha], metrics=fs)
        assert float((gm - fisher).abs().max()) <= tol


# -- the quadratic toy ---------------------------------------------------------------------

def test_quadratic_toy_geometry_aware_merges_land_on_the_optimum():
    toy = quadratic_toy()
    thetas, opt = toy["thetas"], toy["optimum"]
    for t, c in zip(thetas, toy["targets"]):
        assert float((t - c).abs().max()) < 1e-12  # each model reached its own optimum
    fisher = call("fisher", None, thetas, metrics=toy["hessians"])
    adam = call("preconditioned", None, thetas, {"power": 0.5, "epsilon": 0.0}, metrics=toy["second_moments"])
    gm = call("gradient_matching", toy["theta0"], thetas, {"prior": 0.0}, metrics=toy["hessians"])
    for out in (fisher, adam, gm):
        assert float((out - opt).abs().max()) < 1e-12
    linear = call("linear", None, thetas, {}, [{"weight": 1.0}, {"weight": 1.0}])
    assert float((linear - opt).abs().max()) > 0.1
    ta = call("task_arithmetic", toy["theta0"], thetas, {}, [{"weight": 0.5}, {"weight": 0.5}])
    assert float((ta - opt).abs().max()) > 0.1
    # and it is the optimum: the summed gradient vanishes there, not at the linear merge
    grad = sum(h * (opt - c) for h, c in zip(toy["hessians"], toy["targets"]))
    assert float(grad.abs().max()) < 1e-12
    grad_linear = sum(h * (linear - c) for h, c in zip(toy["hessians"], toy["targets"]))
    assert float(grad_linear.abs().max()) > 0.5


# -- recipes and files -------------------------------------------------------------------

def write_metric(path, folder, seed, scale=1.0, gram=False):
    from mergesearch.engine.checkpoint import Checkpoint
    c = Checkpoint(folder)
    out = {}
    for k, n in enumerate(c.names()):
        shape = c.shape(n)
        if gram:
            if len(shape) == 2 and n.endswith("proj.weight"):
                x = rand(40, shape[1], seed=seed * 1000 + k)
                out[n] = (x.T @ x).contiguous()
        else:
            out[n] = (rand(*shape, seed=seed * 1000 + k, pos=True) * scale).contiguous()
    save_file(out, str(path))
    return path


@pytest.fixture(scope="module")
def side_files(family, tmp_path_factory):
    d = tmp_path_factory.mktemp("side")
    fts = [family[f"ft{i}"] for i in range(3)]
    return {
        "metric": [write_metric(d / f"m{i}.safetensors", f, i + 1) for i, f in enumerate(fts)],
        "gram": [write_metric(d / f"g{i}.safetensors", f, i + 1, gram=True) for i, f in enumerate(fts)],
        "base": write_metric(d / "b.safetensors", family["base"], 9),
    }


@pytest.mark.parametrize("method", ["fisher", "preconditioned", "gradient_matching", "regmean"])
def test_streamed_export_equals_in_memory_candidate(family, side_files, tmp_path, method):
    from mergesearch.engine.checkpoint import Checkpoint
    from mergesearch.engine.materialize import Materializer
    from mergesearch.engine.merge import open_plan, stream_merge
    from mergesearch.recipe import from_dict
    fts = [str(family[f"ft{i}"]) for i in range(3)]
    key = "gram" if method == "regmean" else "metric"
    models = [{"path": p, "parameters": {"weight": w}, key: str(f)} for p, w, f in zip(fts, (0.5, 1.0, 1.5), side_files[key])]
    if method == "preconditioned":
        del models[2]["metric"]  # an SGD-trained model: identity
    data = {"method": method, "base": str(family["base"]), "models": models}
    if method == "gradient_matching":
        data["base_metric"] = str(side_files["base"])
        data["parameters"] = {"prior": 0.01}
    recipe = from_dict(data)
    stream_merge(open_plan(recipe), tmp_path / "out")
    exported = Checkpoint(tmp_path / "out")
    mat = Materializer(family["base"], fts, methods=[method],
                       metrics={p: str(f) for p, f in zip(fts, side_files["metric"])},
                       grams={p: str(f) for p, f in zip(fts, side_files["gram"])},
                       base_metric=str(side_files["base"]))
    state = mat.state_dict(recipe)
    changed = 0
    for name, t in state.items():
        assert torch.equal(t, exported.get(name)), name
        changed += int(not torch.equal(t, Checkpoint(fts[0]).get(name)))
    assert changed == len(state)  # every tensor is a real merge
    # the recipe round-trips through YAML with its files, and mergekit cannot express it
    from mergesearch.recipe import to_mergekit
    again = from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe
    with pytest.raises(MergeSearchError, match=f"method '{method}' has no mergekit equivalent"):
        to_mergekit(recipe)


def test_side_file_errors(family, side_files, tmp_path):
    from mergesearch.engine.merge import open_plan
    from mergesearch.recipe import from_dict
    ft = str(family["ft0"])
    base = str(family["base"])

    def plan(**model):
        return open_plan(from_dict({"method": "fisher", "base": base, "models": [{"path": ft, **model}]}))

    with pytest.raises(MergeSearchError, match=r"models\[0\] \(.*ft0\) needs a 'metric' file for method 'fisher'"):
        plan()
    with pytest.raises(MergeSearchError, match=f"{tmp_path / 'none.safetensors'}: metric file not found"):
        plan(metric=str(tmp_path / "none.safetensors"))
    bad = tmp_path / "short.safetensors"
    save_file({"model.embed_tokens.weight": torch.ones(3)}, str(bad))
    with pytest.raises(MergeSearchError, match=f"{bad}: metric has no tensor 'model.layers.0.self_attn.q_proj.weight' "
                                               f"of {ft} \\(38 missing\\)"):
        plan(metric=str(bad))
    from safetensors.torch import load_file
    full = load_file(str(side_files["metric"][0]))
    full["model.norm.weight"] = torch.ones(3)
    save_file(full, str(bad))
    with pytest.raises(MergeSearchError, match=f"{bad}: metric 'model.norm.weight' has shape \\[3\\], the model \\[64\\]"):
        plan(metric=str(bad))
    neg = tmp_path / "neg.safetensors"
    write_metric(neg, family["ft0"], 1, scale=-1.0)
    with pytest.raises(MergeSearchError, match=f"{neg}: metric '.*' has negative values"):
        from mergesearch.engine.merge import stream_merge
        stream_merge(plan(metric=str(neg)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MergeSearchError, match=r"models\[0\].metric: method 'ties' uses no metric"):
        from_dict({"method": "ties", "base": base, "models": [{"path": ft, "metric": str(side_files["metric"][0]),
                                                               "parameters": {"weight": 1.0, "density": 0.5}}]})
    with pytest.raises(MergeSearchError, match="base_metric: only gradient_matching uses a base curvature"):
        from_dict({"method": "fisher", "base": base, "base_metric": str(side_files["base"]),
                   "models": [{"path": ft, "metric": str(side_files["metric"][0])}]})
