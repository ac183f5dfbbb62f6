"""Blueprint of the chunkwise GLA kernels (elementwise key gate gk): the algorithm the
tensor-core kernels implement (issue #5), stage by stage, with an explicit backward.

Per chunk of C steps, G = cumulative gk within the chunk ([C, K], non-increasing), split into
sub-chunks of S rows. The intra-chunk scores A_ij = sum_k q_ik k_jk exp(G_ik - G_jk), j <= i:

  * off-diagonal sub-blocks (query sub-chunk a after key sub-chunk b): one matmul on operands
    folded at the reference row r = a*S (the first row of a):
        Q~ = Q_a * exp(G_a - G_r),  K~ = K_b * exp(G_r - G_b),   A_ab = Q~ K~^T
    every exponent is <= 0 (G is non-increasing), so nothing overflows however strong the gates;
  * diagonal sub-blocks: the [S, S, K] decay tensor built explicitly, masked before exp.

  forward:  O_c = scale [ (Q_c * exp(G)) h_c + A_c V_c ]
            h_{c+1} = diag(exp(G_last)) h_c + (K_c * exp(G_last - G))^T V_c
  backward: dA = scale * (dO V^T) masked; dV = scale * A^T dO + (K * exp(G_last - G)) L_{c+1}
            dQ, dK of the scores through the same sub-block split; dQ += scale (dO h^T) * exp(G);
            dK += (V L_{c+1}^T) * exp(G_last - G); reverse scan L_c = scale (Q exp(G))^T dO
            + diag(exp(G_last)) L_{c+1}, dh0 = L_0; and per key channel
            dgk_t = sum_{i >= t} q_i * dq_i - sum_{j >= t} k_j * dk_j + rowsum(ht * dht).
"""
from __future__ import annotations

import torch

from .chunk_simple_gla import _chunks, _pad, _unchunks


def _scores(qc, kc, G, S):
    """A [B,H,N,C,C] with the sub-block split; also returns the folded operands per block."""
    C = qc.shape[-2]
    A = qc.new_zeros(*qc.shape[:-1], C)
    tri = torch.ones(S, S, dtype=torch.bool, device=qc.device).tril()
    for a in range(C // S):
        ra = slice(a * S, (a + 1) * S)
        Gr = G[..., a * S:a * S + 1, :]                               # reference row
        q_f = qc[..., ra, :] * (G[..., ra, :] - Gr).exp()
        for b in range(a):
            rb = slice(b * S, (b + 1) * S)
            k_f = kc[..., rb, :] * (Gr - G[..., rb, :]).exp()
            A[..., ra, rb] = q_f @ k_f.transpose(-1, -2)
        diff = G[..., ra, None, :] - G[..., None, ra, :]               # [.., S, S, K]
        decay = torch.where(tri[..., None], diff, torch.full_like(diff, float("-inf"))).exp()
        A[..., ra, ra] = (qc[..., ra, None, :] * kc[..., None, ra, :] * decay).sum(-1)
    return A


def _scores_bwd(qc, kc, G, dA, S):
    """Gradients of A = scores(q, k) w.r.t. q and k, through the same sub-block split."""
    C = qc.shape[-2]
    dq, dk = torch.zeros_like(qc), torch.zeros_like(kc)
    tri = torch.ones(S, S, dtype=torch.bool, device=qc.device).tril()
    for a in range(C // S):
        ra = slice(a * S, (a + 1) * S)
        Gr = G[..., a * S:a * S + 1, :]
        eq = (G[..., ra, :] - Gr).exp()
        q_f = qc[..., ra, :] * eq
        dq_f = torch.zeros_like(q_f)
        for b in range(a):
            rb = slice(b * S, (b + 1) * S)
            ek = (Gr - G[..., rb, :]).exp()
            k_f = kc[..., rb, :] * ek
            dq_f += dA[..., ra, rb] @ k_f
            dk[..., rb, :] += (dA[..., ra, rb].transpose(-1, -2) @ q_f) * ek
        dq[..., ra, :] += dq_f * eq
        diff = G[..., ra, None, :] - G[..., None, ra, :]
        decay = torch.where(tri[..., None], diff, torch.full_like(diff, float("-inf"))).exp()
        w = dA[..., ra, ra, None] * decay                               # [.., S, S, K]
        dq[..., ra, :] += (w * kc[..., None, ra, :]).sum(-2)
        dk[..., ra, :] += (w * qc[..., ra, None, :]).sum(-3)
    return dq, dk


def chunk_gla_fwd(q, k, v, gk, *, scale: float, initial_state=None, chunk_size: int = 64, sub_chunk: int = 16):
    """Returns dict(o [B,T,H,V], h [B,H,N,K,V] state entering each chunk, ht, A [B,H,N,C,C])."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, S = chunk_size, sub_chunk
    assert C % S == 0
    qc, kc, vc, gc = (_chunks(_pad(x, C), C) for x in (q, k, v, gk))
    N = qc.shape[2]
    G = gc.cumsum(-2)                                                   # [B,H,N,C,K]
    A = _scores(qc, kc, G, S)
    h = q.new_zeros(B, H, N, K, V)
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(q.dtype)
    k_end = kc * (G[..., -1:, :] - G).exp()
    for c in range(N):
        h[:, :, c] = state
        state = G[:, :, c, -1, :, None].exp() * state + k_end[:, :, c].transpose(-1, -2) @ vc[:, :, c]
    o = scale * ((qc * G.exp()) @ h + A @ vc)
    return dict(o=_unchunks(o)[:, :T], h=h, ht=state, A=A)


def chunk_gla_bwd(q, k, v, gk, do, dht, fwd: dict, *, scale: float, chunk_size: int = 64, sub_chunk: int = 16):
    """Explicit gradients: dict(dq, dk, dv, dgk, dh0, dh [B,H,N,K,V] = dL/dh_c)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, S = chunk_size, sub_chunk
    qc, kc, vc, gc, doc = (_chunks(_pad(x, C), C) for x in (q, k, v, gk, do))
    N = qc.shape[2]
    G = gc.cumsum(-2)
    h, A = fwd["h"], fwd["A"]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    dA = scale * (doc @ vc.transpose(-1, -2)).masked_fill(~causal, 0)
    dq, dk = _scores_bwd(qc, kc, G, dA, S)
    dq = dq + scale * (doc @ h.transpose(-1, -2)) * G.exp()
    dv = scale * A.transpose(-1, -2) @ doc
    dh_out = scale * (qc * G.exp()).transpose(-1, -2) @ doc
    e_end = (G[..., -1:, :] - G).exp()
    dh = torch.empty_like(h)
    L = q.new_zeros(B, H, K, V) if dht is None else dht.to(q.dtype)
    for c in range(N - 1, -1, -1):
        dk[:, :, c] += (vc[:, :, c] @ L.transpose(-1, -2)) * e_end[:, :, c]
        dv[:, :, c] += (kc[:, :, c] * e_end[:, :, c]) @ L
        L = dh_out[:, :, c] + G[:, :, c, -1, :, None].exp() * L
        dh[:, :, c] = L
    dq, dk, dv = (_unchunks(x)[:, :T] for x in (dq, dk, dv))
    dgk = (q * dq - k * dk).flip(1).cumsum(1).flip(1)
    if dht is not None:
        dgk = dgk + (fwd["ht"] * dht.to(q.dtype)).sum(-1)[:, None]
    return dict(dq=dq, dk=dk, dv=dv, dgk=dgk, dh0=L, dh=dh)
