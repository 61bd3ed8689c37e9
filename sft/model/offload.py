"""`train.activation_offload`: what the forward saves for the backward lives in CPU memory, not on the GPU.

Autograd's saved-tensor hooks copy each saved activation to pinned CPU memory as the forward saves it and
back to the GPU when the backward needs it (asynchronous copies on the current stream). Parameters are
never copied (they stay where they are for the optimizer anyway), nor are small tensors. With
`model.gradient_checkpointing` the forward saves only each layer's input, so the two together leave
almost no activations on the GPU, at the price of one recompute and two copies per layer input.
"""

from __future__ import annotations

from typing import Any

import torch

from sft.errors import SftError

MIN_BYTES = 1024  # smaller saved tensors stay on the device: a copy would cost more than they weigh


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks moving activations to CPU memory in the forward and back in the backward."""

    def __init__(self) -> None:
        self.moved_bytes = 0  # what this context copied to CPU memory (for tests and reports)
        pin = torch.cuda.is_available()

        def pack(tensor: torch.Tensor) -> Any:
            if (
                isinstance(tensor, torch.nn.Parameter)
                or isinstance(tensor._base, torch.nn.Parameter)  # a weight saved transposed (linear layers)
                or tensor.layout != torch.strided
                or tensor.numel() * tensor.element_size() < MIN_BYTES
            ):
                return tensor
            host = torch.empty_like(tensor, device="cpu", pin_memory=pin)
            host.copy_(tensor, non_blocking=pin)
            self.moved_bytes += host.numel() * host.element_size()
            return tensor.device, host

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=pin)

        super().__init__(pack, unpack)


def offload_activations(model: torch.nn.Module, device: torch.device) -> None:
    """Run every forward of `model` inside `OffloadActivations` (hooks on the model: the loop is unchanged)."""
    if device.type == "cpu":
        raise SftError(
            "train.activation_offload=true moves activations from the GPU to CPU memory; this run is on the CPU, "
            "where there is nothing to move: set train.activation_offload=false (or use model.gradient_checkpointing)"
        )
    active: list[OffloadActivations] = []

    def enter(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        active.append(OffloadActivations())
        active[-1].__enter__()

    def leave(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        active.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter, with_kwargs=True)
    model.register_forward_hook(leave, with_kwargs=True, always_call=True)
