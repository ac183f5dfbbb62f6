"""Linear-attention normalisation on CUDA (``normalize=True``): fake implementations,
autograd and the Python entry of ``fla_cuda::linear_attn_normalize_fwd`` / ``_bwd``
(csrc/normalize).

    o_t = o_raw_t / (scale <q_t, z0 + sum_{s <= t} k_s> + 1e-10)

The running key sum is a chunked scan in fp32 (chunk totals, a per-sequence scan of the
totals, a pass per chunk), forward and backward, with no [B, T, H, K] temporaries: the
PyTorch composition took ~0.95 ms of the 1.2 ms forward at B=4, T=4096, H=16, K=V=128.

``fla_cuda::linear_attn_normalized_fwd`` / ``_bwd`` are chunk_linear_attn(normalize=True)
in one op where the chunk kernels take the inputs: the normaliser first (it needs only q
and k), then the chunk pass stores o divided by it (o_raw never goes to memory); the
backward adds the normaliser's dq, dk onto the chunk pass's in place.
"""
from __future__ import annotations

import torch

from .. import _extension, backend
from .chunk_cuda import chunk_offsets, fwd_outputs_like

CHUNK = 64          # tokens per scan chunk (kNormChunk in csrc/normalize/normalize.h)
MAX_DIM = 256       # K, V <= kNormThreads (one key channel per thread)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _chunks(B: int, T: int, N: int, packed: bool) -> int:
    """Rows of the per-chunk carry buffer (the grid of the kernels); as normalize_api.cpp."""
    per_seq = (T + CHUNK - 1) // CHUNK
    return per_seq + N if packed else per_seq * B


