"""A PEFT LoRA adapter read as the fine-tune it makes of its base.

A LoRA adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
(or ``adapter_model.bin``). For each module it targets, its task vector is

    delta = (B @ A) * scaling        (transposed for embeddings and fan_in_fan_out layers)

with ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``; ``alpha_pattern``
per module), as PEFT's ``merge_and_unload`` adds it. Modules the adapter does not touch
have a zero task vector; ``modules_to_save`` copies (e.g. a retrained ``lm_head``) are
full tensors of the fine-tune. Nothing dense is built at load: an :class:`Adapter` holds
the factors, r x (in + out) values per module, and builds one tensor's delta when a merge
asks for it (:class:`mergesearch.methods.inputs.LowRank`).

An :class:`Adapter` answers the questions a :class:`~mergesearch.engine.checkpoint.Checkpoint`
answers (names, shapes, dtypes, config, ``get``), so the compatibility checks, the plan,
the streamed export and evaluation-model loading read it as one more model.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mergesearch.engine.checkpoint import Checkpoint, mapped_safetensors, read_safetensors_header, ST_TO_TORCH
from mergesearch import sources
from mergesearch.errors import MergeSearchError

PREFIX = "base_model.model."
# configuration keys of LoRA variants that change what the weights mean: refused by name
UNSUPPORTED = {
    "use_dora": "a DoRA adapter (use_dora: true), whose magnitude vector rescales whole columns of the "
                "merged weight,",
    "lora_bias": "a LoRA adapter with lora_bias: true (a trained bias in lora_B)",
    "trainable_token_indices": "an adapter with trainable_token_indices (trainable token rows)",
    "layer_replication": "an adapter with layer_replication (it adds layers the base does not have)",
    "target_parameters": "an adapter with target_parameters (LoRA on raw parameters, e.g. MoE experts)",
    "use_qalora": "a QA-LoRA adapter (use_qalora: true)",
}
DENSE_ADVICE = "merge it into its base with PEFT (merge_and_unload) and list the result as a full fine-tune"


@dataclass(frozen=True)
class Factor:
    """One module's LoRA factors in the adapter file: delta = (B @ A) * scaling, transposed
    when ``transpose`` (embeddings store A as [r, vocab] and B as [dim, r])."""

    a: str  # key of A in the adapter file
    b: str
    scaling: float
    transpose: bool
    rank: int


class Adapter:
    """A read-only LoRA adapter over ``base``: the fine-tune base + delta, tensor by tensor."""

    def __init__(self, path: str | os.PathLike, base: Checkpoint, label: str | None = None,
                 allow_unrelated: bool = False):
        self.path = Path(path)
        self.label = label if label is not None else str(self.path)
        self.base = base
        self.config = base.config  # the fine-tune's architecture is its base's
        cfg_file = self.path / "adapter_config.json"
        if not cfg_file.is_file():
            raise MergeSearchError(f"{self.path}: not an adapter folder (no adapter_config.json)")
        try:
            self.adapter_config = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise MergeSearchError(f"{cfg_file}: not valid JSON ({e})") from None
        if not isinstance(self.adapter_config, dict):
            raise MergeSearchError(f"{cfg_file}: not a JSON object")
        self._check_type()
        self._tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}  # file key -> (shape, dtype)
        self._file = self._weights_file()
        self._handle = None
        self.factors: dict[str, Factor] = {}  # base tensor name -> its factors
        self.dense: dict[str, str] = {}  # base tensor name -> file key of a full fine-tuned tensor
        self._index()
        if not allow_unrelated:
            self._check_base()

    # -- reading the adapter ---------------------------------------------
    def _check_type(self) -> None:
        cfg = self.adapter_config
        kind = str(cfg.get("peft_type", "LORA")).upper()
        if kind != "LORA":
            article = "an" if kind[:1] in "AEIOU" else "a"
            raise MergeSearchError(f"{self.path}: {article} {kind} adapter; only LoRA adapters can be merged "
                                   f"({DENSE_ADVICE})")
        for k, what in UNSUPPORTED.items():
            if cfg.get(k):
                raise MergeSearchError(f"{self.path}: {what} cannot be merged as a task vector; {DENSE_ADVICE}")

    def _weights_file(self) -> Path:
        st = self.path / "adapter_model.safetensors"
        if st.is_file():
            for k, v in read_safetensors_header(st).items():
                if k != "__metadata__":
                    self._tensors[k] = (tuple(v["shape"]), ST_TO_TORCH[v["dtype"]])
            return st
        pt = self.path / "adapter_model.bin"
        if pt.is_file():
            self._bin = self._load_bin(pt)
            self._tensors = {k: (tuple(t.shape), t.dtype) for k, t in self._bin.items()}
            return pt
        raise MergeSearchError(f"{self.path}: adapter folder without adapter_model.safetensors or adapter_model.bin")

    @staticmethod
    def _load_bin(file: Path) -> dict:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise MergeSearchError(f"{file}: cannot load pickle weights safely ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict):
            raise MergeSearchError(f"{file}: pickle weights are not a state dict")
        return state

    def _target(self, module: str, suffix: str) -> str:
        """The base tensor a module's ``suffix`` (weight, bias) is: the module path with
        PEFT's prefix taken off, as the base checkpoint names it."""
        names = self._base_names
        for cand in (f"{module}.{suffix}", f"model.{module}.{suffix}"):
            if cand in names:
                return cand
        raise MergeSearchError(f"{self.path}: module '{module}' is not in the base {self.base.label} "
                               "(an adapter for another architecture?)")

    def _index(self) -> None:
        self._base_names = set(self.base.names())
        pairs: dict[str, dict[str, str]] = {}
        for k, (shape, _) in self._tensors.items():
            name = k[len(PREFIX):] if k.startswith(PREFIX) else k
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", name) or \
                re.fullmatch(r"(.+)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?", name)
            if m:
                pairs.setdefault(m.group(1), {})[m.group(2)] = k
                continue
            if ".base_layer." in name or name.endswith(".base_layer"):
                continue  # the base's own layer, saved beside trained embeddings: not a change
            if re.search(r"\.(lora_magnitude_vector|lora_[A-Za-z_]+)(\.|$)", name):
                raise MergeSearchError(f"{self.path}: tensor '{k}' is not a LoRA factor this merge understands "
                                       f"({DENSE_ADVICE})")
            name = name.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
            module, _, suffix = name.rpartition(".")
            target = self._target(module, suffix)
            if tuple(shape) != tuple(self.base.shape(target)):
                raise MergeSearchError(f"{self.path}: '{k}' has shape {list(shape)}, the base's '{target}' "
                                       f"{list(self.base.shape(target))} (an adapter for another architecture?)")
            self.dense[target] = k
        for module, ab in pairs.items():
            kind = "embedding" if any(x.startswith("lora_embedding") for x in ab) else "linear"
            a_key, b_key = (ab.get("lora_embedding_A"), ab.get("lora_embedding_B")) if kind == "embedding" \
                else (ab.get("lora_A"), ab.get("lora_B"))
            if a_key is None or b_key is None:
                raise MergeSearchError(f"{self.path}: module '{module}' has only one of its two LoRA factors")
            a_shape, b_shape = self._tensors[a_key][0], self._tensors[b_key][0]
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise MergeSearchError(f"{self.path}: module '{module}' has factors of shapes {list(a_shape)} and "
                                       f"{list(b_shape)}: only linear and embedding layers can be merged "
                                       f"({DENSE_ADVICE})")
            target = self._target(module, "weight")
            r = a_shape[0]
            transpose = kind == "embedding" or bool(self.adapter_config.get("fan_in_fan_out"))
            product = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
            if b_shape[1] != r or tuple(self.base.shape(target)) != product:
                raise MergeSearchError(f"{self.path}: LoRA factors of '{module}' ({list(b_shape)} @ {list(a_shape)}) "
                                       f"do not make the base's '{target}' {list(self.base.shape(target))} "
                                       "(an adapter for another architecture?)")
            self.factors[target] = Factor(a_key, b_key, self._scaling(module, r), transpose, r)
        both = set(self.factors) & set(self.dense)
        if both:
            raise MergeSearchError(f"{self.path}: '{sorted(both)[0]}' has both LoRA factors and a full copy")
        if not self.factors and not self.dense:
            raise MergeSearchError(f"{self._file}: the adapter holds no LoRA factors")

    def _scaling(self, module: str, r: int) -> float:
        cfg = self.adapter_config
        alpha = cfg.get("lora_alpha", 8)
        for pattern, value in (cfg.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
                alpha = value
                break
        if r <= 0:
            raise MergeSearchError(f"{self.path}: module '{module}' has LoRA rank 0")
        return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)

    def _check_base(self) -> None:
        """Refuse an adapter whose recorded base is not this base, where that can be told:
        a Hub repository other than the base's, or a local folder whose weights differ."""
        recorded = self.adapter_config.get("base_model_name_or_path")
        if not recorded:
            return
        base_path = self.base.path.resolve()
        if os.path.isdir(recorded):
            other = Path(recorded).resolve()
            if other == base_path or _same_weights(other, self.base):
                return
            raise MergeSearchError(f"{self.path}: a LoRA adapter of {recorded}, whose weights differ from the base "
                                   f"{self.base.label} (pass --allow-unrelated to merge anyway)")
        repo = recorded.partition("@")[0]
        if sources.HUB_ID.fullmatch(repo):
            ours = _repo_of(self.base)
            if ours is not None and ours.lower() != repo.lower():
                raise MergeSearchError(f"{self.path}: a LoRA adapter of {repo}, not of the base {self.base.label} "
                                       "(pass --allow-unrelated to merge anyway)")

    # -- the Checkpoint questions -----------------------------------------
    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def numel(self, name: str) -> int:
        return self.base.numel(name)

    @property
    def num_layers(self) -> int:
        return self.base.num_layers

    def tokenizer_vocab(self) -> dict | None:
        from mergesearch.engine.checkpoint import tokenizer_vocab
        return tokenizer_vocab(self.path)  # an adapter that ships a tokenizer is compared; else none

    def _raw(self, key: str) -> torch.Tensor:
        if self._file.suffix != ".safetensors":
            return self._bin[key]
        if self._handle is None:
            from safetensors import safe_open
            try:
                self._handle = safe_open(str(self._file), framework="pt", device="cpu")
            except Exception as e:
                raise MergeSearchError(f"{self._file}: cannot open safetensors file ({e})") from None
        return self._handle.get_tensor(key)

    def lowrank(self, name: str, views: dict[str, torch.Tensor] | None = None):
        """The LowRank delta of ``name`` (None when the adapter holds no factors for it),
        reading the factors from ``views`` when given (e.g. device copies)."""
        from mergesearch.methods.inputs import LowRank
        f = self.factors.get(name)
        if f is None:
            return None
        get = (lambda k: views[k]) if views is not None else self._raw
        return LowRank(get(f.a), get(f.b), f.scaling, f.transpose)

    def delta(self, name: str) -> torch.Tensor | None:
        """The float32 task vector of ``name``; None where it is zero."""
        lr = self.lowrank(name)
        if lr is not None:
            return lr.dense(torch.float32)
        if name in self.dense:
            return self._raw(self.dense[name]).float() - self.base.get(name).float()
        return None

    def get(self, name: str) -> torch.Tensor:
        """The fine-tune's tensor, in the base's dtype (as PEFT's merge_and_unload stores it)."""
        base = self.base.get(name)
        if name in self.dense:
            return self._raw(self.dense[name]).to(base.dtype)
        lr = self.lowrank(name)
        if lr is None:
            return base
        return (base.float() + lr.dense(torch.float32)).to(base.dtype)

    def mapped(self) -> dict[str, torch.Tensor]:
        """The adapter file's tensors by file key, as zero-copy views of its mapping."""
        if self._file.suffix == ".safetensors":
            return mapped_safetensors(self._file)
        return dict(self._bin)

    def factor_keys(self) -> list[str]:
        return [k for f in self.factors.values() for k in (f.a, f.b)]

    def sizes(self) -> dict[str, int]:
        """Base tensor name -> bytes this adapter holds for it (factors, or a full copy)."""
        def nbytes(k):
            shape, dtype = self._tensors[k]
            return math.prod(shape) * dtype.itemsize
        out = {n: nbytes(f.a) + nbytes(f.b) for n, f in self.factors.items()}
        out.update({n: nbytes(k) for n, k in self.dense.items()})
        return out

    def dense_sizes(self) -> dict[str, int]:
        return {n: math.prod(self._tensors[k][0]) * self._tensors[k][1].itemsize for n, k in self.dense.items()}

    def release(self) -> None:
        self._handle = None
        self.base.release()

    def __repr__(self) -> str:
        return f"Adapter({self.label})"


