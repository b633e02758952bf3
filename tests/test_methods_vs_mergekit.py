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


# -- mergekit 0.1.5's other methods: multislerp, karcher, sce, ram, ramplus_tl, nearswap,
# arcee_fusion. Each computes the same float32 operations in the same order as mergekit,
# so the results are bit-equal (asserted as max |diff| == 0 where that holds).

def _diff(a, b) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n", [2, 3])
def test_multislerp(shape, with_base, normalize, n):
    base, models = make_inputs(shape, seed=5 + len(shape), n=n)
    weights = W[:n]
    g = {"normalize_weights": normalize}
    got = ours("multislerp", base if with_base else None, models, g, [{"weight": w} for w in weights])
    if with_base:
        want = theirs("multislerp", [base] + models, {"weight": weights, **g})
    else:
        want = theirs("multislerp", models, {"weight": weights, **g}, base_index=None)
    assert _diff(got, want) == 0
    # it really interpolates: neither a model nor the base
    assert min(_diff(got, t) for t in models + [base]) > 1e-2


def test_multislerp_eps_and_single_model():
    base, models = make_inputs((64, 48), seed=2, n=3)
    g = {"eps": 1e-3}
    got = ours("multislerp", base, models, g, [{"weight": w} for w in W])
    assert _diff(got, theirs("multislerp", [base] + models, {"weight": W, **g})) == 0
    one = ours("multislerp", base, models[:1], {}, [{"weight": 0.5}])
    assert torch.equal(one, models[0])  # one model: returned as it is, as mergekit does
    assert torch.equal(one, theirs("multislerp", [base] + models[:1], {"weight": [0.5]}))


def test_multislerp_antipodal():
    """Two opposite task vectors with equal weights: mergekit falls back to a straight
    line; three that cancel are a one-line error (mergekit raises ValueError). The task
    vectors are exact opposites (values on a grid, so model - base is exact): nearly
    opposite ones make both implementations normalize a mean of norm ~1e-8, whose
    direction is rounding noise."""
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-4, 5, (40, 30), generator=g).float()
    d = torch.randint(-64, 65, (40, 30), generator=g).float() / 64
    pair = [base + d, base - d]
    got = ours("multislerp", base, pair, {}, [{"weight": 1.0}, {"weight": 1.0}])
    assert torch.equal(got, theirs("multislerp", [base] + pair, {"weight": [1.0, 1.0]}))
    assert torch.equal(got, base)  # the mean of d and -d
    flat = ours("multislerp", None, [d, -d], {"normalize_weights": False}, [{"weight": 0.5}, {"weight": 0.5}])
    assert torch.equal(flat, theirs("multislerp", [d, -d], {"weight": [0.5, 0.5], "normalize_weights": False},
                                      base_index=None))
    trio = [base + d, base - d, base + d]
    with pytest.raises(ValueError):
        theirs("multislerp", [base] + trio, {"weight": [2.0, 2.0, 0.0]})
    with pytest.raises(MergeSearchError, match="multislerp: the weighted directions of the models cancel out") as e:
        ours("multislerp", base, trio, {}, [{"weight": 2.0}, {"weight": 2.0}, {"weight": 0.0}], name="w.t")
    assert "\n" not in str(e.value) and str(e.value).startswith("w.t: ")
    with pytest.raises(MergeSearchError, match="weights sum to zero"):
        ours("multislerp", base, trio[:2], {}, [{"weight": 1.0}, {"weight": -1.0}])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("g", [{}, {"max_iter": 2, "tol": 1e-3}, {"max_iter": 50, "tol": 1e-8}])
def test_karcher(shape, with_base, g):
    base, models = make_inputs(shape, seed=9 + len(shape))
    if with_base:
        # mergekit adds the configured base model as an input after the listed models
        got = ours("karcher", base, models, g, [{}] * 3)
        want = theirs("karcher", models + [base], g, base_index=3)
        assert _diff(got, ours("karcher", None, models, g, [{}] * 3)) > 1e-3  # the base is one of the points
    else:
        got = ours("karcher", None, models, g, [{}] * 3)
        want = theirs("karcher", models, g, base_index=None)
    assert _diff(got, want) == 0


