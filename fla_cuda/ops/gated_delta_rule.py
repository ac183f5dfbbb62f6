"""The gated delta rule (Gated DeltaNet), FLA 0.6 API.

    S_t = exp(g_t) S_{t-1};  S_t += k_t (beta_t (v_t - S_t^T k_t))^T;  o_t = S_t^T (scale q_t)

Grouped value attention: v, g, beta and the states may have HV heads, a multiple of the
q/k heads H (value head j reads q/k head j // (HV // H)). FLA's in-kernel options are
plain differentiable torch preprocessing here, before the core:

- ``use_qk_l2norm_in_kernel``: q, k <- x / sqrt(sum(x^2) + 1e-6)
- ``use_gate_in_kernel``: g <- -exp(A_log) * softplus(g + dt_bias)
- ``use_beta_sigmoid_in_kernel``: beta <- sigmoid(beta), times 2 with ``allow_neg_eigval``
- ``state_v_first``: states are [N, HV, V, K] at the API boundary.

The PyTorch path is the chunkwise core of ``fla_cuda.ops.delta_rule``.
``fused_recurrent_gated_delta_rule`` also takes per-key (gk) and per-value (gv) log
decays and per-channel beta; the PyTorch path handles those exactly with a slower
per-channel chunk form (chunk 16, V triangular systems per chunk).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend
from ..utils import checks
from .delta_rule import check_beta, delta_chunk_forward, pop_chunk_size, qk_l2norm
from .utils import compute_dtype, pop_state_layout, swap_state_layout

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"]



def _check_head_param(name, x, HV, device):
    checks.check_tensor(name, x)
    if x.numel() != HV or x.dim() != 1:
        raise ValueError(f"`{name}` must have shape ({HV},) (one value per value head), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"`{name}` is on {x.device} but `q` is on {device}")


def _preprocess(q, k, g, beta, *, use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias,
                use_beta_sigmoid_in_kernel, allow_neg_eigval, use_cuda):
    """FLA's in-kernel options as differentiable torch ops (fp32; fp64 stays fp64)."""
    dtype = compute_dtype(q)
    if use_qk_l2norm_in_kernel and not use_cuda:  # the CUDA kernel normalises in-kernel, in fp32
        q, k = qk_l2norm(q, k)
    if use_gate_in_kernel:
        x = g.to(dtype)
        if dt_bias is not None:
            x = x + dt_bias.to(dtype)
        g = -A_log.to(dtype).exp() * F.softplus(x)
    if use_beta_sigmoid_in_kernel:
        beta = torch.sigmoid(beta.to(dtype))
        if allow_neg_eigval:
            beta = beta * 2
    return q, k, g, beta



