"""Common accelerators: memory, and dense peak TFLOP/s by compute dtype (vendor data sheets, without sparsity).

The planner reads the memory (`sft plan --gpu h100`), the MFU metric reads the peak FLOP/s of the device a run is
on (matched by its CUDA name); `train.peak_tflops` overrides the table. fp32 is the plain fp32 rate (PyTorch
runs fp32 matmuls without TF32 unless asked). No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1000**3


@dataclass(frozen=True)
class Gpu:
    key: str
    name: str
    memory_bytes: int
    bf16_tflops: float | None
    fp16_tflops: float
    fp32_tflops: float
    matches: tuple[str, ...]
    """Substrings of `torch.cuda.get_device_name()` (lower case) that mean this device."""

    def peak_tflops(self, dtype: str) -> float | None:
        return {"bf16": self.bf16_tflops, "fp16": self.fp16_tflops, "fp32": self.fp32_tflops}[dtype]


GPUS = [
    Gpu("b200", "NVIDIA B200", 180 * GB, 2250, 2250, 75, ("b200",)),
    Gpu("h200", "NVIDIA H200", 141 * GB, 989, 989, 67, ("h200",)),
    Gpu("h100-pcie", "NVIDIA H100 PCIe", 80 * GB, 756, 756, 51, ("h100 pcie",)),
    Gpu("h100", "NVIDIA H100 SXM", 80 * GB, 989, 989, 67, ("h100",)),
    Gpu("a100-40gb", "NVIDIA A100 40GB", 40 * GB, 312, 312, 19.5, ("a100-sxm4-40gb", "a100-pcie-40gb")),
    Gpu("a100", "NVIDIA A100 80GB", 80 * GB, 312, 312, 19.5, ("a100",)),
    Gpu("l40s", "NVIDIA L40S", 48 * GB, 362, 362, 91.6, ("l40s",)),
    Gpu("a10g", "NVIDIA A10G", 24 * GB, 70, 70, 31.2, ("a10g",)),
    Gpu("a10", "NVIDIA A10", 24 * GB, 125, 125, 31.2, ("a10",)),
    Gpu("l4", "NVIDIA L4", 24 * GB, 121, 121, 30.3, ("l4",)),
    Gpu("v100", "NVIDIA V100", 32 * GB, None, 125, 15.7, ("v100",)),
    Gpu("t4", "NVIDIA T4", 16 * GB, None, 65, 8.1, ("tesla t4",)),
    Gpu("mi300x", "AMD Instinct MI300X", 192 * GB, 1307, 1307, 163.4, ("mi300x",)),
]


def gpu_by_key(key: str) -> Gpu | None:
    return next((g for g in GPUS if g.key == key.lower()), None)


def gpu_by_device_name(name: str) -> Gpu | None:
    """The table's entry for a CUDA device name such as 'NVIDIA H100 80GB HBM3'; None when unknown."""
    low = name.lower()
    return next((g for g in GPUS if any(m in low for m in g.matches)), None)
