"""The compiled fused kernel gives the same bits as the eager one, and mergekit's values
(the torch kernels: the native CPU kernels are off in this module)."""

import pytest
import torch
from mergekit.merge_methods import merge_tensors

from mergesearch.methods import REGISTRY, TensorInputs, kernels


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    """These tests compare the torch kernels (compiled, eager): the native CPU kernels,
    which would otherwise take every CPU merge, are off (tests/test_native.py compares them)."""
    monkeypatch.setenv("MERGESEARCH_NATIVE", "0")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_compiled_equals_eager_and_mergekit(method, monkeypatch):
    if not kernels._compile_available():
        pytest.skip("no C++ compiler for torch.compile")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 200, generator=g)
    models = [base + 0.3 * torch.randn(300, 200, generator=g) for _ in range(3)]
    spec = REGISTRY[method]
    gp = {p.name: p.default for p in spec.global_params}
    mp = [{**{p.name: p.default for p in spec.model_params}, "weight": w, "density": d}
          for w, d in [(0.5, 0.3), (-0.4, 0.6), (0.7, 0.5)]]

    def run():
        return spec.fn(TensorInputs("w", base, tensors=models), gp, mp)

    monkeypatch.setattr(kernels, "COMPILE_MIN_NUMEL", 10**12)
    eager = run()
    monkeypatch.setattr(kernels, "COMPILE_MIN_NUMEL", 1)
    compiled = run()
    assert not kernels._compile_failed
    assert torch.equal(eager, compiled)
    want = merge_tensors([base] + models, method, parameters={"weight": [0.5, -0.4, 0.7], "density": [0.3, 0.6, 0.5]},
                         base_index=0)
    assert (compiled - want).abs().max().item() <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "breadcrumbs_ties"])
def test_compiled_and_eager_threshold_paths_agree_on_tied_magnitudes(method, monkeypatch):
    """bf16-valued deltas tie at the pruning thresholds: given as stored tensors (deltas
    taken inside the kernel) or as deltas, compiled or not, the same elements are kept."""
    if not kernels._compile_available():
        pytest.skip("no C++ compiler for torch.compile")
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(256, 192, generator=g) * 0.05).bfloat16().float()
    models = [(base + torch.randn(256, 192, generator=g) * 0.01).bfloat16().float() for _ in range(3)]
    deltas = [m - base for m in models]
    spec = REGISTRY[method]
    gp = {p.name: p.default for p in spec.global_params}
    mp = [{**{p.name: p.default for p in spec.model_params}, "weight": w, "density": d}
          for w, d in [(0.5, 0.3), (-0.4, 0.6), (0.7, 0.5)]]
    outs = []
    for threshold in (10**12, 1):
        monkeypatch.setattr(kernels, "COMPILE_MIN_NUMEL", threshold)
        outs.append(spec.fn(TensorInputs("w", base, tensors=models), gp, mp))
        outs.append(spec.fn(TensorInputs("w", base, deltas=deltas), gp, mp))
    assert not kernels._compile_failed
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "breadcrumbs_ties", "dare_ties", "linear"])
def test_chunked_eager_kernels_give_the_same_bits(method, monkeypatch):
    """The eager kernels over chunks (bounded temporaries) equal one pass over the whole
    tensor, including the tie split by flat index at the thresholds, whose chunks start
    mid-row and mid-run of equal magnitudes."""
    g = torch.Generator().manual_seed(2)
    base = (torch.randn(257, 193, generator=g) * 0.05).bfloat16().float()
    models = [(base + torch.randn(257, 193, generator=g) * 0.01).bfloat16().float() for _ in range(3)]
    spec = REGISTRY[method]
    gp = {p.name: p.default for p in spec.global_params}
    mp = [{**{p.name: p.default for p in spec.model_params}, "weight": w, **({"density": d} if "density" in
          {p.name for p in spec.model_params} else {})} for w, d in [(0.5, 0.3), (-0.4, 0.6), (0.7, 0.5)]]
    monkeypatch.setattr(kernels, "COMPILE_MIN_NUMEL", 10**12)
    outs = []
    for chunk in (10**9, 1000, 4099):
        monkeypatch.setattr(kernels, "EAGER_CHUNK", chunk)
        outs.append(spec.fn(TensorInputs("w", base, tensors=models, seed=5), gp, mp))
    assert outs[0].shape == base.shape
    assert not torch.equal(outs[0], base)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.slow