def open_model(ref: str, base=None, *, allow_unrelated: bool = False):
    """A pinned reference opened for reading: a Checkpoint, or an Adapter over ``base``
    (a Checkpoint) for an adapter folder or a ``base+adapter`` reference."""
    from mergesearch.engine.checkpoint import Checkpoint

    model, adapter = sources.split(ref)
    if adapter is None:
        folder = sources.local_dir(model)
        if not sources.is_adapter_dir(folder):
            return Checkpoint(folder, label=ref)
        if base is None:
            raise MergeSearchError(f"{ref}: a LoRA adapter needs a base model: give the space or recipe a base "
                                   "(a soup: --base), or write BASE+ADAPTER")
        return _adapter(folder, model, base, ref, allow_unrelated)
    named = Checkpoint(sources.local_dir(model), label=model.text)
    if base is not None and named.path.resolve() != base.path.resolve():
        raise MergeSearchError(f"{ref}: the adapter's base {model.text} is not the base of this merge ({base.label})")
    return _adapter(sources.local_dir(adapter), adapter, base if base is not None else named, ref, allow_unrelated)


def _adapter(folder: Path, part: sources.Part, base, ref: str, allow_unrelated: bool):
    """An Adapter over ``base``; a Hub adapter's refusal names it (``org/name@commit``),
    not the cache folder it lies in."""
    try:
        return Adapter(folder, base, label=ref, allow_unrelated=allow_unrelated)
    except MergeSearchError as e:
        msg = str(e)
        if part.hub and msg.startswith(str(folder)):
            raise MergeSearchError(f"{part.text}{msg[len(str(folder)):]}") from None
        raise


def _repo_of(ckpt: Checkpoint) -> str | None:
    """The Hub repository a checkpoint was resolved from, if any (from its label or cache path)."""
    head = ckpt.label.partition("@")[0]
    if sources.HUB_ID.fullmatch(head) and not os.path.exists(ckpt.label):
        return head
    m = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", str(ckpt.path))
    return f"{m.group(1)}/{m.group(2)}" if m else None


def _same_weights(folder: Path, base: Checkpoint) -> bool:
    """Whether a model folder holds the base's weights (the same names, shapes and the
    bytes of its smallest few float tensors): cheap, and enough to tell two bases apart."""
    try:
        other = Checkpoint(folder)
    except MergeSearchError:
        return False
    if set(other.names()) != set(base.names()):
        return False
    floats = sorted((n for n in base.names() if base.dtype(n).is_floating_point), key=base.numel)
    for n in floats[:4] + floats[len(floats) // 2:len(floats) // 2 + 1]:
        if other.shape(n) != base.shape(n) or not torch.equal(other.get(n), base.get(n)):
            return False
    return True
