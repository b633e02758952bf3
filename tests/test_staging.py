"""The Stager's multi-threaded copy: staged tensors are the source's bytes, for every
dtype, odd sizes, several tensors per job and runs that cross tensor boundaries; and a
Materializer that stages its host inputs (``stream: copy``) with several threads gives
the streamed export's bits."""

import pytest
import torch
from safetensors.torch import save_file

from mergesearch.cli import main
from mergesearch.engine import staging
from mergesearch.engine.checkpoint import ST_DTYPE, mapped_safetensors
from mergesearch.engine.materialize import Materializer
from mergesearch.engine.plan import slot_bytes
from mergesearch.engine.staging import MIN_CHUNK, Stager, _pieces, parallel_copy, staging_threads
from mergesearch.errors import MergeSearchError
from mergesearch.recipe import from_dict

from conftest import load_weights

DTYPES = list(ST_DTYPE)  # every dtype a safetensors file holds here
# dtypes the mapped files do not hold, copied from memory
MORE = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "complex64") if hasattr(torch, n)]


def _random(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (int(torch.tensor(shape).prod()) * dtype.itemsize,), generator=g, dtype=torch.uint8)
    if dtype == torch.bool:
        raw = raw & 1
    return raw.view(dtype).reshape(shape)


def _bits(t):
    return t.contiguous().view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    """Tensors of every dtype and odd sizes (one larger than several copy runs), read
    back as views of a memory-mapped safetensors file."""
    shapes = [(3,), (7, 13), (1,), (2, 3, 5), (MIN_CHUNK * 3 + 37,), (0,), (1001,)]
    tensors = {}
    for k, dtype in enumerate(DTYPES):
        for j, shape in enumerate(shapes):
            if dtype.itemsize > 1 and shape[0] > MIN_CHUNK:
                shape = (shape[0] // dtype.itemsize + 1,)
            tensors[f"t{k}_{j}"] = _random(shape, dtype, 100 * k + j)
    file = tmp_path_factory.mktemp("staging") / "t.safetensors"
    save_file(tensors, str(file))
    return tensors, mapped_safetensors(file)


def test_threads_default_and_override(monkeypatch):
    monkeypatch.delenv("MERGESEARCH_STAGING_THREADS", raising=False)
    assert 1 <= staging_threads() <= staging.DEFAULT_THREADS
    monkeypatch.setenv("MERGESEARCH_STAGING_THREADS", "5")
    assert staging_threads() == 5 and Stager(torch.device("cpu"), 1024).threads == 5
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("MERGESEARCH_STAGING_THREADS", bad)
        with pytest.raises(MergeSearchError, match="^MERGESEARCH_STAGING_THREADS: a positive integer"):
            staging_threads()


def test_runs_cover_every_byte_once_and_cross_tensor_boundaries():
    """Runs are of about equal size, aligned, and together copy each byte exactly once."""
    sizes = [5, MIN_CHUNK + 3, 64, 2 * MIN_CHUNK - 1, 1, 0, 3 * MIN_CHUNK + 7]
    pairs, base = [], 0
    for n in sizes:
        pairs.append((10**9 + base, base, n))
        base += n + 1000
    for parts in (1, 2, 3, 7, 64):
        runs = _pieces(pairs, parts)
        assert len(runs) <= parts
        covered = sorted((src, n) for run in runs for _, src, n in run)
        want = sorted((s, n) for _, s, n in pairs if n)
        merged, k = [], 0  # adjacent pieces of one tensor join back into it
        for s, n in want:
            got = 0
            while k < len(covered) and covered[k][0] == s + got:
                got += covered[k][1]
                k += 1
            merged.append((s, got))
        assert merged == want and k == len(covered), parts
        assert all(dst - src == 10**9 for run in runs for dst, src, _ in run)
        if parts > 1:  # some run spans the end of one tensor and the start of the next
            assert any(len(run) > 1 for run in runs)
        sizes_of = [sum(n for _, _, n in run) for run in runs]
        assert all(s % staging.CHUNK_ALIGN == 0 for s in sizes_of[:-1])


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_parallel_copy_is_bit_equal(mapped, threads):
    source, views = mapped
    names = list(views)
    dsts = [torch.empty_like(views[n]) for n in names]
    pool = staging.ThreadPoolExecutor(threads - 1) if threads > 1 else None
    parallel_copy(dsts, [views[n] for n in names], pool, threads)
    for n, d in zip(names, dsts):
        assert d.dtype == source[n].dtype and torch.equal(_bits(d), _bits(source[n])), n
    more = [_random((MIN_CHUNK // 3 + k,), dtype, k) for k, dtype in enumerate(MORE)]
    dsts = [torch.empty_like(t) for t in more]
    parallel_copy(dsts, more, pool, threads)
    assert all(d.dtype == t.dtype and torch.equal(_bits(d), _bits(t)) for d, t in zip(dsts, more))
    # a source that is not contiguous is copied too
    t = _random((40, 30), torch.bfloat16, 3).t()
    d = torch.empty(t.shape, dtype=t.dtype)
    parallel_copy([d], [t], pool, threads)
    assert torch.equal(_bits(d), _bits(t.contiguous()))
    with pytest.raises(ValueError, match="staging copy"):
        parallel_copy([torch.empty(3)], [torch.empty(4)], pool, threads)


@pytest.mark.parametrize("threads", [1, 4])
def test_stager_jobs_of_several_tensors_are_bit_equal(mapped, threads):
    """Jobs of one to all dtypes' tensors, in slots sized as the plan sizes them; the
    slots alternate and each job's copies are the source's bytes when yielded."""
    source, views = mapped
    names = sorted(views)
    jobs = [(f"j{k}", [views[n] for n in names[k::5]]) for k in range(5)]
    jobs += [("one", [views[names[0]]]), ("big", [views[n] for n in names if views[n].numel() > MIN_CHUNK])]
    capacity = max(sum(slot_bytes(t.numel() * t.element_size()) for t in ts) for _, ts in jobs)
    st = Stager(torch.device("cpu"), capacity, threads=threads)
    seen = []
    for (name, staged), (want_name, ts) in zip(st.run(jobs), jobs):
        assert name == want_name and len(staged) == len(ts)
        for s, t in zip(staged, ts):
            assert s.dtype == t.dtype and s.shape == t.shape and torch.equal(_bits(s), _bits(t))
            assert s.numel() == 0 or s.data_ptr() != t.data_ptr()  # a copy in a slot, not the mapped view
        seen.append({s.untyped_storage().data_ptr() for s in staged if s.numel()})
    slot_ptrs = {x.untyped_storage().data_ptr() for x in st.slots}
    assert all(p <= slot_ptrs for p in seen)
    with pytest.raises(MergeSearchError, match="cannot hold"):
        list(st.run([("too big", [views[n] for n in names] * 2)]))
    st.close()


@pytest.mark.parametrize("threads", ["1", "3"])
def test_staged_materializer_equals_the_export_with_threads(tmp_path, monkeypatch, threads):
    """As test_materialize's placements test: a declared budget puts inputs on the host,
    ``stream: copy`` stages them, and the candidates are the export's bits (and the bytes
    moved are the host inputs')."""
    monkeypatch.setenv("MERGESEARCH_STAGING_THREADS", threads)
    from mergesearch.engine.plan import make_plan
    from mergesearch.zoo.synthetic import make_family
    f = make_family(tmp_path / "fam", n_models=3, hidden=96, layers=2, intermediate=160, vocab=2600,
                    dtype="bfloat16", noise=0.01, init_std=0.1, seed=9)
    models = [str(f[k]) for k in ("ft0", "ft1", "ft2")]
    bw = {"device": 1.0, "link": 1.0, "source": "test"}
    methods = ["ties", "task_arithmetic", "dare_ties"]
    free = make_plan(str(f["base"]), models, methods, bandwidth=bw, stream="copy")
    for k in (0, 2):
        p = make_plan(str(f["base"]), models, methods, budget=free.budget_for(k), bandwidth=bw, stream="copy")
        assert len(p.resident) == k and p.stream == "copy"
        m = Materializer(f["base"], models, methods=methods, placement=p)
        assert m.stager is not None and m.stager.threads == int(threads)
        for method, params in [("ties", {"weight": 0.5, "density": 0.3}), ("task_arithmetic", {"weight": 0.6}),
                               ("dare_ties", {"weight": 0.5, "density": 0.4})]:
            recipe = from_dict(dict(method=method, base=str(f["base"]), seed=3, models=[
                {"path": mdl, "parameters": params} for mdl in models]))
            out = tmp_path / f"{method}"
            if not out.exists():
                recipe.save(tmp_path / f"{method}.yaml")
                assert main(["merge", str(tmp_path / f"{method}.yaml"), "-o", str(out)]) == 0
            exported = load_weights(out)
            mem = m.state_dict(recipe)
            assert set(mem) == set(exported)
            for name in exported:
                assert mem[name].dtype == torch.bfloat16 and torch.equal(mem[name], exported[name]), (k, method, name)
            assert m.last_moved == (4 - k) * free.inputs[0].nbytes
        m.close()


def test_bench_staging_runs_on_the_cpu(tmp_path):
    """scripts/bench_staging.py as the GPU machine runs it, small: 1 and 2 threads, raw JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_staging.py"
    r = subprocess.run([sys.executable, str(script), "--device", "cpu", "--threads", "2", "--gb", "0.03",
                        "--tensor-mb", "2", "--passes", "1", "--dir", str(tmp_path), "--json", str(tmp_path / "s.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "s.json").read_text())
    assert [x["threads"] for x in out["stager"]] == [1, 2] and out["memcpy"] > 0
    assert all(x["bytes_per_s"] > 0 and x["bytes"] == 15 * 2 * 10**6 for x in out["stager"] + out["host_copy"])
    assert "Stager end to end" in r.stdout and "2 threads / 1 thread" in r.stdout
    assert list(tmp_path.iterdir()) == [tmp_path / "s.json"]  # the mapped file is gone
