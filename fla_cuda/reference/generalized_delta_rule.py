"""fp64 oracles for the generalized delta rule (IPLR / DPLR): thin wrappers of `recurrence_reference`.

    IPLR: S_t = S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    DPLR: S_t = diag(exp(gk_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T   (a^T S uses the undecayed S)
    o_t = S_t^T (scale q_t)
"""
from __future__ import annotations

import torch

from .recurrence import recurrence_reference


def iplr_reference(q, k, v, a, b, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None, dtype=torch.float64):
    return recurrence_reference(q, k, v, a=a, b=b, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens, dtype=dtype)


def dplr_reference(q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False,
                   reverse=False, cu_seqlens=None, dtype=torch.float64):
    return recurrence_reference(q, k, v, gk=gk, a=a, b=b, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, reverse=reverse,
                                cu_seqlens=cu_seqlens, dtype=dtype)
