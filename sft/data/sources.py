"""Reading rows from data sources: local files and globs, saved `datasets` folders, hub data sets.

Every row comes with a `where` (file:line or file row N) so that any problem can name it. A row that cannot
be read (malformed JSON, not UTF-8, not an object) comes back as a `Row` with `error` set: the caller decides,
by `data.on_bad_row`, whether that stops the run or is skipped and counted.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sft.config import DataSource
from sft.errors import SftError

HUB_PREFIX = "hub:"
FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class Row(NamedTuple):
    number: int  # the row's place in the source (all files of a glob in sorted order), from 0
    where: str
    data: dict[str, Any] | None
    error: str | None = None


def resolve_path(spec: str) -> Path:
    """`builtin:NAME/SPLIT` -> the packaged file; anything else is a local file that must exist."""
    if spec.startswith("builtin:"):
        from sft.builtin_data import builtin_data_path

        return builtin_data_path(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SftError(f"data: file not found: {spec}")
    return path


@dataclass
class RowSource:
    """One `data.train` / `data.eval` entry, resolved: what to read and how."""

    spec: DataSource
    kind: str  # jsonl | json | parquet | csv | saved | hub
    files: list[Path]

    @property
    def name(self) -> str:
        return self.spec.path

    def rows(self, start: int = 0, every: int = 1, offset: int = 0, streaming: bool = False) -> Iterator[Row]:
        """Rows with index >= start and index % every == offset (a rank's shard), in order."""

        def want(index: int) -> bool:
            return index >= start and index % every == offset

        if self.kind in ("saved", "hub"):
            yield from _dataset_rows(self, start, want, streaming)
            return
        base = 0
        for path in self.files:
            base += yield from READERS[self.kind](path, base, want)

    def fingerprint(self) -> str:
        """Hash of the content this source reads (the cache key's content part; run.json records it). Local
        files are hashed once per process while their sizes and modification times stay the same."""
        if self.kind == "hub":
            return self._fingerprint()
        files = self.files if self.kind != "saved" else sorted(self.files[0].rglob("*"))
        key = (
            self.kind,
            tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()),
        )
        if key not in _FINGERPRINTS:
            _FINGERPRINTS[key] = self._fingerprint()
        return _FINGERPRINTS[key]

    def _fingerprint(self) -> str:
        h = hashlib.sha256(self.kind.encode())
        if self.kind == "hub":
            ds = _load_dataset(self, streaming=False)
            h.update(str(getattr(ds, "_fingerprint", "")).encode())
            return h.hexdigest()
        for path in self.files if self.kind != "saved" else sorted(self.files[0].rglob("*")):
            if path.is_file():
                h.update(str(path.name).encode())
                with path.open("rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
        return h.hexdigest()


_FINGERPRINTS: dict[tuple[Any, ...], str] = {}


def open_source(spec: DataSource) -> RowSource:
    """Resolve a source spec, failing fast (no row is read) when a local path does not exist."""
    path = spec.path
    if path.startswith(HUB_PREFIX):
        if not path.removeprefix(HUB_PREFIX).strip("/"):
            raise SftError(f"data: {path}: name a hub data set, e.g. hub:org/name")
        return RowSource(spec, "hub", [])
    if path.startswith("builtin:"):
        return RowSource(spec, "jsonl", [resolve_path(path)])
    local = Path(path).expanduser()
    if local.is_dir():
        if not ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()):
            raise SftError(
                f"data: {path} is a folder but not one written by datasets' save_to_disk; "
                "point at the data files or a glob (folder/*.jsonl)"
            )
        return RowSource(spec, "saved", [local])
    files = (
        sorted(Path(p) for p in glob.glob(str(local), recursive=True)) if glob.has_magic(path) else [local]
    )
    files = [f for f in files if f.is_file()]
    if not files:
        raise SftError(f"data: file not found: {path}")
    for f in files:
        if f.suffix.lower() not in FILE_KINDS:
            raise SftError(
                f"data: {f}: unknown file type '{f.suffix}'; use .jsonl, .json, .parquet or .csv "
                "(or a folder written by datasets' save_to_disk)"
            )
    kinds = {FILE_KINDS[f.suffix.lower()] for f in files}
    if len(kinds) > 1:
        raise SftError(f"data: {path} matches files of several types ({', '.join(sorted(kinds))}); use one")
    return RowSource(spec, kinds.pop(), files)