def test_karcher_degenerate_branches():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(30, 20, generator=g), torch.randn(30, 20, generator=g)
    zero = torch.zeros(30, 20)
    cases = {
        "a zero tensor (no direction, counts in the norm)": [a, zero, b],
        "all zero": [zero, zero.clone()],
        "below tol": [a * 1e-7, b * 1e-7, a],
        "antipodal (mean of directions ~0)": [a, -a],
        "identical": [a, a.clone()],
        "one": [b],
    }
    for what, tensors in cases.items():
        x = [t.clone() for t in tensors]
        got = ours("karcher", None, x, {}, [{}] * len(x))
        want = theirs("karcher", [t.clone() for t in tensors], {}, base_index=None)
        assert _diff(got, want) == 0, what
        assert torch.isfinite(got).all(), what
    assert torch.equal(ours("karcher", None, [zero, zero.clone()], {}, [{}, {}]), zero)
    # a zero point has no direction but counts in the scale: (|a| + 0 + |b|) / 3
    got = ours("karcher", None, [a, zero, b], {}, [{}] * 3)
    assert abs(got.norm().item() - (a.norm() + b.norm()).item() / 3) < 1e-4


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("topk", [1.0, 0.3, 0.05, 0.0])
def test_sce(shape, topk):
    base, models = make_inputs(shape, seed=11 + len(shape))
    got = ours("sce", base, models, {"select_topk": topk})
    want = theirs("sce", [base] + models, {"select_topk": topk})
    assert _diff(got, want) == 0
    # int8_mask is a memory option: the same numbers
    assert torch.equal(got, ours("sce", base, models, {"select_topk": topk, "int8_mask": True}))
    assert _diff(got, theirs("sce", [base] + models, {"select_topk": topk, "int8_mask": True})) == 0
    changed = (got != base).float().mean().item()
    if topk == 0.0:
        assert changed == 0
    elif topk < 1:  # only the selected share changes (the others' task vectors are zeroed)
        assert 0 < changed <= topk + 1e-9


def test_sce_zero_task_vectors_weigh_equally():
    base, models = make_inputs((64, 48), seed=3, n=2)
    models = [base.clone(), models[1]]  # model 0 is the base: no energy
    got = ours("sce", base, models, {})
    assert _diff(got, theirs("sce", [base] + models, {})) == 0
    same = [base.clone(), base.clone()]  # all energies ~0: equal weights
    assert _diff(ours("sce", base, same, {}), theirs("sce", [base] + same, {})) == 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("epsilon", [1e-5, 0.3, 0.0])
def test_ram(shape, epsilon):
    base, models = make_inputs(shape, seed=13 + len(shape))
    count = sum(((m - base).abs() > epsilon).int() for m in models)
    if epsilon == 0.3:  # some elements changed by one model, some by several, some by none
        assert (count == 1).any() and (count > 1).any() and (count == 0).any()
    got = ours("ram", base, models, {"epsilon": epsilon})
    assert _diff(got, theirs("ram", [base] + models, {"epsilon": epsilon})) == 0
    for g in [{}, {"r": 0.5, "alpha": 0.7}, {"r": 2.0, "alpha": 0.05}]:
        got = ours("ramplus_tl", base, models, {"epsilon": epsilon, **g})
        want = theirs("ramplus_tl", [base] + models, {"epsilon": epsilon, **g})
        assert _diff(got, want) == 0
        if epsilon == 0.3:  # unique elements are amplified
            assert _diff(got, ours("ram", base, models, {"epsilon": epsilon})) > 1e-3


