"""fp64 oracles for the scalar-gate family: simple GLA, linear attention, retention.

Thin wrappers over :func:`recurrence_reference` (the step-by-step recurrence), plus the
explicit attention matrix that ``parallel_*`` ops return. Everything is computed in
float64 and returned in float64; the structure of the return values follows FLA 0.6.
"""
from __future__ import annotations

import torch

from .recurrence import recurrence_reference


def retention_log_decay(H: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """RetNet's per-head log decay: log(1 - 2^(-5 - h)) for h = 0..H-1."""
    h = torch.arange(H, dtype=dtype, device=device)
    return torch.log1p(-torch.pow(2.0, -5.0 - h))


def _expand_gamma(g, g_gamma, B, T):
    if g is not None and g_gamma is not None:
        raise ValueError("give only one of `g` and `g_gamma`")
    if g_gamma is not None:
        return g_gamma.to(torch.float64)[None, None, :].expand(B, T, g_gamma.shape[0])
    return g


def simple_gla_reference(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                         output_final_state=False, reverse=False, cu_seqlens=None):
    """S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T (scale q_t); g [B,T,H] or g_gamma [H]."""
    B, T = q.shape[:2]
    g = _expand_gamma(g, g_gamma, B, T)
    return recurrence_reference(q, k, v, g=g, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, reverse=reverse,
                                cu_seqlens=cu_seqlens)


def retention_reference(q, k, v, scale=None, initial_state=None, output_final_state=False,
                        reverse=False, cu_seqlens=None):
    g_gamma = retention_log_decay(q.shape[2], device=q.device)
    return simple_gla_reference(q, k, v, g_gamma=g_gamma, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, reverse=reverse,
                                cu_seqlens=cu_seqlens)


def linear_attn_reference(q, k, v, scale=None, initial_state=None, output_final_state=False,
                          normalize=False, reverse=False, cu_seqlens=None):
    """Linear attention, optionally normalized by the running key sum z_t.

    The normalizer is computed as a second linear-attention state: appending a column of
    ones to v makes the extra state column sum the keys, so o'[..., V] = scale q_t . z_t.
    Returns like FLA 0.6: ``(o, ht)`` without normalize, ``(o, (ht, z))`` with it, where
    z [N, 1, H, K] is the key sum at the end of each scan (ht None unless asked for).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not normalize:
        return recurrence_reference(q, k, v, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, reverse=reverse,
                                    cu_seqlens=cu_seqlens)
    kv0, z0 = initial_state if isinstance(initial_state, tuple) else (initial_state, None)
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    v_aug = torch.cat([v.to(torch.float64), v.new_ones(B, T, H, 1, dtype=torch.float64)], -1)
    h0 = torch.zeros(N, H, K, V + 1, dtype=torch.float64, device=q.device)
    if kv0 is not None:
        h0 = torch.cat([kv0.to(torch.float64), h0[..., V:]], -1)
    if z0 is not None:
        h0 = torch.cat([h0[..., :V], z0.to(torch.float64)[:, 0, :, :, None]], -1)
    o_aug, ht = recurrence_reference(q, k, v_aug, scale=scale, initial_state=h0,
                                     output_final_state=True, reverse=reverse, cu_seqlens=cu_seqlens)
    o = o_aug[..., :V] / (o_aug[..., V:] + 1e-10)
    z = ht[..., V][:, None]                      # [N, 1, H, K]
    return o, ((ht[..., :V] if output_final_state else None), z)


def simple_gla_attention_reference(q, k, v, g=None, scale=None):
    """The [B, H, T, T] matrix of parallel_simple_gla and its output (dense sequences).

    A[i, j] = scale q_i . k_j prod_{j < s <= i} exp(g_s) for j <= i, else 0.
    """
    B, T, H, K = q.shape
    if scale is None:
        scale = K ** -0.5
    q, k, v = (x.to(torch.float64) for x in (q, k, v))
    A = torch.einsum("bihk,bjhk->bhij", q * scale, k)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if g is not None:
        gc = g.to(torch.float64).cumsum(1).transpose(1, 2)           # [B, H, T]
        diff = gc[..., :, None] - gc[..., None, :]
        A = A * torch.where(mask, diff, torch.full_like(diff, float("-inf"))).exp()
    else:
        A = A * mask
    o = torch.einsum("bhij,bjhv->bihv", A, v)
    return o, A