def _chunk_offsets(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """First chunk of each packed sequence, [N + 1] int64 (on the device: no sync)."""
    return chunk_offsets(cu_seqlens, CHUNK)


def supports(q: torch.Tensor, v: torch.Tensor, reverse: bool) -> bool:
    """Whether the fused normalisation runs for these inputs (else the PyTorch composition)."""
    return (q.is_cuda and not reverse and q.dtype in DTYPES and q.shape[-1] <= MAX_DIM and v.shape[-1] <= MAX_DIM
            and not backend.forced_torch() and _extension.HAS_EXTENSION
            and hasattr(torch.ops.fla_cuda, "linear_attn_normalize_fwd")
            and _extension.cuda_arch_supported(q.device))


if _extension.HAS_EXTENSION and hasattr(torch.ops.fla_cuda, "linear_attn_normalize_fwd"):

    @torch.library.register_fake("fla_cuda::linear_attn_normalize_fwd")
    def _fwd_fake(o_raw, q, k, z0, cu_seqlens, chunk_offsets, scale):
        B, T, H, K = q.shape
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        f32 = dict(dtype=torch.float32)
        return (torch.empty_like(o_raw), q.new_empty(N, H, K, **f32), q.new_empty(B, T, H, **f32),
                q.new_empty(_chunks(B, T, N, cu_seqlens is not None), H, K, **f32))

    @torch.library.register_fake("fla_cuda::linear_attn_normalize_bwd")
    def _bwd_fake(o_raw, q, k, den, k_carry, do, dz_final, cu_seqlens, chunk_offsets, scale):
        B, T, H, K = q.shape
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        return (torch.empty_like(o_raw), torch.empty_like(q), torch.empty_like(k),
                q.new_empty(N, H, K, dtype=torch.float32))

    def _setup_context(ctx, inputs, output):
        o_raw, q, k, z0, cu_seqlens, chunk_offsets, scale = inputs
        # outputs without a gradient arrive as None, not as zero tensors autograd would fill
        ctx.set_materialize_grads(False)
        _, _, den, k_carry = output
        ctx.save_for_backward(o_raw, q, k, den, k_carry, cu_seqlens, chunk_offsets)
        ctx.scale = scale

    def _backward(ctx, do, dz_final, _dden, _dcarry):
        o_raw, q, k, den, k_carry, cu_seqlens, chunk_offsets = ctx.saved_tensors
        if do is None:  # only the key-sum state was used
            do = torch.zeros_like(o_raw)
        do_raw, dq, dk, dz0 = torch.ops.fla_cuda.linear_attn_normalize_bwd(
            o_raw, q, k, den, k_carry, do.to(o_raw.dtype).contiguous(),
            None if dz_final is None else dz_final.float().contiguous(), cu_seqlens, chunk_offsets, ctx.scale)
        return do_raw, dq, dk, (dz0 if ctx.needs_input_grad[3] else None), None, None, None

    torch.library.register_autograd("fla_cuda::linear_attn_normalize_fwd", _backward,
                                    setup_context=_setup_context)

if _extension.HAS_EXTENSION and hasattr(torch.ops.fla_cuda, "linear_attn_normalized_fwd"):

    @torch.library.register_fake("fla_cuda::linear_attn_normalized_fwd")
    def _fused_fwd_fake(q, k, v, h0, z0, cu_seqlens, chunk_offsets, scale, output_final_state):
        B, T, H, K = q.shape
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        f32 = dict(dtype=torch.float32)
        o, ht = fwd_outputs_like(q, v, cu_seqlens, output_final_state)   # the chunk pass's outputs
        return (o, ht, q.new_empty(N, H, K, **f32), q.new_empty(B, T, H, **f32),
                q.new_empty(_chunks(B, T, N, cu_seqlens is not None), H, K, **f32))

    @torch.library.register_fake("fla_cuda::linear_attn_normalized_bwd")
    def _fused_bwd_fake(q, k, v, h0, cu_seqlens, chunk_offsets, o, den, k_carry, do, dht, dz_final, scale,
                        need_dh0):
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        f32 = dict(dtype=torch.float32)
        dh0 = q.new_empty(N, H, K, V, **f32) if need_dh0 else q.new_empty(0, **f32)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dh0, q.new_empty(N, H, K, **f32)

    def _fused_setup_context(ctx, inputs, output):
        q, k, v, h0, z0, cu_seqlens, chunk_offsets, scale, output_final_state = inputs
        o, _, _, den, k_carry = output
        # outputs without a gradient arrive as None, not as zero tensors autograd would fill
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(den, k_carry)
        ctx.save_for_backward(q, k, v, h0, cu_seqlens, chunk_offsets, o, den, k_carry)
        ctx.scale = scale

    def _fused_backward(ctx, do, dht, dz_final, _dden, _dcarry):
        q, k, v, h0, cu_seqlens, chunk_offsets, o, den, k_carry = ctx.saved_tensors
        if dht is not None and dht.numel() == 0:
            dht = None
        if do is None:  # only the states were used
            do = torch.zeros_like(o)
        need_dh0 = h0 is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dh0, dz0 = torch.ops.fla_cuda.linear_attn_normalized_bwd(
            q, k, v, h0, cu_seqlens, chunk_offsets, o, den, k_carry, do.to(o.dtype).contiguous(),
            None if dht is None else dht.float().contiguous(),
            None if dz_final is None else dz_final.float().contiguous(), ctx.scale, need_dh0)
        return (dq, dk, dv, dh0 if need_dh0 else None, dz0 if ctx.needs_input_grad[4] else None,
                None, None, None, None)

    torch.library.register_autograd("fla_cuda::linear_attn_normalized_fwd", _fused_backward,
                                    setup_context=_fused_setup_context)


def _sequence_args(cu_seqlens: torch.Tensor | None, z_init: torch.Tensor | None):
    """cu_seqlens as int64, its chunk offsets, and z_init [N, 1, H, K] as the ops' z0 [N, H, K]."""
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.long().contiguous()
    offsets = None if cu_seqlens is None else _chunk_offsets(cu_seqlens)
    z0 = None if z_init is None else z_init.float().squeeze(1).contiguous()
    return cu_seqlens, offsets, z0


def normalize_cuda(o_raw: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float,
                   z_init: torch.Tensor | None, cu_seqlens: torch.Tensor | None):
    """o_raw [B, T, H, V] (q's dtype) divided by the running-key-sum normaliser, as
    ``linear_attn.normalize_with_z_state`` (forward direction). z_init [N, 1, H, K] or None.
    Returns (o in q's dtype, z_state [N, 1, H, K] fp32). Differentiable in o_raw, q, k, z_init."""
    cu_seqlens, offsets, z0 = _sequence_args(cu_seqlens, z_init)
    o, z, _, _ = torch.ops.fla_cuda.linear_attn_normalize_fwd(
        o_raw.to(q.dtype).contiguous(), q.contiguous(), k.to(q.dtype).contiguous(), z0, cu_seqlens, offsets,
        float(scale))
    return o, z.unsqueeze(1)


def linear_attn_normalized_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                                h0: torch.Tensor | None, z_init: torch.Tensor | None, output_final_state: bool,
                                cu_seqlens: torch.Tensor | None):
    """chunk_linear_attn(normalize=True) in one CUDA op, for inputs the chunk kernels take
    (validated by the caller). h0 [N, H, K, V], z_init [N, 1, H, K] or None. Returns
    (o in q's dtype, ht [N, H, K, V] fp32 or None, z_state [N, 1, H, K] fp32)."""
    cu_seqlens, offsets, z0 = _sequence_args(cu_seqlens, z_init)
    dtype = q.dtype
    o, ht, z, _, _ = torch.ops.fla_cuda.linear_attn_normalized_fwd(
        q.contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous(),
        None if h0 is None else h0.float().contiguous(), z0, cu_seqlens, offsets, float(scale),
        bool(output_final_state))
    return o, (ht if output_final_state else None), z.unsqueeze(1)
