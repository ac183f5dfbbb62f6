"""Blueprint of the chunkwise simple GLA kernels: the algorithm stage by stage, with an
explicit backward (no autograd), in the precision of the inputs (use fp64 as an oracle).

The tensor-core kernels (issue #4) implement exactly these stages; tests compare a kernel's
intermediate buffers (per-chunk states ``h``, their gradients ``dh``) against this module.

Per sequence, chunks of C steps; G = cumulative log gate within a chunk (G_i = g_1 + ... + g_i),
a_c = exp(G_last) the chunk's total decay, D_ij = exp(G_i - G_j) for i >= j (else 0):

  forward
    1. chunk updates  U_c = (K_c * exp(G_last - G))^T V_c                    (parallel)
    2. state scan     h_0 = h0,  h_{c+1} = a_c h_c + U_c                       (sequential or a scan)
    3. output         O_c = scale [ (Q_c * exp(G)) h_c + ((Q_c K_c^T) * D) V_c ]   (parallel)
  backward, given dO and dht
    3'. dQ_c = scale [ (dO_c h_c^T) * exp(G) + ((dO_c V_c^T) * D) K_c ]
        dK_c = scale ((dO_c V_c^T) * D)^T Q_c      dV_c = scale ((Q_c K_c^T) * D)^T dO_c
        dh_c^out = scale (Q_c * exp(G))^T dO_c
    2'. reverse scan  L_N = dht,  L_c = dh_c^out + a_c L_{c+1};  dh0 = L_0   (L_c = dL/dh_c)
    1'. dK_c += (V_c L_{c+1}^T) * exp(G_last - G)      dV_c += (K_c * exp(G_last - G)) L_{c+1}
    dg: every (source j, sink i) pair with j < t <= i carries g_t, so
        dg_t = sum_{i >= t} <q_i, dq_i> - sum_{j >= t} <k_j, dk_j> + <ht, dht>
    (a reverse cumulative sum over the whole sequence; h0 is a source before every t).
"""
from __future__ import annotations

import torch

from ..ops.utils import pad_to_chunks


def _chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B, T, H, ...] (T a multiple of C) -> [B, H, N, C, ...]."""
    B, T, H = x.shape[:3]
    return x.reshape(B, T // C, C, H, *x.shape[3:]).movedim(3, 1)


def _unchunks(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, C, ...] -> [B, N*C, H, ...]."""
    B, H, N, C = x.shape[:4]
    return x.movedim(1, 3).reshape(B, N * C, H, *x.shape[4:])


def _pad(x: torch.Tensor | None, C: int) -> torch.Tensor | None:
    """Pad T to a multiple of C: zero keys/values and zero log gates are neutral."""
    return None if x is None else pad_to_chunks(x, C)


def _decays(g: torch.Tensor | None, B, H, N, C, like):
    """Cumulative gates G [B,H,N,C], chunk decays a [B,H,N], intra-chunk D [B,H,N,C,C]."""
    causal = torch.ones(C, C, dtype=torch.bool, device=like.device).tril()
    if g is None:
        G = like.new_zeros(B, H, N, C)
    else:
        G = _chunks(g, C).cumsum(-1)
    diff = G[..., :, None] - G[..., None, :]
    D = torch.where(causal, diff, torch.full_like(diff, float("-inf"))).exp()  # masked before exp
    return G, G[..., -1].exp(), D