def test_new_weights_and_lambda_do_not_recompile_and_stay_exact(monkeypatch):
    """Weights and lambda reach the compiled kernel as tensors: new values (negative ones
    too) reuse the compiled graph and give the eager kernel's bits. As Python floats they
    were made symbolic after the first change, and torch 2.13 then computed wrong merges
    (max error 6.5 on this input)."""
    if not kernels._compile_available():
        pytest.skip("no C++ compiler for torch.compile")
    from torch._dynamo.utils import counters
    monkeypatch.setattr(kernels, "COMPILE_MIN_NUMEL", 1)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(96, 40, generator=g)
    models = [base + 0.1 * torch.randn(96, 40, generator=g) for _ in range(3)]
    spec = REGISTRY["ties"]
    gp = {p.name: p.default for p in spec.global_params}

    def run(k):
        mp = [{**{p.name: p.default for p in spec.model_params}, "weight": (0.2 + 0.1 * k + i * 0.05) * (-1) ** (k * i),
               "density": 0.5} for i in range(3)]
        return spec.fn(TensorInputs("w", base, tensors=models), {**gp, "lambda": 0.8 + 0.2 * k}, mp)

    run(0)
    frames = counters["frames"]["total"]
    outs = [run(k) for k in range(1, 7)]
    assert counters["frames"]["total"] == frames  # six new weight and lambda values, no new compilation
    assert not kernels._compile_failed
    assert not torch.equal(outs[0], outs[1])
    monkeypatch.setattr(kernels, "COMPILE_MIN_NUMEL", 10**12)
    assert all(torch.equal(o, run(k)) for k, o in zip(range(1, 7), outs))  # the eager kernel's bits


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "breadcrumbs_ties", "linear"])
@pytest.mark.parametrize("compiled", [False, True])
def test_blocked_selection_and_compiled_blocks_give_the_same_bits(method, compiled, monkeypatch):
    """Large stored tensors are selected (radix histogram, bucket, tie positions) and
    combined block by block: the same bits as one pass over the whole tensor, with bf16
    inputs whose magnitudes tie at the thresholds across block edges."""
    from mergesearch.methods import selection
    if compiled and not kernels._compile_available():
        pytest.skip("no C++ compiler for torch.compile")
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(301, 211, generator=g) * 0.05).bfloat16()
    models = [(base.float() + torch.randn(301, 211, generator=g) * 0.01).bfloat16() for _ in range(3)]
    spec = REGISTRY[method]
    gp = {p.name: p.default for p in spec.global_params}
    names = {p.name for p in spec.model_params}
    mp = [{**{p.name: p.default for p in spec.model_params}, "weight": w, **({"density": d} if "density" in names
          else {})} for w, d in [(0.5, 0.3), (-0.4, 0.6), (0.7, 0.5)]]
    monkeypatch.setattr(kernels, "COMPILE_MIN_NUMEL", 1 if compiled else 10**12)
    monkeypatch.setattr(selection, "RADIX_MIN_NUMEL", 1000)
    outs, blocked = [], []
    for block, one_shot in ((10**9, True), (4099, True), (20000, True), (4099, False)):
        monkeypatch.setattr(selection, "SELECT_BLOCK", block)
        monkeypatch.setattr(kernels, "COMPILED_BLOCK", block)
        x = TensorInputs("w", base, tensors=models, seed=5)
        if one_shot:  # the streamed export
            with kernels.streaming():
                blocked.append(selection.blocked(x, 0))
                outs.append(spec.fn(x, gp, mp))
        else:  # a worker: whole-tensor selections
            blocked.append(selection.blocked(x, 0))
            outs.append(spec.fn(x, gp, mp))
    assert blocked == [False, True, True, False]
    assert not kernels._compile_failed
    assert not torch.equal(outs[0], base.float())
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    # and the blocked selection keeps exactly what the whole-tensor one keeps
    if method in ("ties", "breadcrumbs_ties"):
        from mergesearch.methods import sparsify
        kind = spec.sparsifier
        rng = sparsify.keep_range(kind, base.numel(), 0.3, mp[0].get("gamma", 0.0))
        monkeypatch.setattr(selection, "SELECT_BLOCK", 10**9)
        whole = sparsify.window(TensorInputs("w", base, tensors=models), 0, *rng)
        monkeypatch.setattr(selection, "SELECT_BLOCK", 4099)
        with kernels.streaming():
            part = sparsify.window(TensorInputs("w", base, tensors=models), 0, *rng)
        assert all(torch.equal(a, b) for a, b in zip(whole[1:], part[1:]))
        if method == "ties":  # here a run of equal magnitudes is split at the threshold
            assert int(whole[3]) > 0  # (its position found by counting per block)


