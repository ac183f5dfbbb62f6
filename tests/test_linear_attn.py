"""linear attention (chunk / fused_chunk / fused_recurrent), with and without the running
key-sum normalizer, against the fp64 recurrence."""
from __future__ import annotations


import pytest
import torch

from fla_cuda.ops.linear_attn import chunk_linear_attn, fused_chunk_linear_attn, fused_recurrent_linear_attn
from fla_cuda.reference.simple_gla import linear_attn_reference
from tests.utils import assert_close, fake_recurrent_kernel, grads, make_cu_seqlens, randn

OPS = [chunk_linear_attn, fused_chunk_linear_attn, fused_recurrent_linear_attn]
IDS = [f.__name__ for f in OPS]


def make_inputs(B, T, H, K, V, *, dtype=torch.float32, N=None, state=True, z=True, requires_grad=False):
    # positive features (as models use with the normalizer), so denominators stay away from 0
    q = torch.randn(B, T, H, K).sigmoid().to(dtype)
    k = torch.randn(B, T, H, K).sigmoid().to(dtype)
    v = randn(B, T, H, V, dtype=dtype)
    N = B if N is None else N
    h0 = randn(N, H, K, V) if state else None
    z0 = torch.rand(N, 1, H, K) + 0.5 if z else None
    out = dict(q=q, k=k, v=v, h0=h0, z0=z0)
    if requires_grad:
        for x in out.values():
            if x is not None:
                x.requires_grad_(True)
    return out


def run(fn, inp, normalize, **kw):
    init = (inp["h0"], inp["z0"]) if normalize else inp["h0"]
    return fn(inp["q"], inp["k"], inp["v"], initial_state=init, normalize=normalize, **kw)


def compare(op, inp, normalize, *, ratio=1e-5, gratio=1e-4, check_grads=True, **kw):
    o, st = run(op, inp, normalize, output_final_state=True, **kw)
    ro, rst = run(linear_attn_reference, inp, normalize, output_final_state=True, **kw)
    assert o.dtype == inp["q"].dtype
    assert_close("o", ro, o, ratio)
    outs, refs = [o], [ro]
    if normalize:
        (ht, z), (rh, rz) = st, rst
        assert isinstance(st, tuple) and z.shape == rz.shape
        assert_close("z_state", rz, z, ratio)
        outs.append(z)
        refs.append(rz)
    else:
        ht, rh = st, rst
    assert_close("ht", rh, ht, ratio)
    outs.append(ht)
    refs.append(rh)
    if not check_grads:
        return
    cots = [torch.randn_like(r) for r in refs]
    leaves = [inp[n] for n in ("q", "k", "v", "h0", "z0")]
    got = grads(outs, leaves, [c.to(x.dtype) for c, x in zip(cots, outs)])
    want = grads(refs, leaves, cots)
    for name, x, a, b in zip(("dq", "dk", "dv", "dh0", "dz0"), leaves, want, got):
        if x is None or (name == "dz0" and not normalize):
            continue
        assert b is not None, f"{name} missing"
        assert_close(name, a, b, gratio)


@pytest.mark.parametrize("T", [1, 63, 500])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_forward(op, normalize, T):
    compare(op, make_inputs(2, T, 2, 64, 64), normalize, check_grads=False)


@pytest.mark.parametrize("op,kw", [(chunk_linear_attn, {}), (fused_recurrent_linear_attn, {"reverse": True})],
                         ids=["chunk", "recurrent-reverse"])
def test_forward_long(op, kw):
    compare(op, make_inputs(1, 2049, 2, 128, 64), True, ratio=2e-5, check_grads=False, **kw)