def chunk_simple_gla_fwd(q, k, v, g=None, *, scale: float, initial_state=None, chunk_size: int = 64):
    """Returns dict(o [B,T,H,V], h [B,H,N,K,V] state entering each chunk, ht [B,H,K,V])."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    qc, kc, vc = (_chunks(_pad(x, C), C) for x in (q, k, v))
    N = qc.shape[2]
    G, a, D = _decays(_pad(g, C), B, H, N, C, q)
    k_to_end = kc * (G[..., -1:] - G).exp()[..., None]
    U = k_to_end.transpose(-1, -2) @ vc                                   # 1. [B,H,N,K,V]
    h = q.new_zeros(B, H, N, K, V)
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(q.dtype)
    for c in range(N):                                                    # 2.
        h[:, :, c] = state
        state = a[:, :, c, None, None] * state + U[:, :, c]
    o = scale * ((qc * G.exp()[..., None]) @ h + ((qc @ kc.transpose(-1, -2)) * D) @ vc)  # 3.
    return dict(o=_unchunks(o)[:, :T], h=h, ht=state)


def chunk_simple_gla_bwd(q, k, v, g, do, dht, fwd: dict, *, scale: float, chunk_size: int = 64):
    """Explicit gradients: dict(dq, dk, dv, dg (None without g), dh0, dh [B,H,N,K,V] = dL/dh_c)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    qc, kc, vc, doc = (_chunks(_pad(x, C), C) for x in (q, k, v, do))
    N = qc.shape[2]
    G, a, D = _decays(_pad(g, C), B, H, N, C, q)
    h = fwd["h"]
    eG, e_end = G.exp()[..., None], (G[..., -1:] - G).exp()[..., None]
    dA = (doc @ vc.transpose(-1, -2)) * D                                  # dL/d(QK^T) * D, unscaled
    dq = scale * ((doc @ h.transpose(-1, -2)) * eG + dA @ kc)             # 3'.
    dk = scale * dA.transpose(-1, -2) @ qc
    dv = scale * ((qc @ kc.transpose(-1, -2)) * D).transpose(-1, -2) @ doc
    dh_out = scale * (qc * eG).transpose(-1, -2) @ doc                     # [B,H,N,K,V]
    dh = torch.empty_like(h)
    L = q.new_zeros(B, H, K, V) if dht is None else dht.to(q.dtype)       # 2'. L_{c+1}
    for c in range(N - 1, -1, -1):
        dk[:, :, c] += (vc[:, :, c] @ L.transpose(-1, -2)) * e_end[:, :, c]   # 1'.
        dv[:, :, c] += (kc[:, :, c] * e_end[:, :, c]) @ L
        L = dh_out[:, :, c] + a[:, :, c, None, None] * L
        dh[:, :, c] = L
    dq, dk, dv = (_unchunks(x)[:, :T] for x in (dq, dk, dv))
    dg = None
    if g is not None:
        per_step = (q * dq).sum(-1) - (k * dk).sum(-1)                    # [B, T, H]
        dg = per_step.flip(1).cumsum(1).flip(1)
        if dht is not None:
            dg = dg + (fwd["ht"] * dht.to(q.dtype)).sum((-1, -2))[:, None, :]
    return dict(dq=dq, dk=dk, dv=dv, dg=dg, dh0=L, dh=dh)


def gate_gradient(per_token: torch.Tensor, cu_seqlens: torch.Tensor | None,
                  sink: torch.Tensor | None) -> torch.Tensor:
    """dg [B, T, H] (fp64) from the per-token terms of the dg identity above (the CUDA
    backward's last kernel, csrc/chunk/gate_grad.cu, in PyTorch): the sum of per_token
    [B, T, H] over s >= t within t's sequence, plus sink [N, H] (= <h_T, dh_T>) of t's
    sequence when given."""
    # scan along the innermost dim: torch's outer-dim scan kernel is ~50x slower here
    rc = per_token.double().transpose(1, 2).flip(-1).cumsum(-1).flip(-1).transpose(1, 2)
    if cu_seqlens is None:
        return rc if sink is None else rc + sink[:, None, :]
    T = per_token.shape[1]
    seq = torch.repeat_interleave(torch.arange(cu_seqlens.shape[0] - 1, device=rc.device),
                                  cu_seqlens[1:] - cu_seqlens[:-1], output_size=T)     # [T]
    rc_pad = torch.cat([rc, rc.new_zeros(1, 1, rc.shape[2])], dim=1)
    dg = rc - rc_pad[:, cu_seqlens[1:][seq]]       # drop what lies past t's sequence end
    return dg if sink is None else dg + sink[seq][None]
