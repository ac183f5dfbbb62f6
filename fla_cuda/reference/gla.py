"""fp64 step-by-step oracle for GLA: a thin wrapper of ``recurrence_reference``.

    S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_t v_t^T,     o_t = S_t^T (scale * q_t)
"""
from __future__ import annotations

import torch

from .recurrence import recurrence_reference


def gla_reference(q, k, v, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False,
                  reverse=False, state_v_first=False, cu_seqlens=None, dtype=torch.float64):
    """GLA in ``dtype`` (fp64); layouts as ``fused_recurrent_gla``. Returns (o, final state or None)."""
    h0 = initial_state
    if h0 is not None and state_v_first:
        h0 = h0.transpose(-1, -2)
    o, ht = recurrence_reference(q, k, v, gk=gk, gv=gv, scale=scale, initial_state=h0,
                                 output_final_state=output_final_state, reverse=reverse,
                                 cu_seqlens=cu_seqlens, dtype=dtype)
    if ht is not None and state_v_first:
        ht = ht.transpose(-1, -2)
    return o, ht
