"""The tensor-core chunk kernels of simple GLA / linear attention / retention (csrc/chunk)
against the fp64 chunkwise PyTorch path (itself checked against the step-by-step oracle on
the CPU): outputs, final states and every gradient, over gates (per step, constant, none),
odd lengths, varlen with an empty sequence, states in and out, head dims and dtypes.
GPU only (skips elsewhere).
"""
import pytest
import torch

import fla_cuda
from fla_cuda import backend
from fla_cuda.ops.simple_gla import simple_gla_chunk_torch
from tests.utils import assert_close, err_ratio, log_gate, make_cu_seqlens

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 4e-3}
# dg is a reverse cumulative sum of per-token differences <q, dq> - <k, dk> that cancel down to
# a result ~100x smaller than its terms, so the bf16 rounding of the tensor-core operands (the
# state, the decayed scores, the decayed values: the same points as FLA's Triton kernels) shows
# up amplified. An fp64 emulation of exactly these roundings at T=2049, K=V=128 gives a relative
# RMS error of 0.6e-2 to 2.3e-2 over seeds (dq, dk: 1.7e-3); weakly decaying gates (long memory)
# and K=V=256 measured up to 4.3e-2 on the GPU.
DG_TOL = 5e-2


def make_inputs(B, T, H, K, V, dtype, gate="g", N=None, seed=0):
    torch.manual_seed(seed)
    N = N or B
    x = dict(q=torch.randn(B, T, H, K, device="cuda").to(dtype),
             k=torch.randn(B, T, H, K, device="cuda").to(dtype),
             v=torch.randn(B, T, H, V, device="cuda").to(dtype),
             h0=torch.randn(N, H, K, V, device="cuda"))
    if gate == "g":
        x["g"] = log_gate(B, T, H, device="cuda")
    elif gate == "g_gamma":
        x["g_gamma"] = torch.log(1 - 2.0 ** (-5.0 - torch.arange(H, device="cuda", dtype=torch.float32)))
    return x


def run_pair(x, *, cu_seqlens=None, scale=None, grad=True):
    """(ours, fp64 reference) dicts of o, ht and the gradients of every input."""
    from fla_cuda.ops.chunk_cuda import chunk_simple_gla_cuda
    K = x["q"].shape[-1]
    scale = K ** -0.5 if scale is None else scale
    leaves = {n: t.detach().clone().requires_grad_(grad) for n, t in x.items()}
    o, ht = chunk_simple_gla_cuda(leaves["q"], leaves["k"], leaves["v"], g=leaves.get("g"),
                                  g_gamma=leaves.get("g_gamma"), scale=scale, initial_state=leaves["h0"],
                                  output_final_state=True, cu_seqlens=cu_seqlens)
    ref_leaves = {n: t.detach().double().requires_grad_(grad) for n, t in x.items()}
    g = ref_leaves.get("g")
    if "g_gamma" in ref_leaves:
        B, T, H = x["q"].shape[:3]
        g = ref_leaves["g_gamma"][None, None].expand(B, T, H)
    ro, rht = simple_gla_chunk_torch(ref_leaves["q"], ref_leaves["k"], ref_leaves["v"], g, scale=scale,
                                     initial_state=ref_leaves["h0"], output_final_state=True,
                                     cu_seqlens=cu_seqlens)
    ours, ref = {"o": o, "ht": ht}, {"o": ro, "ht": rht}
    if grad:
        gen = torch.Generator(device="cuda").manual_seed(1)
        do = torch.randn(o.shape, generator=gen, device="cuda").to(o.dtype)
        dht = torch.randn(ht.shape, generator=gen, device="cuda")
        names = list(leaves)
        gs = torch.autograd.grad((o, ht), [leaves[n] for n in names], (do, dht))
        rgs = torch.autograd.grad((ro, rht), [ref_leaves[n] for n in names], (do.double(), dht.double()))
        ours.update({"d" + n: t for n, t in zip(names, gs)})
        ref.update({"d" + n: t for n, t in zip(names, rgs)})
    return ours, ref


