"""Generalized delta rule: IPLR (identity plus low rank) and DPLR (diagonal plus low rank).

Per (sequence, head), with the state S of shape [K, V]:

    IPLR:  S_t = S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    DPLR:  S_t = diag(exp(gk_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    o_t   = S_t^T (scale * q_t)

(FLA writes the same recurrence on the transposed state: S_t = S_{t-1} (D_t + a_t b_t^T) + v_t k_t^T.)
The low-rank read-out a_t^T S_{t-1} uses the state *before* the step's decay.

PyTorch path (chunkwise, chunk C = 32). Inside a chunk, with gamma_t = sum_{r<=t} gk_r (chunk-local,
inclusive) and w_t = a_t^T S_{t-1} (a row of V numbers),

    S_t = Gamma_t S_0 + sum_{s<=t} Gamma_t Gamma_s^{-1} (k_s v_s^T + b_s w_s^T)
    w_t = (a_t * exp(gamma_{t-1}))^T S_0 + sum_{s<t} A_ak[t,s] v_s + sum_{s<t} A_ab[t,s] w_s

so W = (I - A_ab)^{-1} (A_ak V + A~ S_0) = U + M S_0 with a unit lower-triangular solve, and

    o     = (Qg + A_qb M) S_0 + A_qk V + A_qb U
    S_C   = (diag(exp(gamma_C)) + Bd^T M) S_0 + Kd^T V + Bd^T U   =: P S_0 + R

Everything but the chunk-to-chunk recursion S <- P S + R is batched over all chunks. The decay
factors exp(gamma_t - gamma_s) (s <= t) and exp(gamma_{t-1} - gamma_s) (s < t) are never formed from
a positive exponent: within 8-step diagonal sub-blocks they are an explicit [8, 8, K] tensor masked
(to -inf) before the exp; across sub-blocks they factor through the end of the source sub-block
(see `_decayed_scores`).
Log gates are clamped from below (see GATE_MIN) so -inf gates give 0, not NaN.
Autograd provides the backward.
"""
from __future__ import annotations

import torch

from .. import backend
from ..utils.checks import (
    INDEX_DTYPES,
    check_cu_seqlens,
    check_flag,
    check_optional,
    check_qkv,
    check_state,
    check_tensor,
    resolve_scale,
)
from .utils import check_chunk_size, check_head_first, compute_dtype, flip_time, pad_to_chunks, per_sequence

__all__ = [
    "chunk_iplr_delta_rule",
    "fused_recurrent_iplr_delta_rule",
    "chunk_dplr_delta_rule",
    "fused_recurrent_dplr_delta_rule",
]

CHUNK = 32     # steps per chunk (the chunk-to-chunk recursion is a Python loop)
SUB = 8        # diagonal sub-block of the explicit decay tensor (must divide CHUNK)
# Log gates are clamped from below at a floor whose exp is already exactly 0 in the compute dtype
# (fp32 exp underflows below -104, fp64 below -745), so the clamp never changes a computed value:
# any decay factor spanning a clamped step is <= exp(floor) = 0 either way. It keeps -inf gates from
# making inf - inf = NaN, and a floor this close to the underflow point (rather than e.g. -1e4) keeps
# the chunk-local cumulative sums small, so later differences of them stay accurate in fp32.
GATE_MIN = {torch.float32: -110.0, torch.float64: -800.0}


# ----------------------------------------------------------------------------- validation

def _check_required(name, x, shape, device):
    if x is None:
        raise TypeError(f"`{name}` is required (a tensor of shape {tuple(shape)}), got None")
    check_optional(name, x, shape, device)