def _validate_common(q, k, v, scale, initial_state, output_final_state, cu_seqlens, state_v_first,
                     use_qk_l2norm_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval,
                     use_gate_in_kernel, A_log, dt_bias):
    B, T, H, K, HV, V = checks.check_qkv(q, k, v, allow_gva=True)
    scale = checks.resolve_scale(scale, K)
    for name, flag in (("output_final_state", output_final_state),
                       ("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel),
                       ("use_beta_sigmoid_in_kernel", use_beta_sigmoid_in_kernel),
                       ("allow_neg_eigval", allow_neg_eigval),
                       ("use_gate_in_kernel", use_gate_in_kernel)):
        checks.check_flag(name, flag)
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("`allow_neg_eigval` (True) requires `use_beta_sigmoid_in_kernel=True`.")
    if use_gate_in_kernel:
        if A_log is None:
            raise ValueError("`A_log` must be provided when `use_gate_in_kernel=True`.")
        _check_head_param("A_log", A_log, HV, q.device)
        if dt_bias is not None:
            _check_head_param("dt_bias", dt_bias, HV, q.device)
    N = checks.check_cu_seqlens(cu_seqlens, B, T, q.device)
    shape = (N, HV, V, K) if state_v_first else (N, HV, K, V)
    checks.check_state("initial_state", initial_state, shape, q.dtype, q.device)
    return B, T, H, K, HV, V, scale


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    cp_context=None,
    **kwargs,
):
    """Gated delta rule, chunkwise. q, k [B,T,H,K]; v [B,T,HV,V]; g (log decay) and beta
    [B,T,HV]; initial_state [N,HV,K,V] ([N,HV,V,K] with ``state_v_first``).
    Returns (o [B,T,HV,V], final_state or None).

    As in FLA, ``use_gate_in_kernel``, ``A_log``, ``dt_bias`` and ``chunk_size`` come as
    keywords; other unknown keywords are ignored. Context parallelism (``cp_context``) and
    precomputed ``chunk_indices`` are not supported: they must be None.
    """
    state_v_first = pop_state_layout(kwargs, state_v_first)
    chunk_size = pop_chunk_size(kwargs)
    if chunk_indices is not None:
        raise ValueError("`chunk_indices` is not supported by fla_cuda (chunks come from `cu_seqlens`); pass None")
    if cp_context is not None:
        raise ValueError("`cp_context` (context parallelism) is not supported by fla_cuda; pass None")
    use_gate_in_kernel = kwargs.get("use_gate_in_kernel", False)
    A_log, dt_bias = kwargs.get("A_log"), kwargs.get("dt_bias")
    B, T, H, K, HV, V, scale = _validate_common(
        q, k, v, scale, initial_state, output_final_state, cu_seqlens, state_v_first,
        use_qk_l2norm_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval,
        use_gate_in_kernel, A_log, dt_bias)
    if g is None:
        raise ValueError("`g` is required (log decays of shape [B, T, HV])")
    checks.check_optional("g", g, (B, T, HV), q.device)
    check_beta(beta, B, T, HV, V, q.device, per_channel=False)
    q, k, g, beta = _preprocess(q, k, g, beta, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                                use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
                                use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
                                allow_neg_eigval=allow_neg_eigval, use_cuda=False)
    o, ht = delta_chunk_forward(q, k, v, beta, g, scale=scale,
                                initial_state=swap_state_layout(initial_state, state_v_first),
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                chunk_size=chunk_size)
    return o, swap_state_layout(ht, state_v_first)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float = None,
    initial_state: torch.Tensor = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule, step by step (CUDA kernel) or chunkwise (PyTorch path).

    g [B,T,HV] (optional scalar log decay), gk [B,T,HV,K], gv [B,T,HV,V] (optional
    per-channel log decays); beta [B,T,HV] or [B,T,HV,V], None means ones (before the
    optional sigmoid, as in FLA). A_log and dt_bias are used only with
    ``use_gate_in_kernel``. Differentiable (FLA's version has no backward).
    """
    state_v_first = pop_state_layout(kwargs, state_v_first)
    if not use_gate_in_kernel:
        A_log, dt_bias = None, None      # FLA ignores them without use_gate_in_kernel
    B, T, H, K, HV, V, scale = _validate_common(
        q, k, v, scale, initial_state, output_final_state, cu_seqlens, state_v_first,
        use_qk_l2norm_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval,
        use_gate_in_kernel, A_log, dt_bias)
    if use_gate_in_kernel and g is None:
        raise ValueError("`g` (raw pre-activation) must be provided when `use_gate_in_kernel=True`.")
    checks.check_optional("g", g, (B, T, HV), q.device)
    checks.check_optional("gk", gk, (B, T, HV, K), q.device)
    checks.check_optional("gv", gv, (B, T, HV, V), q.device)
    if beta is None:
        beta = v.new_ones(B, T, HV)
    check_beta(beta, B, T, HV, V, q.device, per_channel=True)
    use_cuda = backend.use_cuda("fused_recurrent_gated_delta_rule", q, K, V)
    q, k, g, beta = _preprocess(q, k, g, beta, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                                use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
                                use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
                                allow_neg_eigval=allow_neg_eigval, use_cuda=use_cuda)
    h0 = swap_state_layout(initial_state, state_v_first)
    if use_cuda:
        from .recurrent_cuda import fused_recurrent_cuda
        o, ht = fused_recurrent_cuda(q, k, v, g=g, gk=gk, gv=gv, beta=beta, delta=True, scale=scale,
                                     initial_state=h0, output_final_state=output_final_state,
                                     cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm_in_kernel)
    else:
        o, ht = delta_chunk_forward(q, k, v, beta, g, gk, gv, scale=scale, initial_state=h0,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return o, swap_state_layout(ht, state_v_first)
