"""The chunkwise scalar-gate CUDA kernels (simple GLA, linear attention, retention):
fake implementations, autograd, Python entry.

``fla_cuda::chunk_simple_gla_fwd`` / ``_bwd`` (csrc/chunk) run the tensor-core chunk pass:
the forward once, the backward three times (dq forward in time; dk, dv reversed), so no
per-chunk state is ever stored. The gate gradient comes from the identity

    dg_t = sum_{i >= t} <q_i, dq_i> - sum_{j >= t} <k_j, dk_j> + <ht, dht>

(every source j < t <= sink i pair carries g_t; ``reference/chunk_simple_gla.py``): the
passes emit the per-token dot products from their fp32 accumulators and a last kernel sums
them per sequence in fp64 (csrc/chunk/gate_grad.cu); the sink <ht, dht> is summed here.
"""
from __future__ import annotations

import torch

from .. import _extension
from .utils import LOG_GATE_MIN

HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)


def supports(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if the chunk kernels take these inputs, else why not."""
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (the chunk kernels take float16 or bfloat16)"
    K, V = q.shape[-1], v.shape[-1]
    if K not in HEAD_DIMS or V not in HEAD_DIMS:
        return f"head dims K={K}, V={V} (the chunk kernels take 64, 128 or 256)"
    return None


def chunk_offsets(cu_seqlens: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """First chunk of each packed sequence, [N + 1] int64 (on the device: no sync)."""
    counts = (cu_seqlens[1:] - cu_seqlens[:-1] + chunk - 1) // chunk
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def fwd_outputs_like(q, v, cu_seqlens, output_final_state):
    """Fake outputs of a chunk forward: o [B, T, H, V] in q's dtype, ht [N, H, K, V] fp32
    (empty unless output_final_state)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ht = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state \
        else q.new_empty(0, dtype=torch.float32)
    return q.new_empty(B, T, H, V), ht


if _extension.HAS_EXTENSION and hasattr(torch.ops.fla_cuda, "chunk_simple_gla_fwd"):

    @torch.library.register_fake("fla_cuda::chunk_simple_gla_fwd")
    def _fwd_fake(q, k, v, g, g_gamma, h0, cu_seqlens, scale, output_final_state):
        return fwd_outputs_like(q, v, cu_seqlens, output_final_state)

    @torch.library.register_fake("fla_cuda::chunk_simple_gla_bwd")
    def _bwd_fake(q, k, v, g, g_gamma, h0, cu_seqlens, chunk_offsets, do, dht, dg_sink, scale, need_dg, need_dh0):
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        f32 = dict(dtype=torch.float32)
        dg = q.new_empty(B, T, H, **f32) if need_dg else q.new_empty(0, **f32)
        dh0 = q.new_empty(N, H, K, V, **f32) if need_dh0 else q.new_empty(0, **f32)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg, dh0

    def _setup_context(ctx, inputs, output):
        q, k, v, g, g_gamma, h0, cu_seqlens, scale, output_final_state = inputs
        # outputs without a gradient arrive as None, not as zero tensors autograd would fill
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, g, g_gamma, h0, cu_seqlens, output[1])
        ctx.scale = scale

    def _backward(ctx, do, dht):
        q, k, v, g, g_gamma, h0, cu_seqlens, ht = ctx.saved_tensors
        if dht is not None and dht.numel() == 0:
            dht = None
        if do is None:  # only the final state was used
            do = torch.zeros_like(v)
        need_dg = (g is not None and ctx.needs_input_grad[3]) or (g_gamma is not None and ctx.needs_input_grad[4])
        need_dh0 = h0 is not None and ctx.needs_input_grad[5]
        # the final state is a sink after every step: <ht, dht> joins every dg_t of its sequence
        sink = (ht.double() * dht.double()).sum((-1, -2)).float() if need_dg and dht is not None else None
        dq, dk, dv, dgt, dh0 = torch.ops.fla_cuda.chunk_simple_gla_bwd(
            q, k, v, g, g_gamma, h0, cu_seqlens, None if cu_seqlens is None else chunk_offsets(cu_seqlens),
            do.contiguous(), None if dht is None else dht.float().contiguous(), sink, ctx.scale, need_dg,
            need_dh0)
        dg = dgamma = None
        if need_dg:
            if g is not None:
                dg = dgt   # 0 where the gate was clamped
            else:
                dgamma = torch.where(g_gamma < LOG_GATE_MIN, 0.0, dgt.sum((0, 1), dtype=torch.float64)).float()
        return dq, dk, dv, dg, dgamma, (dh0 if need_dh0 else None), None, None, None

    torch.library.register_autograd("fla_cuda::chunk_simple_gla_fwd", _backward, setup_context=_setup_context)


def chunk_simple_gla_cuda(q, k, v, *, g=None, g_gamma=None, scale: float, initial_state=None,
                          output_final_state=False, cu_seqlens=None):
    """Chunkwise simple GLA on the CUDA kernels. Inputs must already be validated and inside
    :func:`supports`. ``g`` [B, T, H] or ``g_gamma`` [H] log decays (or neither), any float
    dtype (read in fp32); states [N, H, K, V] fp32. Returns ``(o, ht or None)``."""
    dtype = q.dtype
    if cu_seqlens is not None and cu_seqlens.dtype != torch.int64:
        cu_seqlens = cu_seqlens.long()
    o, ht = torch.ops.fla_cuda.chunk_simple_gla_fwd(
        q.contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous(),
        None if g is None else g.float().contiguous(),
        None if g_gamma is None else g_gamma.float().contiguous(),
        None if initial_state is None else initial_state.float().contiguous(),
        None if cu_seqlens is None else cu_seqlens.contiguous(),
        float(scale), bool(output_final_state))
    return o, (ht if output_final_state else None)