def test_ramplus_model_without_changes():
    """A model that changes nothing (its task vector is zero): with epsilon 0 mergekit's
    gain for it is 0 / 0 = NaN, which reaches every element (NaN * 0); here that gain is
    unused, and the merge is RAM's of the others, as with any epsilon > 0."""
    base, models = make_inputs((64, 48), seed=6)
    models = [models[0], base.clone(), models[2]]
    got = ours("ramplus_tl", base, models, {"epsilon": 1e-6})
    assert _diff(got, theirs("ramplus_tl", [base] + models, {"epsilon": 1e-6})) == 0
    zero_eps = ours("ramplus_tl", base, models, {"epsilon": 0.0})
    assert torch.isnan(theirs("ramplus_tl", [base] + models, {"epsilon": 0.0})).all()
    assert torch.isfinite(zero_eps).all()
    assert _diff(zero_eps, got) <= 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.01, 0.2, 10.0])
def test_nearswap(shape, t):
    base, models = make_inputs(shape, seed=15 + len(shape), n=1)
    got = ours("nearswap", base, models, {"t": t})
    assert torch.equal(got, theirs("nearswap", [base] + models, {"t": t}))
    close = (models[0] - base).abs() <= t
    assert torch.equal(got[close], models[0][close])  # within t: the model's value
    if t == 0.0:
        assert torch.equal(got, base)
    if 0 < t < 1:
        assert close.any() and (~close).any()


@pytest.mark.parametrize("shape", SHAPES)
def test_arcee_fusion_small(shape):
    base, models = make_inputs(shape, seed=17 + len(shape), n=1)
    got = ours("arcee_fusion", base, models, {}, [{}])
    assert torch.equal(got, theirs("arcee_fusion", [base] + models, {}))
    took = got == models[0]
    assert took.any() and (got == base).any()  # some elements are the model's, the rest the base's
    assert torch.equal(got[~took], base[~took])


def test_arcee_fusion_large_samples_from_the_tensor_generator():
    """Above 1M elements the quantiles come from a sample drawn from the per-tensor
    generator (mergekit draws from the global one): the same stream gives the same
    merge, and the global generator is not touched."""
    from mergesearch.methods import selective
    shape = (1100, 1000)
    assert shape[0] * shape[1] > selective.QUANTILE_SAMPLE
    base, models = make_inputs(shape, seed=21, n=1)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    got = ours("arcee_fusion", base, models, {}, [{}], seed=17, name="layer.w")
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(tensor_seed(17, "layer.w"))
    want = theirs("arcee_fusion", [base] + models, {})
    assert torch.equal(got, want)
    again = ours("arcee_fusion", base, models, {}, [{}], seed=17, name="layer.w")
    assert torch.equal(got, again)
    # another seed draws another sample: another threshold, so (almost surely) other elements
    other = ours("arcee_fusion", base, models, {}, [{}], seed=18, name="layer.w")
    assert not torch.equal(got, other)


def test_new_methods_declare_mergekit_parameters():
    spec = REGISTRY["multislerp"]
    assert spec.param("weight").required and spec.param("weight").scope == "model"
    assert spec.param("normalize_weights").default is True and spec.param("eps").default == 1e-8
    assert spec.uses_base == "optional"
    spec = REGISTRY["karcher"]
    assert spec.param("max_iter").kind is int and spec.param("max_iter").default == 10
    assert spec.param("tol").default == 1e-5 and spec.uses_base == "optional"
    assert spec.param("max_iter").check(20.0, "recipe") == 20  # mergekit's int accepts 20.0, not 20.5
    with pytest.raises(MergeSearchError, match="parameter 'max_iter' must be a whole number, got 20.5"):
        spec.param("max_iter").check(20.5, "recipe")
    spec = REGISTRY["sce"]
    assert spec.param("select_topk").default == 1.0 and spec.param("int8_mask").inert and spec.uses_base == "required"
    assert REGISTRY["nearswap"].param("t").required and REGISTRY["nearswap"].max_models == 1
    assert REGISTRY["arcee_fusion"].params == () and REGISTRY["arcee_fusion"].max_models == 1
    assert REGISTRY["arcee_fusion"].random
    assert REGISTRY["ram"].param("epsilon").default == 1e-5
    assert [(p.name, p.default) for p in REGISTRY["ramplus_tl"].params] == [("r", 0.1), ("alpha", 0.2), ("epsilon", 1e-5)]