def _validate(q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens,
              cu_seqlens_cpu=None, need_gk=False):
    B, T, H, K, HV, V = check_qkv(q, k, v)
    _check_required("a", a, (B, T, H, K), q.device)
    _check_required("b", b, (B, T, H, K), q.device)
    if need_gk:
        _check_required("gk", gk, (B, T, H, K), q.device)
    scale = resolve_scale(scale, K)
    check_flag("output_final_state", output_final_state)
    N = check_cu_seqlens(cu_seqlens, B, T, q.device)
    if cu_seqlens_cpu is not None:
        check_tensor("cu_seqlens_cpu", cu_seqlens_cpu, ndim=1, dtypes=INDEX_DTYPES)
        if cu_seqlens is None:
            raise ValueError("`cu_seqlens_cpu` given without `cu_seqlens`")
        if cu_seqlens_cpu.shape != cu_seqlens.shape:
            raise ValueError(f"`cu_seqlens_cpu` has shape {tuple(cu_seqlens_cpu.shape)} but "
                             f"`cu_seqlens` has {tuple(cu_seqlens.shape)}")
    check_state("initial_state", initial_state, (N, H, K, V), q.dtype, q.device)
    return B, T, H, K, V, N, scale



# ----------------------------------------------------------------------------- PyTorch path


def _decayed_scores(x, gx, ys, gy, *, strict):
    """A[t, s, j] = sum_k x_t[k] ys_s[k, j] exp(gx_t[k] - gy_s[k]) for s <= t (s < t if ``strict``), else 0.

    x, gx, gy: [..., C, K]; ys: [..., C, K, J]. gx_t <= gy_s wherever the term is kept (for log
    decays gk <= 0, as FLA requires), so every exponent below is <= 0. The chunk is cut into SUB-sized blocks:
      * diagonal blocks: the [SUB, SUB, K] decay tensor is built explicitly, masked before the exp;
      * source block j < target block i: factor through the reference point r_j = gy at the last
        step of block j:  exp(gx_t - r_j) * exp(r_j - gy_s), both exponents <= 0 (GLA's trick),
        which turns the pair into one matmul and keeps memory at O(C K) per step instead of O(C^2 K).
    """
    *lead, C, K = x.shape
    J = ys.shape[-1]
    c = min(SUB, C)
    n = C // c
    dev = x.device
    xb, gxb, gyb = (z.reshape(*lead, n, c, K) for z in (x, gx, gy))
    ysb = ys.reshape(*lead, n, c, K, J)
    # diagonal blocks
    ti = torch.arange(c, device=dev)
    drop = (ti[None, :] >= ti[:, None]) if strict else (ti[None, :] > ti[:, None])   # [t, s]
    E = (gxb[..., :, None, :] - gyb[..., None, :, :]).masked_fill(drop[:, :, None], float("-inf")).exp()
    A_d = torch.einsum("...tsk,...skj->...tsj", xb[..., :, None, :] * E, ysb)        # [..., n, c, c, J]
    if n == 1:
        return A_d.reshape(*lead, C, C, J)
    # off-diagonal blocks through the reference point of the source block
    r = gyb[..., -1, :]                                                              # [..., n, K]
    bi = torch.arange(C, device=dev) // c
    later = bi[:, None] > torch.arange(n, device=dev)[None, :]                        # [t, j]
    xr = x[..., :, None, :] * (gx[..., :, None, :] - r[..., None, :, :]).masked_fill(
        ~later[:, :, None], float("-inf")).exp()                                      # [..., C, n, K]
    yr = ysb * (r[..., :, None, :] - gyb).exp()[..., None]                           # [..., n, c, K, J]
    A = torch.einsum("...tik,...iskj->...tisj", xr, yr)                              # [..., C, n, c, J]
    eye = torch.eye(n, dtype=A.dtype, device=dev)
    A = A.reshape(*lead, n, c, n, c, J) + A_d[..., :, :, None, :, :] * eye[:, None, :, None, None]
    return A.reshape(*lead, C, C, J)


