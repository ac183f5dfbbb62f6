"""The fused linear-attention normalisation (csrc/normalize) against the fp64 PyTorch
composition it replaces (``linear_attn.normalize_with_z_state``): outputs, the key-sum
state and every gradient, dense and packed, odd lengths, states in and out. GPU only."""
import re

import pytest
import torch
import torch.nn.functional as F

import fla_cuda
from fla_cuda.ops.linear_attn import normalize_with_z_state
from fla_cuda.ops.normalize_cuda import normalize_cuda, supports
from tests.utils import assert_close, cuda_kernel_names, err_ratio, make_cu_seqlens, sm90_or_skip

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 2e-5, torch.bfloat16: 6e-3, torch.float16: 2e-3}


def make_inputs(B, T, H, K, V, dtype, N, seed=0):
    """q, k feature-mapped positive (elu + 1) as linear-attention models feed them, so the
    normaliser stays away from zero; o_raw and z0 random."""
    torch.manual_seed(seed)
    x = {
        "o_raw": torch.randn(B, T, H, V, device="cuda").to(dtype),
        "q": (F.elu(torch.randn(B, T, H, K, device="cuda")) + 1).to(dtype),
        "k": (F.elu(torch.randn(B, T, H, K, device="cuda")) + 1).to(dtype),
        "z0": torch.rand(N, 1, H, K, device="cuda"),
    }
    return x


