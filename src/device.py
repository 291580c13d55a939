"""Where and how tensors run: device, precision and compile resolution, shared by training and the tools.

`src.sample`, `src.reconstruct`, `src.interpolate` and `src.evaluate` import this module, never the trainer.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager, Optional

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("auto", False, True, "default", "reduce-overhead")


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def missing_device(name: str, key: str) -> Optional[str]:
    """Why `key=name` names a device this machine does not have, or None when it is here (or auto)."""
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not _mps_available()):
        return f"{key}={name!r} is not allowed; no {name.upper()} device is visible here, use auto or cpu"
    return None


def resolve_device(name: str) -> torch.device:
    """auto -> cuda, else mps, else cpu; a named device as it is."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on CUDA where the card has it (no scaler needed), fp32 elsewhere (CPU autocast is slower)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast_for(device: torch.device, precision: str) -> ContextManager:
    """The one precision switch: fp32 runs as is; bf16/fp16 under autocast (fp16 also needs a GradScaler)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def autocast_dtype(precision: str) -> torch.dtype:
    """The dtype a linear layer's output has under the precision's autocast (the encoder's, and so its noise)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def resolve_compile(mode: Any, device: torch.device, world_size: int) -> Any:
    """auto: CUDA graphs (reduce-overhead) on one CUDA device, where small VAEs are launch-bound; off elsewhere."""
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" and world_size == 1 else False
    return "default" if mode is True else mode


def setup_backends(device: torch.device, cudnn_benchmark: bool) -> None:
    """CUDA only: cudnn autotuning for the fixed batch shape, TF32 for fp32 matmuls and convs."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so host timers measure finished work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