def _chunk_dense(q, k, v, a, b, gk, *, initial_state, scale, reverse=False):
    """Dense [B, T, H, *] generalized delta rule; returns (o [B, T, H, V] in q.dtype, ht [B, H, K, V])."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q)
    out_dtype = v.dtype
    sdt = torch.float64 if (dt == torch.float64 or (initial_state is not None
                                                     and initial_state.dtype == torch.float64)) else dt
    if T == 0:
        ht = (initial_state.to(sdt) if initial_state is not None
              else q.new_zeros(B, H, K, V, dtype=sdt))
        return v.new_zeros(B, 0, H, V), ht
    if reverse:
        q, k, v, a, b, gk = flip_time(q, k, v, a, b, gk)

    C = CHUNK
    NT = -(-T // C)

    def prep(x):  # [B, T, H, D] -> [B, H, NT, C, D] in the compute dtype, zero-padded (neutral)
        x = pad_to_chunks(x.to(dt), C, dim=1)
        return x.transpose(1, 2).reshape(B, H, NT, C, x.shape[-1])

    q, k, v, a, b = map(prep, (q, k, v, a, b))
    q = q * scale
    kb = torch.stack((k, b), dim=-1)                       # [B, H, NT, C, K, 2]
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)

    if gk is None:  # IPLR: no decay, plain masked matmuls
        A_q = torch.einsum("...tk,...skj->...tsj", q, kb)
        A_a = torch.einsum("...tk,...skj->...tsj", a, kb)
        incl = strict | torch.eye(C, dtype=torch.bool, device=q.device)
        A_q = A_q * incl[:, :, None]
        A_a = A_a * strict[:, :, None]
        a_tilde, q_g, k_d, b_d, decay_C = a, q, k, b, None
    else:
        g = prep(gk.to(dt).clamp(min=GATE_MIN[dt]))         # clamp: see GATE_MIN
        gamma = g.cumsum(-2)                                # inclusive, chunk-local
        gamma_ex = gamma - g                                # exclusive: gamma_{t-1}
        A_q = _decayed_scores(q, gamma, kb, gamma, strict=False)
        A_a = _decayed_scores(a, gamma_ex, kb, gamma, strict=True)
        a_tilde = a * gamma_ex.exp()
        q_g = q * gamma.exp()
        gamma_C = gamma[..., -1:, :]
        to_end = (gamma_C - gamma).exp()
        k_d, b_d = k * to_end, b * to_end
        decay_C = gamma_C.squeeze(-2).exp()                 # [B, H, NT, K]

    A_qk, A_qb = A_q[..., 0], A_q[..., 1]
    A_ak, A_ab = A_a[..., 0], A_a[..., 1]
    eye = torch.eye(C, dtype=dt, device=q.device)
    L = eye - A_ab                                          # unit lower triangular
    rhs = torch.cat((A_ak @ v, a_tilde), dim=-1)            # [.., C, V + K]
    X = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)
    U, M = X[..., :V], X[..., V:]
    o_intra = A_qk @ v + A_qb @ U                           # [B, H, NT, C, V]
    q_eff = q_g + A_qb @ M                                  # [B, H, NT, C, K]
    b_dT = b_d.transpose(-1, -2)
    P = b_dT @ M                                            # [B, H, NT, K, K]
    if decay_C is None:
        P = P + torch.eye(K, dtype=dt, device=q.device)
    else:
        P = P + torch.diag_embed(decay_C)
    R = k_d.transpose(-1, -2) @ v + b_dT @ U                # [B, H, NT, K, V]

    S = (initial_state.to(sdt) if initial_state is not None
         else q.new_zeros(B, H, K, V, dtype=sdt))
    P, R = P.to(sdt), R.to(sdt)
    starts = []
    # unbind once: indexing P[:, :, i] per chunk would make the backward O(NT^2)
    for P_i, R_i in zip(P.unbind(2), R.unbind(2)):
        starts.append(S)
        S = torch.baddbmm(R_i.flatten(0, 1), P_i.flatten(0, 1), S.flatten(0, 1)).view(B, H, K, V)
    S0 = torch.stack(starts, dim=2).to(dt)                  # [B, H, NT, K, V]
    o = o_intra + q_eff @ S0
    o = o.reshape(B, H, NT * C, V)[:, :, :T].transpose(1, 2)
    if reverse:
        o = o.flip(1)
    return o.to(out_dtype), S


def _run(q, k, v, a, b, gk, *, scale, initial_state, output_final_state, cu_seqlens, reverse=False):
    def fn(q, k, v, a, b, gk, initial_state=None):
        return _chunk_dense(q, k, v, a, b, gk, initial_state=initial_state, scale=scale, reverse=reverse)

    o, ht = per_sequence(fn, cu_seqlens, [q, k, v, a, b, gk], initial_state)
    return o, (ht if output_final_state else None)


# ----------------------------------------------------------------------------- IPLR

def chunk_iplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    **kwargs,
):
    """IPLR delta rule, chunkwise: S_t = S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T, o_t = S_t^T (scale q_t).

    q, k, a, b: [B, T, H, K]; v: [B, T, H, V]; initial_state: [N, H, K, V] (fp32).
    Returns (o [B, T, H, V], final_state [N, H, K, V] or None).
    ``chunk_size`` (kwarg, power of 2) is accepted and ignored, as are other unknown kwargs.
    """
    check_head_first(kwargs)
    check_chunk_size(kwargs.pop("chunk_size", None))
    B, T, H, K, V, N, scale = _validate(q, k, v, a, b, None, scale, initial_state, output_final_state,
                                        cu_seqlens, cu_seqlens_cpu)
    return _run(q, k, v, a, b, None, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def fused_recurrent_iplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float = None,
    initial_state: torch.Tensor = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IPLR delta rule (recurrent form); same math and arguments as :func:`chunk_iplr_delta_rule`."""
    B, T, H, K, V, N, scale = _validate(q, k, v, a, b, None, scale, initial_state, output_final_state,
                                        cu_seqlens)
    if backend.use_cuda("fused_recurrent_iplr_delta_rule", q, K, V):
        from .recurrent_cuda import fused_recurrent_cuda
        return fused_recurrent_cuda(q, k, v, a=a, b=b, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return _run(q, k, v, a, b, None, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens)


# ----------------------------------------------------------------------------- DPLR

def chunk_dplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gk: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    safe_gate: bool = False,
    chunk_size: int | None = None,
    disable_recompute: bool = False,
    cp_context=None,
    lower_bound: float | None = None,
    **kwargs,
):
    """DPLR delta rule, chunkwise:
    S_t = diag(exp(gk_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T, o_t = S_t^T (scale q_t).

    q, k, a, b, gk: [B, T, H, K] (gk: log decays); v: [B, T, H, V]; initial_state [N, H, K, V].
    ``safe_gate``, ``chunk_size``, ``disable_recompute`` and ``lower_bound`` only select FLA's kernel
    schemes and do not change the result: they are validated as FLA does (``lower_bound`` must be
    negative: it is the caller's promise that ``lower_bound <= gk < 0``) and otherwise ignored.
    Context parallelism (``cp_context``) is not supported.
    """
    check_head_first(kwargs)
    if cp_context is not None:
        raise ValueError("`cp_context` (context parallelism) is not supported by fla_cuda; pass None")
    check_flag("safe_gate", safe_gate)
    check_flag("disable_recompute", disable_recompute)
    check_chunk_size(chunk_size)
    if lower_bound is not None:
        if isinstance(lower_bound, bool) or not isinstance(lower_bound, (int, float)):
            raise TypeError(f"`lower_bound` must be a float, got {type(lower_bound).__name__}")
        if not lower_bound < 0:
            raise ValueError(f"`lower_bound` must be negative (gk is a log-decay < 0), got {lower_bound}")
    B, T, H, K, V, N, scale = _validate(q, k, v, a, b, gk, scale, initial_state, output_final_state,
                                        cu_seqlens, cu_seqlens_cpu, need_gk=True)
    return _run(q, k, v, a, b, gk, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def fused_recurrent_dplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gk: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPLR delta rule (recurrent form); ``reverse`` scans each sequence from its last step to its first.

    Unlike FLA (inference only), this one is differentiable.
    """
    B, T, H, K, V, N, scale = _validate(q, k, v, a, b, gk, scale, initial_state, output_final_state,
                                        cu_seqlens, need_gk=True)
    check_flag("reverse", reverse)
    if backend.use_cuda("fused_recurrent_dplr_delta_rule", q, K, V):
        from .recurrent_cuda import fused_recurrent_cuda
        return fused_recurrent_cuda(q, k, v, gk=gk, a=a, b=b, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, reverse=reverse,
                                    cu_seqlens=cu_seqlens)
    return _run(q, k, v, a, b, gk, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, reverse=reverse)
