"""HF checkpoint IO.

Reading: a model folder holds one ``model.safetensors``, shards listed in
``model.safetensors.index.json``, or legacy pickle weights (``pytorch_model.bin``,
loaded only through ``torch.load(weights_only=True)``). Safetensors reads are lazy
and per tensor through ``safe_open`` (memory-mapped); ``release()`` drops the
mappings so a streamed merge keeps its resident set small.

Writing: :class:`StreamingWriter` plans the shards up front from the output
tensors' shapes and dtypes, writes each shard's safetensors header first and then
the tensor bytes as they are produced, so peak memory is a few tensors. Everything
goes to a temp folder beside the destination, renamed into place at the end.

Compatibility checks (:func:`check_compatible`) run before any merge work.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from mergesearch.errors import MergeSearchError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
SIDE_FILES = ("generation_config.json",)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPE = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_TO_TORCH = {v: k for k, v in _ST_DTYPE.items()}

# Relative distance ||theta_i - theta_base|| / ||theta_base|| above which a model is
# not considered a fine-tune of the base. LLM fine-tunes land around 0.001-0.05;
# the bundled zoo's tiny models, fine-tuned hard at high learning rates, reach
# 0.26-0.68. Two independently initialised networks of the same shape sit near
# sqrt(2) = 1.41 (1.2-1.4 measured here), so 1.0 separates the two.
MAX_FINETUNE_DISTANCE = 1.0
# The distance and finiteness pre-checks read at most this many elements per model.
CHECK_SAMPLE_ELEMENTS = 64_000_000


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in a floating tensor: its min and max are finite (NaN propagates
    through both). Two reductions in the stored dtype, about 10x faster on the CPU than
    a float32 sum of a bfloat16 tensor, and no overflow for float16."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def parse_dtype(name: str | None, where: str = "dtype") -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise MergeSearchError(f"{where}: unknown dtype '{name}' (use float32, bfloat16 or float16)") from None


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    return str(dtype).replace("torch.", "")


class Checkpoint:
    """A read-only HF model folder with lazy per-tensor access."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise MergeSearchError(f"{self.path}: no such file or directory")
        if not self.path.is_dir():
            raise MergeSearchError(f"{self.path}: not a model folder (expected a directory)")
        self._handles: dict[Path, object] = {}
        self._bin_cache: dict[Path, dict] = {}
        self.files: dict[str, Path] = {}  # tensor name -> file
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, st dtype)
        self._index()
        self.config = self._read_config()

    # -- discovery -------------------------------------------------------
    def _index(self) -> None:
        single = self.path / "model.safetensors"
        index = self.path / "model.safetensors.index.json"
        bin_single = self.path / "pytorch_model.bin"
        bin_index = self.path / "pytorch_model.bin.index.json"
        if index.exists():
            self._from_index(index)
        elif single.exists():
            self._scan_safetensors(single)
        elif bin_index.exists():
            self._from_index(bin_index)
        elif bin_single.exists():
            self._scan_bin(bin_single)
        else:
            raise MergeSearchError(
                f"{self.path}: not a model folder (no model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
            )
        if not self.files:
            raise MergeSearchError(f"{self.path}: the model folder holds no tensors")

    def _from_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MergeSearchError(f"{index}: unreadable shard index ({type(e).__name__}: {e})") from None
        for shard in sorted(set(weight_map.values())):
            file = self.path / shard
            if not file.exists():
                raise MergeSearchError(f"{file}: shard listed in {index.name} is missing")
            if file.suffix == ".safetensors":
                self._scan_safetensors(file)
            else:
                self._scan_bin(file)

    def _scan_safetensors(self, file: Path) -> None:
        header = read_safetensors_header(file)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            self.files[name] = file
            self._meta[name] = (tuple(info["shape"]), info["dtype"])

    def _scan_bin(self, file: Path) -> None:
        state = self._load_bin(file)
        for name, t in state.items():
            self.files[name] = file
            self._meta[name] = (tuple(t.shape), _ST_DTYPE.get(t.dtype, str(t.dtype)))

    def _load_bin(self, file: Path) -> dict:
        if file not in self._bin_cache:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # pickle refusals and corrupt archives alike
                raise MergeSearchError(f"{file}: cannot load pickle weights safely ({type(e).__name__}: {e})") from None
            if not isinstance(state, dict):
                raise MergeSearchError(f"{file}: pickle weights are not a state dict")
            self._bin_cache[file] = state
        return self._bin_cache[file]

    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.exists():
            return {}
        try:
            return json.loads(cfg.read_text())
        except ValueError as e:
            raise MergeSearchError(f"{cfg}: not valid JSON ({e})") from None

    # -- access ----------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return _ST_TO_TORCH[self._meta[name][1]]

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def get(self, name: str) -> torch.Tensor:
        file = self.files[name]
        if file.suffix != ".safetensors":
            return self._load_bin(file)[name]
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:
                raise MergeSearchError(f"{file}: cannot open safetensors file ({e})") from None
            self._handles[file] = handle
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise MergeSearchError(f"{file}: cannot read tensor '{name}' ({e})") from None

    def mapped(self) -> dict[str, torch.Tensor]:
        """Every tensor as a zero-copy view of its memory-mapped file: the pages live in
        the page cache, one copy per node however many processes map them."""
        out: dict[str, torch.Tensor] = {}
        for file in sorted(set(self.files.values())):
            if file.suffix == ".safetensors":
                out.update(mapped_safetensors(file))
            else:  # pickle archives are loaded memory-mapped already (see _load_bin)
                out.update(self._load_bin(file))
        return {n: out[n] for n in self.files}

    def release(self) -> None:
        """Drop memory mappings (they are reopened on the next read)."""
        self._handles.clear()
        self._bin_cache.clear()

    @property
    def num_layers(self) -> int:
        n = self.config.get("num_hidden_layers") or self.config.get("n_layer") or self.config.get("num_layers")
        if n:
            return int(n)
        layers = {layer_index(k) for k in self.files} - {None}
        return max(layers) + 1 if layers else 0

    def tokenizer_vocab(self) -> dict | None:
        return tokenizer_vocab(self.path)

    def __repr__(self) -> str:
        return f"Checkpoint({self.path})"


