"""The Triton merge kernels give the torch kernels' bits.

Triton's interpreter (``TRITON_INTERPRET=1``, read when triton is imported) runs the
kernels on CPU tensors, so the checks run in one child process with it set,
``MERGESEARCH_TRITON=force`` (the kernels on the CPU, at every size) and the native and
compiled kernels off; each check merges the same inputs with the Triton kernels and with
the eager torch kernels (``MERGESEARCH_TRITON=0``) and compares the bits. The tensors are
small (the interpreter runs a program in numpy) and not a multiple of the kernels' blocks;
the deltas are bf16-valued, so magnitudes tie at the selection thresholds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "linear"]
ROWS, COLS = 37, 59  # 2183 elements: three blocks of the combine kernel, the last one partial


def _family(dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(ROWS, COLS, generator=g) * 0.05).bfloat16().to(dtype)
    models = [(base.float() + torch.randn(ROWS, COLS, generator=g) * 0.01).bfloat16().to(dtype) for _ in range(3)]
    models[1].view(-1)[::5] = base.view(-1)[::5]  # zero deltas never vote
    return base, models


def _params(spec, **overrides):
    names = {p.name for p in spec.model_params}
    gp = {p.name: p.default for p in spec.global_params}
    if "lambda" in gp:
        gp["lambda"] = 1.3
    gp.update(overrides)
    mp = [{**{p.name: p.default for p in spec.model_params}, "weight": w,
           **({"density": d} if "density" in names else {})} for w, d in [(0.5, 0.3), (-0.4, 0.6), (0.7, 0.5)]]
    return gp, mp


def _bits(t):
    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


CASES = (
    [(m, "bf16", "tensors", "same", {}) for m in METHODS]
    + [(m, "f32", "tensors", "same", {}) for m in METHODS]
    + [(m, "f32", "deltas", "none", {}) for m in ("task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties")]
    + [("ties", "bf16", "tensors", "none", {}), ("ties", "f16", "tensors", "same", {}),
       ("ties", "bf16", "tensors", "same", {"normalize": False}),
       ("task_arithmetic", "bf16", "tensors", "same", {"normalize": True}),
       ("ties", "bf16", "tensors", "same", {"rescale": True}),
       ("breadcrumbs", "f32", "tensors", "same", {"normalize": True})]
)


def _case_id(c) -> str:
    return "-".join([c[0], c[1], c[2], c[3]] + [f"{k}={v}" for k, v in c[4].items()])


def _run_checks() -> dict:
    """In the child process: every case of CASES, the selection and the export check."""
    from mergesearch.methods import REGISTRY, TensorInputs, kernels, selection
    from mergesearch.methods import triton_kernels as tk
    from mergesearch.methods import triton_select as ts
    from mergesearch.methods.apply import merge_tensor
    from mergesearch.methods.inputs import FactorCache

    calls = {"combine": 0, "weighted_sum": 0, "select": 0, "nth": 0}

    def counted(name, fn):
        def wrapper(*a, **k):
            made = fn(*a, **k)
            calls[name] += made is not None  # a fallback returns None
            return made
        return wrapper

    tk.combine, tk.weighted_sum = counted("combine", tk.combine), counted("weighted_sum", tk.weighted_sum)
    ts.select_abs, ts.nth_equal = counted("select", ts.select_abs), counted("nth", ts.nth_equal)
    dtypes = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}
    out = {}

    def merge(spec, x_args, gp, mp, out_dtype):
        x = TensorInputs("w", *x_args[:1], **x_args[1], seed=5, out_dtype=out_dtype)
        got = spec.fn(x, gp, mp)
        return got.to(out_dtype or got.dtype)

    for case in CASES:
        method, dt, given, outk, over = case
        base, models = _family(dtypes[dt])
        spec = REGISTRY[method]
        gp, mp = _params(spec, **over)
        if given == "deltas":
            args = (base, {"deltas": [m.float() - base.float() for m in models]})
        else:
            args = (base, {"tensors": models})
        out_dtype = None if outk == "none" else dtypes[dt]
        before = dict(calls)
        os.environ["MERGESEARCH_TRITON"] = "force"
        got = merge(spec, args, gp, mp, out_dtype)
        ran = {k: calls[k] - before[k] for k in calls}
        os.environ["MERGESEARCH_TRITON"] = "0"
        want = merge(spec, args, gp, mp, out_dtype)
        out[_case_id(case)] = {"equal": got.dtype == want.dtype and torch.equal(_bits(got), _bits(want)),
                               "changed": not torch.equal(got.float(), base.float()), "ran": ran}

    # the selection: thresholds, counts and tie positions equal the torch selection's, from
    # gathered buckets and, with every bucket counted as crowded, from the radix passes
    for label, compact_min, compact_share, histogram in (
            ("selection", ts.COMPACT_MIN, ts.COMPACT_SHARE, "atomics"), ("selection_radix", 0, 0.0, "atomics"),
            ("selection_two_passes", ts.COMPACT_MIN, ts.COMPACT_SHARE, "radix")):
        ts.COMPACT_MIN, ts.COMPACT_SHARE, ts.HISTOGRAM = compact_min, compact_share, histogram
        ts.HIST_COPIES_MIN_NUMEL = 0 if label == "selection" else 1 << 20  # the histogram in 8 copies too
        base, models = _family(torch.bfloat16, seed=7)
        x = TensorInputs("w", base, tensors=models)
        n = x.numel
        sel = {"equal": True, "split_runs": 0, "checked": 0}
        for i in range(3):
            for start, end in ((int(0.7 * n), n), (int(0.13 * n), int(0.91 * n)), (0, 1), (n - 1, n), (5, 6)):
                os.environ["MERGESEARCH_TRITON"] = "force"
                got = selection.window(x, i, start, end)
                os.environ["MERGESEARCH_TRITON"] = "0"
                want = selection.window(x, i, start, end)
                same = all(torch.equal(_bits(a.reshape(1)), _bits(b.reshape(1))) for a, b in zip(got[1:], want[1:]))
                sel["equal"] &= same
                sel["checked"] += 1
                sel["split_runs"] += int(int(want[3]) != 0) + int(int(want[4]) != n)
        a = (models[0].float() - base.float()).abs().reshape(-1)
        srt = torch.sort(a).values
        for k in (0, 1, n // 3, n // 2, n - 2, n - 1):
            scratch = selection.Scratch(native=False)
            src, b = models[0].reshape(-1), base.reshape(-1)
            v, below, at = ts.select_abs(src, b, k, scratch)
            sel["equal"] &= bool(v == srt[k]) and below == int((a < srt[k]).sum()) and at == int((a <= srt[k]).sum())
            want = int((a == v).nonzero()[k - below])
            sel["equal"] &= ts.nth_equal(src, b, v, k - below, scratch) == want  # from the gathered bucket
            sel["equal"] &= ts.nth_equal(src, b, v, k - below) == want  # by the counting pass
        out[label] = sel
    ts.COMPACT_MIN, ts.COMPACT_SHARE, ts.HISTOGRAM = 1 << 16, 1 / 64, "atomics"

    # a worker keeps each model's histogram between candidates: the same bits, fewer passes
    base, models = _family(torch.bfloat16, seed=11)
    spec = REGISTRY["breadcrumbs_ties"]
    cache, cached = FactorCache(), {"equal": True}
    for density in (0.3, 0.55, 0.3):
        gp, mp = _params(spec)
        mp = [{**p, "density": density} for p in mp]
        os.environ["MERGESEARCH_TRITON"] = "force"
        got = spec.fn(TensorInputs("w", base, tensors=models, seed=5, cache=cache, ids=["a", "b", "c"]), gp, mp)
        os.environ["MERGESEARCH_TRITON"] = "0"
        want = spec.fn(TensorInputs("w", base, tensors=models, seed=5), gp, mp)
        cached["equal"] &= torch.equal(_bits(got), _bits(want))
    cached.update(hits=cache.hits, misses=cache.misses)
    # histograms kept for other inputs under the same names are caught, not used
    other, others = _family(torch.bfloat16, seed=12)
    os.environ["MERGESEARCH_TRITON"] = "force"
    try:
        spec.fn(TensorInputs("w", other, tensors=others, seed=5, cache=cache, ids=["a", "b", "c"]), gp, mp)
        cached["stale_caught"] = False
    except RuntimeError as e:
        cached["stale_caught"] = "counted" in str(e)
    out["cached"] = cached

    # an export (one-shot, streaming) merges to the bits of the in-memory candidate
    os.environ["MERGESEARCH_TRITON"] = "force"
    base, models = _family(torch.bfloat16)
    spec = REGISTRY["ties"]
    gp, mp = _params(spec)
    scored = merge_tensor(spec, TensorInputs("w", base, tensors=models, seed=5, out_dtype=torch.bfloat16), gp, mp)
    with kernels.streaming():
        exported = merge_tensor(spec, TensorInputs("w", base, tensors=models, seed=5, out_dtype=torch.bfloat16),
                                gp, mp)
    out["export"] = {"equal": torch.equal(_bits(scored.to(torch.bfloat16)), _bits(exported.to(torch.bfloat16)))}

    # the result written into a given tensor (the evaluation model's parameter) when it fits
    os.environ["MERGESEARCH_TRITON"] = "force"
    dest = torch.empty_like(base)
    args = (base, models, [False] * 3, [None] * 3, [0.5, -0.4, 0.7], 1.3, False, True, 0.8)
    made = kernels.combine(*args, out_dtype=torch.bfloat16, out=dest)
    summed = kernels.weighted_sum(models, [0.5, -0.4, 0.7], 0.8, True, out_dtype=torch.bfloat16,
                                  out=torch.empty_like(base))
    odd = kernels.combine(*args, out_dtype=torch.bfloat16, out=torch.empty_like(base).t())  # not contiguous
    os.environ["MERGESEARCH_TRITON"] = "0"
    want = kernels.combine(*args, out_dtype=torch.bfloat16).to(torch.bfloat16)
    want_sum = kernels.weighted_sum(models, [0.5, -0.4, 0.7], 0.8, True, out_dtype=torch.bfloat16).to(torch.bfloat16)
    out["into"] = {"same_tensor": made is dest, "equal": torch.equal(_bits(made), _bits(want))
                   and torch.equal(_bits(summed), _bits(want_sum)) and torch.equal(_bits(odd), _bits(want))}

    # a kernel that fails to launch: the torch kernels take over, the same bits, Triton off
    class Broken:
        def __getitem__(self, grid):
            def run(*a, **k):
                raise RuntimeError("simulated build failure")
            return run

    jit = tk.jit()
    saved, jit.combine_kernel = jit.combine_kernel, Broken()
    os.environ["MERGESEARCH_TRITON"] = "force"
    gp, mp = _params(REGISTRY["task_arithmetic"])
    got = merge(REGISTRY["task_arithmetic"], (base, {"tensors": models}), gp, mp, torch.bfloat16)
    out["fallback"] = {"off": tk.jit() is None and not tk.applies("cpu", 1 << 20)}
    jit.combine_kernel, tk._jit = saved, jit
    os.environ["MERGESEARCH_TRITON"] = "0"
    want = merge(REGISTRY["task_arithmetic"], (base, {"tensors": models}), gp, mp, torch.bfloat16)
    out["fallback"]["equal"] = torch.equal(_bits(got), _bits(want))
    return out


@pytest.fixture(scope="module")
def checks():
    env = {**os.environ, "TRITON_INTERPRET": "1", "MERGESEARCH_TRITON": "force", "MERGESEARCH_NATIVE": "0",
           "MERGESEARCH_COMPILE": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_merge_gives_the_torch_kernels_bits(checks, case):
    r = checks[_case_id(case)]
    method, _, given, _, over = case
    assert r["changed"]
    assert r["equal"], r
    if method == "linear":
        assert r["ran"]["weighted_sum"] == 1, r
    else:
        assert r["ran"]["combine"] == 1, r  # the Triton kernel ran, not a fallback
    if method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        assert r["ran"]["select"] >= 3, r  # each model's thresholds came from the radix passes


@pytest.mark.parametrize("label", ["selection", "selection_radix", "selection_two_passes"])
def test_triton_selection_gives_the_torch_thresholds(checks, label):
    r = checks[label]
    assert r["equal"], r
    assert r["checked"] == 15
    assert r["split_runs"] >= 6  # the tie split by index was exercised


def test_triton_selection_histograms_kept_between_candidates(checks):
    r = checks["cached"]
    assert r["equal"], r
    assert (r["misses"], r["hits"]) == (3, 6)  # built once per model (3 candidates of 3 models)
    assert r["stale_caught"]


def test_triton_export_equals_the_scored_candidate(checks):
    assert checks["export"]["equal"]


def test_triton_kernels_write_into_a_given_tensor(checks):
    assert checks["into"] == {"same_tensor": True, "equal": True}


def test_failed_launch_falls_back_to_the_torch_kernels(checks):
    assert checks["fallback"] == {"off": True, "equal": True}


def _ptx(fn, signature: dict, constexprs: dict, fusion: bool) -> str:
    """``fn`` compiled for an H100 (sm_90) with the launch options, as the JIT compiles it
    for aligned tensors; no GPU needed (the triton wheel brings ptxas)."""
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")

    names = list(fn.arg_names)
    # pointers to 16-byte-aligned tensors and a size divisible by 16 (as every weight matrix)
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items()
             if v.startswith("*") or k == "n"}
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs,
                    attrs=attrs)
    from mergesearch.methods import triton_kernels as tk
    options = {**tk.LAUNCH, "enable_fp_fusion": fusion}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def test_cuda_build_rounds_like_torch():
    """Compiled for a GPU, the TIES combine (bf16, 3 models) has no fused multiply-add
    with the launch options (it has some with Triton's default), divides with IEEE
    rounding, keeps denormals, and reads and writes in vectors."""
    import re

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter's triton.jit makes no compilable kernels")
    from mergesearch.methods import triton_jit as tj
    from mergesearch.methods import triton_kernels as tk

    assert tk.LAUNCH["enable_fp_fusion"] is False
    sig = {"out": "*i16", "base": "*i16", **{f"s{i}": "*i16" for i in range(8)},
           **{f"m{i}": "*u8" for i in range(8)}, "fp": "*fp32", "ip": "*i64", "n": "i64"}
    consts = {"K": 3, "FLAGS": sum((1 | 1 << 5) << (6 * j) for j in range(3)), "BASE_KIND": 1, "OUT_KIND": 1,
              "NORMALIZE": True, "CONSENSUS": True, "BLOCK": tk.BLOCK}
    ptx = _ptx(tj.combine_kernel, sig, consts, fusion=False)
    assert not re.search(r"\bfma\.", ptx)
    assert re.search(r"div\.rn\.f32", ptx) and not re.search(r"\.ftz", ptx)
    assert not re.search(r"\b(add|sub|mul)\.f32", ptx)  # every product and sum rounds on its own (.rn)
    assert re.search(r"ld\.global\.v\d", ptx) and re.search(r"st\.global\.v\d", ptx)
    assert re.search(r"\bfma\.rn\.f32", _ptx(tj.combine_kernel, sig, consts, fusion=True))


def _flags(kind, delta=0, mask=0, factor=0, window=0, models=1):
    return sum((kind | delta << 2 | mask << 3 | factor << 4 | window << 5) << (6 * j) for j in range(models))


_SRC = {"src": "*i16", "base": "*i16"}
BUILDS = {  # kernel, signature, constexprs: every kind of launch the host side makes
    "combine dare_ties bf16 x4": ("combine_kernel", {
        "out": "*i16", "base": "*i16", **{f"s{i}": "*i16" for i in range(8)}, **{f"m{i}": "*u8" for i in range(8)},
        "fp": "*fp32", "ip": "*i64", "n": "i64"}, {
        "K": 4, "FLAGS": _flags(1, mask=1, factor=1, models=4), "BASE_KIND": 1, "OUT_KIND": 1, "NORMALIZE": False,
        "CONSENSUS": True, "BLOCK": 1024}),
    "combine breadcrumbs f32 deltas x8": ("combine_kernel", {
        "out": "*fp32", "base": "*fp32", **{f"s{i}": "*fp32" for i in range(8)},
        **{f"m{i}": "*u8" for i in range(8)}, "fp": "*fp32", "ip": "*i64", "n": "i64"}, {
        "K": 8, "FLAGS": _flags(0, delta=1, window=1, models=8), "BASE_KIND": 0, "OUT_KIND": 0, "NORMALIZE": True,
        "CONSENSUS": False, "BLOCK": 1024}),
    "weighted_sum f16 x3": ("weighted_sum_kernel", {
        "out": "*fp16", **{f"s{i}": "*fp16" for i in range(8)}, "fp": "*fp32", "n": "i64"}, {
        "K": 3, "FLAGS": _flags(2, models=3), "OUT_KIND": 2, "NORMALIZE": True, "BLOCK": 1024}),
    "top16 histogram": ("top16_hist_kernel", {**_SRC, "hist": "*i32", "n": "i64"}, {
        "SRC_KIND": 1, "BASE_KIND": 1, "COPIES": 8, "BLOCK": 1024}),
    "bucket gather": ("compact_kernel", {**_SRC, "counter": "*i32", "out": "*i64", "n": "i64", "bucket": "i32",
                                         "cap": "i64"}, {
        "SRC_KIND": 1, "BASE_KIND": 1, "BLOCK": 1024}),
    "radix pass": ("radix_hist_kernel", {"src": "*fp32", "base": "*fp32", "hist": "*i32", "n": "i64",
                                         "prefix": "i32"}, {
        "SRC_KIND": 0, "BASE_KIND": -1, "PSHIFT": 16, "SHIFT": 8, "NBITS": 8, "BLOCK": 1024, "TILES": 16}),
    "tie counts": ("count_equal_kernel", {**_SRC, "counts": "*i32", "n": "i64", "bits": "i32"}, {
        "SRC_KIND": 1, "BASE_KIND": 1, "BLOCK": 1024}),
    "tie position": ("position_equal_kernel", {**_SRC, "out": "*i64", "n": "i64", "lo": "i64", "r": "i64",
                                               "bits": "i32"}, {"SRC_KIND": 1, "BASE_KIND": 1, "BLOCK": 1024}),
}


@pytest.mark.parametrize("build", list(BUILDS))
def test_every_kernel_compiles_for_a_gpu(build):
    """The interpreter runs what a GPU compiler may refuse: each kernel is built for sm_90."""
    import re

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter's triton.jit makes no compilable kernels")
    from mergesearch.methods import triton_jit as tj

    name, sig, consts = BUILDS[build]
    ptx = _ptx(getattr(tj, name), sig, consts, fusion=False)
    assert ".entry " + name in ptx and not re.search(r"\bfma\.", ptx)


def test_cpu_tensors_keep_their_kernels(monkeypatch):
    """Without ``force``, CPU tensors never reach the Triton kernels (nor import triton);
    with the kernels unavailable, every device keeps the torch kernels."""
    from mergesearch.methods import triton_kernels as tk

    monkeypatch.delenv("MERGESEARCH_TRITON", raising=False)
    assert not tk.applies("cpu", 1 << 24)
    monkeypatch.setenv("MERGESEARCH_TRITON", "0")
    assert not tk.applies("cuda", 1 << 24)
    monkeypatch.setenv("MERGESEARCH_TRITON", "force")
    monkeypatch.setattr(tk, "_jit", None)
    monkeypatch.setattr(tk, "_tried", True)  # as after a failed import
    assert not tk.applies("cuda", 1 << 24)


if __name__ == "__main__":
    print(json.dumps(_run_checks()))


def test_factor_cache_limited_to_prefixes_keeps_only_those_kinds():
    """A worker with no room for SVD factors keeps only the device selection's histograms:
    other kinds are built every time, and nothing of theirs is held."""
    from mergesearch.methods import FactorCache

    calls = []

    def build(v):
        def f():
            calls.append(v)
            return torch.full((4,), float(len(v)))
        return f

    c = FactorCache(("triton_abs_top16/",))
    for _ in range(3):
        c.get("w", "sum", (1,), build("sum"))
        c.get("w", "triton_abs_top16/m0", None, build("hist"))
    assert calls == ["sum", "hist", "sum", "sum"]
    assert list(c.entries) == [("w", "triton_abs_top16/m0")]
    assert c.nbytes == 16 and c.hits == 2 and c.misses == 1
