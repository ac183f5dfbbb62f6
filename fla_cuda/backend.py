"""Which backend each public op uses: a CUDA kernel, or the PyTorch path.

An op runs its CUDA kernel when (1) the kernel exists in the compiled extension,
(2) the inputs are on a GPU the extension has machine code for, and (3) the inputs are
inside the kernel's envelope (dtype, head dims). Otherwise it runs the PyTorch path,
which is always correct and differentiable. ``FLA_CUDA_BACKEND=torch`` forces the
PyTorch path everywhere (debugging, A/B comparisons).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from . import _extension


@dataclass(frozen=True)
class KernelSpec:
    cpp_op: str                      # name under torch.ops.fla_cuda
    dtypes: tuple = (torch.float16, torch.bfloat16, torch.float32)
    max_head_dim: int = 256
    head_dims: tuple | None = None   # the only head dims the kernel takes (None: any up to max)
    backward: bool = True            # False: the gradient is still the PyTorch path's


_RECURRENT = KernelSpec("recurrent_fwd")
_CHUNK_SCALAR_GATE = KernelSpec("chunk_simple_gla_fwd", dtypes=(torch.float16, torch.bfloat16),
                                head_dims=(64, 128, 256))
_CHUNK_GLA = KernelSpec("chunk_gla_fwd", dtypes=(torch.float16, torch.bfloat16), head_dims=(64, 128, 256))

# Every public op of the library, in the order `python -m fla_cuda info` lists them,
# mapped to its CUDA kernel (None: PyTorch path only, the kernel has not landed yet).
OPS: dict[str, KernelSpec | None] = {
    "chunk_simple_gla": _CHUNK_SCALAR_GATE,
    "fused_chunk_simple_gla": _CHUNK_SCALAR_GATE,
    "parallel_simple_gla": _CHUNK_SCALAR_GATE,
    "fused_recurrent_simple_gla": _RECURRENT,
    "chunk_linear_attn": _CHUNK_SCALAR_GATE,
    "fused_chunk_linear_attn": _CHUNK_SCALAR_GATE,
    "fused_recurrent_linear_attn": _RECURRENT,
    "chunk_retention": _CHUNK_SCALAR_GATE,
    "fused_chunk_retention": _CHUNK_SCALAR_GATE,
    "parallel_retention": _CHUNK_SCALAR_GATE,
    "fused_recurrent_retention": _RECURRENT,
    "chunk_gla": _CHUNK_GLA,
    "fused_recurrent_gla": _RECURRENT,
    "chunk_delta_rule": None,
    "fused_recurrent_delta_rule": _RECURRENT,
    "chunk_gated_delta_rule": None,
    "fused_recurrent_gated_delta_rule": _RECURRENT,
    "chunk_iplr_delta_rule": None,
    "fused_recurrent_iplr_delta_rule": _RECURRENT,
    "chunk_dplr_delta_rule": None,
    "fused_recurrent_dplr_delta_rule": _RECURRENT,
}


def forced_torch() -> bool:
    return os.environ.get("FLA_CUDA_BACKEND", "").lower() == "torch"


def kernel_available(op: str) -> bool:
    """The op's CUDA kernel is compiled into the loaded extension."""
    spec = OPS[op]
    return (spec is not None and _extension.HAS_EXTENSION
            and hasattr(torch.ops.fla_cuda, spec.cpp_op))


_warned: set = set()


def _outside_envelope(spec: KernelSpec, x: torch.Tensor, head_dims) -> str | None:
    if x.dtype not in spec.dtypes:
        return f"dtype {x.dtype}"
    if spec.head_dims is not None and any(d not in spec.head_dims for d in head_dims):
        return f"head dims {tuple(head_dims)} (it takes {spec.head_dims})"
    if any(d > spec.max_head_dim for d in head_dims):
        return f"head dims {tuple(head_dims)} (at most {spec.max_head_dim})"
    return None


def use_cuda(op: str, x: torch.Tensor, *head_dims: int) -> bool:
    """Whether a call of ``op`` on inputs like ``x`` (and these head dims) runs its kernel.

    Inputs on a supported GPU but outside the kernel's envelope run the PyTorch path with a
    one-time warning per (op, reason), so a slow path is never taken silently."""
    if forced_torch() or not x.is_cuda or not kernel_available(op):
        return False
    if not _extension.cuda_arch_supported(x.device):
        # Once per GPU model: every op then runs the PyTorch path (e.g. a newer GPU than the
        # wheel's sm_80 / sm_90a code, or a build whose _build_info.py is missing).
        major, minor = torch.cuda.get_device_capability(x.device)
        archs = _extension.build_info()["cuda_archs"]
        built = f"built for sm_{', sm_'.join(archs)}" if archs else "fla_cuda/_build_info.py, which lists them, is missing"
        _warn_once(("arch", major, minor),
                   f"fla_cuda: the extension has no machine code for this GPU (sm_{major}{minor}; {built}); "
                   "every op runs the (slower) PyTorch path")
        return False
    why = _outside_envelope(OPS[op], x, head_dims)
    if why is not None:
        _warn_once((op, why), f"fla_cuda: {op} has no CUDA kernel for {why}; running the (slower) PyTorch path")
        return False
    return True


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


def describe(device: torch.device | str) -> dict[str, str]:
    """op -> 'cuda kernel' | 'pytorch' for typical (bf16, head dim 128) inputs on ``device``."""
    device = torch.device(device)
    out = {}
    for op, spec in OPS.items():
        if device.type == "cuda" and not forced_torch() and kernel_available(op) \
                and _extension.cuda_arch_supported(device):
            out[op] = "cuda kernel" if spec.backward else "cuda kernel (forward; backward: pytorch)"
        elif device.type == "cuda" and spec is not None and kernel_available(op):
            out[op] = "pytorch (no machine code for this GPU)" if not forced_torch() else "pytorch (forced)"
        else:
            out[op] = "pytorch" + ("" if device.type == "cpu" or spec is not None
                                   else " (CUDA kernel not written yet)")
    return out
