"""The delta rule, and the chunkwise PyTorch core shared with the gated delta rule.

Recurrence (per sequence and value head, state S [K, V]; see ``recurrence_reference``):

    S_t = exp(g_t) * diag(exp(gk_t)) S_{t-1} diag(exp(gv_t))        (gated variants only)
    S_t = S_t + k_t (beta_t * (v_t - S_t^T k_t))^T
    o_t = S_t^T (scale * q_t)

PyTorch path: the chunkwise WY representation. Inside a chunk of C steps the updates
u_s = beta_s (v_s - k_s^T S~_s) depend on each other through a unit lower-triangular
system; solving it gives u = u0 - w S0, with u0 and w independent of the state S0 at the
chunk start, so all chunks are prepared at once (batched matmuls and triangular solves)
and only a short loop over chunks carries the state.

Decays stay exact and safe: every exp() is of a non-positive sum of log gates (for log
gates <= 0): in-chunk pair decays are segment sums of the gates between the two steps
(masked before the cumulative sum, never differences of large cumulative sums), state
decays are prefix sums from the chunk start and segment sums to the chunk end. Log gates
are clamped at ``LOG_GATE_MIN`` = -1e4 so that -inf gates give zero decay without
-inf - (-inf) = NaN anywhere in the forward or backward pass (exp(-1e4) is 0 in fp32 and
fp64 alike, so the result is unchanged).
"""
from __future__ import annotations

import torch

from .. import backend
from ..utils import checks
from .utils import (LOG_GATE_MIN, check_chunk_size, check_head_first, compute_dtype, l2norm, pad_to_chunks,
                    per_sequence)

__all__ = ["chunk_delta_rule", "fused_recurrent_delta_rule"]

# Chunk length of the general path (per-key/per-value gates or per-channel beta), which
# builds [C, C, K] / [C, C, V] tensors per chunk: kept small so memory stays ~O(T * 16 * K).
GENERAL_CHUNK = 16
CHUNK_SIZES = (16, 32, 64)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _to(x, dtype):
    return None if x is None else x.to(dtype)


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """x [..., C] -> [..., C, C] with out[t, s] = sum_{s < r <= t} x_r for t >= s, -inf above.

    Summing only the gates between s and t (masked before the cumulative sum) keeps the
    pair decay exact and non-positive for non-positive gates.
    """
    C = x.shape[-1]
    strict = torch.ones(C, C, dtype=torch.bool, device=x.device).tril(-1)
    X = x.unsqueeze(-1).expand(*x.shape, C).masked_fill(~strict, 0.0)  # X[r, s] = x_r, r > s
    out = X.cumsum(-2)
    return out.masked_fill(~strict.logical_or(torch.eye(C, dtype=torch.bool, device=x.device)),
                           float("-inf"))


def _segsum_ch(x: torch.Tensor) -> torch.Tensor:
    """x [..., C, D] -> [..., C, C, D]: ``_segsum`` along C for every channel of D."""
    return _segsum(x.transpose(-1, -2)).permute(*range(x.dim() - 2), -2, -1, -3)


def _blocks(x: torch.Tensor, C: int, NT: int) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, NT, C, ...] (zero-padded along T)."""
    B, H = x.shape[0], x.shape[2]
    x = pad_to_chunks(x, C, dim=1)
    x = x.reshape(B, NT, C, H, *x.shape[3:])
    return x.movedim(3, 1)


def _unblocks(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, NT, C, V] -> [B, T, H, V]."""
    B, H, NT, C, V = x.shape
    return x.movedim(1, 3).reshape(B, NT * C, H, V)[:, :T].contiguous()


def _unit_lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """(I + L)^{-1} for strictly lower-triangular L [..., C, C], C a power of two.

    Recursive block inversion, batched per level: the inverse of [[A, 0], [B, D]] is
    [[A^-1, 0], [-D^-1 B A^-1, D^-1]], starting from 1x1 blocks (ones). Only matmuls:
    torch.linalg.solve_triangular is orders of magnitude slower on multi-threaded CPUs
    for many small batched systems.
    """
    C = L.shape[-1]
    if C & (C - 1):
        raise ValueError(f"chunk length must be a power of two, got {C}")
    lead = L.shape[:-2]
    X = L.new_ones(*lead, C, 1, 1)
    b = 1
    while b < C:
        nb = C // (2 * b)
        X = X.reshape(*lead, nb, 2, b, b)
        X1, X2 = X[..., 0, :, :], X[..., 1, :, :]
        # the nb diagonal blocks of size 2b of L, and their lower-left b x b corners
        D = torch.diagonal(L.reshape(*lead, nb, 2 * b, nb, 2 * b), dim1=-4, dim2=-2).movedim(-1, -3)
        low = -(X2 @ (D[..., b:, :b] @ X1))
        X = torch.cat([torch.cat([X1, torch.zeros_like(X1)], -1), torch.cat([low, X2], -1)], -2)
        b *= 2
    return X.reshape(*lead, C, C)


