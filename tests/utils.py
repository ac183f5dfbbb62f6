"""Test helpers: FLA-style error measures and random inputs that never hide bugs."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rmse(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def err_ratio(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Relative RMS error ||out - ref||_rms / ||ref||_rms (FLA's get_err_ratio)."""
    ref, out = ref.double(), out.double()
    return rmse(out - ref) / max(rmse(ref), 1e-30)


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float, *, atol: float = 0.0) -> None:
    """FLA's assert_close: pass if the max abs error is tiny, else the relative RMS error must be <= ratio."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    diff = (out.double() - ref.double()).abs().max().item()
    if diff <= atol:
        return
    r = err_ratio(ref, out)
    assert r <= ratio, f"{name}: relative RMS error {r:.3e} > {ratio:.1e} (max abs diff {diff:.3e})"


def log_gate(*shape, dtype=torch.float32, device="cpu", divisor: float = 1.0) -> torch.Tensor:
    """Per-step log decays as models make them: logsigmoid of random data (never zeros)."""
    return F.logsigmoid(torch.randn(*shape, dtype=torch.float32, device=device)).div(divisor).to(dtype)


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def make_cu_seqlens(lengths, device="cpu") -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int64, device=device)


def grads(outputs, inputs, cotangents):
    """Gradients of sum(<output, cotangent>) w.r.t. inputs (None for inputs given as None)."""
    live = [x for x in inputs if x is not None and x.requires_grad]
    gs = torch.autograd.grad(outputs, live, cotangents, allow_unused=True)
    it = iter(gs)
    return [None if (x is None or not x.requires_grad) else next(it) for x in inputs]


def fake_recurrent_kernel(monkeypatch, op: str) -> list[dict]:
    """Send ``op`` (and no other op) down its CUDA branch, with the kernel module replaced by a
    fake that runs the fp64 oracle. Returns the list that records every call's g,
    initial_state ("h0"), reverse, cu_seqlens and any other keywords ("kw")."""
    import sys
    import types

    from fla_cuda import backend
    from fla_cuda.reference.recurrence import recurrence_reference

    calls = []

    def fake(q, k, v, *, g=None, scale, initial_state=None, output_final_state=False, reverse=False,
             cu_seqlens=None, **kw):
        calls.append(dict(g=g, h0=initial_state, reverse=reverse, cu_seqlens=cu_seqlens, kw=kw))
        o, ht = recurrence_reference(q, k, v, g=g, scale=scale, initial_state=initial_state,
                                     output_final_state=output_final_state, reverse=reverse,
                                     cu_seqlens=cu_seqlens)
        return o.to(q.dtype), (None if ht is None else ht.float())

    mod = types.ModuleType("fla_cuda.ops.recurrent_cuda")
    mod.fused_recurrent_cuda = fake
    monkeypatch.setitem(sys.modules, "fla_cuda.ops.recurrent_cuda", mod)
    monkeypatch.setattr(backend, "use_cuda", lambda name, *a: name == op)
    return calls