def tokenizer_vocab(folder: Path) -> dict | None:
    """Token -> id from tokenizer.json (or vocab.json); None when there is neither."""
    tj = folder / "tokenizer.json"
    if tj.exists():
        try:
            data = json.loads(tj.read_text())
        except ValueError as e:
            raise MergeSearchError(f"{tj}: not valid JSON ({e})") from None
        vocab = (data.get("model") or {}).get("vocab")
        added = {t["content"]: t["id"] for t in data.get("added_tokens", []) if "content" in t}
        if isinstance(vocab, dict):
            return {**vocab, **added}
        if isinstance(vocab, list):  # unigram: [[piece, score], ...]
            return {**{p[0]: i for i, p in enumerate(vocab)}, **added}
    vj = folder / "vocab.json"
    if vj.exists():
        return json.loads(vj.read_text())
    return None


def read_safetensors_header(file: Path) -> dict:
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info.get("dtype") not in _ST_TO_TORCH:
                raise ValueError(f"tensor '{name}' has unsupported dtype {info.get('dtype')!r}")
            end = max(end, info["data_offsets"][1])
        if 8 + n + end > size:
            raise ValueError(f"tensor data runs past the end of the file ({8 + n + end} > {size} bytes)")
        return header
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        raise MergeSearchError(f"{file}: corrupt safetensors header ({e})") from None


