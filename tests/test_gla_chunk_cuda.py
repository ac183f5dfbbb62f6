"""The chunkwise GLA CUDA kernels (csrc/chunk/gla.h: gla_intra + the chunk pass in GLA mode
forward; three GLA-mode passes + gla_bwd_intra backward) against the fp64 chunkwise PyTorch
path (itself checked against the step-by-step oracle on the CPU): outputs, final states and
the gradients of q, k, v, g and the initial state, over odd lengths, packed sequences with an
empty one, states in and out, head dims, dtypes, gate dtypes and strengths (logsigmoid(randn)
as it is, /16, hard resets at -1e4 and -inf), segment splits of long sequences (against the
recurrent kernel), determinism, and no worse than FLA's chunk_gla on the same inputs.
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
# dg is a reverse cumulative sum of q dq - k dk, terms that cancel (tests/test_chunk_cuda.py);
# measured 2e-4 to 1e-3 at T=1000 with FLA's formulation of the chunk-end term (gla.h)
DG_TOL = 1e-2


def make_inputs(B, T, H, K, V, dtype, divisor=1.0, N=None, g_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    N = N or B
    return dict(q=torch.randn(B, T, H, K, device="cuda").to(dtype),
                k=torch.randn(B, T, H, K, device="cuda").to(dtype),
                v=torch.randn(B, T, H, V, device="cuda").to(dtype),
                g=(F.logsigmoid(torch.randn(B, T, H, K, device="cuda")) / divisor).to(g_dtype),
                h0=torch.randn(N, H, K, V, device="cuda"))


def run_pair(x, *, cu_seqlens=None, scale=None, grad=True):
    """(ours, fp64 reference) dicts of o, ht and (grad) the gradients of every input under
    random cotangents of o and ht."""
    from fla_cuda.ops.gla_cuda import chunk_gla_cuda
    scale = x["q"].shape[-1] ** -0.5 if scale is None else scale
    names = ("q", "k", "v", "g", "h0")
    leaves = {n: x[n].detach().clone().requires_grad_(grad) for n in names}
    o, ht = chunk_gla_cuda(*(leaves[n] for n in names[:4]), scale=scale, initial_state=leaves["h0"],
                           output_final_state=True, cu_seqlens=cu_seqlens)
    d = {n: x[n].detach().double().requires_grad_(grad) for n in names}
    ro, rht = gla_chunk_torch(d["q"], d["k"], d["v"], d["g"], None, scale=scale, initial_state=d["h0"],
                              output_final_state=True, cu_seqlens=cu_seqlens)
    ours, ref = {"o": o, "ht": ht}, {"o": ro, "ht": rht}
    if grad:
        gen = torch.Generator(device="cuda").manual_seed(1)
        do = torch.randn(o.shape, generator=gen, device="cuda").to(o.dtype)
        dht = torch.randn(ht.shape, generator=gen, device="cuda")
        gs = torch.autograd.grad((o, ht), [leaves[n] for n in names], (do, dht))
        rgs = torch.autograd.grad((ro, rht), [d[n] for n in names], (do.double(), dht.double()))
        ours.update({"d" + n: t for n, t in zip(names, gs)})
        ref.update({"d" + n: t for n, t in zip(names, rgs)})
    return ours, ref


def check(ours, ref, tol):
    for n in ref:
        assert torch.isfinite(ours[n]).all(), f"{n} has non-finite values"
        assert_close(n, ref[n], ours[n], max(tol, DG_TOL) if n == "dg" else tol)


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
    """No h0, no final state: the backward runs without dht and without dh0."""
    from fla_cuda.ops.gla_cuda import chunk_gla_cuda
    x = make_inputs(2, 130, 2, 64, 128, torch.bfloat16)
    names = ("q", "k", "v", "g")
    leaves = [x[n].clone().requires_grad_() for n in names]
    o, ht = chunk_gla_cuda(*leaves, scale=0.3)
    assert ht is None
    d = [x[n].double().requires_grad_() for n in names]
    ro, _ = gla_chunk_torch(*d, None, scale=0.3)
    assert_close("o", ro, o, TOL[torch.bfloat16])
    do = torch.randn_like(o)
    for n, r, t in zip(names, torch.autograd.grad(ro, d, do.double()), torch.autograd.grad(o, leaves, do)):
        assert_close("d" + n, r, t, DG_TOL if n == "g" else TOL[torch.bfloat16])


@pytest.mark.parametrize("fill", [-1e4, float("-inf")])
def test_strong_gates_finite(fill):
    x = make_inputs(1, 300, 2, 64, 64, torch.bfloat16)
    x["g"][:, 100:103] = fill        # a hard reset in the middle of a chunk
    x["g"][:, 192, :, ::3] = fill    # and on some channels at a chunk boundary
    ours, ref = run_pair(x)
    ref["dg"] = torch.where(x["g"] < -1e4, 0.0, ref["dg"])   # clamped gates: no gradient
    check(ours, ref, TOL[torch.bfloat16])


def dg_error_per_chunk(ref, out):
    """Relative RMS error of dg in each chunk of 64 positions, of that chunk's own RMS."""
    return torch.tensor([err_ratio(ref[:, c:c + 64], out[:, c:c + 64]) for c in range(0, ref.shape[1], 64)])


