"""Simple GLA: linear attention with a scalar (head-wise) forget gate.

    S_t = exp(g_t) S_{t-1} + k_t v_t^T,        o_t = S_t^T (scale q_t)

``g`` [B, T, H] is a per-step log decay, ``g_gamma`` [H] a constant log decay per head,
neither: plain linear attention. Public API mirrors ``fla.ops.simple_gla`` (FLA 0.6).

The PyTorch path is one chunkwise algorithm (:func:`simple_gla_chunk_torch`), shared by
linear attention and retention: inside a chunk the causal decay matrix comes from the
chunk's cumulative log gates (masked before exp), across chunks a [K, V] state is carried
in a loop over chunks. ``fused_recurrent_*`` runs the CUDA recurrence kernel when the
backend says so.
"""
from __future__ import annotations

import torch

from .. import backend
from ..utils.checks import (check_cu_seqlens, check_flag, check_optional, check_qkv, check_state,
                            resolve_scale)
from .utils import (LOG_GATE_MIN, check_chunk_size, check_head_first, compute_dtype, flip_time, pad_to_chunks,
                    per_sequence, pop_state_layout, swap_state_layout)

__all__ = [
    "chunk_simple_gla", "fused_chunk_simple_gla", "fused_recurrent_simple_gla", "parallel_simple_gla",
    "simple_gla_chunk_torch",
]

CHUNK_SIZE = 64



