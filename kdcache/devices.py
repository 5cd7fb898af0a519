"""Device choice and mixed precision in one place (bf16 autocast and channels_last on CUDA)."""

from __future__ import annotations

import contextlib

import torch

from kdcache.errors import KDCacheError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KDCacheError(f"--device {name} asked for, but no CUDA device is available here",
                           fix="use --device cpu (or auto)")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise KDCacheError(f"unknown device {name!r}", expected="auto, cpu, cuda or cuda:N") from exc


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op on the CPU (where fp32 keeps replay checks exact)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast_name(device: torch.device, enabled: bool = True) -> str:
    return "bf16" if enabled and device.type == "cuda" else "none"
