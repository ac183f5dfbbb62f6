"""Gated linear attention (GLA): per-channel decay on the key (and optionally value) dimension.

    S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_t v_t^T,     o_t = S_t^T (scale * q_t)

Public ops (FLA 0.6 signatures): ``chunk_gla`` and ``fused_recurrent_gla``.

PyTorch path (``gla_chunk_torch``): chunkwise and exact for arbitrarily strong gates.
With G the cumulative log gate, every decay factor exp(G_i - G_j) (i >= j) is built from
sums of gates over (j, i] only (never as a difference of two large cumulative sums,
which would cancel) and never as exp() of a positive number (which could overflow):

* Intra-chunk (chunks of C <= 64 steps, C a power of two), by binary splitting: every
  pair i > j of a chunk lies in exactly one aligned block of size 2b (b = C/2, ..., 2, 1)
  with j in its first half and i in its second half. Splitting the span at the middle,
      G_i - G_j = L_i + R_j,   L_i = sum of gates in (mid, i],  R_j = sum in (j, mid],
  both <= 0, so the block's scores are ONE exact matmul (q e^L) @ (k e^R)^T with every
  factor <= 1. The diagonal i == j has decay 1. Memory is O(T K log C) per head, no
  [C, C, K] decay tensor and nothing [T, T].
* A value-side gate gv has the same structure on the V axis and uses the same split
  points: o_i += e^{Lv_i} * (A_block @ (v e^{Rv})), so gk, gv, both or neither are exact.
* Between chunks a state S [K, V] is carried by a Python loop over chunks:
      o += e^{Lv} * ((q e^{Lk}) @ S),   S = e^{Tk} S e^{Tv} + (k e^{Rk})^T (v e^{Rv})
  with L / R / T the chunk's inclusive / exclusive-reverse / total gate sums.
"""
from __future__ import annotations


import torch

from .. import backend
from ..utils.checks import (check_cu_seqlens, check_flag, check_optional, check_qkv, check_state,
                            check_tensor, resolve_scale)
from .utils import LOG_GATE_MIN, pad_to_chunks, per_sequence, pop_state_layout, swap_state_layout

__all__ = ["chunk_gla", "fused_recurrent_gla", "gla_chunk_torch"]

MAX_CHUNK = 64    # chunk size of the inter-chunk state loop (a power of two)


def _split_sums(g: torch.Tensor):
    """For segments along dim -2: (inclusive cumsum, exclusive reverse cumsum, segment total).

    All three are plain sums of the segment's gates (no subtraction), so they carry
    only rounding relative to their own size.
    """
    incl = g.cumsum(-2)
    rev = g.flip(-2).cumsum(-2).flip(-2)                     # sum over t >= j
    excl_rev = torch.cat([rev[..., 1:, :], torch.zeros_like(rev[..., :1, :])], dim=-2)   # t > j
    return incl, excl_rev, rev[..., 0, :]


