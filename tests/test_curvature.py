"""Curvature estimates, Gram matrices and Adam second moments: values, cache, CLI."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergesearch.cli import main
from mergesearch.engine.models import load_model
from mergesearch.search.curvature import adam_second_moments, curvature, estimate, load_examples
from mergesearch.errors import MergeSearchError


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cdata") / "items.jsonl"
    rows = [{"context": f"ab{i}c=", "choices": [f"{i}x", f"{i + 1}y", "zz"], "answer": i % 3} for i in range(6)]
    rows += [{"context": "hello ", "target": "world"}, {"context": "q", "target": "rs"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def per_example_sq(model, tok, examples):
    """Independent reference: each example alone, no padding, loss written out."""
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for ctx, cont in examples:
        c = tok(ctx, add_special_tokens=False)["input_ids"]
        whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([whole])
        logp = model(input_ids=ids[:, :-1]).logits.float().log_softmax(-1)[0]
        k = len(whole) - len(c)
        loss = -sum(logp[t - 1, whole[t]] for t in range(len(whole) - k, len(whole)))
        model.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            acc[n] += p.grad ** 2
    return {n: a / len(examples) for n, a in acc.items()}


def test_empirical_fisher_matches_per_example_reference(family, data):
    model, tok = load_model(family["ft0"])
    # contexts without trailing spaces so the reference's simple split is the evaluator's
    ex = [e for e in load_examples(data, 8) if not e[0].endswith(" ")]
    got = estimate(model, tok, ex, "empirical_fisher")
    ref = per_example_sq(model, tok, ex)
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-12)
    # squared mini-batch gradients: equal at batch size 1, a different estimate at 4
    sq1 = estimate(model, tok, ex, "squared_grad", batch_size=1)
    for n in ref:
        torch.testing.assert_close(sq1[n], got[n], rtol=1e-5, atol=1e-14)
    sq4 = estimate(model, tok, ex, "squared_grad", batch_size=4)
    assert any(not torch.allclose(sq4[n], got[n]) for n in ref)


def test_fisher_samples_from_the_model_deterministically(family, data):
    model, tok = load_model(family["ft0"])
    ex = load_examples(data, 8)
    a = estimate(model, tok, ex, "fisher", seed=3)
    b = estimate(model, tok, ex, "fisher", seed=3)
    c = estimate(model, tok, ex, "fisher", seed=4)
    emp = estimate(model, tok, ex, "empirical_fisher")
    for n in a:
        assert torch.equal(a[n], b[n]) and bool((a[n] >= 0).all())
    assert any(not torch.equal(a[n], c[n]) for n in a)
    assert any(not torch.allclose(a[n], emp[n]) for n in a)


def test_gram_matrices_are_the_layer_inputs_second_moments(family, data):
    model, tok = load_model(family["ft0"])
    ex = load_examples(data, 8)
    grams = estimate(model, tok, ex, "gram", batch_size=3)
    linear = [n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(grams) == sorted(linear)
    # reference for the first attention projection: its input is the first layer's normed hidden state
    xs = []
    with torch.no_grad():
        from mergesearch.evaluate.jsonl import encode_pair
        for ctx, cont in ex:
            c, k = encode_pair(tok, ctx, cont)
            ids = torch.tensor([(c or [tok.bos_token_id]) + k][0][:-1]).unsqueeze(0)
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[0]
            xs.append(model.model.layers[0].input_layernorm(h)[0])
    x = torch.cat(xs)
    ref = x.T @ x / x.shape[0]
    torch.testing.assert_close(grams["model.layers.0.self_attn.q_proj.weight"], ref, rtol=1e-4, atol=1e-6)


def test_adam_moments_from_the_zoo_layout_and_trainer_optimizer(family, tmp_path):
    import shutil
    from safetensors.torch import save_file
    model, _ = load_model(family["ft0"])
    folder = tmp_path / "m"
    shutil.copytree(family["ft0"], folder)
    # HF Trainer's two groups: weight decay first, then biases and norms
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    rest = [p for n, p in model.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            betas=(0.9, 0.95))
    for _ in range(3):
        loss = sum((p ** 2).sum() for p in model.parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    v, info = adam_second_moments(folder)
    assert info["step"] == 3 and info["beta2"] == 0.95
    for n, p in model.named_parameters():
        torch.testing.assert_close(v[n], opt.state[p]["exp_avg_sq"] / (1 - 0.95 ** 3), rtol=0, atol=0)
    # the zoo layout wins when both exist, with its recorded step
    raw = {n: opt.state[p]["exp_avg_sq"] for n, p in model.named_parameters()}
    save_file(raw, str(folder / "exp_avg_sq.safetensors"),
              metadata={"adam": json.dumps({"step": 10, "beta2": 0.9, "eps": 1e-8})})
    v, info = adam_second_moments(folder)
    assert info["source"].endswith("exp_avg_sq.safetensors")
    for n in raw:
        torch.testing.assert_close(v[n], raw[n] / (1 - 0.9 ** 10), rtol=0, atol=0)
    # a pickle that is not plain tensors is refused, not executed
    (folder / "exp_avg_sq.safetensors").unlink()
    (folder / "optimizer.pt").write_bytes(b"\x80\x04cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    with pytest.raises(MergeSearchError, match="optimizer.pt: cannot load optimizer state safely"):
        adam_second_moments(folder)
    (folder / "optimizer.pt").unlink()
    with pytest.raises(MergeSearchError, match="no Adam second moments"):
        adam_second_moments(folder)


def test_cache_and_cli(family, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MERGESEARCH_CACHE", str(tmp_path / "cache"))
    p1, cached = curvature(family["ft0"], "empirical_fisher", str(data), n_examples=4)
    assert not cached and p1.parent == tmp_path / "cache" / "curvature"
    p2, cached = curvature(family["ft0"], "empirical_fisher", str(data), n_examples=4)
    assert cached and p2 == p1
    assert curvature(family["ft0"], "empirical_fisher", str(data), n_examples=5)[0] != p1
    assert curvature(family["ft1"], "empirical_fisher", str(data), n_examples=4)[0] != p1
    meta = json.loads(__import__("safetensors").safe_open(str(p1), "pt").metadata()["mergesearch"])
    assert meta["kind"] == "empirical_fisher" and meta["n_examples"] == 4
    out = tmp_path / "f.safetensors"
    assert main(["curvature", str(family["ft0"]), "--data", str(data), "--kind", "empirical_fisher",
                 "--n-examples", "4", "-o", str(out)]) == 0
    assert "cached" in capsys.readouterr().out
    a, b = load_file(str(out)), load_file(str(p1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for args, msg in [
        (["--kind", "hessian", "--data", str(data)], "--kind: 'hessian' is not one of"),
        (["--kind", "fisher"], "--kind fisher needs --data"),
        (["--data", str(data), "--n-examples", "99"], f"{data}: --n-examples 99 but the file has 8 items"),
        (["--data", "nope"], "--data: 'nope' is neither a .jsonl file nor TASK:SPLIT"),
        (["--data", str(tmp_path / "x.jsonl")], f"{tmp_path / 'x.jsonl'}: data file not found"),
    ]:
        assert main(["curvature", str(family["ft0"]), *args]) == 2
        assert msg in capsys.readouterr().err
