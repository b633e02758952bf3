"""Each method against mergekit 0.1.5 on random tensors (float32)."""

import pytest
import torch
from mergekit.merge_methods import merge_tensors

from mergesearch.errors import MergeSearchError
from mergesearch.methods import REGISTRY, TensorInputs, tensor_seed
from mergesearch.methods import sparsify

SHAPES = [(257,), (64, 48), (8, 16, 12)]
W = [0.4, 0.3, 0.5]
D = [0.3, 0.5, 0.7]


def make_inputs(shape, seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + 0.3 * torch.randn(shape, generator=g) for _ in range(n)]
    return base, models


def ours(method, base, models, g=None, m=None, seed=0, name="w"):
    spec = REGISTRY[method]
    gg = {p.name: p.default for p in spec.global_params}
    gg.update(g or {})
    mp = []
    for d in m or [{} for _ in models]:
        dd = {p.name: p.default for p in spec.model_params}
        dd.update(d)
        mp.append(dd)
    x = TensorInputs(name, base if spec.uses_base != "no" else None, tensors=list(models), seed=seed)
    return spec.fn(x, gg, mp)


def theirs(method, tensors, params, base_index=0):
    return merge_tensors(tensors, method, parameters=params, base_index=base_index)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("g", [{}, {"lambda": 0.7, "normalize": True}, {"normalize": False, "rescale": True}])
