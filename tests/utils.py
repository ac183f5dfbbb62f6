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


# --- the wgmma chunk pass against the SM80 pass (tests/test_chunk_sm90.py, test_gla_sm90.py)

def sm90_or_skip():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        import pytest
        pytest.skip("the wgmma pass runs on sm_90 only")


def wgmma_and_sm80(run_pair, x, monkeypatch, **kw):
    """(wgmma pass, SM80 pass, fp64 reference) results of run_pair on the same inputs:
    FLA_CUDA_CHUNK_SM90=0 selects the SM80 pass."""
    monkeypatch.delenv("FLA_CUDA_CHUNK_SM90", raising=False)
    new, ref = run_pair(x, **kw)
    monkeypatch.setenv("FLA_CUDA_CHUNK_SM90", "0")
    old, _ = run_pair(x, **kw)
    monkeypatch.delenv("FLA_CUDA_CHUNK_SM90")
    return new, old, ref


def assert_no_worse_than_sm80(new, old, ref, floor: float) -> None:
    """Every output of the wgmma pass finite and within 1.25x the SM80 pass's error (+ floor)."""
    for n in ref:
        e_new, e_old = err_ratio(ref[n], new[n]), err_ratio(ref[n], old[n])
        assert torch.isfinite(new[n]).all(), n
        assert e_new <= 1.25 * e_old + floor, f"{n}: wgmma pass {e_new:.3e}, SM80 pass {e_old:.3e}"


def cuda_kernel_names(fn) -> set:
    """Names of the CUDA kernels fn launches (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
