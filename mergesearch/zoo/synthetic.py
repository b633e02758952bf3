"""Generated Llama-shaped model families (for the demo, tests and benchmarks).

A family is a random base plus fine-tunes = base + N(0, noise) deltas, written as
HF model folders (config.json, safetensors, a char-level tokenizer) that
``transformers.AutoModelForCausalLM`` loads. Generation is deterministic and
streamed tensor by tensor, so a 0.44B-parameter family needs little memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mergesearch.engine.writer import StreamingWriter

CHARS = [chr(c) for c in range(32, 127)]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def llama_config(hidden: int, layers: int, intermediate: int, vocab: int, heads: int, dtype: str,
                 tie: bool = False, kv_heads: int | None = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": dtype,
    }


def llama_layout(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    names = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        names += [(p + f"self_attn.{x}_proj.weight", (h if x in "qo" else kv, h)) for x in "qkvo"]
        names += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                  (p + "mlp.down_proj.weight", (h, i))]
        names += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    names.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings"):
        names.append(("lm_head.weight", (v, h)))
    return names


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A char-level tokenizer whose vocabulary fills ``vocab_size`` ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = SPECIALS + CHARS
    tokens += [f"<extra_{k}>" for k in range(max(0, vocab_size - len(tokens)))]
    vocab = {t: k for k, t in enumerate(tokens[:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out))


# An 8B Llama's shape (Llama 3): what `mergesearch plan` and the GPU benchmark size against.
LLAMA_8B = dict(hidden=4096, layers=32, intermediate=14336, vocab=128256, heads=32, kv_heads=8)


def write_shaped_model(out: Path, cfg: dict, dtype: str = "bfloat16") -> Path:
    """A model folder whose ``model.safetensors`` has a real header but no data: a
    sparse file, so a 16 GB model takes no disk. Enough for anything that reads
    headers only (planning); never load its tensors."""

    from mergesearch.engine.checkpoint import DTYPES

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_sparse_safetensors(out / "model.safetensors", dict(llama_layout(cfg)), DTYPES[dtype])
    (out / "config.json").write_text(json.dumps({**cfg, "torch_dtype": dtype}, indent=2) + "\n")
    return out


def write_sparse_safetensors(file: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> None:
    """A safetensors file with a real header and no data (a sparse file): sizes without disk."""
    import math
    import struct

    from mergesearch.engine.checkpoint import ST_DTYPE

    header, off = {}, 0
    for name, shape in shapes.items():
        n = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)


def shaped_family(out: str | Path, n_models: int = 4, dtype: str = "bfloat16", **shape) -> dict[str, Path]:
    """``base`` and ``ft0..`` as header-only models of ``shape`` (default: LLAMA_8B)."""
    shape = {**LLAMA_8B, **shape}
    cfg = llama_config(shape["hidden"], shape["layers"], shape["intermediate"], shape["vocab"], shape["heads"],
                       dtype, kv_heads=shape.get("kv_heads"))
    out = Path(out)
    return {k: write_shaped_model(out / k, cfg, dtype) for k in ["base", *[f"ft{i}" for i in range(n_models)]]}


def _gen(seed: int, *parts) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_stable(seed, *parts))
    return g


def _stable(*parts) -> int:
    import hashlib
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "little")


def write_model(out: Path, cfg: dict, tensor_fn, dtype: torch.dtype, shard_bytes: int = 2 * 1024**3,
                force: bool = False) -> None:
    layout = llama_layout(cfg)
    with StreamingWriter(out, [(n, s, dtype) for n, s in layout], max_shard_bytes=shard_bytes, force=force) as w:
        for name, shape in layout:
            w.write(name, tensor_fn(name, shape).to(dtype))
        w.write_file("config.json", json.dumps(cfg, indent=2) + "\n")
        w.write_file("generation_config.json", json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
        write_tokenizer(w.tmp, cfg["vocab_size"])


def base_tensor(seed: int, name: str, shape, init_std: float = 0.02) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.randn(shape, generator=_gen(seed, "base", name)) * init_std


def make_family(
    out: str | Path,
    n_models: int = 3,
    hidden: int = 64,
    layers: int = 4,
    intermediate: int = 128,
    vocab: int = 128,
    heads: int = 4,
    dtype: str = "float32",
    noise: float = 0.002,
    seed: int = 0,
    init_std: float = 0.02,
    shard_bytes: int = 2 * 1024**3,
) -> dict[str, Path]:
    """Write ``base`` and ``ft0..ft{n-1}`` under ``out`` (skipped when present)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    cfg = llama_config(hidden, layers, intermediate, vocab, heads, dtype)
    paths = {"base": out / "base", **{f"ft{k}": out / f"ft{k}" for k in range(n_models)}}
    if not paths["base"].exists():
        write_model(paths["base"], cfg, lambda n, s: base_tensor(seed, n, s, init_std), torch_dtype, shard_bytes)
    for k in range(n_models):
        if paths[f"ft{k}"].exists():
            continue

        def fn(name, shape, k=k):
            b = base_tensor(seed, name, shape, init_std)
            return b + torch.randn(shape, generator=_gen(seed, "ft", k, name)) * noise
        write_model(paths[f"ft{k}"], cfg, fn, torch_dtype, shard_bytes)
    return paths


