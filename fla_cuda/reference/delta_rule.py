"""fp64 oracles of the delta rule and the gated delta rule: thin wrappers of
``recurrence_reference`` (step by step, no chunking, no preprocessing other than the
optional q/k l2norm, computed in fp64 with FLA's eps 1e-6)."""
from __future__ import annotations

import torch

from .recurrence import recurrence_reference

__all__ = ["delta_rule_reference", "gated_delta_rule_reference", "l2norm_reference"]


def l2norm_reference(x: torch.Tensor, eps: float = 1e-6, dtype=torch.float64) -> torch.Tensor:
    x = x.to(dtype)
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def delta_rule_reference(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
                         use_qk_l2norm=False, cu_seqlens=None, dtype=torch.float64):
    """o, ht (fp64) of the delta rule; beta [B,T,H] or [B,T,H,V]."""
    if use_qk_l2norm:
        q, k = l2norm_reference(q, dtype=dtype), l2norm_reference(k, dtype=dtype)
    return recurrence_reference(q, k, v, beta=beta, delta=True, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens, dtype=dtype)


def gated_delta_rule_reference(q, k, v, g=None, beta=None, *, gk=None, gv=None, scale=None,
                               initial_state=None, output_final_state=False, use_qk_l2norm=False,
                               cu_seqlens=None, state_v_first=False, dtype=torch.float64):
    """o, ht (fp64) of the gated delta rule: g [B,T,HV] log decays (optional), gk [B,T,HV,K],
    gv [B,T,HV,V], beta [B,T,HV] or [B,T,HV,V] (None: ones); v may have HV = G * H heads.
    With ``state_v_first`` the states are [N,HV,V,K]."""
    if beta is None:
        beta = torch.ones(v.shape[:3], dtype=dtype, device=v.device)
    if use_qk_l2norm:
        q, k = l2norm_reference(q, dtype=dtype), l2norm_reference(k, dtype=dtype)
    if state_v_first and initial_state is not None:
        initial_state = initial_state.transpose(-1, -2)
    o, ht = recurrence_reference(q, k, v, g=g, gk=gk, gv=gv, beta=beta, delta=True, scale=scale,
                                 initial_state=initial_state, output_final_state=output_final_state,
                                 cu_seqlens=cu_seqlens, dtype=dtype)
    if state_v_first and ht is not None:
        ht = ht.transpose(-1, -2)
    return o, ht
