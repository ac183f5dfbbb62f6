"""The chunkwise GLA CUDA kernels (csrc/chunk/gla.h): fake implementations, autograd, entry.

``fla_cuda::chunk_gla_fwd`` runs two kernels: ``gla_intra`` (the chunk's gated scores on
tensor cores, with q and k folded per 16-row sub-chunk, plus the gated q and k) and the
scalar-gate chunk pass in its GLA mode (inter-chunk state on tensor cores). It also returns
those intermediates (q~, k~, A with its low part A_lo, per-chunk key decays), which autograd
saves.

``fla_cuda::chunk_gla_bwd`` runs the pass three times (dv and dh0 with (A_hi + A_lo)^T: the
intra-chunk part of dv to about 16 bits, as FLA keeps it in fp32; chunks walked
in reverse; the ungated inter-chunk parts of dq and of dk on transposed states, the forward
walk also storing its state after each chunk) and ``gla_bwd_intra`` (dq, dk with the
intra-chunk scores' gradient, and dg). The gate gradient per key channel

    dgk_t = sum_{s >= t} (q_s dq_s - k_s dk_s) + rowsum(ht * dht)

is that sum to the end of t's chunk plus rowsum(h * dL/dh) at the chunk's end (gla.h).
"""
from __future__ import annotations

import torch

from .. import _extension
from .chunk_cuda import chunk_offsets, fwd_outputs_like

CHUNK = 64


if _extension.HAS_EXTENSION and hasattr(torch.ops.fla_cuda, "chunk_gla_fwd"):

    @torch.library.register_fake("fla_cuda::chunk_gla_fwd")
    def _fwd_fake(q, k, v, g, h0, cu_seqlens, offsets, scale, output_final_state, for_backward):
        o, ht = fwd_outputs_like(q, v, cu_seqlens, output_final_state)
        B, T, H, K = q.shape
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        chunks = (T + CHUNK - 1) // CHUNK
        slots = B * chunks if cu_seqlens is None else chunks + N
        A_lo = q.new_empty(B, T, H, CHUNK) if for_backward else q.new_empty(0)
        return (o, ht, torch.empty_like(q), torch.empty_like(q), q.new_empty(B, T, H, CHUNK), A_lo,
                q.new_empty(slots, H, K, dtype=torch.float32))

    @torch.library.register_fake("fla_cuda::chunk_gla_bwd")
    def _bwd_fake(q, k, v, g, h0, cu_seqlens, offsets, q_gated, k_gated, A, A_lo, key_decay, do, dht, scale,
                  need_dh0):
        f32 = dict(dtype=torch.float32)
        N, H, K = (q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1), q.shape[2], q.shape[3]
        dh0 = q.new_empty(N, H, K, v.shape[-1], **f32) if need_dh0 else q.new_empty(0, **f32)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g), dh0

    def _setup_context(ctx, inputs, output):
        q, k, v, g, h0, cu_seqlens, offsets, scale, output_final_state, _for_backward = inputs
        # outputs without a gradient arrive as None, not as zero tensors autograd would fill
        ctx.set_materialize_grads(False)
        o, ht, q_gated, k_gated, A, A_lo, key_decay = output
        ctx.save_for_backward(q, k, v, g, h0, cu_seqlens, offsets, q_gated, k_gated, A, A_lo, key_decay)
        ctx.mark_non_differentiable(q_gated, k_gated, A, A_lo, key_decay)
        ctx.scale = scale

    def _backward(ctx, do, dht, *_intermediates):
        q, k, v, g, h0, cu_seqlens, offsets, q_gated, k_gated, A, A_lo, key_decay = ctx.saved_tensors
        if dht is not None and dht.numel() == 0:
            dht = None
        if do is None:  # only the final state was used
            do = torch.zeros_like(v)
        need_dh0 = h0 is not None and ctx.needs_input_grad[4]
        dq, dk, dv, dg, dh0 = torch.ops.fla_cuda.chunk_gla_bwd(
            q, k, v, g, h0, cu_seqlens, offsets, q_gated, k_gated, A, A_lo, key_decay, do.contiguous(),
            None if dht is None else dht.float().contiguous(), ctx.scale, need_dh0)
        return dq, dk, dv, dg, (dh0 if need_dh0 else None), None, None, None, None, None

    torch.library.register_autograd("fla_cuda::chunk_gla_fwd", _backward, setup_context=_setup_context)


def chunk_gla_cuda(q, k, v, g, *, scale: float, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Chunkwise GLA on the CUDA kernels (forward and backward). Inputs must already be validated and inside
    the kernel's envelope (fp16/bf16, K and V in 64/128/256). ``g`` [B, T, H, K] log decays in
    fp32 or the input dtype; states [N, H, K, V] fp32. Returns ``(o, ht or None)``."""
    dtype = q.dtype
    if cu_seqlens is not None and cu_seqlens.dtype != torch.int64:
        cu_seqlens = cu_seqlens.long()
    if g.dtype not in (torch.float32, dtype):
        g = g.float()
    # A_lo (the backward's dv) only when autograd will record this call
    for_backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, initial_state))
    o, ht, *_ = torch.ops.fla_cuda.chunk_gla_fwd(
        q.contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous(), g.contiguous(),
        None if initial_state is None else initial_state.float().contiguous(),
        None if cu_seqlens is None else cu_seqlens.contiguous(),
        None if cu_seqlens is None else chunk_offsets(cu_seqlens),
        float(scale), bool(output_final_state), for_backward)
    return o, (ht if output_final_state else None)