def quadratic_toy(dim: int = 6, seed: int = 0, steps: int = 200, lr: float = 0.5) -> dict:
    """Two models trained on quadratic losses L_i(theta) = 1/2 sum_j h_ij (theta_j - c_ij)^2
    from a shared start, each by gradient descent under its own diagonal preconditioner
    P_i = H_i (float64). The second moments an Adam-like optimizer would hold are
    v_i = P_i^2, so sqrt(v_i) is the preconditioner. The analytic optimum of
    L_1 + L_2 is (H_1 c_1 + H_2 c_2) / (H_1 + H_2)."""
    g = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(dim, generator=g, dtype=torch.float64)
    hs = [torch.rand(dim, generator=g, dtype=torch.float64) * 3.5 + 0.5 for _ in range(2)]
    hs[1] = hs[1] * 10  # a very different scale: the second model's curvature dominates
    cs = [theta0 + torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(2)]
    thetas = []
    for h, c in zip(hs, cs):
        theta = theta0.clone()
        for _ in range(steps):
            grad = h * (theta - c)
            theta = theta - lr * grad / h  # preconditioned by P = H
        thetas.append(theta)
    optimum = (hs[0] * cs[0] + hs[1] * cs[1]) / (hs[0] + hs[1])
    return {"theta0": theta0, "thetas": thetas, "hessians": hs, "second_moments": [h * h for h in hs],
            "optimum": optimum, "targets": cs}


# The modules a typical LLM LoRA adapter targets (all linear projections of a Llama block).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_shapes(cfg: dict, r: int, targets=LORA_TARGETS) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """Module path -> (A shape [r, in], B shape [out, r]) of a LoRA adapter of ``cfg``."""
    out = {}
    for name, shape in llama_layout(cfg):
        module = name[:-len(".weight")]
        if name.endswith(".weight") and module.rpartition(".")[2] in targets and len(shape) == 2:
            out[module] = ((r, shape[1]), (shape[0], r))
    return out


def write_adapter(out: str | Path, cfg: dict, base: str | None, factor_fn=None, r: int = 8, alpha: float = 16,
                  targets=LORA_TARGETS, dtype: str = "float32", config: dict | None = None,
                  extra: dict[str, torch.Tensor] | None = None, sparse: bool = False) -> Path:
    """A PEFT LoRA adapter folder (``adapter_config.json``, ``adapter_model.safetensors``)
    for a model of ``cfg``, in PEFT's key layout. ``factor_fn(key, shape)`` gives each
    factor (default: seeded normal values, B included, so the adapter changes the model);
    ``extra`` adds tensors by key (e.g. a ``modules_to_save`` copy); ``sparse`` writes a
    header-only file, like :func:`write_shaped_model` (for planning)."""
    from safetensors.torch import save_file

    from mergesearch.engine.checkpoint import DTYPES

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tdtype = DTYPES[dtype]
    shapes = {}
    for module, (a, b) in lora_shapes(cfg, r, targets).items():
        shapes[f"base_model.model.{module}.lora_A.weight"] = a
        shapes[f"base_model.model.{module}.lora_B.weight"] = b
    fn = factor_fn or (lambda key, shape: torch.randn(shape, generator=_gen(0, "lora", str(out), key)) * 0.05)
    if sparse:
        write_sparse_safetensors(out / "adapter_model.safetensors", shapes, tdtype)
    else:
        tensors = {key: fn(key, shape).to(tdtype).contiguous() for key, shape in shapes.items()}
        tensors.update({k: v.contiguous() for k, v in (extra or {}).items()})
        save_file(tensors, str(out / "adapter_model.safetensors"))
    meta = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
            "target_modules": sorted(set(targets)), "base_model_name_or_path": base, "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "modules_to_save": None, "bias": "none",
            "rank_pattern": {}, "alpha_pattern": {}, **(config or {})}
    (out / "adapter_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