def test_radix_select_bits_matches_a_sort_with_ties_zeros_and_ends():
    from mergesearch.methods.selection import first_digit_cumsum, radix_select_bits
    g = torch.Generator().manual_seed(11)
    cases = [torch.randn(5000, generator=g).abs(),
             (torch.randn(7000, generator=g) * 0.01).bfloat16().float().abs(),  # many ties
             torch.cat([torch.zeros(3000), torch.rand(2000, generator=g)]),  # a run of zeros
             torch.full((999,), 0.25)]
    for a in cases:
        s = a.sort().values
        bits = a.view(torch.int32)
        first = first_digit_cumsum(bits)
        for k in (0, 1, a.numel() // 3, a.numel() // 2, a.numel() - 1):
            vb, below, at = radix_select_bits(bits, k, first if k % 2 else None)
            v = torch.tensor([vb], dtype=torch.int32).view(torch.float32)[0]
            assert torch.equal(v, s[k])
            assert (below, at) == (int((a < v).sum()), int((a <= v).sum()))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_accelerator_selection_paths_give_the_cpu_bits(method, monkeypatch):
    """The selection paths taken on an accelerator (a sort, then 8-bit radix passes),
    run here on the CPU: the same merged bits as the CPU paths (kthvalue, 16-bit radix)."""
    from mergesearch.methods import selection
    g = torch.Generator().manual_seed(4)
    base = (torch.randn(257, 129, generator=g) * 0.05).bfloat16()
    models = [(base.float() + torch.randn(257, 129, generator=g) * 0.01).bfloat16() for _ in range(3)]
    spec = REGISTRY[method]
    gp = {p.name: p.default for p in spec.global_params}
    mp = [{**{p.name: p.default for p in spec.model_params}, "weight": w, "density": d}
          for w, d in [(0.5, 0.3), (-0.4, 0.6), (0.7, 0.5)]]
    monkeypatch.setattr(kernels, "COMPILE_MIN_NUMEL", 10**12)
    outs = {}
    for label, accel, radix_min in (("cpu kthvalue", False, 10**9), ("cpu radix16", False, 1000),
                                    ("sort", True, 10**9), ("radix8", True, 1000)):
        monkeypatch.setattr(selection, "_select_by_sort_and_radix8", lambda device, accel=accel: accel)
        monkeypatch.setattr(selection, "SORT_MIN_NUMEL", 1000)
        monkeypatch.setattr(selection, "RADIX_MIN_NUMEL", radix_min)
        outs[label] = spec.fn(TensorInputs("w", base, tensors=models, seed=5), gp, mp)
    assert not torch.equal(outs["cpu kthvalue"], base.float())
    assert all(torch.equal(outs["cpu kthvalue"], o) for o in outs.values())