@pytest.mark.parametrize("divisor", [1.0, 16.0])
def test_dg_error_even_across_chunks(divisor):
    """No chunk's dg error an order above the rest: a chunk-end term that left k~'s bf16
    rounding in dg gave 1.4e-2 in the last, partial chunk (where dht enters) against 8e-4
    elsewhere, under the global DG_TOL. Now 1.5e-3 against 3.4e-4 (logsigmoid gates: dht's
    bf16 rounding in R, as in FLA; FLA's bar per chunk in the test below)."""
    x, do, dht = fla_problem(divisor)
    ref = gradients(fla_cuda.chunk_gla, x, do, dht, lambda t: t.double())[3]
    per_chunk = dg_error_per_chunk(ref, gradients(fla_cuda.chunk_gla, x, do, dht)[3])
    print("dg error per chunk:", " ".join(f"{e:.1e}" for e in per_chunk.tolist()))
    assert per_chunk.max() <= 8 * per_chunk.median(), f"uneven dg error: {per_chunk.tolist()}"


def test_forward_and_backward_deterministic():
    x = make_inputs(2, 1000, 4, 128, 128, torch.bfloat16)
    a, _ = run_pair(x)
    b, _ = run_pair(x)
    for n in a:
        assert torch.equal(a[n], b[n]), f"{n} differs between two identical runs"


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


GRAD_NAMES = ("q", "k", "v", "g", "h0")


def fla_problem(divisor):
    """Inputs and cotangents of the FLA comparisons: B=2, T=1000, H=4, K=V=128, bf16."""
    x = make_inputs(2, 1000, 4, 128, 128, torch.bfloat16, divisor)
    gen = torch.Generator(device="cuda").manual_seed(1)
    do = torch.randn(x["v"].shape, generator=gen, device="cuda").to(torch.bfloat16)
    dht = torch.randn(x["h0"].shape, generator=gen, device="cuda")
    return x, do, dht


def gradients(fn, x, do, dht, cast=lambda t: t):
    """Gradients of q, k, v, g, h0 through fn (a chunk_gla) with the inputs cast."""
    leaves = [cast(x[n]).detach().requires_grad_() for n in GRAD_NAMES]
    o, ht = fn(*leaves[:4], initial_state=leaves[4], output_final_state=True)
    return torch.autograd.grad((o, ht), leaves, (cast(do), cast(dht)))


_FLA_BWD_ERRORS: dict = {}


def fla_backward_errors(divisor):
    """{name: (our error, FLA's error)} of every gradient against fp64, on the same inputs;
    skips where FLA's chunk_gla backward does not run (FLA 0.6 refuses it on some Hopper
    setups). Cached: FLA's first call autotunes for minutes."""
    if divisor in _FLA_BWD_ERRORS:
        return _FLA_BWD_ERRORS[divisor]
    fla_ops = pytest.importorskip("fla.ops")
    x, do, dht = fla_problem(divisor)
    ref = gradients(fla_cuda.chunk_gla, x, do, dht, lambda t: t.double())
    ours = gradients(fla_cuda.chunk_gla, x, do, dht)
    try:
        theirs = gradients(fla_ops.chunk_gla, x, do, dht)
    except Exception as e:   # noqa: BLE001 - FLA's own refusal, whatever its type
        pytest.skip(f"FLA's chunk_gla backward does not run here: {type(e).__name__}: {str(e)[:200]}")
    errs = {n: (err_ratio(r, o), err_ratio(r, t)) for n, r, o, t in zip(GRAD_NAMES, ref, ours, theirs)}
    errs["g per chunk"] = (dg_error_per_chunk(ref[3], ours[3]), dg_error_per_chunk(ref[3], theirs[3]))
    for n, (e_ours, e_fla) in errs.items():
        if n == "g per chunk":
            print("dg per chunk: ours", " ".join(f"{e:.1e}" for e in e_ours.tolist()))
            print("dg per chunk: FLA ", " ".join(f"{e:.1e}" for e in e_fla.tolist()))
        else:
            print(f"d{n}: ours {e_ours:.3e}  FLA {e_fla:.3e}")
    _FLA_BWD_ERRORS[divisor] = errs
    return errs