def _gla_dense(q, k, v, gk, gv, *, initial_state, output_final_state, scale, reverse, state_dtype):
    """Dense (batched, equal-length) chunkwise GLA. q, k [B,T,H,K], v [B,T,H,V]; h0 [B,H,K,V]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    cdt = state_dtype
    if reverse:
        q, k, v = q.flip(1), k.flip(1), v.flip(1)
        gk = None if gk is None else gk.flip(1)
        gv = None if gv is None else gv.flip(1)

    C = MAX_CHUNK
    while C > 1 and C // 2 >= T:
        C //= 2
    Tp = T + (-T) % C
    NC = Tp // C

    def heads_first(x):  # [B, T, H, D] -> [B, H, Tp, D] in the compute dtype, zero padded
        return pad_to_chunks(x.to(cdt), C, dim=1).transpose(1, 2)

    qb, kb, vb = heads_first(q) * scale, heads_first(k), heads_first(v)
    gkb = None if gk is None else heads_first(gk).clamp(min=LOG_GATE_MIN)
    gvb = None if gv is None else heads_first(gv).clamp(min=LOG_GATE_MIN)

    # ---- intra-chunk: diagonal (decay 1), then one aligned block level per b ----------
    o = (qb * kb).sum(-1, keepdim=True) * vb
    b = C // 2
    while b >= 1:
        def halves(x):
            x = x.reshape(B, H, Tp // (2 * b), 2, b, x.shape[-1])
            return x[..., 0, :, :], x[..., 1, :, :]
        _, q2 = halves(qb)
        k1, _ = halves(kb)
        v1, _ = halves(vb)
        if gkb is not None:
            g1, g2 = halves(gkb)
            q2 = q2 * g2.cumsum(-2).exp()
            k1 = k1 * _split_sums(g1)[1].exp()
        A = q2 @ k1.transpose(-1, -2)                                    # [B, H, Tp/2b, b, b]
        if gvb is not None:
            h1, h2 = halves(gvb)
            c = (A @ (v1 * _split_sums(h1)[1].exp())) * h2.cumsum(-2).exp()
        else:
            c = A @ v1
        o = o + torch.stack([torch.zeros_like(c), c], dim=-3).reshape(B, H, Tp, V)
        b //= 2

    # ---- inter-chunk state passing ---------------------------------------------------
    qc, kc, vc = qb.reshape(B, H, NC, C, K), kb.reshape(B, H, NC, C, K), vb.reshape(B, H, NC, C, V)
    tk = tv = lv = None
    if gkb is not None:
        L, R, tk = _split_sums(gkb.reshape(B, H, NC, C, K))
        qc, kc, tk = qc * L.exp(), kc * R.exp(), tk.exp()
    if gvb is not None:
        L, R, tv = _split_sums(gvb.reshape(B, H, NC, C, V))
        lv, vc, tv = L.exp(), vc * R.exp(), tv.exp()
    U = kc.transpose(-1, -2) @ vc                                          # [B, H, NC, K, V]
    state = (torch.zeros(B, H, K, V, dtype=cdt, device=q.device) if initial_state is None
             else initial_state.to(cdt))
    # unbind once: indexing a chunk per step would make autograd scatter a full-size
    # zero gradient per step (quadratic in the number of chunks).
    Us = U.unbind(2)
    tks = None if tk is None else tk.unsqueeze(-1).unbind(2)          # [B, H, K, 1] each
    tvs = None if tv is None else tv.unsqueeze(-2).unbind(2)          # [B, H, 1, V] each
    before = []
    for c in range(NC):
        before.append(state)
        if tks is not None:
            state = state * tks[c]
        if tvs is not None:
            state = state * tvs[c]
        state = state + Us[c]
    if NC > 0:
        o_inter = qc @ torch.stack(before, dim=2)                          # [B, H, NC, C, V]
        if lv is not None:
            o_inter = o_inter * lv
        o = o + o_inter.reshape(B, H, Tp, V)

    o = o[:, :, :T].transpose(1, 2)
    if reverse:
        o = o.flip(1)
    return o, (state if output_final_state else None)


def gla_chunk_torch(q, k, v, gk=None, gv=None, *, scale: float, initial_state=None,
                    output_final_state: bool = False, reverse: bool = False, cu_seqlens=None):
    """Chunkwise PyTorch GLA on validated inputs (reusable building block).

    q, k [B, T, H, K]; v [B, T, H, V]; gk [B, T, H, K] / gv [B, T, H, V] log decays
    (either may be None); initial_state [N, H, K, V]. Returns (o [B, T, H, V] in q's
    dtype, final state [N, H, K, V] in fp32 (fp64 for fp64 inputs) or None).
    Differentiable in every tensor input.
    """
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32

    def fn(q, k, v, gk, gv, initial_state):
        return _gla_dense(q, k, v, gk, gv, initial_state=initial_state, output_final_state=True,
                          scale=scale, reverse=reverse, state_dtype=cdt)

    o, ht = per_sequence(fn, cu_seqlens, [q, k, v, gk, gv], initial_state)
    return o.to(q.dtype), (ht if output_final_state else None)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def _check_gate(name, g, shape, q):
    check_optional(name, g, shape, q.device)
    if g is not None and g.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"`{name}` has dtype {g.dtype}; expected float32 or the input dtype {q.dtype}")


def _common_checks(q, k, v, scale, initial_state, output_final_state, state_v_first, cu_seqlens):
    B, T, H, K, _, V = check_qkv(q, k, v)
    check_flag("output_final_state", output_final_state)
    check_flag("state_v_first", state_v_first)
    N = check_cu_seqlens(cu_seqlens, B, T, q.device)
    shape = (N, H, V, K) if state_v_first else (N, H, K, V)
    check_state("initial_state", initial_state, shape, q.dtype, q.device)
    scale = resolve_scale(scale, K)
    h0 = swap_state_layout(initial_state, state_v_first)
    return B, T, H, K, V, scale, h0



def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Chunkwise GLA, FLA 0.6's ``fla.ops.gla.chunk_gla``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: per-step log forget gates ``[B, T, H, K]`` (float32 or the input dtype).
        scale: score scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (``[N, H, V, K]`` with ``state_v_first``), float32.
        output_final_state: also return the final state (same layout as ``initial_state``).
        state_v_first: states in V-first ``[V, K]`` layout.
        cu_seqlens: ``[N + 1]`` packed sequence boundaries (``B == 1``).
        cu_seqlens_cpu: optional host copy of ``cu_seqlens`` (accepted for API parity).

    Returns:
        ``(o [B, T, H, V], final_state or None)``.

    Forward and backward run the CUDA chunk kernels where ``backend.use_cuda`` allows
    (fp16/bf16, head dims 64/128/256; ``gla_cuda``), else the PyTorch path.
    """
    B, T, H, K, V, scale, h0 = _common_checks(q, k, v, scale, initial_state, output_final_state,
                                              state_v_first, cu_seqlens)
    check_tensor("g", g, ndim=4)
    _check_gate("g", g, (B, T, H, K), q)
    if cu_seqlens_cpu is not None:
        check_tensor("cu_seqlens_cpu", cu_seqlens_cpu, ndim=1, dtypes=(torch.int32, torch.int64))
        if cu_seqlens is not None and cu_seqlens_cpu.tolist() != cu_seqlens.tolist():
            raise ValueError("`cu_seqlens_cpu` must be a host copy of `cu_seqlens`")
    if backend.use_cuda("chunk_gla", q, K, V):
        from .gla_cuda import chunk_gla_cuda
        o, ht = chunk_gla_cuda(q, k, v, g, scale=scale, initial_state=h0,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    else:
        o, ht = gla_chunk_torch(q, k, v, g, None, scale=scale, initial_state=h0,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return o, swap_state_layout(ht, state_v_first)


def fused_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Recurrent GLA, FLA 0.6's ``fla.ops.gla.fused_recurrent_gla``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        gk: log forget gates on the key dim ``[B, T, H, K]`` (optional).
        gv: log forget gates on the value dim ``[B, T, H, V]`` (optional).
        scale: score scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (``[N, H, V, K]`` with ``state_v_first``), float32.
        output_final_state: also return the final state.
        reverse: scan each sequence from its last step to its first.
        state_v_first: states in V-first ``[V, K]`` layout.
        cu_seqlens: ``[N + 1]`` packed sequence boundaries (``B == 1``).
        **kwargs: ``transpose_state_layout`` (deprecated alias of ``state_v_first``);
            other keys are ignored, as in FLA.

    Returns:
        ``(o [B, T, H, V], final_state or None)``.

    Runs the CUDA recurrent kernel where ``backend.use_cuda`` allows, else the exact
    chunkwise PyTorch path (``gla_chunk_torch``).
    """
    state_v_first = pop_state_layout(kwargs, state_v_first)
    B, T, H, K, V, scale, h0 = _common_checks(q, k, v, scale, initial_state, output_final_state,
                                              state_v_first, cu_seqlens)
    check_flag("reverse", reverse)
    _check_gate("gk", gk, (B, T, H, K), q)
    _check_gate("gv", gv, (B, T, H, V), q)

    if backend.use_cuda("fused_recurrent_gla", q, K, V):
        from .recurrent_cuda import fused_recurrent_cuda
        o, ht = fused_recurrent_cuda(q, k, v, gk=gk, gv=gv, scale=scale, initial_state=h0,
                                     output_final_state=output_final_state, reverse=reverse,
                                     cu_seqlens=cu_seqlens)
    else:
        o, ht = gla_chunk_torch(q, k, v, gk, gv, scale=scale, initial_state=h0,
                                output_final_state=output_final_state, reverse=reverse,
                                cu_seqlens=cu_seqlens)
    return o, swap_state_layout(ht if output_final_state else None, state_v_first)
