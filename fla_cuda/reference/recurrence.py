"""The oracle: one plain, step-by-step recurrence that every family is a case of.

State S has shape [K, V] per (sequence, value head), kept in ``dtype`` (fp64 by default).
One step t, in this order:

    w   = a_t^T S                                    (low-rank term uses S_{t-1}; DPLR/IPLR)
    S   = exp(g_t) * diag(exp(gk_t)) S diag(exp(gv_t))   (any gate may be absent)
    S  += b_t w^T                                    (DPLR/IPLR)
    v'  = beta_t * (v_t - S^T k_t)  if delta else v_t  (beta scalar per head or per V channel)
    S  += k_t v'^T
    o_t = S^T (scale * q_t)

Families:
  simple GLA  g              linear attention: no gate     retention: g = log(1 - 2^(-5-h))
  GLA         gk (and/or gv)
  delta rule  delta, beta    gated delta rule: delta, beta, g
  IPLR        a, b           DPLR: a, b, gk
Layouts: q, k, a, b, gk [B, T, H, K]; v, gv [B, T, HV, V]; g, beta [B, T, HV] (beta may be
[B, T, HV, V]); HV is a multiple of H (grouped value heads: value head j reads q/k head
j // (HV // H)). States [N, HV, K, V]. With ``cu_seqlens`` (B == 1) each packed sequence
runs on its own state. ``reverse`` scans each sequence from its last step to its first.
"""
from __future__ import annotations

import torch


def recurrence_reference(
    q, k, v, *, g=None, gk=None, gv=None, beta=None, a=None, b=None, delta: bool = False,
    scale: float | None = None, initial_state=None, output_final_state: bool = False,
    reverse: bool = False, cu_seqlens=None, dtype=torch.float64,
):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    G = HV // H
    if scale is None:
        scale = K ** -0.5
    if delta and beta is None:
        raise ValueError("delta rule needs beta")

    def cast(x):
        return None if x is None else x.to(dtype)

    q, k, v, g, gk, gv, beta, a, b = map(cast, (q, k, v, g, gk, gv, beta, a, b))
    # Query/key-side tensors expanded to the value heads.
    if G > 1:
        q, k = q.repeat_interleave(G, dim=2), k.repeat_interleave(G, dim=2)
        a = None if a is None else a.repeat_interleave(G, dim=2)
        b = None if b is None else b.repeat_interleave(G, dim=2)
        if gk is not None and gk.shape[2] != HV:  # gk may be given per q/k head or per value head
            gk = gk.repeat_interleave(G, dim=2)

    if cu_seqlens is None:
        bounds = [(i, 0, T) for i in range(B)]
    else:
        c = cu_seqlens.tolist()
        bounds = [(0, c[i], c[i + 1]) for i in range(len(c) - 1)]
    N = len(bounds)
    o = torch.zeros(B, T, HV, V, dtype=dtype, device=q.device)
    ht = torch.zeros(N, HV, K, V, dtype=dtype, device=q.device)
    for n, (bi, bos, eos) in enumerate(bounds):
        S = torch.zeros(HV, K, V, dtype=dtype, device=q.device)
        if initial_state is not None:
            S = S + initial_state[n].to(dtype)
        steps = range(eos - 1, bos - 1, -1) if reverse else range(bos, eos)
        for t in steps:
            if a is not None:
                w = torch.einsum("hk,hkv->hv", a[bi, t], S)
            if g is not None:
                S = S * g[bi, t].exp()[:, None, None]
            if gk is not None:
                S = S * gk[bi, t].exp()[:, :, None]
            if gv is not None:
                S = S * gv[bi, t].exp()[:, None, :]
            if a is not None:
                S = S + b[bi, t][:, :, None] * w[:, None, :]
            vt = v[bi, t]
            if delta:
                bt = beta[bi, t] if beta.dim() == 4 else beta[bi, t][:, None]
                vt = bt * (vt - torch.einsum("hk,hkv->hv", k[bi, t], S))
            S = S + k[bi, t][:, :, None] * vt[:, None, :]
            o[bi, t] = torch.einsum("hk,hkv->hv", q[bi, t] * scale, S)
        ht[n] = S
    return o, (ht if output_final_state else None)