@pytest.mark.parametrize("D,scale", [(64, None), (128, 0.2)])
def test_head_dims_and_scale(D, scale):
    compare(fused_chunk_linear_attn, make_inputs(1, 80, 2, D, D), True, scale=scale, check_grads=False)
    compare(chunk_linear_attn, make_inputs(1, 80, 2, D, 32), False, scale=scale, check_grads=False)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_backward(op, normalize):
    compare(op, make_inputs(2, 100, 2, 32, 16, requires_grad=True), normalize)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_varlen(op, normalize):
    lengths = [1, 63, 0, 130, 7]
    cu = make_cu_seqlens(lengths)
    inp = make_inputs(1, sum(lengths), 2, 16, 16, N=len(lengths), requires_grad=True)
    compare(op, inp, normalize, cu_seqlens=cu)
    if normalize:   # empty sequence keeps its initial key sum
        _, (_, z) = run(op, inp, True, cu_seqlens=cu)
        assert torch.equal(z[2], inp["z0"][2].float())


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_reverse(normalize, varlen):
    lengths = [5, 70, 1]
    cu = make_cu_seqlens(lengths) if varlen else None
    B, T = (1, sum(lengths)) if varlen else (2, 77)
    inp = make_inputs(B, T, 2, 16, 8, N=3 if varlen else None, requires_grad=True)
    compare(fused_recurrent_linear_attn, inp, normalize, reverse=True, cu_seqlens=cu)


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_bf16(op):
    inp = make_inputs(2, 300, 2, 64, 64, dtype=torch.bfloat16, requires_grad=True)
    compare(op, inp, True, ratio=1e-2, gratio=1e-2)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_gradcheck(op, normalize):
    inp = make_inputs(1, 10, 2, 4, 5, dtype=torch.float64)
    inp = {n: x.double().requires_grad_() for n, x in inp.items()}
    names = ["q", "k", "v", "h0"] + (["z0"] if normalize else [])

    def f(*xs):
        d = dict(inp, **dict(zip(names, xs)))
        o, st = run(op, d, normalize, output_final_state=True)
        return (o, *st) if normalize else (o, st)

    assert torch.autograd.gradcheck(f, [inp[n] for n in names])


def test_return_structure():
    inp = make_inputs(1, 20, 2, 8, 8)
    q, k, v = inp["q"], inp["k"], inp["v"]
    # FLA 0.6: with normalize the second value is always a (kv_state, z_state) tuple
    for op in (chunk_linear_attn, fused_chunk_linear_attn):       # normalize defaults to True
        o, st = op(q, k, v)
        assert isinstance(st, tuple) and st[0] is None and st[1].shape == (1, 1, 2, 8)
        _, (_, z) = linear_attn_reference(q, k, v, normalize=True)
        assert_close("z", z, st[1], 1e-6)
    o, st = fused_recurrent_linear_attn(q, k, v)                   # normalize defaults to False
    assert st is None
    assert_close("o", linear_attn_reference(q, k, v)[0], o, 1e-5)
    o, st = chunk_linear_attn(q, k, v, normalize=False, output_final_state=True)
    assert isinstance(st, torch.Tensor) and st.shape == (1, 2, 8, 8)
    # a bare tensor as initial_state with normalize: the key sum starts at zero
    o, (ht, z) = chunk_linear_attn(q, k, v, initial_state=inp["h0"], output_final_state=True)
    ro, (rh, rz) = linear_attn_reference(q, k, v, initial_state=inp["h0"], output_final_state=True,
                                         normalize=True)
    assert_close("o", ro, o, 1e-5)
    assert_close("z", rz, z, 1e-6)
    # the normalizer really divides: differs from the unnormalized output
    assert (o - chunk_linear_attn(q, k, v, initial_state=inp["h0"], normalize=False)[0]).abs().max() > 1e-2


def test_cuda_dispatch_plumbing(monkeypatch):
    calls = fake_recurrent_kernel(monkeypatch, "fused_recurrent_linear_attn")
    inp = make_inputs(2, 12, 2, 4, 6)
    compare(fused_recurrent_linear_attn, inp, True, reverse=True, check_grads=False)
    assert len(calls) == 1 and calls[0]["g"] is None and calls[0]["reverse"] and not calls[0]["kw"]
    chunk_linear_attn(inp["q"], inp["k"], inp["v"])
    assert len(calls) == 1


@pytest.mark.gpu
def test_fused_recurrent_cuda():
    inp = make_inputs(2, 300, 2, 64, 64)
    inp = {n: x.cuda().requires_grad_() for n, x in inp.items()}
    compare(fused_recurrent_linear_attn, inp, True, reverse=True)


# ------------------------------------------------------------------------------ bad inputs