def shifted(t):
    """t's values in a contiguous tensor 2 bytes past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def run_pair(x, scale, cu_seqlens, with_z0=True, place=torch.clone):
    leaves = {n: place(t.detach()).requires_grad_() for n, t in x.items()}
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    z0 = leaves["z0"] if with_z0 else None
    rz0 = ref_leaves["z0"] if with_z0 else None
    o, z = normalize_cuda(leaves["o_raw"], leaves["q"], leaves["k"], scale, z0, cu_seqlens)
    ro, rz = normalize_with_z_state(ref_leaves["o_raw"], ref_leaves["q"], ref_leaves["k"], scale, rz0,
                                    False, cu_seqlens)
    assert o.dtype == x["q"].dtype and z.dtype == torch.float32
    gen = torch.Generator(device="cuda").manual_seed(1)
    do = torch.randn(o.shape, generator=gen, device="cuda").to(o.dtype)
    dz = torch.randn(z.shape, generator=gen, device="cuda")
    names = [n for n in leaves if with_z0 or n != "z0"]
    gs = torch.autograd.grad((o, z), [leaves[n] for n in names], (do, dz))
    rgs = torch.autograd.grad((ro, rz), [ref_leaves[n] for n in names], (do.double(), dz.double()))
    out = {"o": (ro, o), "z": (rz, z)}
    out.update({"d" + n: (r, g) for n, r, g in zip(names, rgs, gs)})
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T", [1, 63, 500, 2049])
def test_dense(dtype, T):
    x = make_inputs(2, T, 3, 64, 64, dtype, N=2)
    for name, (r, o) in run_pair(x, 0.125, None).items():
        assert_close(name, r, o, TOL[dtype])


# Key rows of 4, 8, 16 and 32 16-byte vectors (the key-vector kernels), and the per-channel
# kernels they fall back to: K not whole vectors (100), more than 32 of them (fp32 K=256).
# V=36 is not whole 16-byte vectors (the per-element value path).
@pytest.mark.parametrize("dtype,K,V", [(torch.bfloat16, 32, 32), (torch.bfloat16, 128, 128),
                                       (torch.float16, 256, 256), (torch.bfloat16, 100, 48),
                                       (torch.bfloat16, 64, 36), (torch.float32, 16, 16),
                                       (torch.float32, 128, 64), (torch.float32, 256, 128)])
def test_head_dims_without_state(dtype, K, V):
    x = make_inputs(1, 200, 2, K, V, dtype, N=1)
    for name, (r, o) in run_pair(x, K ** -0.5, None, with_z0=False).items():
        assert_close(name, r, o, TOL[dtype])


def test_unaligned_inputs():
    """Inputs 2 bytes past a 16-byte boundary take the per-channel and per-element kernels,
    with the accuracy of the vector ones."""
    x = make_inputs(2, 150, 2, 128, 64, torch.bfloat16, N=2)
    for name, (r, o) in run_pair(x, 0.1, None, place=shifted).items():
        assert_close(name, r, o, TOL[torch.bfloat16])


def test_packed_sequences():
    lengths = [1, 64, 0, 130, 63, 500]
    cu = make_cu_seqlens(lengths, device="cuda")
    x = make_inputs(1, sum(lengths), 2, 64, 128, torch.bfloat16, N=len(lengths))
    for name, (r, o) in run_pair(x, 0.2, cu).items():
        assert_close(name, r, o, TOL[torch.bfloat16])


def test_deterministic():
    x = make_inputs(2, 777, 4, 128, 128, torch.bfloat16, N=2)
    a, b = run_pair(x, 0.1, None), run_pair(x, 0.1, None)
    for name in a:
        assert torch.equal(a[name][1], b[name][1]), name


def _public_run(cast, args, monkeypatch, torch_path=False, cu_seqlens=None):
    if torch_path:
        monkeypatch.setenv("FLA_CUDA_BACKEND", "torch")
    else:
        monkeypatch.delenv("FLA_CUDA_BACKEND", raising=False)
    leaves = {n: cast(t).detach().requires_grad_() for n, t in args.items()}
    o, (ht, z) = fla_cuda.chunk_linear_attn(leaves["q"], leaves["k"], leaves["v"],
                                            initial_state=(leaves["h0"], leaves["z0"]),
                                            output_final_state=True, normalize=True, cu_seqlens=cu_seqlens)
    loss = o.double().square().sum() + ht.double().square().sum() + z.double().sum()
    return [o, ht, z] + list(torch.autograd.grad(loss, list(leaves.values())))


def _public_args(T, K, V, N, lengths=None, seed=0, H=2):
    B = 1 if lengths else N
    x = make_inputs(B, T, H, K, V, torch.bfloat16, N=N, seed=seed)
    v = torch.randn(B, T, H, V, device="cuda").to(torch.bfloat16)
    h0 = torch.randn(N, H, K, V, device="cuda")
    return {"q": x["q"], "k": x["k"], "v": v, "h0": h0, "z0": x["z0"]}


def _two_op_run(args, cu_seqlens):
    """The kernels chunk_linear_attn(normalize=True) ran before the fused op: the chunk pass
    writes o_raw, then the normaliser op divides it; autograd adds the two dq (and dk)."""
    from fla_cuda.ops.chunk_cuda import chunk_simple_gla_cuda
    leaves = {n: t.detach().clone().requires_grad_() for n, t in args.items()}
    scale = args["q"].shape[-1] ** -0.5
    o_raw, ht = chunk_simple_gla_cuda(leaves["q"], leaves["k"], leaves["v"], scale=scale,
                                      initial_state=leaves["h0"], output_final_state=True, cu_seqlens=cu_seqlens)
    o, z = normalize_cuda(o_raw, leaves["q"], leaves["k"], scale, leaves["z0"], cu_seqlens)
    loss = o.double().square().sum() + ht.double().square().sum() + z.double().sum()
    return [o, ht, z] + list(torch.autograd.grad(loss, list(leaves.values())))


@pytest.mark.parametrize("T,K,V,lengths", [(300, 64, 64, None), (1, 128, 128, None), (2049, 128, 64, None),
                                           (500, 64, 128, [200, 0, 63, 237])])
def test_public_op_takes_the_fused_path(T, K, V, lengths, monkeypatch):
    """chunk_linear_attn(normalize=True) on bf16 CUDA inputs runs as one op (the chunk pass
    divides by the normaliser as it stores o; the backward adds the normaliser's dq, dk onto
    the chunk pass's); every output and gradient is within the bf16 tolerance of the fp64
    path, or within 1.5x the error of the PyTorch composition on the same inputs, or within
    1.1x the error of the two kernels it replaces. (dq is the sum of two terms that nearly
    cancel, because o does not change when q is scaled; the chunk pass's bf16 operands, the
    initial state among them, show in it amplified: ~1.2e-2 on either kernel path.)"""
    import fla_cuda.ops.normalize_cuda as nc
    calls = []
    real = nc.linear_attn_normalized_cuda
    monkeypatch.setattr(nc, "linear_attn_normalized_cuda", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    N = len(lengths) if lengths else 2
    cu = make_cu_seqlens(lengths, device="cuda") if lengths else None
    args = _public_args(T, K, V, N, lengths)

    ours = _public_run(lambda t: t, args, monkeypatch, cu_seqlens=cu)
    assert calls, "the fused op did not run"
    n_calls = len(calls)
    composed = _public_run(lambda t: t, args, monkeypatch, torch_path=True, cu_seqlens=cu)
    assert len(calls) == n_calls
    ref = _public_run(lambda t: t.double(), args, monkeypatch, cu_seqlens=cu)
    before = _two_op_run(args, cu)
    for i, (r, o, c, b) in enumerate(zip(ref, ours, composed, before)):
        assert_close(f"output {i}", r, o, max(TOL[torch.bfloat16], 1.5 * err_ratio(r, c), 1.1 * err_ratio(r, b)))


def _runs_pass_folding(names, fold):
    """Whether the wgmma pass ran with NormFold `fold` (1: the gradient, 2: den) among names."""
    return any(re.search(rf"chunk_pass_sm90_kernel<[^<>]*, ?{fold}>", n) for n in names)


@pytest.mark.parametrize("T,K,V,N,lengths", [(63, 128, 128, 2, None), (2049, 64, 128, 2, None),
                                             (500, 128, 64, 4, [200, 0, 63, 237]), (20000, 128, 128, 1, None)])
def test_sm90_folds_the_normaliser_into_the_passes(T, K, V, N, lengths, monkeypatch):
    """On sm_90 the backward's dq and dk passes add the normaliser's gradient themselves (each
    score gains w of its row or column, each output row the carry; the dk pass's carries are
    over chunks aligned to the sequence's end, which odd lengths and packed sequences test;
    T = 20000 splits the walks): the separate gradient kernel does not run. The forward pass
    computes den itself unless the walks are split (T = 20000, and dense batches of so few
    walks: the normaliser's own kernels then).
    Every output and gradient is within 1.25x the error of the unfolded path
    (FLA_CUDA_CHUNK_SM90=0) against fp64."""
    sm90_or_skip()
    cu = make_cu_seqlens(lengths, device="cuda") if lengths else None
    args = _public_args(T, K, V, N, lengths)
    ref = _public_run(lambda t: t.double(), args, monkeypatch, cu_seqlens=cu)
    monkeypatch.delenv("FLA_CUDA_CHUNK_SM90", raising=False)
    folded = []
    names = cuda_kernel_names(lambda: folded.extend(_public_run(lambda t: t, args, monkeypatch, cu_seqlens=cu)))
    assert not any("normalize_bwd_grads_kernel" in n for n in names), names
    assert _runs_pass_folding(names, 1), names
    assert _runs_pass_folding(names, 2) != any("key_totals_kernel" in n for n in names), names
    assert not (T == 20000 and _runs_pass_folding(names, 2)), names
    monkeypatch.setenv("FLA_CUDA_CHUNK_SM90", "0")
    unfolded = []
    names = cuda_kernel_names(lambda: unfolded.extend(_public_run(lambda t: t, args, monkeypatch, cu_seqlens=cu)))
    assert any("normalize_bwd_grads_kernel" in n for n in names), names
    for i, (r, a, b) in enumerate(zip(ref, folded, unfolded)):
        assert torch.isfinite(a).all(), f"output {i}"
        ea, eb = err_ratio(r, a), err_ratio(r, b)
        assert ea <= 1.25 * eb + 0.05 * TOL[torch.bfloat16], f"output {i}: folded {ea:.3e}, unfolded {eb:.3e}"


@pytest.mark.parametrize("T,K,V,N,lengths,with_z0", [(1, 64, 64, 2, None, True), (63, 128, 128, 2, None, False),
                                                     (2049, 64, 128, 3, None, True),
                                                     (700, 128, 64, 5, [200, 0, 63, 64, 373], True)])
def test_forward_pass_den_matches_the_normaliser_kernels(T, K, V, N, lengths, with_z0, monkeypatch):
    """What the sm_90 forward pass computes of the normaliser (den, the carry before each chunk,
    z_final; o divided by den) against the normaliser's own kernels (FLA_CUDA_CHUNK_SM90=0):
    fp32 sums of the same bf16 products in another order, so within 1e-5 relative; slots past
    the packed sequences' last chunk are zero in both. Odd lengths, an empty sequence, with and
    without z0. Sixteen heads: dense batches of fewer walks are split, and the pass leaves den
    to the normaliser's kernels."""
    sm90_or_skip()
    cu = make_cu_seqlens(lengths, device="cuda") if lengths else None
    args = _public_args(T, K, V, N, lengths, seed=3, H=16)
    from fla_cuda.ops.normalize_cuda import _chunk_offsets
    offs = None if cu is None else _chunk_offsets(cu)
    z0 = args["z0"].squeeze(1).contiguous() if with_z0 else None
    fwd = (args["q"], args["k"], args["v"], args["h0"], z0, cu, offs, K ** -0.5, True)
    monkeypatch.delenv("FLA_CUDA_CHUNK_SM90", raising=False)
    names = cuda_kernel_names(lambda: torch.ops.fla_cuda.linear_attn_normalized_fwd(*fwd))
    assert _runs_pass_folding(names, 2) and not any("key_totals_kernel" in n for n in names), names
    fused = torch.ops.fla_cuda.linear_attn_normalized_fwd(*fwd)
    monkeypatch.setenv("FLA_CUDA_CHUNK_SM90", "0")
    apart = torch.ops.fla_cuda.linear_attn_normalized_fwd(*fwd)
    for name, a, b in zip(("o", "ht", "z_final", "den", "k_carry"), fused, apart):
        assert a.shape == b.shape and torch.isfinite(a).all(), name
        if name in ("o", "ht"):   # bf16 operands of two different kernels
            assert_close(name, b.double(), a, TOL[torch.bfloat16])
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)
    if cu is not None:
        tail = int(offs[-1])
        assert fused[4][tail:].eq(0).all() and apart[4][tail:].eq(0).all()


def test_fused_chunk_and_recurrent_normalized(monkeypatch):
    """fused_chunk_linear_attn(normalize=True) runs the same op as chunk_linear_attn (equal
    results); fused_recurrent_linear_attn(normalize=True) keeps the recurrent kernel and the
    standalone normaliser, and agrees with it to bf16 accuracy."""
    import fla_cuda.ops.normalize_cuda as nc
    calls = []
    real = nc.linear_attn_normalized_cuda
    monkeypatch.setattr(nc, "linear_attn_normalized_cuda", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    args = _public_args(130, 64, 64, 2)
    state = (args["h0"], args["z0"])
    a = fla_cuda.chunk_linear_attn(args["q"], args["k"], args["v"], initial_state=state, output_final_state=True)
    b = fla_cuda.fused_chunk_linear_attn(args["q"], args["k"], args["v"], initial_state=state,
                                         output_final_state=True)
    assert len(calls) == 2
    for x, y in zip((a[0], *a[1]), (b[0], *b[1])):
        assert torch.equal(x, y)
    r = fla_cuda.fused_recurrent_linear_attn(args["q"], args["k"], args["v"], initial_state=state,
                                             output_final_state=True, normalize=True)
    assert len(calls) == 2
    for name, x, y in zip(("o", "ht", "z"), (r[0], *r[1]), (a[0], *a[1])):
        assert_close(name, y.double(), x, TOL[torch.bfloat16])


def test_fused_op_deterministic(monkeypatch):
    """Bitwise equal outputs and gradients from two identical runs; sixteen heads, so that on
    sm_90 the forward pass computes den itself."""
    args = _public_args(777, 128, 128, 2, H=16)
    a = _public_run(lambda t: t, args, monkeypatch)
    b = _public_run(lambda t: t, args, monkeypatch)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"output {i} differs between two identical runs"


def test_no_worse_than_fla_normalized():
    """FLA's chunk_linear_attn(normalize=True) on the same inputs is the bar (x1.5 + a floor).
    Sixteen heads: enough walks that the sm_90 forward pass computes den itself."""
    fla_ops = pytest.importorskip("fla.ops")
    x = make_inputs(2, 1000, 16, 128, 128, torch.bfloat16, N=2)
    v = torch.randn(2, 1000, 16, 128, device="cuda").to(torch.bfloat16)
    inputs = {"q": x["q"], "k": x["k"], "v": v}
    do = torch.randn(2, 1000, 16, 128, device="cuda").to(torch.bfloat16)

    def run(fn, cast):
        leaves = {n: cast(t).detach().requires_grad_() for n, t in inputs.items()}
        o = fn(leaves["q"], leaves["k"], leaves["v"], normalize=True)[0]
        return [o] + list(torch.autograd.grad(o, list(leaves.values()), cast(do)))

    ours = run(fla_cuda.chunk_linear_attn, lambda t: t)
    ref = run(fla_cuda.chunk_linear_attn, lambda t: t.double())
    theirs = run(fla_ops.chunk_linear_attn, lambda t: t)
    for name, r, o, t in zip(("o", "dq", "dk", "dv"), ref, ours, theirs):
        e_ours, e_fla = err_ratio(r, o), err_ratio(r, t)
        assert e_ours <= 1.5 * e_fla + 1e-6, f"{name}: ours {e_ours:.2e} vs FLA {e_fla:.2e}"


def test_supports():
    q = torch.randn(1, 4, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert supports(q, q, reverse=False)
    assert not supports(q, q, reverse=True)
    assert not supports(q.double(), q, reverse=False)
    wide = torch.randn(1, 4, 2, 300, device="cuda")
    assert not supports(wide, q, reverse=False)
    assert not supports(q, wide, reverse=False)


def test_opcheck():
    x = make_inputs(1, 70, 2, 64, 32, torch.bfloat16, N=2)
    cu = make_cu_seqlens([30, 40], device="cuda")
    from fla_cuda.ops.normalize_cuda import _chunk_offsets
    offs = _chunk_offsets(cu)
    z0 = x["z0"].squeeze(1).contiguous()
    torch.library.opcheck(torch.ops.fla_cuda.linear_attn_normalize_fwd.default,
                          (x["o_raw"], x["q"], x["k"], z0, cu, offs, 0.3))
    o, z, den, carry = torch.ops.fla_cuda.linear_attn_normalize_fwd(x["o_raw"], x["q"], x["k"], z0, cu, offs, 0.3)
    torch.library.opcheck(torch.ops.fla_cuda.linear_attn_normalize_bwd.default,
                          (x["o_raw"], x["q"], x["k"], den, carry, torch.randn_like(o), torch.randn_like(z),
                           cu, offs, 0.3))


def test_fused_op_opcheck():
    args = _public_args(70, 64, 64, 2, [30, 40])
    cu = make_cu_seqlens([30, 40], device="cuda")
    from fla_cuda.ops.normalize_cuda import _chunk_offsets
    offs = _chunk_offsets(cu)
    z0 = args["z0"].squeeze(1).contiguous()
    fwd_args = (args["q"], args["k"], args["v"], args["h0"], z0, cu, offs, 0.3, True)
    torch.library.opcheck(torch.ops.fla_cuda.linear_attn_normalized_fwd.default, fwd_args)
    o, ht, z, den, carry = torch.ops.fla_cuda.linear_attn_normalized_fwd(*fwd_args)
    torch.library.opcheck(torch.ops.fla_cuda.linear_attn_normalized_bwd.default,
                          (args["q"], args["k"], args["v"], args["h0"], cu, offs, o, den, carry,
                           torch.randn_like(o), torch.randn_like(ht), torch.randn_like(z), 0.3, True))


def test_torch_compile_fullgraph():
    x = make_inputs(2, 130, 2, 64, 64, torch.bfloat16, N=2)
    v = torch.randn(2, 130, 2, 64, device="cuda").to(torch.bfloat16)

    def f(q, k, v):
        return fla_cuda.chunk_linear_attn(q, k, v, normalize=True)[0]

    compiled = torch.compile(f, fullgraph=True)
    assert_close("o", f(x["q"], x["k"], v).double(), compiled(x["q"], x["k"], v), 1e-6)
