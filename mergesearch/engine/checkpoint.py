"""HF checkpoint reading.

A model folder holds one ``model.safetensors``, shards listed in
``model.safetensors.index.json``, or legacy pickle weights (``pytorch_model.bin``,
loaded only through ``torch.load(weights_only=True)``). Safetensors reads are lazy
and per tensor through ``safe_open`` (memory-mapped); ``release()`` drops the
mappings so a streamed merge keeps its resident set small. Side files (curvature
metrics, Gram matrices) are read by :class:`SideFile`.

Writing is in :mod:`mergesearch.engine.writer`, the compatibility checks that run before any
merge work in :mod:`mergesearch.engine.compat`, atomic file replacement in
:mod:`mergesearch.fsutil`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from mergesearch.methods import native
from mergesearch.errors import MergeSearchError
from mergesearch.recipe import layer_index

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ST_DTYPE = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_TO_TORCH = {v: k for k, v in ST_DTYPE.items()}



def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in a floating tensor: its min and max are finite (NaN propagates
    through both). Two reductions in the stored dtype, about 10x faster on the CPU than
    a float32 sum of a bfloat16 tensor, and no overflow for float16."""
    if t.numel() == 0:
        return True
    fast = native.all_finite(t)  # from the bits, one pass
    if fast is not None:
        return fast
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

    def __init__(self, path: str | os.PathLike, label: str | None = None):
        self.path = Path(path)
        # how the user named it (a Hub ID at its commit, or the folder)
        self.label = label if label is not None else str(self.path)
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
            self._meta[name] = (tuple(t.shape), ST_DTYPE.get(t.dtype, str(t.dtype)))

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
        return ST_TO_TORCH[self._meta[name][1]]

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
        return f"Checkpoint({self.label})"


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
            if info.get("dtype") not in ST_TO_TORCH:
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
        dtype = ST_TO_TORCH[info["dtype"]]
        a, b = info["data_offsets"]
        chunk = raw[start + a:start + b]
        if (start + a) % dtype.itemsize:
            chunk = chunk.clone()
        out[name] = chunk.view(dtype).reshape(info["shape"])
    return out


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
        self._dtypes = {n: ST_TO_TORCH[v["dtype"]] for n, v in header.items()}
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