def test_task_vector_methods(shape, method, g):
    base, models = make_inputs(shape, seed=len(shape))
    weights = [0.4, -0.3, 0.5]  # a negative weight negates a task vector
    params = {"weight": weights}
    m = [{"weight": w} for w in weights]
    if method != "task_arithmetic":
        params["density"] = D
        for d, mm in zip(D, m):
            mm["density"] = d
    if method.startswith("breadcrumbs"):
        params["gamma"] = [0.05, 0.01, 0.1]
        for gm, mm in zip(params["gamma"], m):
            mm["gamma"] = gm
    got = ours(method, base, models, g, m)
    want = theirs(method, [base] + models, {**params, **g})
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear(shape, normalize):
    _, models = make_inputs(shape)
    got = ours("linear", None, models, {"normalize": normalize}, [{"weight": w} for w in W])
    want = theirs("linear", models, {"weight": W, "normalize": normalize}, base_index=None)
    assert (got - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp(shape, t):
    base, models = make_inputs(shape, n=1)
    got = ours("slerp", base, models, {"t": t}, [{}])
    want = theirs("slerp", [base, models[0]], {"t": t})
    assert (got - want).abs().max().item() <= 1e-6


def test_slerp_collinear_falls_back_to_lerp():
    base = torch.randn(32)
    got = ours("slerp", base, [2 * base], {"t": 0.25}, [{}])
    want = theirs("slerp", [base, 2 * base], {"t": 0.25})
    assert torch.allclose(got, 1.25 * base, atol=1e-6)
    assert (got - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shape", [(64, 48), (8, 16, 12)])
@pytest.mark.parametrize("opts", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp(shape, opts, with_base):
    base, models = make_inputs(shape, n=2)
    m = [{"weight": 0.3}, {"weight": 0.6}]
    got = ours("nuslerp", base if with_base else None, models, opts, m) if with_base else \
        REGISTRY["nuslerp"].fn(TensorInputs("w", None, tensors=models), {"nuslerp_row_wise": False,
                                                                       "nuslerp_flatten": True, **opts}, m)
    if with_base:
        want = theirs("nuslerp", [base] + models, {"weight": [0.3, 0.6], **opts})
    else:
        want = theirs("nuslerp", models, {"weight": [0.3, 0.6], **opts}, base_index=None)
    assert (got - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(shape, filter_wise):
    base, models = make_inputs(shape)
    got = ours("model_stock", base, models, {"filter_wise": filter_wise})
    want = theirs("model_stock", [base] + models, {"filter_wise": filter_wise})
    assert (got - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("scale", [1.0, 0.5, -2.0])
def test_passthrough(scale):
    _, models = make_inputs((64, 48), n=1)
    got = ours("passthrough", None, models, {}, [{"scale": scale}])
    want = theirs("passthrough", models, {"scale": [scale]}, base_index=None)
    assert torch.equal(got, want)


# -- random methods: same draws as mergekit for the same generator state -----------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_match_mergekit_for_same_stream(shape, method):
    base, models = make_inputs(shape, seed=3)
    m = [{"weight": w, "density": d} for w, d in zip(W, D)]
    seed = 17
    got = ours(method, base, models, {}, m, seed=seed, name="layer.w")
    torch.manual_seed(tensor_seed(seed, "layer.w"))  # mergekit draws from the global generator
    want = theirs(method, [base] + models, {"weight": W, "density": D})
    assert (got - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_seeded(method):
    base, models = make_inputs((64, 48))
    m = [{"weight": w, "density": d} for w, d in zip(W, D)]
    a = ours(method, base, models, {}, m, seed=5)
    b = ours(method, base, models, {}, m, seed=5)
    c = ours(method, base, models, {}, m, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dare_kept_count_and_rescale():
    base, models = make_inputs((200, 50), seed=4, n=1)
    x = TensorInputs("t", base, tensors=models, seed=9)
    out = sparsify.dare(x, 0, 0.3, rescale=True)
    # the same generator stream gives the mask: kept count is exactly its sum
    g = torch.Generator().manual_seed(tensor_seed(9, "t"))
    mask = torch.bernoulli(torch.full((200, 50), 0.3), generator=g)
    delta = models[0] - base
    assert int((out != 0).sum()) == int(mask.sum())
    assert torch.equal(out != 0, mask.bool())
    # L1 rescale: the kept part is scaled to the original L1 norm
    scale = delta.abs().sum() / (delta * mask).abs().sum()
    # (the factor is summed in float64 over blocks here, the reference in float32)
    assert torch.allclose(out, delta * mask * scale, rtol=1e-6, atol=0)
    assert abs(out.abs().sum().item() - delta.abs().sum().item()) < 1e-3
    no_rescale = sparsify.dare(TensorInputs("t", base, tensors=models, seed=9), 0, 0.3, rescale=False)
    assert torch.equal(no_rescale, delta * mask)


def test_della_keep_probability_follows_rank():
    base = torch.zeros(1, 20000)
    model = torch.linspace(0.001, 1, 20000).reshape(1, -1)  # ranks increase left to right
    out = sparsify.della(TensorInputs("t", base, tensors=[model], seed=1), 0, 0.5, 0.4, rescale=False)
    kept = (out != 0).float().reshape(-1)
    low, high = kept[:2000].mean().item(), kept[-2000:].mean().item()
    assert 0.08 < low < 0.2 and 0.8 < high < 0.92  # p runs from 0.1 to 0.9
    with pytest.raises(MergeSearchError, match="epsilon"):
        sparsify.della(TensorInputs("t", base, tensors=[model]), 0, 0.5, 0.6, rescale=False)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.999])
def test_magnitude_keeps_exact_count_with_ties(density):
    g = torch.Generator().manual_seed(0)
    delta = torch.randint(-5, 6, (40, 25), generator=g).float()  # heavy ties
    base = torch.zeros_like(delta)
    x = TensorInputs("t", base, tensors=[delta])
    out = sparsify.magnitude(x, 0, density, rescale=False)
    k = max(1, int(density * delta.numel()))
    assert int((out != 0).sum()) == min(k, int((delta != 0).sum()))
    # the kept elements are a top-k by magnitude
    kept, dropped = delta[out != 0].abs(), delta[(out == 0) & (delta != 0)].abs()
    if len(dropped) and len(kept):
        assert kept.min() >= dropped.max()
    # exactly the last k of the stable ascending magnitude order (ties: higher indices kept)
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices
    want = torch.zeros(delta.numel(), dtype=torch.bool)
    want[order[delta.numel() - k:]] = True
    assert torch.equal(out.reshape(-1) != 0, want & (delta.reshape(-1) != 0))


@pytest.mark.parametrize("density,gamma", [(0.3, 0.05), (0.5, 0.2), (0.9, 0.3)])
def test_breadcrumbs_window_exact_with_ties(density, gamma):
    g = torch.Generator().manual_seed(1)
    delta = torch.randint(1, 8, (30, 30), generator=g).float()
    x = TensorInputs("t", torch.zeros_like(delta), tensors=[delta])
    out = sparsify.magnitude_outliers(x, 0, density, gamma, rescale=False)
    n = delta.numel()
    keep = int(density * n)
    assert int((out != 0).sum()) == keep
    n_top = int(gamma * n)
    order = torch.sort(delta.abs().reshape(-1), stable=True).values
    n_bot = max(0, n - keep - n_top)
    assert torch.equal(out[out != 0].abs().sort().values, order[n_bot:n_bot + keep])


def test_registry_declares_parameters():
    assert set(REGISTRY) >= {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                             "breadcrumbs_ties", "della", "della_linear", "slerp", "nuslerp", "model_stock",
                             "passthrough"}
    ties = REGISTRY["ties"]
    assert ties.param("density").scope == "model" and ties.param("density").default == 1.0
    assert (ties.param("density").low, ties.param("density").high) == (0.0, 1.0)
    assert ties.param("weight").required
    assert ties.param("lambda").scope == "global"
    assert REGISTRY["slerp"].param("t").required and REGISTRY["slerp"].max_models == 1


def test_dare_masks_drawn_in_blocks_are_the_whole_tensor_draws():
    """A tensor over several of DARE's blocks: the mask drawn block by block is the mask
    of one whole-tensor draw, and the merge still matches mergekit's."""
    assert 1000 * 700 > 2 * sparsify.DARE_BLOCK
    base, models = make_inputs((1000, 700), seed=8)
    x = TensorInputs("t", base, tensors=models, seed=9)
    keep, factor = sparsify.dare_mask(x, 0, 0.3, rescale=True)
    g = torch.Generator().manual_seed(tensor_seed(9, "t"))
    assert torch.equal(keep, torch.bernoulli(torch.full((1000, 700), 0.3), generator=g).bool())
    delta = models[0] - base
    assert factor.item() == pytest.approx((delta.abs().sum() / (delta * keep).abs().sum()).item(), rel=1e-6)
    m = [{"weight": w, "density": d} for w, d in zip(W, D)]
    got = ours("dare_ties", base, models, {}, m, seed=17, name="layer.w")
    torch.manual_seed(tensor_seed(17, "layer.w"))
    want = theirs("dare_ties", [base] + models, {"weight": W, "density": D})
    assert (got - want).abs().max().item() <= 1e-6
