"""retention (chunk / fused_chunk / fused_recurrent / parallel) against the fp64 recurrence."""
from __future__ import annotations

import math

import pytest
import torch

from fla_cuda.ops.retention import (chunk_retention, fused_chunk_retention, fused_recurrent_retention,
                                    parallel_retention, retention_g_gamma)
from fla_cuda.reference.simple_gla import retention_reference, simple_gla_attention_reference
from tests.utils import assert_close, fake_recurrent_kernel, grads, make_cu_seqlens, randn

STATE_OPS = [chunk_retention, fused_chunk_retention, fused_recurrent_retention]
ALL_OPS = STATE_OPS + [parallel_retention]
IDS = [f.__name__ for f in ALL_OPS]


def make_inputs(B, T, H, K, V, *, dtype=torch.float32, N=None, state=True, requires_grad=False):
    out = dict(q=randn(B, T, H, K, dtype=dtype), k=randn(B, T, H, K, dtype=dtype),
               v=randn(B, T, H, V, dtype=dtype),
               initial_state=randn(B if N is None else N, H, K, V) if state else None)
    if requires_grad:
        for x in out.values():
            if x is not None:
                x.requires_grad_(True)
    return out


def call(op, inp, **kw):
    if op is parallel_retention:
        kw.pop("output_final_state", None)
        args = {n: x for n, x in inp.items() if n != "initial_state"}
        return op(**args, **kw)[0], None
    return op(**inp, **kw)


def check(op, inp, *, ratio=1e-5, gratio=1e-4, check_grads=True, kw=None, ref_kw=None):
    kw, ref_kw = kw or {}, ref_kw or {}
    o, ht = call(op, inp, output_final_state=True, **kw)
    ro, rh = retention_reference(**inp, output_final_state=True, **ref_kw)
    assert o.dtype == inp["q"].dtype
    assert_close("o", ro, o, ratio)
    if ht is not None:
        assert ht.dtype == torch.float32
        assert_close("ht", rh, ht, ratio)
    if not check_grads:
        return
    leaves = [inp[n] for n in ("q", "k", "v", "initial_state")]
    do, dht = torch.randn_like(ro), torch.randn_like(rh)
    if ht is None:
        got, want = grads([o], leaves, [do.to(o.dtype)]), grads([ro], leaves, [do])
    else:
        got, want = grads([o, ht], leaves, [do.to(o.dtype), dht.float()]), grads([ro, rh], leaves, [do, dht])
    for name, x, a, b in zip(("dq", "dk", "dv", "dh0"), leaves, want, got):
        if x is None:
            continue
        assert b is not None, f"{name} missing"
        assert_close(name, a, b, gratio)


def test_decay_formula():
    q = torch.zeros(1, 1, 6, 4)
    want = torch.tensor([math.log(1 - 2.0 ** (-5 - h)) for h in range(6)])
    gamma = retention_g_gamma(q)
    assert gamma.dtype == torch.float32
    assert torch.allclose(gamma, want, rtol=1e-6, atol=0)
    assert retention_g_gamma(q.double()).dtype == torch.float64


@pytest.mark.parametrize("T", [1, 63, 500])
@pytest.mark.parametrize("op", ALL_OPS, ids=IDS)
def test_forward(op, T):
    check(op, make_inputs(2, T, 4, 64, 64, state=op is not parallel_retention), check_grads=False)


@pytest.mark.parametrize("op", [chunk_retention, parallel_retention], ids=["chunk", "parallel"])
def test_forward_long(op):
    check(op, make_inputs(1, 2049, 2, 128, 128, state=op is not parallel_retention), ratio=2e-5,
          check_grads=False)