def _solve_unit_lower(L: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve (I + L) X = rhs for strictly lower-triangular L."""
    return _unit_lower_inverse(L) @ rhs


# --------------------------------------------------------------------------------------
# chunkwise cores (dense batch, all heads already expanded to the value heads)
# --------------------------------------------------------------------------------------

def _chunk_scalar(q, k, v, beta, g, *, scale, initial_state, chunk_size):
    """Scalar beta [B,T,H] and optional scalar log gate g [B,T,H]; q,k [B,T,H,K], v [B,T,H,V].

    Returns o [B,T,H,V] and the final state [B,H,K,V] (compute dtype).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    NT = -(-T // C)
    S = initial_state if initial_state is not None else q.new_zeros(B, H, K, V)
    if NT == 0:
        return v.new_zeros(B, 0, H, V), S + 0
    qb, kb, vb, bb = (_blocks(x, C, NT) for x in (q, k, v, beta))
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(0)
    kk = kb @ kb.transpose(-1, -2)          # [B,H,NT,C,C]
    qk = qb @ kb.transpose(-1, -2)
    if g is not None:
        gb = _blocks(g.clamp(min=LOG_GATE_MIN), C, NT)    # [B,H,NT,C]
        a = gb.cumsum(-1)                                  # decay from the chunk start
        seg = _segsum(gb)                                  # pair decays, -inf above diagonal
        E = seg.exp()
        kk = kk * E
        qk = qk * E
        start = a.exp()                                    # [B,H,NT,C]
        end = seg[..., -1, :].exp()                        # decay from step s to the chunk end
        whole = a[..., -1].exp()                           # decay over the whole chunk [B,H,NT]
    L = (kk * bb.unsqueeze(-1)).masked_fill(~strict, 0.0)
    bk = bb if g is None else bb * start
    uw = _solve_unit_lower(L, torch.cat([vb * bb.unsqueeze(-1), kb * bk.unsqueeze(-1)], dim=-1))
    u, w = uw.split([V, K], dim=-1)
    Aqk = qk.masked_fill(~incl, 0.0) * scale
    qd = qb * (scale if g is None else (start * scale).unsqueeze(-1))
    kd = kb if g is None else kb * end.unsqueeze(-1)
    # unbind once: indexing chunk n inside the loop would make every backward step
    # materialise a full-size zero gradient (quadratic in the number of chunks)
    us, ws, qds, Aqks = u.unbind(2), w.unbind(2), qd.unbind(2), Aqk.unbind(2)
    kdts = kd.transpose(-1, -2).unbind(2)
    wholes = None if g is None else whole[..., None, None].unbind(2)
    outs = []
    for n in range(NT):
        v_new = us[n] - ws[n] @ S
        outs.append(qds[n] @ S + Aqks[n] @ v_new)
        if g is not None:
            S = S * wholes[n]
        S = S + kdts[n] @ v_new
    o = torch.stack(outs, dim=2)
    return _unblocks(o, T), S


def _chunk_general(q, k, v, beta, g, gk, gv, *, scale, initial_state, chunk_size):
    """Any mix of scalar gate g [B,T,H], key gate gk [B,T,H,K], value gate gv [B,T,H,V] and
    beta [B,T,H] or per value channel [B,T,H,V].

    A per-channel beta or value gate makes the in-chunk triangular system differ for every
    value channel, so this path solves V systems per chunk; everything is built chunk by
    chunk (memory O(T * C * max(K, V))) with the small ``chunk_size``.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    NT = -(-T // C)
    S = initial_state if initial_state is not None else q.new_zeros(B, H, K, V)
    if NT == 0:
        return v.new_zeros(B, 0, H, V), S + 0
    qb, kb, vb = (_blocks(x, C, NT) for x in (q, k, v))
    bb = _blocks(beta if beta.dim() == 4 else beta.unsqueeze(-1), C, NT)    # [B,H,NT,C,1|V]
    # value-side log decay per step: scalar gate + value gate, [B,T,H,1|V]
    xv = None
    if g is not None:
        xv = g.clamp(min=LOG_GATE_MIN).unsqueeze(-1)
    if gv is not None:
        gvc = gv.clamp(min=LOG_GATE_MIN)
        xv = gvc if xv is None else xv + gvc
    xb = None if xv is None else _blocks(xv, C, NT)
    gkb = None if gk is None else _blocks(gk.clamp(min=LOG_GATE_MIN), C, NT)
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(0)
    split = lambda x: None if x is None else x.unbind(2)  # noqa: E731  (see _chunk_scalar)
    qs_, ks_, vs_, bs_, gks_, xs_ = map(split, (qb, kb, vb, bb, gkb, xb))
    outs = []
    for n in range(NT):
        qn, kn, vn, bn = qs_[n], ks_[n], vs_[n], bs_[n]
        # key side: P[t,s] = sum_k k_t k_s exp(gk_{s+1..t}), Qd likewise with q_t
        if gkb is None:
            P = kn @ kn.transpose(-1, -2)
            Qd = qn @ kn.transpose(-1, -2)
            k_start, q_start, k_end = kn, qn, kn
            key_whole = None
        else:
            gkn = gks_[n]                                   # [B,H,C,K]
            ak = gkn.cumsum(-2)
            ek = _segsum_ch(gkn).exp()                      # [B,H,C,C,K], 0 above diagonal
            P = torch.einsum("bhtk,bhsk,bhtsk->bhts", kn, kn, ek)
            Qd = torch.einsum("bhtk,bhsk,bhtsk->bhts", qn, kn, ek)
            k_start, q_start = kn * ak.exp(), qn * ak.exp()
            k_end = kn * ek[..., -1, :, :]
            key_whole = ak[..., -1, :].exp()                # [B,H,K]
        # value side: E[t,s,j] = exp(x_{s+1..t, j})
        if xb is None:
            E = None
        else:
            xn = xs_[n]                                     # [B,H,C,1|V]
            av = xn.cumsum(-2)
            segv = _segsum_ch(xn)                           # [B,H,C,C,1|V]
            E = segv.exp()
            v_start = av.exp()                              # [B,H,C,1|V]
            v_end = segv[..., -1, :, :].exp()               # [B,H,C,1|V]
            v_whole = av[..., -1, :].exp()                  # [B,H,1|V]
        Lm = P.unsqueeze(-1) if E is None else P.unsqueeze(-1) * E      # [B,H,C,C,1|V]
        Lm = (Lm * bn.unsqueeze(-2)).masked_fill(~strict.unsqueeze(-1), 0.0)
        ks = k_start @ S                                    # [B,H,C,V]
        rhs = bn * (vn - (ks if E is None else v_start * ks))
        if Lm.shape[-1] == 1:
            u = _solve_unit_lower(Lm[..., 0], rhs)
        else:
            Lj = Lm.expand(*Lm.shape[:-1], V).permute(0, 1, 4, 2, 3)     # [B,H,V,C,C]
            u = _solve_unit_lower(Lj, rhs.transpose(-1, -2).unsqueeze(-1)).squeeze(-1).transpose(-1, -2)
        Aq = Qd.masked_fill(~incl, 0.0)
        if E is None:
            intra = Aq @ u
        elif E.shape[-1] == 1:
            intra = (Aq * E[..., 0]) @ u
        else:
            intra = torch.einsum("bhts,bhtsj,bhsj->bhtj", Aq, E, u)
        qs = q_start @ S
        outs.append((qs if E is None else v_start * qs) * scale + intra * scale)
        if key_whole is not None:
            S = S * key_whole.unsqueeze(-1)
        if E is not None:
            S = S * v_whole.unsqueeze(-2)
        S = S + k_end.transpose(-1, -2) @ (u if E is None else u * v_end)
    o = torch.stack(outs, dim=2)
    return _unblocks(o, T), S


def delta_chunk_forward(q, k, v, beta, g=None, gk=None, gv=None, *, scale, initial_state=None,
                        output_final_state=False, cu_seqlens=None, chunk_size=64):
    """PyTorch path of every delta-rule op, on validated, preprocessed inputs.

    q, k [B,T,H,K]; v [B,T,HV,V]; beta [B,T,HV] or [B,T,HV,V]; g [B,T,HV]; gk [B,T,HV,K];
    gv [B,T,HV,V]; initial_state [N,HV,K,V]. Computes in fp32 (fp64 for fp64 q); returns
    o in v's dtype and the final state (fp32/fp64) or None.
    """
    dtype = compute_dtype(q)
    out_dtype = v.dtype      # v is never preprocessed: it has the caller's dtype
    H, HV = q.shape[2], v.shape[2]
    q, k, v, beta, g, gk, gv, h0 = (_to(x, dtype) for x in (q, k, v, beta, g, gk, gv, initial_state))
    if HV != H:
        q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)
    if gk is None and gv is None and beta.dim() == 3:
        o, ht = per_sequence(_chunk_scalar, cu_seqlens, (q, k, v, beta, g), h0,
                             scale=scale, chunk_size=chunk_size)
    else:
        o, ht = per_sequence(_chunk_general, cu_seqlens, (q, k, v, beta, g, gk, gv), h0,
                             scale=scale, chunk_size=min(chunk_size, GENERAL_CHUNK))
    return o.to(out_dtype), (ht if output_final_state else None)


# --------------------------------------------------------------------------------------
# shared argument handling
# --------------------------------------------------------------------------------------

def pop_chunk_size(kwargs: dict) -> int:
    check_head_first(kwargs)
    chunk_size = check_chunk_size(kwargs.pop("chunk_size", None), 64)
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"`chunk_size` must be 16, 32 or 64, got {chunk_size!r}")
    return chunk_size


def check_beta(beta, B, T, HV, V, device, *, per_channel: bool) -> None:
    checks.check_tensor("beta", beta)
    if beta.dim() == 4 and per_channel:
        checks.check_optional("beta", beta, (B, T, HV, V), device)
    else:
        what = "[B, T, HV] or [B, T, HV, V]" if per_channel else "[B, T, HV]"
        if beta.dim() != 3:
            raise ValueError(f"`beta` must have shape {what}, got {tuple(beta.shape)}")
        checks.check_optional("beta", beta, (B, T, HV), device)


def qk_l2norm(q, k):
    """FLA's in-kernel l2norm of q and k (eps 1e-6), computed in fp32 (fp64 stays fp64)."""
    dtype = compute_dtype(q)
    return l2norm(q.to(dtype), eps=1e-6), l2norm(k.to(dtype), eps=1e-6)


# --------------------------------------------------------------------------------------
# public ops
# --------------------------------------------------------------------------------------

def _validate(q, k, v, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
              cu_seqlens, *, per_channel_beta):
    B, T, H, K, HV, V = checks.check_qkv(q, k, v)
    check_beta(beta, B, T, HV, V, q.device, per_channel=per_channel_beta)
    scale = checks.resolve_scale(scale, K)
    checks.check_flag("output_final_state", output_final_state)
    checks.check_flag("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel)
    N = checks.check_cu_seqlens(cu_seqlens, B, T, q.device)
    checks.check_state("initial_state", initial_state, (N, HV, K, V), q.dtype, q.device)
    return scale, K, V


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    **kwargs,
):
    """Delta rule, chunkwise. q, k [B,T,H,K]; v [B,T,H,V]; beta [B,T,H]; initial_state
    [N,H,K,V]. Returns (o [B,T,H,V], final_state [N,H,K,V] fp32 or None).

    ``chunk_size`` (16, 32, 64) may be given as a keyword, as in FLA; other unknown
    keywords are ignored (FLA does the same).
    """
    chunk_size = pop_chunk_size(kwargs)
    scale, K, V = _validate(q, k, v, beta, scale, initial_state, output_final_state,
                            use_qk_l2norm_in_kernel, cu_seqlens, per_channel_beta=False)
    if use_qk_l2norm_in_kernel:
        q, k = qk_l2norm(q, k)
    return delta_chunk_forward(q, k, v, beta, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                               chunk_size=chunk_size)


def fused_recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor = None,
    scale: float = None,
    initial_state: torch.Tensor = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Delta rule, step by step (CUDA kernel) or chunkwise (PyTorch path).

    beta: [B,T,H] (scalar per head) or [B,T,H,V] (per value channel); None means ones.
    Returns (o [B,T,H,V], final_state [N,H,K,V] fp32 or None).
    """
    if beta is None:
        checks.check_tensor("q", q, ndim=4)
        beta = q.new_ones(q.shape[:3])
    scale, K, V = _validate(q, k, v, beta, scale, initial_state, output_final_state,
                            use_qk_l2norm_in_kernel, cu_seqlens, per_channel_beta=True)
    if backend.use_cuda("fused_recurrent_delta_rule", q, K, V):
        from .recurrent_cuda import fused_recurrent_cuda  # normalises q, k in-kernel in fp32, as FLA
        return fused_recurrent_cuda(q, k, v, beta=beta, delta=True, scale=scale,
                                    initial_state=initial_state, output_final_state=output_final_state,
                                    cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm_in_kernel)
    if use_qk_l2norm_in_kernel:
        q, k = qk_l2norm(q, k)
    return delta_chunk_forward(q, k, v, beta, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens)