def check(ours, ref, tol):
    for n in ref:
        assert_close(n, ref[n], ours[n], max(tol, DG_TOL) if n in ("dg", "dg_gamma") else tol)


@pytest.mark.parametrize("gate", ["g", "g_gamma", None])
@pytest.mark.parametrize("T", [1, 63, 500, 2049])
def test_gates_and_lengths(gate, T):
    x = make_inputs(2, T, 2, 64, 64, torch.bfloat16, gate)
    check(*run_pair(x), TOL[torch.bfloat16])


@pytest.mark.parametrize("K,V", [(128, 128), (256, 256), (64, 128), (128, 256), (256, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_dims_and_dtypes(K, V, dtype):
    x = make_inputs(1, 200, 2, K, V, dtype, "g")
    check(*run_pair(x), TOL[dtype])


def test_wide_batch_one_walk_per_block():
    """B*H*tiles >= SM count: no sequence split (the other tests mostly take the split path)."""
    x = make_inputs(4, 300, 40, 128, 128, torch.bfloat16, "g")
    check(*run_pair(x), TOL[torch.bfloat16])


def test_varlen_with_empty_sequence():
    lengths = [1, 130, 0, 64, 257]
    x = make_inputs(1, sum(lengths), 3, 64, 128, torch.bfloat16, "g", N=len(lengths))
    check(*run_pair(x, cu_seqlens=make_cu_seqlens(lengths, device="cuda")), TOL[torch.bfloat16])


def test_long_packed_sequences():
    """Sequences of hundreds of chunks: the gate gradient's per-sequence scan takes runs of
    several chunks per thread (csrc/chunk/gate_grad.cu); the sink <ht, dht> of each sequence."""
    lengths = [17000, 3, 20001]
    x = make_inputs(1, sum(lengths), 2, 64, 64, torch.bfloat16, "g", N=len(lengths))
    check(*run_pair(x, cu_seqlens=make_cu_seqlens(lengths, device="cuda")), TOL[torch.bfloat16])


def test_backward_deterministic():
    x = make_inputs(2, 1000, 4, 128, 128, torch.bfloat16, "g")
    a, _ = run_pair(x)
    b, _ = run_pair(x)
    for n in a:
        assert torch.equal(a[n], b[n]), f"{n} differs between two identical runs"


@pytest.mark.parametrize("fill", [-1e4, float("-inf")])
def test_strong_gates_finite(fill):
    x = make_inputs(1, 300, 2, 64, 64, torch.bfloat16, "g")
    x["g"][:, 100:103] = fill        # a hard reset in the middle of a chunk
    x["g"][:, 192] = fill            # and at a chunk boundary
    ours, ref = run_pair(x)
    ref["dg"] = torch.where(x["g"] < -1e4, 0.0, ref["dg"])   # clamped gates: no gradient
    check(ours, ref, TOL[torch.bfloat16])


def test_million_tokens_bounded_memory():
    """B=1, H=4, T=1e6: finite, equal to the recurrent kernel, memory O(inputs)."""
    from fla_cuda.ops.chunk_cuda import chunk_simple_gla_cuda
    from fla_cuda.ops.recurrent_cuda import fused_recurrent_cuda
    T, H, D = 1_000_000, 4, 64
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = log_gate(1, T, H, device="cuda", divisor=16)
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v, g))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
    o, ht = chunk_simple_gla_cuda(*leaves[:3], g=leaves[3], scale=D ** -0.5, output_final_state=True)
    gs = torch.autograd.grad((o.float().sum() + ht.sum()), leaves)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # leaves, o, their grads and the per-token gate dots: a few times the inputs, no per-chunk states
    assert peak < 8 * inputs, f"peak {peak / 2**30:.2f} GiB for {inputs / 2**30:.2f} GiB of inputs"
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    assert all(torch.isfinite(x).all() for x in gs)
    ro, rht = fused_recurrent_cuda(q, k, v, g=g, scale=D ** -0.5, output_final_state=True)
    assert_close("o", ro.float(), o.float(), TOL[torch.bfloat16])
    assert_close("ht", rht, ht, TOL[torch.bfloat16])


def test_torch_compile_fullgraph_and_opcheck():
    from fla_cuda.ops.chunk_cuda import chunk_simple_gla_cuda
    x = make_inputs(2, 100, 2, 64, 64, torch.bfloat16, "g")

    def f(q, k, v, g, h0):
        o, ht = chunk_simple_gla_cuda(q, k, v, g=g, scale=0.125, initial_state=h0, output_final_state=True)
        return o.float().square().sum() + ht.square().sum()

    leaves = [x[n].clone().requires_grad_() for n in ("q", "k", "v", "g", "h0")]
    compiled = torch.compile(f, fullgraph=True)
    gc = torch.autograd.grad(compiled(*leaves), leaves)
    ge = torch.autograd.grad(f(*leaves), leaves)
    for a, b in zip(gc, ge):
        assert torch.equal(a, b)
    args = (x["q"], x["k"], x["v"], x["g"], None, x["h0"], None, 0.125, True)
    torch.library.opcheck(torch.ops.fla_cuda.chunk_simple_gla_fwd.default, args)
    do = torch.randn_like(x["v"])
    dht = torch.randn_like(x["h0"])
    torch.library.opcheck(torch.ops.fla_cuda.chunk_simple_gla_bwd.default,
                          (x["q"], x["k"], x["v"], x["g"], None, x["h0"], None, None, do, dht,
                           torch.randn(x["h0"].shape[:2], device="cuda"), 0.125, True, True))


# ------------------------------------------------------------------------------------------
# Public ops: the kernel is what runs, and it agrees with the fp64 PyTorch path.

PUBLIC = {
    "chunk_simple_gla": lambda f, q, k, v, g, h0: f(q, k, v, g=g, initial_state=h0, output_final_state=True),
    "fused_chunk_simple_gla": lambda f, q, k, v, g, h0: f(q, k, v, g, initial_state=h0, output_final_state=True),
    "chunk_retention": lambda f, q, k, v, g, h0: f(q, k, v, initial_state=h0, output_final_state=True),
    "fused_chunk_retention": lambda f, q, k, v, g, h0: f(q, k, v, initial_state=h0, output_final_state=True),
    "chunk_linear_attn": lambda f, q, k, v, g, h0: f(q, k, v, initial_state=h0, output_final_state=True,
                                                     normalize=False),
    "fused_chunk_linear_attn": lambda f, q, k, v, g, h0: f(q, k, v, initial_state=h0, output_final_state=True,
                                                           normalize=False),
    "parallel_simple_gla": lambda f, q, k, v, g, h0: (f(q, k, v, g)[0], None),
    "parallel_retention": lambda f, q, k, v, g, h0: (f(q, k, v)[0], None),
}


@pytest.mark.parametrize("name", list(PUBLIC))
def test_public_ops_run_the_kernel(name, monkeypatch):
    monkeypatch.delenv("FLA_CUDA_BACKEND", raising=False)
    x = make_inputs(2, 150, 4, 64, 64, torch.bfloat16, "g")
    assert backend.use_cuda(name, x["q"], 64, 64)

    def run(force_torch, cast):
        if force_torch:
            monkeypatch.setenv("FLA_CUDA_BACKEND", "torch")
        else:
            monkeypatch.delenv("FLA_CUDA_BACKEND", raising=False)
        leaves = {n: cast(t).detach().requires_grad_() for n, t in x.items()}
        o, ht = PUBLIC[name](getattr(fla_cuda, name), leaves["q"], leaves["k"], leaves["v"], leaves["g"],
                             leaves["h0"])
        loss = o.double().square().sum() + (0 if ht is None else ht.double().square().sum())
        gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return [o, ht] + list(gs)

    ours = run(False, lambda t: t)
    ref = run(True, lambda t: t.double())
    for i, (r, o) in enumerate(zip(ref, ours)):
        if r is None:
            assert o is None or not o.abs().sum(), i
            continue
        assert_close(f"output {i}", r, o, TOL[torch.bfloat16])


def test_linear_attn_normalize_on_kernel():
    x = make_inputs(1, 300, 2, 64, 64, torch.bfloat16, None)
    o, _ = fla_cuda.chunk_linear_attn(x["q"], x["k"], x["v"], normalize=True)
    q, k, v = (x[n].double() for n in ("q", "k", "v"))
    ro, _ = fla_cuda.chunk_linear_attn(q, k, v, normalize=True)
    assert_close("o", ro, o, TOL[torch.bfloat16])


def test_outside_envelope_warns_once_and_is_correct():
    x = make_inputs(1, 70, 2, 32, 64, torch.bfloat16, "g")
    with pytest.warns(UserWarning, match="no CUDA kernel"):
        o, _ = fla_cuda.chunk_simple_gla(x["q"], x["k"], x["v"], g=x["g"])
    ro, _ = fla_cuda.chunk_simple_gla(x["q"].double(), x["k"].double(), x["v"].double(), g=x["g"].double())
    assert_close("o", ro, o, TOL[torch.bfloat16])


# ------------------------------------------------------------------------------------------
# FLA's Triton kernels as the bar: our error vs fp64 is at most theirs (x1.5 + a floor).

def _fla_or_skip():
    return pytest.importorskip("fla.ops")


@pytest.mark.parametrize("gate", ["g", None])
def test_forward_no_worse_than_fla(gate):
    fla_ops = _fla_or_skip()
    x = make_inputs(2, 2049, 4, 128, 128, torch.bfloat16, gate)
    ours, ref = run_pair(x, grad=False)
    fo, fht = fla_ops.chunk_simple_gla(x["q"], x["k"], x["v"], g=x.get("g"), initial_state=x["h0"],
                                       output_final_state=True)
    for n, theirs in (("o", fo), ("ht", fht)):
        e_ours, e_fla = err_ratio(ref[n], ours[n]), err_ratio(ref[n], theirs)
        assert e_ours <= 1.5 * e_fla + 1e-6, f"{n}: ours {e_ours:.2e} vs FLA {e_fla:.2e}"


def test_backward_no_worse_than_fla_linear_attn():
    """FLA 0.6 refuses the backward of gated chunk ops on Hopper; its linear attention runs."""
    fla_ops = _fla_or_skip()
    x = make_inputs(2, 1000, 4, 128, 128, torch.bfloat16, None)
    ours, ref = run_pair(x)
    leaves = {n: x[n].detach().clone().requires_grad_() for n in ("q", "k", "v", "h0")}
    fo, fht = fla_ops.chunk_linear_attn(leaves["q"], leaves["k"], leaves["v"], initial_state=leaves["h0"],
                                        output_final_state=True, normalize=False)
    gen = torch.Generator(device="cuda").manual_seed(1)
    do = torch.randn(fo.shape, generator=gen, device="cuda").to(fo.dtype)
    dht = torch.randn(fht.shape, generator=gen, device="cuda")
    gs = torch.autograd.grad((fo, fht), list(leaves.values()), (do, dht.to(fht.dtype)))
    theirs = {"o": fo, "ht": fht, **{"d" + n: t for n, t in zip(leaves, gs)}}
    for n, t in theirs.items():
        e_ours, e_fla = err_ratio(ref[n], ours[n]), err_ratio(ref[n], t)
        assert e_ours <= 1.5 * e_fla + 1e-6, f"{n}: ours {e_ours:.2e} vs FLA {e_fla:.2e}"
