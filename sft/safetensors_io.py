"""Streaming safetensors I/O: read one tensor at a time, write shards as tensors arrive.

Why not `safetensors.safe_open`? It maps the whole file, and every page a merge touches stays resident, so
peak RSS grows to the size of the inputs. Reading each tensor into its own buffer keeps memory at a few
tensors, whatever the model size. The writer lays out every shard up front (names, dtypes and shapes are
known before any math runs), writes each header, then appends tensor bytes in order; no shard is ever held
in memory. The format is the documented safetensors one (8-byte little-endian header length, JSON header
with `data_offsets`, then the raw bytes); tests read our files back with the safetensors library.

Header parsing needs no torch, so plans and dry runs stay light.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from sft.errors import SftError

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
CODE_OF = {name: code for code, (name, _) in DTYPES.items()}  # "float32" -> "F32"

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, dtype code and shape."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int:
    n = DTYPES[dtype][1]
    for d in shape:
        n *= d
    return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header and check that every tensor lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SftError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise SftError(f"{path}: not a safetensors file (bad header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SftError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise SftError(f"{path}: not a safetensors file (header is not a mapping)")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SftError(f"{path}: tensor {name}: malformed header entry") from None
        if dtype not in DTYPES:
            raise SftError(f"{path}: tensor {name} has dtype {dtype}, which the merge does not handle")
        if end - begin != nbytes_of(dtype, shape) or data_start + end > size:
            raise SftError(f"{path}: tensor {name}: offsets do not match its shape or the file is truncated")
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
    return infos, meta


class Checkpoint:
    """The safetensors weights of one model folder: `model.safetensors`, or shards listed by the index.

    Opening checks that every file exists and every header is sound; nothing is read until `read`.
    """

    def __init__(self, folder: Path, filename: str | None = None) -> None:
        self.folder = folder
        self.tensors: dict[str, TensorInfo] = {}
        self._handles: dict[Path, BufferedReader] = {}
        files = [folder / filename] if filename else self._weight_files(folder)
        for file in files:
            if not file.is_file():
                raise SftError(f"{file}: missing (listed in {folder / INDEX_FILE}); the model is incomplete")
            infos, _ = read_header(file)
            for name, info in infos.items():
                if name in self.tensors:
                    raise SftError(f"{folder}: tensor {name} appears in two files")
                self.tensors[name] = info

    @staticmethod
    def _weight_files(folder: Path) -> list[Path]:
        if (folder / INDEX_FILE).is_file():
            try:
                weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SftError(f"{folder / INDEX_FILE}: not a safetensors index (no weight_map)") from None
            return [folder / f for f in dict.fromkeys(weight_map.values())]
        if (folder / SINGLE_FILE).is_file():
            return [folder / SINGLE_FILE]
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise SftError(
                f"{folder}: weights are pickle files (.bin/.pt); sft reads safetensors only. Convert "
                "with `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`"
            )
        raise SftError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; is this a Hugging Face model folder?")

    def read(self, name: str, device: str = "cpu") -> torch.Tensor:
        """Read one tensor into its own buffer (no mmap, see the module docstring)."""
        info = self.tensors[name]
        return self.read_rows(name, 0, info.shape[0] if info.shape else 1).reshape(info.shape).to(device)

    def read_rows(self, name: str, first: int, last: int) -> torch.Tensor:
        """Rows [first, last) of a tensor (along dim 0) into their own buffer: a sharded loader reads only
        the rows its rank keeps (tensors are stored row-major, so the rows are one contiguous byte range)."""
        info = self.tensors[name]
        row = math.prod(info.shape[1:])
        return self.read_flat(name, first * row, last * row).reshape(last - first, *info.shape[1:])

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor (one contiguous byte range), 1-D."""
        import torch

        info = self.tensors[name]
        dtype = getattr(torch, DTYPES[info.dtype][0])
        size = torch.empty(0, dtype=dtype).element_size()
        count = (stop - start) * size
        buf = torch.empty(count, dtype=torch.uint8)
        if count:
            fh = self._handles.get(info.file)
            if fh is None:
                fh = self._handles[info.file] = open(info.file, "rb")  # noqa: SIM115 (kept open across reads)
            fh.seek(info.start + start * size)
            if fh.readinto(buf.numpy().data) != count:
                raise SftError(f"{info.file}: tensor {name}: file ended early (truncated while it was read?)")
        return buf.view(dtype)

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    """What the writer expects next: name, safetensors dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Cut the ordered tensors into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


def shard_names(count: int) -> list[str]:
    """Hugging Face names: one file is model.safetensors, more are model-0000i-of-0000n.safetensors."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardedWriter:
    """Writes tensors in the planned order straight to their shard files, then the index.

    `write` must be called once per spec, in order; it holds nothing after it returns, and
    `peak_pending_bytes` records the largest tensor it was handed (what the writer itself ever held).
    """

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int) -> None:
        self.folder = folder
        self.shards = plan_shards(specs, max_shard_bytes)
        self.files = shard_names(len(self.shards))
        self._order = [(s, i) for i, shard in enumerate(self.shards) for s in shard]
        self._next = 0
        self._fh: IO[bytes] | None = None
        self.bytes_written = 0
        self.peak_pending_bytes = 0

    def _open_shard(self, i: int) -> IO[bytes]:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in self.shards[i]:
            header[spec.name] = {
                "dtype": spec.dtype,
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # pad so tensor data starts 8-byte aligned, as safetensors does
        fh = open(self.folder / self.files[i], "wb")  # noqa: SIM115 (closed when the shard is complete)
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        return fh

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        if self._next >= len(self._order):
            raise RuntimeError(f"writer: tensor {name} was not planned")
        spec, shard = self._order[self._next]
        if name != spec.name or CODE_OF.get(str(tensor.dtype).removeprefix("torch.")) != spec.dtype:
            raise RuntimeError(f"writer: expected {spec.name} ({spec.dtype}), got {name} ({tensor.dtype})")
        if tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"writer: {name} has shape {tuple(tensor.shape)}, planned {spec.shape}")
        self.peak_pending_bytes = max(self.peak_pending_bytes, spec.nbytes)
        first = self._next == 0 or self._order[self._next - 1][1] != shard
        if first:
            self._fh = self._open_shard(shard)
        assert self._fh is not None
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._fh.write(data.view(torch.uint8).numpy().data)
        self.bytes_written += spec.nbytes
        self._next += 1
        last = self._next == len(self._order) or self._order[self._next][1] != shard
        if last:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def finish(self) -> None:
        """Check that every planned tensor arrived; write the index when there are several shards."""
        if self._next != len(self._order):
            missing = self._order[self._next][0].name
            raise RuntimeError(
                f"writer: {len(self._order) - self._next} tensors never written (first: {missing})"
            )
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.bytes_written},
                "weight_map": {s.name: self.files[i] for s, i in self._order},
            }
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
