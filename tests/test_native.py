"""The native CPU kernels give the bits of the torch kernels, for every task-vector method,
input dtype and output dtype, with magnitudes tied at the thresholds; and without a
compiler the torch kernels take over."""

import logging

import pytest
import torch

from mergesearch.methods import native
from mergesearch.methods import REGISTRY, TensorInputs, kernels, selection

METHODS = ["ties", "task_arithmetic", "breadcrumbs_ties", "breadcrumbs", "dare_ties", "dare_linear", "linear"]


@pytest.fixture()
def fresh_native(monkeypatch, tmp_path):
    """The library state reset, its cache under tmp_path (a build from scratch)."""
    monkeypatch.setenv("MERGESEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    return tmp_path / "cache" / "native"


def _family(dtype, rows=301, cols=311, seed=3):
    """bf16-valued deltas: many magnitudes tie at the selection thresholds."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(rows, cols, generator=g) * 0.05).bfloat16().to(dtype)
    models = [(base.float() + torch.randn(rows, cols, generator=g) * 0.01).bfloat16().to(dtype) for _ in range(3)]
    models[1].view(-1)[::5] = base.view(-1)[::5]  # zero deltas never vote
    return base, models


def _params(spec):
    names = {p.name for p in spec.model_params}
    gp = {p.name: p.default for p in spec.global_params}
    if "lambda" in gp:
        gp["lambda"] = 1.3
    mp = [{**{p.name: p.default for p in spec.model_params}, "weight": w,
           **({"density": d} if "density" in names else {})} for w, d in [(0.5, 0.3), (-0.4, 0.6), (0.7, 0.5)]]
    return gp, mp


def _bits(t):
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _merge(spec, base, models, gp, mp, out_dtype):
    out = spec.fn(TensorInputs("w", base, tensors=models, seed=5, out_dtype=out_dtype), gp, mp)
    return out.to(out_dtype or out.dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_native_kernels_give_the_torch_kernels_bits(method, dtype, monkeypatch):
    if native.lib() is None:
        pytest.skip("no C++ compiler for the native kernels")
    base, models = _family(dtype)
    spec = REGISTRY[method]
    gp, mp = _params(spec)
    monkeypatch.setattr(selection, "SELECT_BLOCK", 4099)  # the native selection from this size
    monkeypatch.setattr(kernels, "COMPILE_MIN_NUMEL", 10**12)
    for out_dtype in (None, dtype):
        monkeypatch.setenv("MERGESEARCH_NATIVE", "0")
        want = _merge(spec, base, models, gp, mp, out_dtype)
        monkeypatch.setenv("MERGESEARCH_NATIVE", "1")

        def torch_kernel(*a, **k):
            raise AssertionError("the torch kernel ran where the native one applies")
        with monkeypatch.context() as m:
            m.setattr(kernels, "_combine_chunked", torch_kernel)
            m.setattr(kernels, "_weighted_sum_chunked", torch_kernel)
            got = _merge(spec, base, models, gp, mp, out_dtype)
        assert got.dtype == want.dtype and got.shape == base.shape
        assert not torch.equal(got.float(), base.float())
        assert torch.equal(_bits(got), _bits(want)), f"{method} {dtype} -> {out_dtype}"


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_native_selection_keeps_what_the_whole_tensor_selection_keeps(method, monkeypatch):
    """The native histograms find the same thresholds, counts and tie positions as
    kthvalue over the whole |delta| (no native, no blocks)."""
    if native.lib() is None:
        pytest.skip("no C++ compiler for the native kernels")
    from mergesearch.methods import sparsify
    base, models = _family(torch.bfloat16, seed=7)
    spec = REGISTRY[method]
    windows = {}
    for label, on, block in (("torch", "0", 10**9), ("native", "1", 4099)):
        monkeypatch.setenv("MERGESEARCH_NATIVE", on)
        monkeypatch.setattr(selection, "SELECT_BLOCK", block)
        x = TensorInputs("w", base, tensors=models)
        assert selection.uses_native(x, 0) == (on == "1")
        windows[label] = [sparsify.window(x, i, *sparsify.keep_range(spec.sparsifier, x.numel, d, 0.01))
                          for i, d in enumerate((0.3, 0.6, 0.5))]
    for a, b in zip(windows["torch"], windows["native"]):
        assert [float(v) for v in a[1:]] == [float(v) for v in b[1:]]
    if method == "ties":  # a run of equal magnitudes is split at a threshold (by flat index)
        assert any(int(w[3]) > 0 for w in windows["native"])


def test_native_kernels_split_over_threads_give_one_threads_bits(monkeypatch):
    if native.lib() is None:
        pytest.skip("no C++ compiler for the native kernels")
    base, models = _family(torch.bfloat16, rows=517, cols=389)  # 201113 elements: ranges end mid-tile
    spec = REGISTRY["ties"]
    gp, mp = _params(spec)
    monkeypatch.setattr(selection, "SELECT_BLOCK", 4099)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(_merge(spec, base, models, gp, mp, torch.bfloat16))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(_bits(outs[0]), _bits(o)) for o in outs[1:])


def test_native_library_is_built_once_into_the_cache(fresh_native):
    if native._compiler() is None:
        pytest.skip("no C++ compiler")
    assert native.lib() is not None
    built = sorted(p.name for p in fresh_native.iterdir())
    assert len(built) == 1 and built[0].startswith("mergesearch_native_") and built[0].endswith(".so")
    mtime = (fresh_native / built[0]).stat().st_mtime_ns
    native._lib, native._tried = None, False  # a new process: loads the built file, no rebuild
    assert native.lib() is not None
    assert (fresh_native / built[0]).stat().st_mtime_ns == mtime
    assert sorted(p.name for p in fresh_native.iterdir()) == built  # no temporary left


def test_without_a_compiler_the_torch_kernels_merge_the_same(fresh_native, monkeypatch, caplog):
    base, models = _family(torch.bfloat16)
    spec = REGISTRY["ties"]
    gp, mp = _params(spec)
    monkeypatch.setattr(selection, "SELECT_BLOCK", 4099)
    monkeypatch.setattr(kernels, "COMPILE_MIN_NUMEL", 10**12)
    want = _merge(spec, base, models, gp, mp, torch.bfloat16)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    with caplog.at_level(logging.WARNING, logger="mergesearch.methods.native"):
        got = _merge(spec, base, models, gp, mp, torch.bfloat16)
    assert native.lib() is None
    assert any("native merge kernels unavailable" in r.getMessage() for r in caplog.records)
    assert torch.equal(_bits(got), _bits(want))
    assert not any(p.name.endswith(".tmp") for p in fresh_native.glob("*"))  # no partial library left


def test_native_dare_draws_and_exact_norms_are_torchs(monkeypatch):
    """The native DARE mask is torch's random_ draws (from a generator already part-way
    through its 624-draw refill, across several refills), the generator ends where
    torch's ends, and the L1 norms are exact: equal to the torch blocks' mantissa bins
    and to a sum of fractions, with magnitudes over many exponents, subnormals and zeros."""
    if native.lib() is None:
        pytest.skip("no C++ compiler for the native kernels")
    from fractions import Fraction

    from mergesearch.methods import sparsify
    g = torch.Generator().manual_seed(9)
    n = 40_000
    base = torch.randn(n, generator=g)
    delta = torch.randn(n, generator=g) * torch.exp2(torch.randint(-60, 10, (n,), generator=g).float())
    delta[::7] = 0.0
    delta[5:9] = torch.tensor([1e-40, -3e-42, 2.0**-126, 7e-45])  # subnormals
    src = base + delta
    bound = 5_000_000
    a, b = torch.Generator().manual_seed(77), torch.Generator().manual_seed(77)
    torch.empty(100, dtype=torch.int32).random_(0, 1 << 24, generator=a)
    torch.empty(100, dtype=torch.int32).random_(0, 1 << 24, generator=b)
    want = torch.empty(n, dtype=torch.int32).random_(0, 1 << 24, generator=a).lt_(bound)
    keep, bins = native.dare_mask(b, bound, src, base, norms=True)
    assert torch.equal(keep, want)
    assert torch.equal(a.get_state(), b.get_state())
    d = src - base
    torch_bins = [0] * 512
    for lo in range(0, n, 4096):
        for k, c in enumerate(sparsify._mantissa_bins(d[lo:lo + 4096], want[lo:lo + 4096])):
            torch_bins[k] += c
    scale = 1 << 150
    whole = sum(Fraction(v) for v in d.abs().double().tolist())
    kept = sum(Fraction(v) for v, k in zip(d.abs().double().tolist(), want.tolist()) if k)
    for bb in (bins, torch_bins):
        assert Fraction(sum(c << max(e, 1) for e, c in enumerate(bb[:256])), scale) == whole
        assert Fraction(sum(c << max(e, 1) for e, c in enumerate(bb[256:])), scale) == kept
    factor = sparsify.exact_l1_factor(bins)
    assert factor.dtype == torch.float32 and float(factor) == float(torch.tensor(float(whole / kept)).float())
    assert sparsify.exact_l1_factor([0] * 512) is None
    nan = [0] * 512
    nan[255] = 1
    assert torch.isnan(sparsify.exact_l1_factor(nan))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_native_finite_check_and_distance(dtype):
    """The input check finds one NaN or Inf anywhere (here in the second thread's range),
    and the relative distance's sums agree with float64 ones."""
    if native.lib() is None:
        pytest.skip("no C++ compiler for the native kernels")
    from mergesearch.engine.checkpoint import all_finite
    g = torch.Generator().manual_seed(4)
    t = torch.randn(300_001, generator=g).to(dtype)
    assert native.all_finite(t) is True and all_finite(t)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[250_000] = bad
        assert native.all_finite(u) is False and not all_finite(u)
    big = torch.full((10,), 60000.0).to(dtype)  # large but finite (float16's max is 65504)
    assert native.all_finite(big) is True
    m = (t.float() + 0.01 * torch.randn(300_001, generator=g)).to(dtype)
    num, den = native.squared_distance(m, t)
    want_num = float((m.double() - t.double()).square().sum())
    want_den = float(t.double().square().sum())
    assert num == pytest.approx(want_num, rel=1e-5) and den == pytest.approx(want_den, rel=1e-5)


def test_selection_scratch_is_reused_only_when_nothing_uses_it(monkeypatch):
    if native.lib() is None:
        pytest.skip("no C++ compiler for the native kernels")
    monkeypatch.setattr(native, "_POOL", [])
    a = native._scratch(1000)
    b = native._scratch(1000)
    assert a.data_ptr() != b.data_ptr()  # a is still held
    derived = a.reshape(10, 100)  # a view of the view keeps the memory in use
    ptr = a.data_ptr()
    del a
    c = native._scratch(1000)
    assert c.data_ptr() != ptr
    del derived
    d = native._scratch(800)  # now free: reused
    assert d.data_ptr() == ptr and d.numel() == 800
