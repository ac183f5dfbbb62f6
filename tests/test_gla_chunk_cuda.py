"""The chunkwise GLA CUDA forward (csrc/chunk/gla.h: gla_intra + the chunk pass in GLA mode)
against the fp64 chunkwise PyTorch path (itself checked against the step-by-step oracle on
the CPU): outputs and final states over odd lengths, packed sequences with an empty one,
states in and out, head dims, dtypes, gate dtypes and strengths (logsigmoid(randn) as it is,
/16, hard resets at -1e4 and -inf), and no worse than FLA's chunk_gla on the same inputs.
The gradient is the PyTorch path's (no backward kernel yet); one test checks it flows.
GPU only (skips elsewhere).
"""
import pytest
import torch
import torch.nn.functional as F

import fla_cuda
from fla_cuda import backend
from fla_cuda.ops.gla import gla_chunk_torch
from tests.utils import assert_close, err_ratio, make_cu_seqlens

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 4e-3}


def make_inputs(B, T, H, K, V, dtype, divisor=1.0, N=None, g_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    N = N or B
    return dict(q=torch.randn(B, T, H, K, device="cuda").to(dtype),
                k=torch.randn(B, T, H, K, device="cuda").to(dtype),
                v=torch.randn(B, T, H, V, device="cuda").to(dtype),
                g=(F.logsigmoid(torch.randn(B, T, H, K, device="cuda")) / divisor).to(g_dtype),
                h0=torch.randn(N, H, K, V, device="cuda"))


def run_pair(x, *, cu_seqlens=None, scale=None):
    """(ours, fp64 reference) dicts of o and ht."""
    from fla_cuda.ops.gla_cuda import chunk_gla_cuda
    scale = x["q"].shape[-1] ** -0.5 if scale is None else scale
    o, ht = chunk_gla_cuda(x["q"], x["k"], x["v"], x["g"], scale=scale, initial_state=x["h0"],
                           output_final_state=True, cu_seqlens=cu_seqlens)
    d = {n: t.double() for n, t in x.items()}
    ro, rht = gla_chunk_torch(d["q"], d["k"], d["v"], d["g"], None, scale=scale, initial_state=d["h0"],
                              output_final_state=True, cu_seqlens=cu_seqlens)
    return {"o": o, "ht": ht}, {"o": ro, "ht": rht}


def check(ours, ref, tol):
    for n in ref:
        assert torch.isfinite(ours[n]).all(), f"{n} has non-finite values"
        assert_close(n, ref[n], ours[n], tol)


@pytest.mark.parametrize("divisor", [1.0, 16.0])
@pytest.mark.parametrize("T", [1, 63, 64, 500, 2049])
def test_lengths_and_gate_strengths(T, divisor):
    x = make_inputs(2, T, 2, 64, 64, torch.bfloat16, divisor)
    check(*run_pair(x), TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,V", [(64, 64), (128, 128), (256, 256), (64, 256), (256, 64), (128, 64)])
def test_head_dims_and_dtypes(K, V, dtype):
    x = make_inputs(2, 300, 3, K, V, dtype)
    check(*run_pair(x), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gate_in_input_dtype(dtype):
    x = make_inputs(1, 200, 2, 128, 128, dtype, g_dtype=dtype)
    check(*run_pair(x), TOL[dtype])


def test_fp16_weak_gates_take_the_folded_diagonal():
    """fp16 folds a sub-chunk's diagonal block only while its gate sum stays above -5.5
    (2^8 growth); weaker gates take the tensor-core diagonal, stronger ones the exact path."""
    x = make_inputs(2, 500, 2, 128, 128, torch.float16, divisor=16.0)
    check(*run_pair(x), TOL[torch.float16])


def test_varlen_with_empty_sequence():
    cu = make_cu_seqlens([100, 0, 257, 64, 1], device="cuda")
    x = make_inputs(1, int(cu[-1]), 2, 128, 64, torch.bfloat16, N=5)
    check(*run_pair(x, cu_seqlens=cu), TOL[torch.bfloat16])


def test_no_initial_state_and_scale():
    from fla_cuda.ops.gla_cuda import chunk_gla_cuda
    x = make_inputs(2, 130, 2, 64, 128, torch.bfloat16)
    o, ht = chunk_gla_cuda(x["q"], x["k"], x["v"], x["g"], scale=0.3)
    assert ht is None
    d = {n: t.double() for n, t in x.items()}
    ro, _ = gla_chunk_torch(d["q"], d["k"], d["v"], d["g"], None, scale=0.3)
    assert_close("o", ro, o, TOL[torch.bfloat16])


@pytest.mark.parametrize("fill", [-1e4, float("-inf")])
def test_strong_gates_finite(fill):
    x = make_inputs(1, 300, 2, 64, 64, torch.bfloat16)
    x["g"][:, 100:103] = fill        # a hard reset in the middle of a chunk
    x["g"][:, 192, :, ::3] = fill    # and on some channels at a chunk boundary
    check(*run_pair(x), TOL[torch.bfloat16])


def test_forward_deterministic():
    from fla_cuda.ops.gla_cuda import chunk_gla_cuda
    x = make_inputs(2, 1000, 4, 128, 128, torch.bfloat16)
    a = chunk_gla_cuda(x["q"], x["k"], x["v"], x["g"], scale=0.1, initial_state=x["h0"], output_final_state=True)
    b = chunk_gla_cuda(x["q"], x["k"], x["v"], x["g"], scale=0.1, initial_state=x["h0"], output_final_state=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("divisor", [1.0, 16.0])
def test_no_worse_than_fla(divisor):
    """FLA's chunk_gla on the same inputs is the bar for the forward (x1.25)."""
    fla_ops = pytest.importorskip("fla.ops")
    x = make_inputs(2, 1000, 4, 128, 128, torch.bfloat16, divisor)
    args = (x["q"], x["k"], x["v"], x["g"])
    ours = fla_cuda.chunk_gla(*args, initial_state=x["h0"], output_final_state=True)
    theirs = fla_ops.chunk_gla(*args, initial_state=x["h0"], output_final_state=True)
    ref = fla_cuda.chunk_gla(*(t.double() for t in args), initial_state=x["h0"].double(), output_final_state=True)
    for name, r, o, t in zip(("o", "ht"), ref, ours, theirs):
        e_ours, e_fla = err_ratio(r, o), err_ratio(r, t)
        print(f"{name}: ours {e_ours:.3e}  FLA {e_fla:.3e}")
        assert e_ours <= 1.25 * e_fla + 1e-6, f"{name}: ours {e_ours:.2e} vs FLA {e_fla:.2e}"


def test_public_op_runs_the_kernel_and_its_gradient_flows(monkeypatch):
    monkeypatch.delenv("FLA_CUDA_BACKEND", raising=False)
    x = make_inputs(2, 150, 2, 64, 64, torch.bfloat16)
    assert backend.use_cuda("chunk_gla", x["q"], 64, 64)
    import fla_cuda.ops.gla_cuda as gla_cuda
    called = []
    real = gla_cuda.chunk_gla_cuda

    def spy(*a, **kw):
        called.append(True)
        return real(*a, **kw)
    monkeypatch.setattr(gla_cuda, "chunk_gla_cuda", spy)

    def run(cast):
        leaves = {n: cast(t).detach().requires_grad_() for n, t in x.items()}
        o, ht = fla_cuda.chunk_gla(leaves["q"], leaves["k"], leaves["v"], leaves["g"], initial_state=leaves["h0"],
                                   output_final_state=True)
        loss = o.double().square().sum() + ht.double().square().sum()
        return [o, ht, *torch.autograd.grad(loss, list(leaves.values()))]

    ours = run(lambda t: t)
    assert called, "chunk_gla did not run the CUDA kernel"
    ref = run(lambda t: t.double())
    for name, r, o in zip(("o", "ht", "dq", "dk", "dv", "dg", "dh0"), ref, ours):
        assert_close(name, r, o, 2e-2)


def test_torch_compile_fullgraph_and_opcheck():
    from fla_cuda.ops.gla_cuda import chunk_gla_cuda
    x = make_inputs(2, 100, 2, 64, 64, torch.bfloat16)

    def f(q, k, v, g, h0):
        return chunk_gla_cuda(q, k, v, g, scale=0.125, initial_state=h0, output_final_state=True)

    args = [x[n] for n in ("q", "k", "v", "g", "h0")]
    with torch.no_grad():
        oc, hc = torch.compile(f, fullgraph=True)(*args)
        oe, he = f(*args)
    assert torch.equal(oc, oe) and torch.equal(hc, he)
    torch.library.opcheck(torch.ops.fla_cuda.chunk_gla_fwd.default,
                          (x["q"], x["k"], x["v"], x["g"], x["h0"], None, None, 0.125, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("H,divisor", [(2, 1.0), (3, 16.0)])
def test_long_sequence_split_into_segments(H, divisor):
    """B=1 and few heads: the walk splits into segments (state-only launch, then folded in
    order with per-key decays); the recurrent kernel gives the same answer."""
    from fla_cuda.ops.gla_cuda import chunk_gla_cuda
    from fla_cuda.ops.recurrent_cuda import fused_recurrent_cuda
    x = make_inputs(1, 20000, H, 128, 128, torch.bfloat16, divisor)
    o, ht = chunk_gla_cuda(x["q"], x["k"], x["v"], x["g"], scale=0.1, initial_state=x["h0"], output_final_state=True)
    ro, rht = fused_recurrent_cuda(x["q"], x["k"], x["v"], gk=x["g"], scale=0.1, initial_state=x["h0"],
                                   output_final_state=True)
    assert_close("o", ro.float(), o.float(), TOL[torch.bfloat16])
    assert_close("ht", rht, ht, TOL[torch.bfloat16])
