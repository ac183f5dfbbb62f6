"""Linear attention: simple GLA without a gate, optionally normalized by the running key sum.

    S_t = S_{t-1} + k_t v_t^T,   o_t = S_t^T (scale q_t)
    normalize:  z_t = z_0 + sum_{s<=t} k_s,   o_t <- o_t / (scale q_t . z_t + 1e-10)

Public API mirrors ``fla.ops.linear_attn`` (FLA 0.6): with ``normalize`` the initial state
may be a ``(kv_state, z_state)`` tuple (z_state [N, 1, H, K]) and the second return value
is always the tuple ``(final_kv_state or None, z_state)``; without it, as simple GLA.
"""
from __future__ import annotations

import torch

from .. import backend
from ..utils.checks import FLOAT_DTYPES, check_flag, check_optional
from . import normalize_cuda
from .simple_gla import run_simple_gla, validate
from .utils import compute_dtype, pad_to_chunks, seq_bounds

__all__ = ["chunk_linear_attn", "fused_chunk_linear_attn", "fused_recurrent_linear_attn"]


def _split_state(initial_state, normalize: bool):
    if isinstance(initial_state, (tuple, list)):
        if not normalize:
            raise TypeError("`initial_state` must be a tensor (not a tuple) when normalize=False")
        if len(initial_state) != 2:
            raise ValueError(f"`initial_state` must be a (kv_state, z_state) pair, got {len(initial_state)} items")
        return initial_state[0], initial_state[1]
    return initial_state, None


def _key_prefix_sums(kf: torch.Tensor, reverse: bool, C: int = 64) -> torch.Tensor:
    """Inclusive running sum of kf [B, T, H, K] along T (from the end if ``reverse``) as a
    two-level scan: within chunks of C, then across chunk totals. torch's scan along a long
    outer dim runs one thread per column (B*H*K threads for T sequential steps); both levels
    here are short."""
    if reverse:
        return _key_prefix_sums(kf.flip(1), False, C).flip(1)
    B, T, H, K = kf.shape
    NC = (T + C - 1) // C
    intra = pad_to_chunks(kf, C).view(B, NC, C, H, K).cumsum(2)
    totals = intra[:, :, -1]
    before = totals.cumsum(1) - totals                       # exclusive prefix over chunks
    return (intra + before[:, :, None]).view(B, NC * C, H, K)[:, :T]


def normalize_with_z_state(o, q, k, scale: float, z_init, reverse: bool, cu_seqlens):
    """Divide o by scale * q_t . z_t, z_t the running key sum (from the end if ``reverse``)
    plus ``z_init`` [N, 1, H, K]. Returns (o in q's dtype, z_state [N, 1, H, K] fp32/fp64)."""
    cd = compute_dtype(q)
    B, T, H, K = k.shape
    kf = k.to(cd)
    # dense batches: one scan over all rows; packed sequences: one per sequence
    rows = [(slice(None), 0, T)] if cu_seqlens is None else \
        [(slice(n, n + 1), bos, eos) for n, (bos, eos) in enumerate(seq_bounds(cu_seqlens, B, T))]
    pieces, z_out = [], []
    for seqs, bos, eos in rows:
        z0 = None if z_init is None else z_init[seqs].to(cd)
        kc = _key_prefix_sums(kf[:, bos:eos], reverse)
        if z0 is not None:
            kc = kc + z0
        pieces.append(kc)
        if eos > bos:
            z_out.append((kc[:, :1] if reverse else kc[:, -1:]).clone())
        else:   # empty sequence: keeps its initial key sum
            z_out.append(z0 if z0 is not None else kf.new_zeros(kc.shape[0], 1, H, K))
    k_cum = torch.cat(pieces, dim=1)
    denom = (q.to(cd) * k_cum).sum(-1, keepdim=True) * scale + 1e-10
    return (o.to(cd) / denom).to(q.dtype), torch.cat(z_out, dim=0)


def _linear_attn(op, q, k, v, scale, initial_state, output_final_state, normalize, reverse, cu_seqlens,
                 recurrent):
    check_flag("normalize", normalize)
    kv_init, z_init = _split_state(initial_state, normalize)
    _, scale, N = validate(q, k, v, None, None, scale, kv_init, output_final_state, cu_seqlens,
                           reverse=reverse)
    if normalize:
        H, K = q.shape[2], q.shape[3]
        check_optional("initial_state[1] (z_state)", z_init, (N, 1, H, K), q.device, FLOAT_DTYPES)
    # the fused normaliser reads o in q's dtype (as FLA's does); the composition wants fp32
    fused_norm = normalize and normalize_cuda.supports(q, v, reverse)
    if fused_norm and not recurrent and backend.use_cuda(op, q, q.shape[-1], v.shape[-1]):
        # the chunk pass stores o already divided by the normaliser: one op, forward and backward
        o, ht, z = normalize_cuda.linear_attn_normalized_cuda(q, k, v, scale, kv_init, z_init,
                                                              output_final_state, cu_seqlens)
        return o, (ht, z)
    o, ht = run_simple_gla(op, q, k, v, None, None, scale, kv_init, output_final_state, reverse=reverse,
                           cu_seqlens=cu_seqlens, recurrent=recurrent,
                           o_dtype=compute_dtype(q) if normalize and not fused_norm else None)
    if not normalize:
        return o, ht
    if fused_norm:
        o, z = normalize_cuda.normalize_cuda(o, q, k, scale, z_init, cu_seqlens)
    else:
        o, z = normalize_with_z_state(o, q, k, scale, z_init, reverse, cu_seqlens)
    return o, (ht, z)


def chunk_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | tuple | None = None,
    output_final_state: bool = False,
    normalize: bool = True,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise linear attention. Returns ``(o, ht)``, or ``(o, (ht, z_state))`` with normalize."""
    return _linear_attn("chunk_linear_attn", q, k, v, scale, initial_state, output_final_state,
                        normalize, False, cu_seqlens, recurrent=False)


def fused_chunk_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | tuple | None = None,
    output_final_state: bool = False,
    normalize: bool = True,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same math as :func:`chunk_linear_attn`."""
    return _linear_attn("fused_chunk_linear_attn", q, k, v, scale, initial_state, output_final_state,
                        normalize, False, cu_seqlens, recurrent=False)


def fused_recurrent_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | tuple | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    normalize: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent linear attention (CUDA kernel when available); ``reverse`` scans from the end."""
    return _linear_attn("fused_recurrent_linear_attn", q, k, v, scale, initial_state, output_final_state,
                        normalize, reverse, cu_seqlens, recurrent=True)
