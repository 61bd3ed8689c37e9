"""`train.compile`: torch.compile of each decoder layer, in place.

In place (`Module.compile`) keeps the layer's module, parameter names, hooks and state dict as they were,
so checkpoints, exports and FSDP2's sharding (applied afterwards, per layer) see the same model. All layers
share one compiled graph (same code, parameters are inputs); the embeddings, the head and the loss stay
eager. The first step pays the compilation (printed by the loop); later steps run the compiled kernels.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import torch

from sft.errors import SftError
from sft.model.layers import decoder_layers

# Tests set aot_eager: the same tracing and autograd as inductor, without generating kernels (minutes on CI).
BACKEND = os.environ.get("SFT_COMPILE_BACKEND", "inductor")


def check_compile_toolchain(device: torch.device) -> None:
    """inductor writes C++ (CPU) or Triton (GPU) kernels: refuse clearly when their compiler is missing."""
    if BACKEND != "inductor":
        return
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise SftError(
            "train.compile=true on CPU needs a C++ compiler (g++ or clang++) for torch.compile's kernels; "
            "install one (apt-get install g++) or set train.compile=false"
        )
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise SftError(
            "train.compile=true on a GPU needs Triton (it ships with CUDA builds of torch); install it or set "
            "train.compile=false"
        )


def compile_layers(model: torch.nn.Module, device: torch.device) -> int:
    """Compile every decoder layer of `model` in place; returns how many."""
    check_compile_toolchain(device)
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=BACKEND)
    return len(layers)
