"""The chunkwise GLA CUDA forward (csrc/chunk/gla.h): fake implementation, autograd, entry.

``fla_cuda::chunk_gla_fwd`` runs two kernels: ``gla_intra`` (the chunk's gated scores on
tensor cores, with q and k folded per 16-row sub-chunk, plus the gated q and k) and the
scalar-gate chunk pass in its GLA mode (inter-chunk state on tensor cores).

The backward has no kernel yet: the gradient is that of the exact chunkwise PyTorch path
(``gla_chunk_torch`` in fp32), recomputed from the saved inputs. ``backend.describe``
reports this.
"""
from __future__ import annotations

import torch

from .. import _extension
from .chunk_cuda import chunk_offsets, fwd_outputs_like


if _extension.HAS_EXTENSION and hasattr(torch.ops.fla_cuda, "chunk_gla_fwd"):

    @torch.library.register_fake("fla_cuda::chunk_gla_fwd")
    def _fwd_fake(q, k, v, g, h0, cu_seqlens, offsets, scale, output_final_state):
        return fwd_outputs_like(q, v, cu_seqlens, output_final_state)

    def _setup_context(ctx, inputs, output):
        q, k, v, g, h0, cu_seqlens, offsets, scale, output_final_state = inputs
        ctx.save_for_backward(q, k, v, g, h0, cu_seqlens)
        ctx.scale = scale

    def _backward(ctx, do, dht):
        from .gla import gla_chunk_torch
        q, k, v, g, h0, cu_seqlens = ctx.saved_tensors
        want = list(ctx.needs_input_grad[:5])
        leaves = [None if t is None else t.detach().requires_grad_(w) for t, w in zip((q, k, v, g, h0), want)]
        with torch.enable_grad():
            o, ht = gla_chunk_torch(leaves[0], leaves[1], leaves[2], leaves[3], None, scale=ctx.scale,
                                    initial_state=leaves[4], output_final_state=True, cu_seqlens=cu_seqlens)
            outs, cots = [o], [torch.zeros_like(o) if do is None else do]
            if dht is not None and dht.numel() > 0:
                outs.append(ht)
                cots.append(dht)
            inputs = [t for t, w in zip(leaves, want) if t is not None and w]
            grads = iter(torch.autograd.grad(outs, inputs, cots, allow_unused=True)) if inputs else iter(())
        out = [next(grads) if (t is not None and w) else None for t, w in zip(leaves, want)]
        return (*out, None, None, None, None)

    torch.library.register_autograd("fla_cuda::chunk_gla_fwd", _backward, setup_context=_setup_context)


def chunk_gla_cuda(q, k, v, g, *, scale: float, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Chunkwise GLA forward on the CUDA kernels. Inputs must already be validated and inside
    the kernel's envelope (fp16/bf16, K and V in 64/128/256). ``g`` [B, T, H, K] log decays in
    fp32 or the input dtype; states [N, H, K, V] fp32. Returns ``(o, ht or None)``."""
    dtype = q.dtype
    if cu_seqlens is not None and cu_seqlens.dtype != torch.int64:
        cu_seqlens = cu_seqlens.long()
    if g.dtype not in (torch.float32, dtype):
        g = g.float()
    o, ht = torch.ops.fla_cuda.chunk_gla_fwd(
        q.contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous(), g.contiguous(),
        None if initial_state is None else initial_state.float().contiguous(),
        None if cu_seqlens is None else cu_seqlens.contiguous(),
        None if cu_seqlens is None else chunk_offsets(cu_seqlens),
        float(scale), bool(output_final_state))
    return o, (ht if output_final_state else None)
