"""Retention (RetNet): simple GLA with a fixed per-head decay gamma_h = 1 - 2^(-5 - h).

Public API mirrors ``fla.ops.retention`` (FLA 0.6).
"""
from __future__ import annotations

import torch

from ..utils.checks import check_tensor
from .simple_gla import CHUNK_SIZE, parallel_simple_gla_impl, run_simple_gla
from .utils import check_chunk_size, check_head_first, compute_dtype, pop_state_layout

__all__ = ["chunk_retention", "fused_chunk_retention", "fused_recurrent_retention", "parallel_retention",
           "retention_g_gamma"]


def retention_g_gamma(q: torch.Tensor) -> torch.Tensor:
    """Log decay per head, log(1 - 2^(-5 - h)), [H]: fp32 as in FLA (fp64 for fp64 inputs)."""
    check_tensor("q", q, ndim=4)
    h = torch.arange(q.shape[2], dtype=compute_dtype(q), device=q.device)
    return torch.log1p(-torch.pow(2.0, -5.0 - h))


def chunk_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise retention; returns ``(o, final_state or None)``. Accepts FLA's ``chunk_size``."""
    check_head_first(kwargs)
    chunk_size = check_chunk_size(kwargs.pop("chunk_size", None), CHUNK_SIZE)
    return run_simple_gla("chunk_retention", q, k, v, None, retention_g_gamma(q), scale, initial_state,
                          output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size)


def fused_chunk_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same math as :func:`chunk_retention`."""
    return run_simple_gla("fused_chunk_retention", q, k, v, None, retention_g_gamma(q), scale,
                          initial_state, output_final_state, cu_seqlens=cu_seqlens)


def fused_recurrent_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent retention (CUDA kernel when available); ``reverse`` scans from the end."""
    state_v_first = pop_state_layout(kwargs, state_v_first)
    return run_simple_gla("fused_recurrent_retention", q, k, v, None, retention_g_gamma(q), scale,
                          initial_state, output_final_state, reverse=reverse, state_v_first=state_v_first,
                          cu_seqlens=cu_seqlens, recurrent=True)


def parallel_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    output_attentions: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel retention; returns ``(o, attn [B,H,T,T] or None)`` like FLA."""
    return parallel_simple_gla_impl("parallel_retention", q, k, v, None, retention_g_gamma(q), scale,
                                    output_attentions, cu_seqlens)
