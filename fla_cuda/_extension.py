"""Loads the compiled extension (``_C.abi3.so``) if it was built.

The extension registers its ops under ``torch.ops.fla_cuda``; when it is missing (no
nvcc at install time) every op runs on its PyTorch path.
"""
from __future__ import annotations

import glob
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
LOAD_ERROR: str | None = None


def _load() -> bool:
    global LOAD_ERROR
    candidates = sorted(glob.glob(os.path.join(_HERE, "_C*.so")))
    if not candidates:
        LOAD_ERROR = "not built (no nvcc at install time, or FLA_CUDA_SKIP=1)"
        return False
    try:
        torch.ops.load_library(candidates[0])
    except (OSError, RuntimeError) as e:  # wrong torch / missing libcudart: stay usable on the PyTorch path
        LOAD_ERROR = f"failed to load {os.path.basename(candidates[0])}: {e}"
        return False
    return True


HAS_EXTENSION = _load()


def build_info() -> dict:
    try:
        from . import _build_info as b
        return {"version": b.VERSION, "cuda_archs": list(b.CUDA_ARCHS), "cuda_home": b.CUDA_HOME,
                "built_with_torch": b.BUILT_WITH_TORCH}
    except ImportError:
        return {"version": None, "cuda_archs": [], "cuda_home": None, "built_with_torch": None}


def cuda_arch_supported(device: torch.device) -> bool:
    """True if the extension holds machine code for this GPU (sm_80 code runs on sm_8x, 90a on sm_90)."""
    if not HAS_EXTENSION or device.type != "cuda":
        return False
    major, minor = torch.cuda.get_device_capability(device)
    archs = build_info()["cuda_archs"]
    for a in archs:
        a = a.replace("+PTX", "").replace("a", "")
        amaj, amin = int(a[:-1]), int(a[-1])
        if amaj == major and amin <= minor:
            return True
    return False