def mapped_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as read-only, zero-copy views of one shared
    memory map (a tensor whose offset is not aligned to its element size is copied)."""
    import warnings

    import numpy as np

    header = read_safetensors_header(file)
    with open(file, "rb") as f:
        start = 8 + struct.unpack("<Q", f.read(8))[0]
    mm = np.memmap(file, dtype=np.uint8, mode="r")
    out = {}
    with warnings.catch_warnings():  # the views are never written to
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(mm)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_TO_TORCH[info["dtype"]]
        a, b = info["data_offsets"]
        chunk = raw[start + a:start + b]
        if (start + a) % dtype.itemsize:
            chunk = chunk.clone()
        out[name] = chunk.view(dtype).reshape(info["shape"])
    return out


def layer_index(name: str) -> int | None:
    """The transformer block index in a tensor name (``model.layers.3.mlp...`` -> 3)."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h", "blocks", "layer") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def is_trainer_checkpoint(path: Path) -> int | None:
    """The step of an HF Trainer ``checkpoint-<step>`` folder, else None."""
    name = Path(path).name
    if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
        return int(name[len("checkpoint-"):])
    return None


class SideFile:
    """A safetensors file of per-tensor side inputs for one model: a diagonal metric
    (same names and shapes as the model's float tensors) or Gram matrices (linear
    weight names, ``[in, in]``). Read lazily, like a checkpoint."""

    def __init__(self, path: str | os.PathLike, kind: str):
        self.path = Path(path)
        self.kind = kind
        if not self.path.is_file():
            raise MergeSearchError(f"{self.path}: {kind} file not found")
        header = dict(read_safetensors_header(self.path))
        self.metadata = header.pop("__metadata__", None) or {}
        self._shapes = {n: tuple(v["shape"]) for n, v in header.items()}
        self._dtypes = {n: _ST_TO_TORCH[v["dtype"]] for n, v in header.items()}
        self._handle = None

    def names(self) -> list[str]:
        return list(self._shapes)

    def has(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def numel(self, name: str) -> int:
        return math.prod(self._shapes[name])

    def check_values(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Refuse non-finite values, and negative ones in a metric."""
        if not all_finite(t):
            raise MergeSearchError(f"{self.path}: {self.kind} '{name}' contains NaN or Inf")
        if self.kind == "metric" and t.numel() and bool(t.min() < 0):
            raise MergeSearchError(f"{self.path}: metric '{name}' has negative values (a metric is a curvature)")
        return t

    def get(self, name: str) -> torch.Tensor:
        if self._handle is None:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        return self.check_values(name, self._handle.get_tensor(name))

    def release(self) -> None:
        self._handle = None

    def check_against(self, model: "Checkpoint") -> "SideFile":
        """Refuse a file that does not fit ``model`` (one line naming both)."""
        floats = [n for n in model.names() if model.dtype(n).is_floating_point]
        if self.kind == "metric":
            missing = [n for n in floats if n not in self._shapes]
            if missing:
                raise MergeSearchError(f"{self.path}: metric has no tensor '{missing[0]}' of {model.path} "
                                       f"({len(missing)} missing)")
            for n in floats:
                if self._shapes[n] != model.shape(n):
                    raise MergeSearchError(f"{self.path}: metric '{n}' has shape {list(self._shapes[n])}, "
                                           f"the model {list(model.shape(n))}")
        else:
            names = set(model.names())
            for n, shape in self._shapes.items():
                if n not in names:
                    raise MergeSearchError(f"{self.path}: Gram matrix for '{n}', which {model.path} does not have")
                ms = model.shape(n)
                if len(ms) != 2 or shape != (ms[1], ms[1]):
                    raise MergeSearchError(f"{self.path}: Gram matrix '{n}' has shape {list(shape)}; the layer's "
                                           f"inputs need [{ms[1] if len(ms) == 2 else '?'}, same]")
        return self


# -- compatibility -------------------------------------------------------------


def _arch(ckpt: Checkpoint) -> tuple:
    return (tuple(ckpt.config.get("architectures") or ()), ckpt.config.get("model_type"))


def _arch_name(arch: tuple) -> str:
    return ",".join(arch[0]) if arch[0] else str(arch[1])


def check_compatible(
    base: Checkpoint | None,
    models: list[Checkpoint],
    *,
    allow_unrelated: bool = False,
    max_distance: float = MAX_FINETUNE_DISTANCE,
) -> dict[str, float]:
    """Refuse inputs that cannot be merged, before any merge work.

    Returns the relative distance of each model to the base (empty without a base).
    Each refusal is a one-line :class:`MergeSearchError` naming the offending folder.
    """
    ref = base if base is not None else models[0]
    others = [m for m in models if m is not ref and m.path.resolve() != ref.path.resolve()]
    ref_arch = _arch(ref)
    ref_names = set(ref.names())
    ref_vocab = ref.tokenizer_vocab()
    for m in others:
        arch = _arch(m)
        if ref.config and m.config and arch != ref_arch:
            raise MergeSearchError(
                f"{m.path}: architecture {_arch_name(arch)} differs from {ref.path} ({_arch_name(ref_arch)})"
            )
        names = set(m.names())
        if names != ref_names:
            missing = sorted(ref_names - names)[:3]
            extra = sorted(names - ref_names)[:3]
            raise MergeSearchError(
                f"{m.path}: tensor names differ from {ref.path} (missing {missing}, unexpected {extra})"
            )
        for name in ref.names():
            if m.shape(name) != ref.shape(name):
                raise MergeSearchError(
                    f"{m.path}: shape mismatch for '{name}': {list(m.shape(name))} vs {list(ref.shape(name))} in {ref.path}"
                )
        v1, v2 = ref.config.get("vocab_size"), m.config.get("vocab_size")
        if v1 is not None and v2 is not None and v1 != v2:
            raise MergeSearchError(f"{m.path}: vocab size {v2} differs from {ref.path} ({v1})")
        vocab = m.tokenizer_vocab()
        if ref_vocab is not None and vocab is not None and vocab != ref_vocab:
            diff = len(set(vocab.items()) ^ set(ref_vocab.items()))
            raise MergeSearchError(f"{m.path}: tokenizer vocabulary differs from {ref.path} ({diff} entries differ)")
    sample = _sample_names(ref)
    for m in [ref, *others]:
        for name in sample:
            t = m.get(name)
            if t.is_floating_point() and not all_finite(t):
                raise MergeSearchError(f"{m.path}: tensor '{name}' contains NaN or Inf")
    distances: dict[str, float] = {}
    if base is not None:
        for m in others:
            d = relative_distance(base, m, sample)
            distances[str(m.path)] = d
            if d > max_distance and not allow_unrelated:
                raise MergeSearchError(
                    f"{m.path}: not a fine-tune of {base.path} (relative distance {d:.3f} > {max_distance}; "
                    f"pass --allow-unrelated to merge anyway)"
                )
        for m in models:
            m.release()
        base.release()
    return distances


def _sample_names(ckpt: Checkpoint) -> list[str]:
    """Floating tensors to check: all of them when small, else an even spread."""
    names = [n for n in ckpt.names() if ckpt.dtype(n).is_floating_point]
    total = sum(ckpt.numel(n) for n in names)
    if total <= CHECK_SAMPLE_ELEMENTS:
        return names
    by_size = sorted(names, key=ckpt.numel)
    picked, count = [], 0
    stride = max(1, len(by_size) // 16)
    for n in by_size[::stride]:
        if count + ckpt.numel(n) > CHECK_SAMPLE_ELEMENTS:
            break
        picked.append(n)
        count += ckpt.numel(n)
    return picked or by_size[:1]


def relative_distance(base: Checkpoint, model: Checkpoint, names: Iterable[str]) -> float:
    num = den = 0.0
    for name in names:
        b = base.get(name).float()
        num += float((model.get(name).float() - b).square().sum())
        den += float(b.square().sum())
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


# -- writing -------------------------------------------------------------------


class StreamingWriter:
    """Write tensors into planned safetensors shards as they are produced.

    ``plan`` lists (name, shape, dtype) in the order tensors will be written.
    Use as a context manager; on error the temp folder is removed and nothing
    appears at ``out_dir``.
    """

    def __init__(self, out_dir: str | os.PathLike, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 2 * 1024**3, force: bool = False):
        self.out_dir = Path(out_dir)
        self.force = force
        if self.out_dir.exists() and not force:
            raise MergeSearchError(f"{self.out_dir}: output path exists (pass --force to replace it)")
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.shards = self._plan_shards(plan, max_shard_bytes)
        self._order = [name for shard in self.shards for name, _, _ in shard]
        self._next = 0
        self._file = None
        self._shard_i = -1
        self._shard_pos = 0

    @staticmethod
    def _plan_shards(plan, max_bytes):
        shards, cur, size = [], [], 0
        for name, shape, dtype in plan:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if cur and size + nbytes > max_bytes:
                shards.append(cur)
                cur, size = [], 0
            cur.append((name, tuple(shape), dtype))
            size += nbytes
        if cur:
            shards.append(cur)
        return shards

    def _shard_name(self, i: int) -> str:
        if len(self.shards) == 1:
            return "model.safetensors"
        return f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def __enter__(self) -> "StreamingWriter":
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        except OSError as e:
            raise MergeSearchError(f"{self.out_dir}: cannot create output folder ({e.strerror or e})") from None
        return self

    def _open_shard(self, i: int) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in self.shards[i]:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.tmp / self._shard_name(i), "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._shard_i, self._shard_pos = i, 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise RuntimeError(f"tensor {name} written out of plan order")
        shard_i, pos = self._locate(self._next)
        _, shape, dtype = self.shards[shard_i][pos]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"tensor {name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
        if shard_i != self._shard_i:
            self._close_shard()
            self._open_shard(shard_i)
        t = tensor.detach().to("cpu").contiguous()
        data = t.view(torch.uint8) if t.dim() > 0 and t.dtype != torch.bool else t.reshape(-1).view(torch.uint8)
        try:
            self._file.write(memoryview(data.numpy()).cast("B"))
        except OSError as e:
            raise MergeSearchError(f"{self.out_dir}: write failed ({e.strerror or e}); nothing was left at the output path") from None
        self._next += 1

    def _locate(self, k: int) -> tuple[int, int]:
        for i, shard in enumerate(self.shards):
            if k < len(shard):
                return i, k
            k -= len(shard)
        raise IndexError(k)

    def _close_shard(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            finally:
                self._file.close()
                self._file = None

    def copy_side_files(self, source: Path, tokenizer_source: Path | None = None,
                        config_updates: dict | None = None) -> None:
        """config.json and the generation config from ``source``; tokenizer files
        from ``tokenizer_source`` (default: ``source``)."""
        tokenizer_source = tokenizer_source or source
        cfg = source / "config.json"
        if cfg.exists():
            data = json.loads(cfg.read_text())
            data.update(config_updates or {})
            (self.tmp / "config.json").write_text(json.dumps(data, indent=2) + "\n")
        for folder, names in ((source, SIDE_FILES), (tokenizer_source, TOKENIZER_FILES)):
            for fname in names:
                if (folder / fname).exists():
                    shutil.copy2(folder / fname, self.tmp / fname)

    def write_file(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._close_shard()
        except OSError:
            if exc_type is None:
                raise
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            if self._next != len(self._order):
                raise RuntimeError(f"only {self._next} of {len(self._order)} planned tensors were written")
            if len(self.shards) > 1:
                weight_map = {name: self._shard_name(i) for i, s in enumerate(self.shards) for name, _, _ in s}
                total = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for sh in self.shards for _, s, d in sh)
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            replace_dir(self.tmp, self.out_dir, self.force)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise


def replace_dir(tmp: Path, final: Path, force: bool) -> None:
    """Move a finished temp folder to its final path; an old one is replaced only with force."""
    if final.exists():
        if not force:
            raise MergeSearchError(f"{final}: output path exists (pass --force to replace it)")
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Write a file to a temp name beside it, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