@pytest.mark.parametrize("D,scale", [(64, None), (128, 0.25)])
def test_head_dims_and_scale(D, scale):
    check(fused_chunk_retention, make_inputs(1, 70, 3, D, D // 2), kw={"scale": scale},
          ref_kw={"scale": scale}, check_grads=False)


@pytest.mark.parametrize("op", ALL_OPS, ids=IDS)
def test_backward(op):
    check(op, make_inputs(2, 100, 3, 32, 16, requires_grad=True, state=op is not parallel_retention))


@pytest.mark.parametrize("op", ALL_OPS, ids=IDS)
def test_varlen(op):
    lengths = [1, 63, 0, 130, 7]
    cu = make_cu_seqlens(lengths)
    inp = make_inputs(1, sum(lengths), 2, 16, 16, N=len(lengths), requires_grad=True,
                      state=op is not parallel_retention)
    check(op, inp, kw={"cu_seqlens": cu}, ref_kw={"cu_seqlens": cu})


@pytest.mark.parametrize("varlen", [False, True])
def test_reverse(varlen):
    lengths = [5, 70, 1]
    cu = make_cu_seqlens(lengths) if varlen else None
    B, T = (1, sum(lengths)) if varlen else (2, 77)
    inp = make_inputs(B, T, 2, 16, 16, N=3 if varlen else None, requires_grad=True)
    check(fused_recurrent_retention, inp, kw={"reverse": True, "cu_seqlens": cu},
          ref_kw={"reverse": True, "cu_seqlens": cu})


def test_state_v_first():
    inp = make_inputs(2, 90, 2, 16, 8)
    ro, rh = retention_reference(**inp, output_final_state=True)
    h0t = inp["initial_state"].transpose(-1, -2).contiguous()
    o, ht = fused_recurrent_retention(inp["q"], inp["k"], inp["v"], initial_state=h0t, output_final_state=True,
                                      state_v_first=True)
    assert_close("o", ro, o, 1e-5)
    assert_close("ht", rh.transpose(-1, -2), ht, 1e-5)
    with pytest.warns(DeprecationWarning):
        _, ht2 = fused_recurrent_retention(inp["q"], inp["k"], inp["v"], initial_state=h0t,
                                           output_final_state=True, transpose_state_layout=True)
    assert torch.equal(ht2, ht)


@pytest.mark.parametrize("op", ALL_OPS, ids=IDS)
def test_bf16(op):
    inp = make_inputs(2, 300, 2, 64, 64, dtype=torch.bfloat16, requires_grad=True,
                      state=op is not parallel_retention)
    check(op, inp, ratio=1e-2, gratio=1e-2)


@pytest.mark.parametrize("op", ALL_OPS, ids=IDS)
def test_gradcheck(op):
    inp = make_inputs(1, 10, 2, 4, 6, dtype=torch.float64, state=op is not parallel_retention)
    inp = {n: (None if x is None else x.double().requires_grad_()) for n, x in inp.items()}
    names = [n for n, x in inp.items() if x is not None]
    kw = {"chunk_size": 4} if op is chunk_retention else {}

    def f(*xs):
        o, ht = call(op, dict(inp, **dict(zip(names, xs))), output_final_state=True, **kw)
        return (o,) if ht is None else (o, ht)

    assert torch.autograd.gradcheck(f, [inp[n] for n in names])


def test_parallel_attentions():
    inp = make_inputs(2, 70, 3, 16, 8, state=False)
    q, k, v = inp["q"], inp["k"], inp["v"]
    o, A = parallel_retention(q, k, v, output_attentions=True)
    gamma = torch.tensor([math.log(1 - 2.0 ** (-5 - h)) for h in range(3)], dtype=torch.float64)
    ro, rA = simple_gla_attention_reference(q, k, v, gamma[None, None].expand(2, 70, 3))
    assert A.shape == (2, 3, 70, 70)
    assert_close("o", ro, o, 1e-5)
    assert_close("attn", rA, A, 1e-5)
    assert parallel_retention(q, k, v)[1] is None
    with pytest.raises(ValueError, match="output_attentions"):
        parallel_retention(q[:1], k[:1], v[:1], output_attentions=True, cu_seqlens=make_cu_seqlens([30, 40]))


def test_cuda_dispatch_plumbing(monkeypatch):
    calls = fake_recurrent_kernel(monkeypatch, "fused_recurrent_retention")
    inp = make_inputs(2, 12, 3, 4, 6)
    check(fused_recurrent_retention, inp, kw={"reverse": True}, ref_kw={"reverse": True}, check_grads=False)
    assert len(calls) == 1
    g = calls[0]["g"]
    assert g.shape == (2, 12, 3) and g.dtype == torch.float32
    assert torch.allclose(g[1, 5], retention_g_gamma(inp["q"]))
    chunk_retention(**inp)
    assert len(calls) == 1


@pytest.mark.gpu
def test_fused_recurrent_cuda():
    inp = make_inputs(2, 300, 2, 64, 64)
    inp = {n: x.cuda().requires_grad_() for n, x in inp.items()}
    check(fused_recurrent_retention, inp, kw={"reverse": True}, ref_kw={"reverse": True})


# ------------------------------------------------------------------------------ bad inputs

def _bad_cases():
    B, T, H, K, V = 2, 8, 2, 4, 4
    return [
        ("q rank", dict(q=randn(B, T, H * K)), ValueError, "q"),
        ("q not tensor", dict(q=1.0), TypeError, "q"),
        ("k shape", dict(k=randn(B, T, H, K + 1)), ValueError, "k"),
        ("v heads", dict(v=randn(B, T, H + 1, V)), ValueError, "v"),
        ("q int", dict(q=torch.ones(B, T, H, K, dtype=torch.int32)), TypeError, "q"),
        ("dtype mix", dict(k=randn(B, T, H, K, dtype=torch.float16)), TypeError, "k"),
        ("h0 shape", dict(initial_state=randn(B, H, V, K + 1)), ValueError, "initial_state"),
        ("h0 dtype", dict(initial_state=randn(B, H, K, V, dtype=torch.float16)), TypeError, "initial_state"),
        ("flag", dict(output_final_state="no"), TypeError, "output_final_state"),
        ("scale", dict(scale=float("inf")), ValueError, "scale"),
        ("cu B>1", dict(cu_seqlens=make_cu_seqlens([3, 5])), ValueError, "cu_seqlens"),
        ("cu float", dict(cu_seqlens=torch.tensor([0.0, 8.0])), TypeError, "cu_seqlens"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("op", ALL_OPS, ids=IDS)
def test_bad_inputs(op, case):
    label, over, exc, name = case
    if op is parallel_retention and label in ("h0 shape", "h0 dtype", "flag"):
        pytest.skip("parallel_retention has no such argument")
    inp = make_inputs(2, 8, 2, 4, 4, state=False)
    inp.pop("initial_state")
    inp.update(over)
    with pytest.raises(exc, match=name):
        op(**inp)


def test_bad_varlen_and_kwargs():
    inp = make_inputs(1, 8, 2, 4, 4, N=2)
    for cu in (torch.tensor([1, 3, 8]), torch.tensor([0, 3, 7]), torch.tensor([0, 5, 3, 8])):
        with pytest.raises(ValueError, match="cu_seqlens"):
            chunk_retention(**inp, cu_seqlens=cu)
    with pytest.raises(ValueError, match="initial_state"):
        fused_recurrent_retention(**inp, cu_seqlens=torch.tensor([0, 2, 5, 8]))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_retention(**inp, chunk_size=3)
    with pytest.raises(DeprecationWarning):
        chunk_retention(**inp, head_first=False)
    with pytest.raises(TypeError):
        fused_chunk_retention(**inp, chunk_size=64)     # no **kwargs in FLA
    with pytest.raises(TypeError, match="reverse"):
        fused_recurrent_retention(**inp, reverse=0)