class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: ``o.sum().backward()``
    sends a stride-0 gradient, on which CPU batched matmuls fall back to a very slow loop."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _to_chunks(x: torch.Tensor, BT: int) -> torch.Tensor:
    """[B, Tp, H, ...] -> [B, H, NC, BT, ...]."""
    B, Tp, H = x.shape[:3]
    x = x.reshape(B, Tp // BT, BT, H, *x.shape[3:])
    return x.movedim(3, 1).contiguous()   # contiguous: strided batched matmuls are very slow


def _chunk_dense(q, k, v, g, initial_state, *, scale: float, chunk_size: int, cd: torch.dtype):
    """Chunkwise forward over dense [B, T, ...] sequences; returns (o in ``cd``, final state)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if initial_state is None:
        S = torch.zeros(B, H, K, V, dtype=cd, device=q.device)
    else:
        S = initial_state.to(cd)
    if T == 0:
        return torch.zeros(B, 0, H, V, dtype=cd, device=q.device), S
    BT = min(chunk_size, T)
    qc = _to_chunks(pad_to_chunks(q.to(cd) * scale, BT), BT)     # [B, H, NC, BT, K]
    kc = _to_chunks(pad_to_chunks(k.to(cd), BT), BT)
    vc = _to_chunks(pad_to_chunks(v.to(cd), BT), BT)             # [B, H, NC, BT, V]
    NC = qc.shape[2]
    causal = torch.ones(BT, BT, dtype=torch.bool, device=q.device).tril()

    A = qc @ kc.transpose(-1, -2)                                # [B, H, NC, BT, BT]
    if g is not None:
        # Zero log gates in the padding are neutral (decay 1 with zero keys and values).
        gg = _to_chunks(pad_to_chunks(g.to(cd).clamp(min=LOG_GATE_MIN), BT), BT)  # [B, H, NC, BT]
        # Cumulative gates in fp64: with gates near the clamp the sums reach ~1e4-1e6, where
        # fp32 differences of two sums would lose most of their digits.
        gc = gg.to(torch.float64).cumsum(-1)
        diff = (gc[..., :, None] - gc[..., None, :]).to(cd)
        # Mask BEFORE exp: above the diagonal diff is positive and could overflow.
        decay = torch.where(causal, diff, torch.full_like(diff, float("-inf"))).exp()
        A = A * decay
        q_decay = gc.exp().to(cd)                                # decay from chunk start to i
        k_decay = (gc[..., -1:] - gc).exp().to(cd)               # decay from j to chunk end
        chunk_decay = gc[..., -1].exp().to(cd)                   # [B, H, NC]
        q_in = qc * q_decay[..., None]
        k_in = kc * k_decay[..., None]
    else:
        A = A.masked_fill(~causal, 0.0)
        q_in, k_in, chunk_decay = qc, kc, None
    o = A @ vc                                                   # intra-chunk part
    U = k_in.transpose(-1, -2) @ vc                              # [B, H, NC, K, V] chunk updates
    # unbind (not indexing) so that backward stacks the pieces instead of scattering each
    # one into a zero tensor of the full size.
    U = U.unbind(2)
    decays = chunk_decay.unbind(2) if chunk_decay is not None else None
    states = []
    for c in range(NC):
        states.append(S)
        S = (S * decays[c][:, :, None, None] if decays is not None else S) + U[c]
    o = o + q_in @ torch.stack(states, dim=2)                    # inter-chunk part
    if o.requires_grad:
        o = _ContiguousGrad.apply(o)
    o = o.movedim(1, 3).reshape(B, NC * BT, H, V)[:, :T]
    return o, S


def simple_gla_chunk_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
    o_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise PyTorch simple GLA (differentiable by autograd), on validated inputs.

    q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] log decays or None (no decay; expand a
    g_gamma to [B, T, H] before calling); initial_state [N, H, K, V] (K-first layout).
    Computes in fp32 (fp64 for fp64 inputs). Returns o [B, T, H, V] in ``o_dtype``
    (default q.dtype) and the final state [N, H, K, V] in fp32/fp64, or None.
    ``reverse`` scans each sequence from its end. No [T, T] memory: [BT, BT] per chunk.
    """
    cd = compute_dtype(q)

    def run(q_, k_, v_, g_, initial_state=None):
        if reverse:
            q_, k_, v_, g_ = flip_time(q_, k_, v_, g_)
        o_, ht_ = _chunk_dense(q_, k_, v_, g_, initial_state, scale=scale, chunk_size=chunk_size, cd=cd)
        return (o_.flip(1) if reverse else o_), ht_

    o, ht = per_sequence(run, cu_seqlens, [q, k, v, g], initial_state)
    return o.to(o_dtype or q.dtype), (ht if output_final_state else None)


# --------------------------------------------------------------------------------------------
# Validation shared by the public ops of this family (also used by linear_attn / retention).


def validate(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
             cu_seqlens=None, *, reverse=False, state_v_first=False):
    """Check every input of a simple-GLA-family op; returns (g as [B,T,H] or None, scale, N)."""
    B, T, H, K, _, V = check_qkv(q, k, v)
    N = check_cu_seqlens(cu_seqlens, B, T, q.device)
    check_optional("g", g, (B, T, H), q.device)
    check_optional("g_gamma", g_gamma, (H,), q.device)
    if g is not None and g_gamma is not None:
        raise ValueError("pass only one of `g` (per-step gates) and `g_gamma` (constant per-head decay)")
    scale = resolve_scale(scale, K)
    check_flag("output_final_state", output_final_state)
    check_flag("reverse", reverse)
    check_flag("state_v_first", state_v_first)
    shape = (N, H, V, K) if state_v_first else (N, H, K, V)
    check_state("initial_state", initial_state, shape, q.dtype, q.device)
    if g_gamma is not None:
        g = g_gamma.to(compute_dtype(q))[None, None, :].expand(B, T, H)
    return g, scale, N


def run_simple_gla(op, q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                   output_final_state=False, reverse=False, state_v_first=False, cu_seqlens=None,
                   chunk_size=CHUNK_SIZE, recurrent=False, o_dtype=None):
    """Validate, then run the CUDA recurrence (``recurrent`` ops, when available) or the
    chunkwise PyTorch path. ``op`` is the public op name given to ``backend.use_cuda``."""
    g_step, g_const = g, g_gamma
    g, scale, _ = validate(q, k, v, g, g_gamma, scale, initial_state, output_final_state, cu_seqlens,
                           reverse=reverse, state_v_first=state_v_first)
    h0 = swap_state_layout(initial_state, state_v_first)
    if recurrent and backend.use_cuda(op, q, q.shape[-1], v.shape[-1]):
        from .recurrent_cuda import fused_recurrent_cuda
        o, ht = fused_recurrent_cuda(
            q, k, v, g=None if g is None else g.float(), scale=scale, initial_state=h0,
            output_final_state=output_final_state, reverse=reverse, cu_seqlens=cu_seqlens)
        if o_dtype is not None:
            o = o.to(o_dtype)
    elif not recurrent and not reverse and backend.use_cuda(op, q, q.shape[-1], v.shape[-1]):
        from .chunk_cuda import chunk_simple_gla_cuda
        o, ht = chunk_simple_gla_cuda(q, k, v, g=g_step, g_gamma=g_const, scale=scale, initial_state=h0,
                                      output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        if o_dtype is not None:
            o = o.to(o_dtype)
    else:
        o, ht = simple_gla_chunk_torch(q, k, v, g, scale=scale, initial_state=h0,
                                       output_final_state=output_final_state, reverse=reverse,
                                       cu_seqlens=cu_seqlens, chunk_size=chunk_size, o_dtype=o_dtype)
    return o, swap_state_layout(ht, state_v_first)


# --------------------------------------------------------------------------------------------
# Public ops (FLA 0.6 signatures).

def chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise simple GLA. q, k [B,T,H,K]; v [B,T,H,V]; g [B,T,H] or g_gamma [H] (or neither).

    Returns ``(o [B,T,H,V], final_state [N,H,K,V] or None)``; with ``state_v_first`` states are
    [N,H,V,K]. Accepts FLA's ``chunk_size`` kwarg (power of 2); other kwargs are ignored.
    """
    check_head_first(kwargs)
    chunk_size = check_chunk_size(kwargs.pop("chunk_size", None), CHUNK_SIZE)
    return run_simple_gla("chunk_simple_gla", q, k, v, g, g_gamma, scale, initial_state,
                          output_final_state, state_v_first=state_v_first, cu_seqlens=cu_seqlens,
                          chunk_size=chunk_size)


def fused_chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same math as :func:`chunk_simple_gla` (FLA's fused-chunk variant)."""
    return run_simple_gla("fused_chunk_simple_gla", q, k, v, g, g_gamma, scale, initial_state,
                          output_final_state, cu_seqlens=cu_seqlens)


def fused_recurrent_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent simple GLA (CUDA kernel when available); ``reverse`` scans from the end."""
    state_v_first = pop_state_layout(kwargs, state_v_first)
    return run_simple_gla("fused_recurrent_simple_gla", q, k, v, g, g_gamma, scale, initial_state,
                          output_final_state, reverse=reverse, state_v_first=state_v_first,
                          cu_seqlens=cu_seqlens, recurrent=True)


def parallel_attention(q, k, v, g, scale: float, cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [B, H, T, T] decayed causal attention A and o = A v (both in ``cd``)."""
    T = q.shape[1]
    A = torch.einsum("bihk,bjhk->bhij", q.to(cd) * scale, k.to(cd))
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if g is not None:
        # Clamp (see LOG_GATE_MIN) and cumulate in fp64: over long sequences the fp32 sums
        # would lose the digits of their differences.
        gc = g.to(cd).clamp(min=LOG_GATE_MIN).to(torch.float64).cumsum(1).transpose(1, 2)  # [B, H, T]
        diff = (gc[..., :, None] - gc[..., None, :]).to(cd)
        A = A * torch.where(causal, diff, torch.full_like(diff, float("-inf"))).exp()
    else:
        A = A.masked_fill(~causal, 0.0)
    return torch.einsum("bhij,bjhv->bihv", A, v.to(cd)), A


def parallel_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    output_attentions: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel (attention-form) simple GLA. Returns ``(o, attn)``; attn [B,H,T,T] in q's dtype
    (scale * q k^T times the causal decay) when ``output_attentions``, else None."""
    return parallel_simple_gla_impl("parallel_simple_gla", q, k, v, g, None, scale, output_attentions,
                                    cu_seqlens)


def parallel_simple_gla_impl(op, q, k, v, g, g_gamma, scale, output_attentions, cu_seqlens):
    """parallel_* ops: chunkwise path for o alone; the dense [B,H,T,T] form when the attention
    matrix is asked for (FLA does not support it with ``cu_seqlens``)."""
    check_flag("output_attentions", output_attentions)
    if output_attentions and cu_seqlens is not None:
        raise ValueError("`output_attentions=True` is not supported with variable-length `cu_seqlens`")
    if not output_attentions:
        o, _ = run_simple_gla(op, q, k, v, g, g_gamma, scale, None, False, cu_seqlens=cu_seqlens)
        return o, None
    g, scale, _ = validate(q, k, v, g, g_gamma, scale, None, False, cu_seqlens)
    o, A = parallel_attention(q, k, v, g, scale, compute_dtype(q))
    return o.to(q.dtype), A.to(q.dtype)