@pytest.mark.parametrize("divisor", [1.0, 16.0])
def test_backward_no_worse_than_fla(divisor):
    """FLA's chunk_gla backward on the same inputs is the bar (x1.25) for every gradient; and
    dg in every chunk of 64 within 2x FLA's error in that chunk (the chunk-local fault of
    test_dg_error_even_across_chunks is what this guards against)."""
    for n, (e_ours, e_fla) in fla_backward_errors(divisor).items():
        if n == "g per chunk":
            assert (e_ours <= 2 * e_fla + 1e-6).all(), f"dg per chunk: ours {e_ours.tolist()} vs FLA {e_fla.tolist()}"
        else:
            assert e_ours <= 1.25 * e_fla + 1e-6, f"d{n}: ours {e_ours:.2e} vs FLA {e_fla:.2e}"


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
    fwd_args = (x["q"], x["k"], x["v"], x["g"], x["h0"], None, None, 0.125, True, True)
    for for_backward in (False, True):
        torch.library.opcheck(torch.ops.fla_cuda.chunk_gla_fwd.default, fwd_args[:-1] + (for_backward,),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    _, ht, q_gated, k_gated, A, A_lo, key_decay = torch.ops.fla_cuda.chunk_gla_fwd(*fwd_args)
    torch.library.opcheck(torch.ops.fla_cuda.chunk_gla_bwd.default,
                          (x["q"], x["k"], x["v"], x["g"], x["h0"], None, None, q_gated, k_gated, A, A_lo, key_decay,
                           torch.randn_like(x["v"]), torch.randn_like(ht), 0.125, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_backward():
    """The compiled graph's backward runs the backward kernel (fake shapes agree) and matches eager."""
    from fla_cuda.ops.gla_cuda import chunk_gla_cuda
    x = make_inputs(2, 100, 2, 64, 64, torch.bfloat16)
    names = ("q", "k", "v", "g", "h0")

    def f(q, k, v, g, h0):
        return chunk_gla_cuda(q, k, v, g, scale=0.125, initial_state=h0, output_final_state=True)

    do, dht = torch.randn_like(x["v"]), torch.randn_like(x["h0"])

    def grads_of(fn):
        leaves = [x[n].clone().requires_grad_() for n in names]
        return torch.autograd.grad(fn(*leaves), leaves, (do, dht))
    for n, a, b in zip(names, grads_of(torch.compile(f, fullgraph=True)), grads_of(f)):
        assert torch.equal(a, b), f"d{n}: compiled and eager differ"


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


@pytest.mark.parametrize("H,divisor", [(2, 1.0), (3, 16.0)])
def test_long_sequence_backward_split_into_segments(H, divisor):
    """The backward's passes split the same way (reverse walks fold the later segments first;
    the transposed states decay per column). Against the fp64 chunkwise path, each gradient is
    within tolerance or no worse than the recurrent kernel's (x1.25) on the same inputs."""
    from fla_cuda.ops.gla_cuda import chunk_gla_cuda
    from fla_cuda.ops.recurrent_cuda import fused_recurrent_cuda
    x = make_inputs(1, 20000, H, 128, 128, torch.bfloat16, divisor)
    names = ("q", "k", "v", "g", "h0")
    gen = torch.Generator(device="cuda").manual_seed(1)
    do = torch.randn(x["v"].shape, generator=gen, device="cuda").to(torch.bfloat16)
    dht = torch.randn(x["h0"].shape, generator=gen, device="cuda")

    def grads_of(run):
        leaves = [x[n].clone().requires_grad_() for n in names]
        o, ht = run(*leaves)
        return torch.autograd.grad((o, ht), leaves, (do, dht))
    ours = grads_of(lambda q, k, v, g, h0: chunk_gla_cuda(q, k, v, g, scale=0.1, initial_state=h0,
                                                          output_final_state=True))
    rec = grads_of(lambda q, k, v, g, h0: fused_recurrent_cuda(q, k, v, gk=g, scale=0.1, initial_state=h0,
                                                               output_final_state=True))
    x = {n: t.double() for n, t in x.items()}
    do, dht = do.double(), dht.double()
    ref = grads_of(lambda q, k, v, g, h0: gla_chunk_torch(q, k, v, g, None, scale=0.1, initial_state=h0,
                                                          output_final_state=True))
    for n, r, o, c in zip(names, ref, ours, rec):
        e_ours, e_rec = err_ratio(r, o), err_ratio(r, c)
        print(f"d{n}: chunk kernels {e_ours:.3e}  recurrent kernel {e_rec:.3e}")
        assert torch.isfinite(o).all(), f"d{n} has non-finite values"
        assert e_ours <= max(DG_TOL if n == "g" else TOL[torch.bfloat16], 1.25 * e_rec), f"d{n}: {e_ours:.2e}"


def test_inference_skips_A_lo_with_the_same_outputs():
    """Without autograd the forward leaves A_lo out (only dv reads it); o and ht are unchanged."""
    from fla_cuda.ops.gla_cuda import chunk_gla_cuda
    x = make_inputs(2, 300, 2, 128, 128, torch.bfloat16)
    args = [x[n] for n in ("q", "k", "v", "g")]
    with torch.no_grad():
        o0, h0 = chunk_gla_cuda(*args, scale=0.1, initial_state=x["h0"], output_final_state=True)
    leaves = [t.clone().requires_grad_() for t in args]
    o1, h1 = chunk_gla_cuda(*leaves, scale=0.1, initial_state=x["h0"], output_final_state=True)
    assert torch.equal(o0, o1.detach()) and torch.equal(h0, h1.detach())
    out = torch.ops.fla_cuda.chunk_gla_fwd(*(t.contiguous() for t in args), x["h0"], None, None, 0.1, True, False)
    assert out[5].numel() == 0 and out[4].shape == (2, 300, 2, 64)