def _bad_cases():
    B, T, H, K, V = 2, 8, 2, 4, 4
    h0, z0 = randn(B, H, K, V), torch.rand(B, 1, H, K)
    return [
        ("q rank", dict(q=randn(B, T, H * K)), ValueError, "q"),
        ("v heads", dict(v=randn(B, T, H + 1, V)), ValueError, "v"),
        ("k int", dict(k=torch.ones(B, T, H, K, dtype=torch.int64)), TypeError, "k"),
        ("dtype mix", dict(v=randn(B, T, H, V, dtype=torch.float64)), TypeError, "v"),
        ("h0 shape", dict(initial_state=(randn(B, H, V + 1, K), z0)), ValueError, "initial_state"),
        ("h0 dtype", dict(initial_state=(h0.long(), z0)), TypeError, "initial_state"),
        ("z0 shape", dict(initial_state=(h0, torch.rand(B, H, K))), ValueError, "initial_state"),
        ("z0 heads", dict(initial_state=(h0, torch.rand(B, 1, H + 1, K))), ValueError, "initial_state"),
        ("z0 int", dict(initial_state=(h0, z0.long())), TypeError, "initial_state"),
        ("state triple", dict(initial_state=(h0, z0, z0)), ValueError, "initial_state"),
        ("tuple without normalize", dict(initial_state=(h0, z0), normalize=False), TypeError, "initial_state"),
        ("normalize type", dict(normalize=1), TypeError, "normalize"),
        ("scale type", dict(scale=[1.0]), TypeError, "scale"),
        ("cu B>1", dict(cu_seqlens=make_cu_seqlens([3, 5])), ValueError, "cu_seqlens"),
        ("cu float", dict(cu_seqlens=torch.tensor([0.0, 8.0])), TypeError, "cu_seqlens"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_bad_inputs(op, case):
    _, over, exc, name = case
    inp = make_inputs(2, 8, 2, 4, 4)
    args = dict(q=inp["q"], k=inp["k"], v=inp["v"], normalize=True)
    args.update(over)
    with pytest.raises(exc, match=name):
        op(**args)


def test_bad_varlen():
    inp = make_inputs(1, 8, 2, 4, 4, N=2)
    for cu, exc in ((torch.tensor([1, 3, 8]), ValueError), (torch.tensor([0, 3, 7]), ValueError),
                    (torch.tensor([0, 5, 3, 8]), ValueError)):
        with pytest.raises(exc, match="cu_seqlens"):
            chunk_linear_attn(inp["q"], inp["k"], inp["v"], cu_seqlens=cu)
    with pytest.raises(ValueError, match="initial_state"):   # 3 sequences, 2 states
        chunk_linear_attn(inp["q"], inp["k"], inp["v"], initial_state=(inp["h0"], inp["z0"]),
                          cu_seqlens=torch.tensor([0, 2, 5, 8]))
    with pytest.raises(TypeError, match="reverse"):
        fused_recurrent_linear_attn(inp["q"], inp["k"], inp["v"], reverse=None)


def test_fused_normaliser_plumbing_on_cpu():
    """The fused normaliser's host-side pieces: it is never chosen for CPU tensors, the chunk
    offsets of packed sequences, and its fake (meta) shapes, which torch.compile traces."""
    from fla_cuda import _extension
    from fla_cuda.ops import normalize_cuda as nc
    q = torch.randn(1, 8, 2, 4)
    assert not nc.supports(q, q, reverse=False)
    cu = torch.tensor([0, 1, 65, 65, 195])
    assert nc._chunk_offsets(cu).tolist() == [0, 1, 2, 2, 5]
    if not (_extension.HAS_EXTENSION and hasattr(torch.ops.fla_cuda, "linear_attn_normalize_fwd")):
        pytest.skip("extension not built")
    meta = dict(device="meta", dtype=torch.bfloat16)
    o_raw, qm = torch.empty(1, 195, 3, 32, **meta), torch.empty(1, 195, 3, 16, **meta)
    offs = nc._chunk_offsets(cu).to("meta")
    o, z, den, carry = torch.ops.fla_cuda.linear_attn_normalize_fwd(o_raw, qm, qm, None, cu.to("meta"), offs, 0.5)
    assert o.shape == o_raw.shape and o.dtype == torch.bfloat16
    assert z.shape == (4, 3, 16) and den.shape == (1, 195, 3)
    assert carry.shape == (4 + 4, 3, 16)   # a bound: ceil(195 / 64) + N chunks
    dense = torch.ops.fla_cuda.linear_attn_normalize_fwd(torch.empty(2, 130, 3, 32, **meta),
                                                         torch.empty(2, 130, 3, 16, **meta),
                                                         torch.empty(2, 130, 3, 16, **meta), None, None, None, 1.0)
    assert dense[3].shape == (2 * 3, 3, 16)
