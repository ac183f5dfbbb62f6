"""Linear attention: simple GLA without a gate, optionally normalized by the running key sum.

    S_t = S_{t-1} + k_t v_t^T,   o_t = S_t^T (scale q_t)
    normalize:  z_t = z_0 + sum_{s<=t} k_s,   o_t <- o_t / (scale q_t . z_t + 1e-10)

Public API mirrors ``fla.ops.linear_attn`` (FLA 0.6): with ``normalize`` the initial state
may be a ``(kv_state, z_state)`` tuple (z_state [N, 1, H, K]) and the second return value
is always the tuple ``(final_kv_state or None, z_state)``; without it, as simple GLA.
"""
from __future__ import annotations

import torch

from ..utils.checks import FLOAT_DTYPES, check_flag, check_optional
from .simple_gla import run_simple_gla, validate
from .utils import compute_dtype, seq_bounds

__all__ = ["chunk_linear_attn", "fused_chunk_linear_attn", "fused_recurrent_linear_attn"]


def _split_state(initial_state, normalize: bool):
    if isinstance(initial_state, (tuple, list)):
        if not normalize:
            raise TypeError("`initial_state` must be a tensor (not a tuple) when normalize=False")
        if len(initial_state) != 2:
            raise ValueError(f"`initial_state` must be a (kv_state, z_state) pair, got {len(initial_state)} items")
        return initial_state[0], initial_state[1]
    return initial_state, None


def normalize_with_z_state(o, q, k, scale: float, z_init, reverse: bool, cu_seqlens):
    """Divide o by scale * q_t . z_t, z_t the running key sum (from the end if ``reverse``)
    plus ``z_init`` [N, 1, H, K]. Returns (o in q's dtype, z_state [N, 1, H, K] fp32/fp64)."""
    cd = compute_dtype(q)
    B, T, H, K = k.shape
    kf = k.to(cd)
    if cu_seqlens is None and T > 0:   # one batched scan (the loop below is for packed sequences)
        # scan along the innermost dim ([B, H, K, T]): torch's outer-dim scan is far slower
        kt = kf.permute(0, 2, 3, 1)
        k_cum = kt.flip(-1).cumsum(-1).flip(-1) if reverse else kt.cumsum(-1)
        if z_init is not None:
            k_cum = k_cum + z_init.to(cd).view(B, H, K, 1)
        z = (k_cum[..., :1] if reverse else k_cum[..., -1:]).permute(0, 3, 1, 2).contiguous()
        denom = (q.to(cd).permute(0, 2, 3, 1) * k_cum).sum(2) * scale + 1e-10       # [B, H, T]
        return (o.to(cd) / denom.transpose(1, 2)[..., None]).to(q.dtype), z
    bounds = seq_bounds(cu_seqlens, B, T)
    pieces, z_out = [], []
    for n, (bos, eos) in enumerate(bounds):
        b = n if cu_seqlens is None else 0
        kn = kf[b:b + 1, bos:eos]
        kc = kn.flip(1).cumsum(1).flip(1) if reverse else kn.cumsum(1)
        if z_init is not None:
            kc = kc + z_init[n:n + 1].to(cd)
        pieces.append(kc)
        if eos > bos:
            z_out.append(kc[:, :1] if reverse else kc[:, -1:])
        else:   # empty sequence: keeps its initial key sum
            z_out.append(z_init[n:n + 1].to(cd) if z_init is not None
                         else torch.zeros(1, 1, H, K, dtype=cd, device=k.device))
    k_cum = torch.cat(pieces, dim=0 if cu_seqlens is None else 1)
    denom = (q.to(cd) * scale * k_cum).sum(-1, keepdim=True) + 1e-10
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
    o, ht = run_simple_gla(op, q, k, v, None, None, scale, kv_init, output_final_state, reverse=reverse,
                           cu_seqlens=cu_seqlens, recurrent=recurrent,
                           o_dtype=compute_dtype(q) if normalize else None)
    if not normalize:
        return o, ht
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
