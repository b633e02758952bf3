"""Streamed checkpoint writing.

:class:`StreamingWriter` plans the shards up front from the output tensors' shapes and
dtypes, writes each shard's safetensors header first and then the tensor bytes as they
are produced, so peak memory is a few tensors. Everything goes to a temp folder beside
the destination, renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import uuid
from pathlib import Path

import torch

from mergesearch.engine.checkpoint import ST_DTYPE
from mergesearch.errors import MergeSearchError
from mergesearch.fsutil import replace_dir

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
            header[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
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
