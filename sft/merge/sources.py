"""Merge inputs: the `Source` protocol, a name (`builtin:...` or a folder) resolved, and `FolderSource`.

A source knows its tensors' names, dtypes and shapes (from the safetensors headers, no data read) and
reads one tensor at a time as float32. A model folder is a `FolderSource`; an adapter folder is an
`AdapterSource` (lora.py, built on this module) that looks like its base with the adapter folded in, tensor
by tensor. plan.py's `open_source` picks one of the two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sft.errors import SftError
from sft.safetensors_io import Checkpoint, TensorSpec

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"


class Source(Protocol):
    label: str
    """What the user wrote (shown in messages)."""
    folder: Path
    """The folder holding config.json (for an adapter: its base)."""
    config: dict[str, Any]

    def specs(self) -> dict[str, TensorSpec]: ...

    def read(self, name: str, device: str) -> torch.Tensor:
        """One tensor; floating ones as float32."""
        ...

    def close(self) -> None: ...


def resolve(ref: str, what: str) -> Path:
    """`builtin:NAME` or a local folder -> the folder; `what` names the config key in errors."""
    from sft.model.builtin import builtin_model_dir, is_builtin

    if is_builtin(ref):
        return builtin_model_dir(ref)
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise SftError(
            f"{what}: {ref}: folder not found (expected builtin:NAME or a local folder; the merge does not "
            "download hub models)"
        )
    return path.resolve()


def is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SftError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise SftError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise SftError(f"{path}: expected a JSON object")
    return data


class FolderSource:
    """A Hugging Face model folder: config.json plus safetensors weights."""

    def __init__(self, label: str, folder: Path) -> None:
        self.label = label
        self.folder = folder
        if not (folder / "config.json").is_file():
            raise SftError(f"{label}: {folder} has no config.json; is this a Hugging Face model folder?")
        self.config = read_json(folder / "config.json")
        self.checkpoint = Checkpoint(folder)
        self._specs = {n: TensorSpec(n, i.dtype, i.shape) for n, i in self.checkpoint.tensors.items()}

    def specs(self) -> dict[str, TensorSpec]:
        return self._specs

    def read_stored(self, name: str, device: str) -> torch.Tensor:
        """One tensor in the dtype it is stored in."""
        return self.checkpoint.read(name, device)

    def read(self, name: str, device: str) -> torch.Tensor:
        t = self.checkpoint.read(name, device)
        return t.float() if t.is_floating_point() else t

    def close(self) -> None:
        self.checkpoint.close()
