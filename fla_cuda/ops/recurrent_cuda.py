"""The generic fused recurrent CUDA kernel: fake implementations, autograd, Python entry.

Every family's ``fused_recurrent_*`` runs on the one C++ op pair
``fla_cuda::recurrent_fwd`` / ``recurrent_bwd`` (csrc/recurrent), which computes
``fla_cuda.reference.recurrence.recurrence_reference`` with any combination of the gates
g / gk / gv, the delta rule (beta) and the low-rank term (a, b).
The forward saves the state every 16 steps when a gradient will be needed; the backward
replays each 16-step segment from its checkpoint. The kernel writes K-vector gradients as
per-value-tile partials; they are summed here (torch.sum: fixed order, deterministic).
"""
from __future__ import annotations

import torch

from .. import _extension

CKPT = 16      # must match kRecurrentCkpt in csrc/recurrent/recurrent.h
BV = 32        # must match kRecurrentBV


def _num_tiles(V: int) -> int:
    return (V + BV - 1) // BV


if _extension.HAS_EXTENSION and hasattr(torch.ops.fla_cuda, "recurrent_fwd"):

    @torch.library.register_fake("fla_cuda::recurrent_fwd")
    def _recurrent_fwd_fake(q, k, v, g, gk, gv, beta, a, b, h0, cu_seqlens, scale, reverse, delta,
                            l2norm_qk, output_final_state, save_checkpoints):
        B, T, H, K = q.shape
        HV, V = v.shape[2], v.shape[3]
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        f32 = dict(dtype=torch.float32)
        o = q.new_empty(B, T, HV, V)
        ht = q.new_empty(N, HV, K, V, **f32) if output_final_state else q.new_empty(0, **f32)
        slots = B * T // CKPT + N + 1
        ckpt = q.new_empty(slots, HV, K, V, **f32) if save_checkpoints else q.new_empty(0, **f32)
        return o, ht, ckpt

    @torch.library.register_fake("fla_cuda::recurrent_bwd")
    def _recurrent_bwd_fake(q, k, v, g, gk, gv, beta, a, b, cu_seqlens, checkpoints, do, dht, scale,
                            reverse, delta, l2norm_qk, need_dh0):
        B, T, H, K = q.shape
        HV, V = v.shape[2], v.shape[3]
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        NV = _num_tiles(V)
        f32 = dict(dtype=torch.float32)
        none = q.new_empty(0, **f32)
        part_k = q.new_empty(NV, B * T, HV, K, **f32)
        dq, dk = part_k, q.new_empty(NV, B * T, HV, K, **f32)
        dv = q.new_empty(B, T, HV, V, **f32)
        dg = q.new_empty(NV, B * T, HV, **f32) if g is not None else none
        dgk = q.new_empty(NV, B * T, HV, K, **f32) if gk is not None else none
        dgv = q.new_empty(B, T, HV, V, **f32) if gv is not None else none
        if not delta:
            dbeta = none
        elif beta.dim() == 4:
            dbeta = q.new_empty(B, T, HV, V, **f32)
        else:
            dbeta = q.new_empty(NV, B * T, HV, **f32)
        da = q.new_empty(NV, B * T, HV, K, **f32) if a is not None else none
        db = q.new_empty(NV, B * T, HV, K, **f32) if a is not None else none
        dh0 = q.new_empty(N, HV, K, V, **f32) if need_dh0 else none
        return dq, dk, dv, dg, dgk, dgv, dbeta, da, db, dh0

    def _setup_context(ctx, inputs, output):
        (q, k, v, g, gk, gv, beta, a, b, h0, cu_seqlens, scale, reverse, delta, l2norm_qk, _, _) = inputs
        # outputs without a gradient arrive as None, not as zero tensors autograd would fill
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, g, gk, gv, beta, a, b, h0, cu_seqlens, output[2])
        ctx.scale, ctx.reverse, ctx.delta, ctx.l2norm_qk = scale, reverse, delta, l2norm_qk
        ctx.mark_non_differentiable(output[2])

    def _l2norm_backward(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """y = x * r, r = (|x|^2 + 1e-6)^-1/2  ->  dx = r (dy - y <y, dy>), in fp32."""
        x = x.float()
        r = torch.rsqrt(x.square().sum(-1, keepdim=True) + 1e-6)
        y = x * r
        return r * (dy - y * (y * dy).sum(-1, keepdim=True))

    def _fold_heads(x: torch.Tensor, B: int, T: int, heads: int) -> torch.Tensor:
        """[NV, B*T, HV, D] per-tile partials -> [B, T, heads, D] (sum tiles, then value-head groups)."""
        x = x.sum(0)
        HV = x.shape[1]
        x = x.view(B, T, HV, *x.shape[2:])
        if heads != HV:
            x = x.view(B, T, heads, HV // heads, *x.shape[3:]).sum(3)
        return x

    def _backward(ctx, do, dht, _dckpt):
        q, k, v, g, gk, gv, beta, a, b, h0, cu_seqlens, ckpt = ctx.saved_tensors
        B, T, H, K = q.shape
        if dht is not None and dht.numel() == 0:
            dht = None
        if do is None:  # only the final state was used
            do = torch.zeros_like(v)
        need_dh0 = h0 is not None and ctx.needs_input_grad[9]
        (dq, dk, dv, dg, dgk, dgv, dbeta, da, db, dh0) = torch.ops.fla_cuda.recurrent_bwd(
            q, k, v, g, gk, gv, beta, a, b, cu_seqlens, ckpt, do.contiguous(),
            None if dht is None else dht.float().contiguous(),
            ctx.scale, ctx.reverse, ctx.delta, ctx.l2norm_qk, need_dh0)
        dq, dk = _fold_heads(dq, B, T, H), _fold_heads(dk, B, T, H)
        if ctx.l2norm_qk:  # the kernel differentiated w.r.t. the normalised q, k
            dq, dk = _l2norm_backward(q, dq), _l2norm_backward(k, dk)
        dq, dk = dq.to(q.dtype), dk.to(k.dtype)
        dv = dv.to(v.dtype)
        dg = _fold_heads(dg, B, T, dg.shape[-1]) if g is not None else None
        dgk = _fold_heads(dgk, B, T, gk.shape[2]) if gk is not None else None
        dgv = dgv if gv is not None else None
        if beta is None:
            dbeta = None
        elif beta.dim() == 3:
            dbeta = _fold_heads(dbeta, B, T, beta.shape[2]).to(beta.dtype)
        else:
            dbeta = dbeta.to(beta.dtype)
        da = _fold_heads(da, B, T, H).to(a.dtype) if a is not None else None
        db = _fold_heads(db, B, T, H).to(b.dtype) if b is not None else None
        dh0 = dh0 if need_dh0 else None
        return (dq, dk, dv, dg, dgk, dgv, dbeta, da, db, dh0, None, None, None, None, None, None, None)

    torch.library.register_autograd("fla_cuda::recurrent_fwd", _backward, setup_context=_setup_context)


def _f32(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.float().contiguous()


def _same(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype).contiguous()


def fused_recurrent_cuda(q, k, v, *, g=None, gk=None, gv=None, beta=None, a=None, b=None, delta=False,
                         scale, initial_state=None, output_final_state=False, reverse=False, cu_seqlens=None,
                         use_qk_l2norm=False):
    """Run the generic recurrence on the CUDA kernel. Inputs must already be validated.

    Same arguments as ``recurrence_reference``; returns ``(o, ht)`` with ``ht`` None unless
    ``output_final_state``. Differentiable in every tensor input. ``use_qk_l2norm``
    normalises q and k inside the kernel, in fp32 (FLA's ``use_qk_l2norm_in_kernel``).
    """
    dtype = q.dtype
    tensors = (q, k, v, g, gk, gv, beta, a, b, initial_state)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if cu_seqlens is not None and cu_seqlens.dtype != torch.int64:
        cu_seqlens = cu_seqlens.long()
    o, ht, _ = torch.ops.fla_cuda.recurrent_fwd(
        q.contiguous(), _same(k, dtype), _same(v, dtype), _f32(g), _f32(gk), _f32(gv),
        # beta is read in q's dtype as is (no cast kernel in the decode step), else as fp32
        None if beta is None else (beta.contiguous() if beta.dtype == dtype else _f32(beta)),
        _same(a, dtype), _same(b, dtype), _f32(initial_state),
        None if cu_seqlens is None else cu_seqlens.contiguous(),
        float(scale), bool(reverse), bool(delta), bool(use_qk_l2norm), bool(output_final_state),
        bool(needs_grad))
    return o, (ht if output_final_state else None)
