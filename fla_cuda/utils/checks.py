"""Input validation shared by every op.

Each check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape,
value, device) and names the offending argument, so a bad call fails loudly at the
API boundary instead of crashing or silently computing garbage inside a kernel.
"""
from __future__ import annotations

import torch

# Inputs the library accepts. float64 runs on the PyTorch path only (gradcheck, oracles).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
STATE_DTYPES = (torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 256


def check_tensor(name: str, x, *, ndim: int | None = None, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"`{name}` has dtype {x.dtype}; expected one of: {allowed}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimensions, got shape {tuple(x.shape)}")


def check_shape(name: str, x: torch.Tensor, shape: tuple, what: str = "") -> None:
    if tuple(x.shape) != tuple(shape):
        hint = f" ({what})" if what else ""
        raise ValueError(f"`{name}` must have shape {tuple(shape)}{hint}, got {tuple(x.shape)}")


def check_same_device(**tensors) -> None:
    present = {n: t for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if not present:
        return
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.device != first.device:
            raise ValueError(f"`{name}` is on {t.device} but `{first_name}` is on {first.device}; "
                             "all inputs must be on the same device")


def check_head_dim(name: str, dim: int, limit: int = MAX_HEAD_DIM) -> None:
    if dim < 1 or dim > limit:
        raise ValueError(f"head dimension of `{name}` is {dim}; supported: 1..{limit}")


def check_qkv(q, k, v, *, allow_gva: bool = False):
    """Validate q [B,T,H,K], k [B,T,H,K], v [B,T,HV,V]; returns (B, T, H, K, HV, V).

    With ``allow_gva`` the value heads HV may be a multiple of the query/key heads H
    (grouped value attention); otherwise HV must equal H.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"`q`, `k`, `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    B, T, H, K = q.shape
    check_shape("k", k, (B, T, H, K), "same as q")
    if v.shape[0] != B or v.shape[1] != T:
        raise ValueError(f"`v` must have batch and length {(B, T)} like q, got shape {tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if allow_gva:
        if HV % H != 0:
            raise ValueError(f"`v` has {HV} heads, which is not a multiple of the {H} heads of q/k")
    elif HV != H:
        raise ValueError(f"`v` has {HV} heads but q/k have {H}; heads must match")
    check_head_dim("q", K)
    check_head_dim("v", V)
    return B, T, H, K, HV, V


def check_cu_seqlens(cu_seqlens, B: int, T: int, device: torch.device) -> int:
    """Validate varlen boundaries; returns the number of sequences N.

    Values are read on the host once (a sync on CUDA); the check is what keeps a bad
    boundary from becoming an out-of-bounds access in a kernel.
    """
    if cu_seqlens is None:
        return B
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=INDEX_DTYPES)
    if cu_seqlens.device != device:
        raise ValueError(f"`cu_seqlens` is on {cu_seqlens.device} but `q` is on {device}")
    if B != 1:
        raise ValueError(f"with `cu_seqlens` the batch size must be 1 (sequences packed along T), got B={B}")
    if cu_seqlens.numel() < 2:
        raise ValueError("`cu_seqlens` needs at least 2 entries [0, ..., T]")
    vals = cu_seqlens.tolist()
    if vals[0] != 0:
        raise ValueError(f"`cu_seqlens` must start at 0, got {vals[0]}")
    if vals[-1] != T:
        raise ValueError(f"`cu_seqlens` must end at T={T}, got {vals[-1]}")
    if any(b < a for a, b in zip(vals[:-1], vals[1:])):
        raise ValueError("`cu_seqlens` must be non-decreasing")
    return len(vals) - 1


def check_state(name: str, state, shape: tuple, input_dtype: torch.dtype, device: torch.device) -> None:
    """States are fp32 ([N, H, K, V]); fp64 only alongside fp64 inputs."""
    if state is None:
        return
    allowed = STATE_DTYPES if input_dtype == torch.float64 else (torch.float32,)
    check_tensor(name, state, ndim=len(shape), dtypes=allowed)
    check_shape(name, state, shape)
    if state.device != device:
        raise ValueError(f"`{name}` is on {state.device} but `q` is on {device}")


def check_optional(name: str, x, shape: tuple, device: torch.device, dtypes=FLOAT_DTYPES) -> None:
    """A per-step tensor (gate, beta, a, b ...) of an exact shape, if given."""
    if x is None:
        return
    check_tensor(name, x, ndim=len(shape), dtypes=dtypes)
    check_shape(name, x, shape)
    if x.device != device:
        raise ValueError(f"`{name}` is on {x.device} but `q` is on {device}")


def resolve_scale(scale, K: int) -> float:
    if scale is None:
        return K ** -0.5
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"`scale` must be a number, got a tensor of shape {tuple(scale.shape)}")
        scale = scale.item()
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"`scale` must be a float, got {type(scale).__name__}")
    scale = float(scale)
    if not (scale == scale) or scale in (float("inf"), float("-inf")):
        raise ValueError(f"`scale` must be finite, got {scale}")
    return scale


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}")
    return value
