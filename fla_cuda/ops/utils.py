"""Helpers shared by the PyTorch paths of every family."""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch

# Log gates are clamped from below at this value (every PyTorch path and the chunk kernels,
# csrc/chunk kMinLogGate): a gate of -inf (or hugely negative) would otherwise turn
# cumulative-gate differences into (-inf) - (-inf) = NaN. exp(-1e4) is exactly 0 in every
# float format, as exp(-inf) is, so the clamp changes no finite result; clamped gates get a
# zero gradient, which matches the reference's exp(-1e4) * (...) == 0.
LOG_GATE_MIN = -1e4


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) along the last dim, in fp32 (FLA's in-kernel l2norm)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)).to(x.dtype)


def seq_bounds(cu_seqlens: torch.Tensor | None, B: int, T: int) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, T)] * B
    vals = cu_seqlens.tolist()
    return list(zip(vals[:-1], vals[1:]))


def per_sequence(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    cu_seqlens: torch.Tensor | None,
    seq_tensors: Sequence[torch.Tensor | None],
    initial_state: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a dense (batched) PyTorch path over packed variable-length sequences.

    ``seq_tensors`` are [1, T, ...] tensors split along T at ``cu_seqlens``;
    ``fn(*pieces, initial_state=h0_i, **kwargs)`` must return ``(o_i, ht_i)`` with
    o_i [1, T_i, ...] and ht_i [1, ...]. Outputs are concatenated along T and final
    states stacked along N. Without ``cu_seqlens`` this is a single call.
    Empty sequences keep their initial state (zeros if none).
    """
    if cu_seqlens is None:
        return fn(*seq_tensors, initial_state=initial_state, **kwargs)
    outs, states = [], []
    for i, (bos, eos) in enumerate(seq_bounds(cu_seqlens, 1, 0)):
        pieces = [None if t is None else t[:, bos:eos] for t in seq_tensors]
        h0 = None if initial_state is None else initial_state[i:i + 1]
        o, ht = fn(*pieces, initial_state=h0, **kwargs)
        outs.append(o)
        states.append(ht)
    o = torch.cat(outs, dim=1)
    ht = None if states[0] is None else torch.cat(states, dim=0)
    return o, ht


def pad_to_chunks(x: torch.Tensor, chunk: int, dim: int = 1, value: float = 0.0) -> torch.Tensor:
    """Pad ``dim`` up to a multiple of ``chunk`` (zero keys/values and zero log-gates are neutral)."""
    n = x.shape[dim]
    pad = (-n) % chunk
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def flip_time(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Reverse the time axis (dim 1) of [B, T, ...] tensors, for ``reverse=True`` scans."""
    return [None if t is None else t.flip(1) for t in tensors]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """PyTorch paths compute in fp32; fp64 inputs (gradcheck, oracles) stay fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class HeadFirstRemovedError(ValueError, DeprecationWarning):
    """FLA 0.6 raises DeprecationWarning for ``head_first``; also a ValueError naming it."""


def check_head_first(kwargs: dict) -> None:
    if "head_first" in kwargs:
        raise HeadFirstRemovedError("`head_first` has been removed (as in FLA 0.6): inputs must be [B, T, H, ...]")


def check_chunk_size(chunk_size, default: int | None = None) -> int | None:
    """FLA's ``chunk_size`` kwarg: a power of two (``default`` when not given)."""
    if chunk_size is None:
        return default
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise TypeError(f"`chunk_size` must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"`chunk_size` must be a power of 2, got {chunk_size}")
    return chunk_size


def pop_state_layout(kwargs: dict, state_v_first) -> bool:
    """``state_v_first``, honouring FLA's deprecated alias ``transpose_state_layout``."""
    from ..utils import checks
    if "transpose_state_layout" in kwargs:
        if state_v_first:
            raise ValueError("Cannot pass both `state_v_first` and the deprecated `transpose_state_layout`.")
        warnings.warn("`transpose_state_layout` is deprecated and renamed to `state_v_first`.",
                      DeprecationWarning, stacklevel=3)
        state_v_first = kwargs.pop("transpose_state_layout")
    return checks.check_flag("state_v_first", state_v_first)


def swap_state_layout(state: torch.Tensor | None, state_v_first: bool) -> torch.Tensor | None:
    """[..., V, K] <-> [..., K, V] at the API boundary when ``state_v_first`` (FLA 0.6)."""
    return state.transpose(-1, -2).contiguous() if (state is not None and state_v_first) else state