# ---------------------------------------------------------------- local files


def _as_object(value: Any, where: str, index: int) -> Row:
    if not isinstance(value, dict):
        return Row(index, where, None, f"each row must be a JSON object, got {type(value).__name__}")
    return Row(index, where, value)


# Each reader yields the rows `want` accepts, numbered from `base`, and returns how many rows the file has.
Want = Callable[[int], bool]


def _jsonl_rows(path: Path, base: int, want: Want) -> Generator[Row, None, int]:
    index = base - 1
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines are layout, not rows
            index += 1
            if not want(index):
                continue  # another rank's row (or already read): not even parsed
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Row(index, where, None, f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                yield Row(index, where, None, f"malformed JSON ({e.msg}, column {e.colno})")
                continue
            yield _as_object(value, where, index)
    return index + 1 - base


def _csv_rows(path: Path, base: int, want: Want) -> Generator[Row, None, int]:
    # surrogateescape keeps reading past bytes that are not UTF-8; the row holding them is reported.
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        count = 0
        for count, record in enumerate(reader, start=1):
            index = base + count - 1
            if not want(index):
                continue
            where = f"{path}:{reader.line_num}"
            values = [*record.values()]
            if any(isinstance(v, str) and any("\udc80" <= c <= "\udcff" for c in v) for v in values):
                yield Row(index, where, None, "not valid UTF-8")
            elif None in record or any(v is None for v in values):
                yield Row(index, where, None, f"has a different number of fields than the header of {path}")
            else:
                yield Row(index, where, dict(record))
    return count


def _json_rows(path: Path, base: int, want: Want) -> Generator[Row, None, int]:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SftError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise SftError(f"{path}: malformed JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    if not isinstance(value, list):
        raise SftError(f"{path}: a .json data file must hold a list of row objects (or use .jsonl)")
    for i, item in enumerate(value):
        if want(base + i):
            yield _as_object(item, f"{path} row {i}", base + i)
    return len(value)


def _parquet_rows(path: Path, base: int, want: Want) -> Generator[Row, None, int]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise SftError(f"{path}: not a readable Parquet file ({e})") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for item in batch.to_pylist():
            if want(base + i):
                yield Row(base + i, f"{path} row {i}", item)
            i += 1
    return i


READERS: dict[str, Callable[[Path, int, Want], Generator[Row, None, int]]] = {
    "jsonl": _jsonl_rows,
    "csv": _csv_rows,
    "json": _json_rows,
    "parquet": _parquet_rows,
}


# ---------------------------------------------------------------- datasets: saved folders and the hub


def _load_dataset(src: RowSource, streaming: bool) -> Any:
    import datasets

    spec = src.spec
    if src.kind == "saved":
        ds = datasets.load_from_disk(str(src.files[0]))
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise SftError(f"data: {spec.path} has splits {', '.join(ds)}; set split: to one of them")
            ds = ds[spec.split]
        return ds
    name = spec.path.removeprefix(HUB_PREFIX)
    try:
        return datasets.load_dataset(
            name, spec.subset, split=spec.split, revision=spec.revision, streaming=streaming
        )
    except Exception as e:  # network, missing split, unknown name: all end the run here, named
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SftError(f"data: could not load hub data set {name} (split {spec.split}): {first}") from None


def _dataset_rows(src: RowSource, start: int, want: Want, streaming: bool) -> Iterator[Row]:
    ds = _load_dataset(src, streaming=streaming and src.kind == "hub")
    label = f"{src.spec.path}[{src.spec.split}]"
    if start and hasattr(ds, "skip"):
        ds = ds.skip(start)  # resuming a stream: skip without handing the rows to us
    else:
        start = 0
    for i, item in enumerate(ds, start=start):
        if want(i):
            yield _as_object(item, f"{label} row {i}", i)
