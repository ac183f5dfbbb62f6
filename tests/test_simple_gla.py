"""simple GLA (chunk / fused_chunk / fused_recurrent / parallel) against the fp64 recurrence."""
from __future__ import annotations

import time

import pytest
import torch

from fla_cuda.ops.simple_gla import (chunk_simple_gla, fused_chunk_simple_gla, fused_recurrent_simple_gla,
                                     parallel_simple_gla, simple_gla_chunk_torch)
from fla_cuda.reference.simple_gla import simple_gla_attention_reference, simple_gla_reference
from tests.utils import assert_close, fake_recurrent_kernel, grads, log_gate, make_cu_seqlens, randn

STATE_OPS = [chunk_simple_gla, fused_chunk_simple_gla, fused_recurrent_simple_gla]
ALL_OPS = STATE_OPS + [parallel_simple_gla]
GATES = ["g", "g_gamma", "none"]


def _ids(fns):
    return [f.__name__ for f in fns]


def make_inputs(B, T, H, K, V, gate, *, dtype=torch.float32, N=None, state=True, requires_grad=False):
    q, k = randn(B, T, H, K, dtype=dtype), randn(B, T, H, K, dtype=dtype)
    v = randn(B, T, H, V, dtype=dtype)
    g = log_gate(B, T, H) if gate == "g" else None
    # gamma in [log 0.5, log 0.99]: a real decay, not zero
    g_gamma = torch.linspace(0.5, 0.99, H).log() if gate == "g_gamma" else None
    h0 = randn(B if N is None else N, H, K, V) if state else None
    out = dict(q=q, k=k, v=v, g=g, g_gamma=g_gamma, initial_state=h0)
    if requires_grad:
        for x in out.values():
            if x is not None:
                x.requires_grad_(True)
    return out


def call(op, inp, **kw):
    args = dict(inp)
    if op is parallel_simple_gla:
        args.pop("initial_state")
        gamma = args.pop("g_gamma")
        if gamma is not None:    # parallel_simple_gla has no g_gamma: pass the expanded gate
            B, T, H = args["q"].shape[:3]
            args["g"] = gamma[None, None].expand(B, T, H)
        kw.pop("output_final_state", None)
        return op(**args, **kw)[0], None
    return op(**args, **kw)


def reference(inp, **kw):
    return simple_gla_reference(**inp, **kw)


@pytest.mark.parametrize("T", [1, 63, 500])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("op", ALL_OPS, ids=_ids(ALL_OPS))
def test_forward(op, gate, T):
    inp = make_inputs(2, T, 2, 64, 64, gate, state=op is not parallel_simple_gla)
    o, ht = call(op, inp, output_final_state=True)
    ro, rh = reference(inp, output_final_state=True)
    assert o.dtype == torch.float32
    assert_close("o", ro, o, 1e-5)
    if op is not parallel_simple_gla:
        assert ht.dtype == torch.float32 and ht.shape == (2, 2, 64, 64)
        assert_close("ht", rh, ht, 1e-5)


@pytest.mark.parametrize("op,gate,kw", [(chunk_simple_gla, "g", {}),
                                        (fused_recurrent_simple_gla, "g_gamma", {"reverse": True}),
                                        (parallel_simple_gla, "g", {"output_attentions": False})],
                         ids=["chunk", "recurrent-reverse", "parallel"])
def test_forward_long(op, gate, kw):
    inp = make_inputs(1, 2049, 2, 128, 128, gate, state=op is not parallel_simple_gla)
    o, ht = call(op, inp, output_final_state=True, **kw)
    ro, rh = reference(inp, output_final_state=True, reverse=kw.get("reverse", False))
    assert_close("o", ro, o, 2e-5)
    if ht is not None:
        assert_close("ht", rh, ht, 2e-5)


@pytest.mark.parametrize("D,scale", [(64, None), (128, 0.37), (32, 1.0)])
def test_head_dims_and_scale(D, scale):
    inp = make_inputs(1, 70, 2, D, D // 2, "g")
    o, ht = chunk_simple_gla(**inp, scale=scale, output_final_state=True)
    ro, rh = reference(inp, scale=scale, output_final_state=True)
    assert_close("o", ro, o, 1e-5)
    assert_close("ht", rh, ht, 1e-5)


def _check_grads(op, inp, *, kw=None, ref_kw=None, ratio=1e-4):
    kw, ref_kw = kw or {}, ref_kw or {}
    o, ht = call(op, inp, output_final_state=True, **kw)
    ro, rh = reference(inp, output_final_state=True, **ref_kw)
    assert_close("o", ro, o, ratio / 10 if o.dtype == torch.float32 else ratio)
    do = torch.randn_like(ro)
    leaves = [inp[n] for n in ("q", "k", "v", "g", "g_gamma", "initial_state")]
    if ht is None:
        got, want = grads([o], leaves, [do.to(o.dtype)]), grads([ro], leaves, [do])
    else:
        dht = torch.randn_like(rh)
        got = grads([o, ht], leaves, [do.to(o.dtype), dht.to(ht.dtype)])
        want = grads([ro, rh], leaves, [do, dht])
    for name, x, a, b in zip(("dq", "dk", "dv", "dg", "dg_gamma", "dh0"), leaves, want, got):
        if x is None or (name == "dh0" and op is parallel_simple_gla):
            continue
        assert b is not None, f"{name} missing"
        assert_close(name, a, b, ratio)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("op", ALL_OPS, ids=_ids(ALL_OPS))
def test_backward(op, gate):
    inp = make_inputs(2, 100, 2, 32, 16, gate, requires_grad=True, state=op is not parallel_simple_gla)
    _check_grads(op, inp)


@pytest.mark.parametrize("op", ALL_OPS, ids=_ids(ALL_OPS))
def test_varlen(op):
    lengths = [1, 63, 0, 130, 7]
    cu = make_cu_seqlens(lengths)
    inp = make_inputs(1, sum(lengths), 2, 32, 16, "g", N=len(lengths), requires_grad=True,
                      state=op is not parallel_simple_gla)
    _check_grads(op, inp, kw={"cu_seqlens": cu}, ref_kw={"cu_seqlens": cu})
    if op is not parallel_simple_gla:
        # each sequence matches a separate call (state does not leak across boundaries)
        o, ht = op(**inp, output_final_state=True, cu_seqlens=cu)
        bos = 64
        o3, ht3 = op(inp["q"][:, bos:bos + 130], inp["k"][:, bos:bos + 130], inp["v"][:, bos:bos + 130],
                     inp["g"][:, bos:bos + 130], initial_state=inp["initial_state"][3:4], output_final_state=True)
        assert_close("o[seq3]", o3, o[:, bos:bos + 130], 1e-6)
        assert_close("ht[seq3]", ht3, ht[3:4], 1e-6)
        assert torch.equal(ht[2], inp["initial_state"][2])   # empty sequence keeps its state


@pytest.mark.parametrize("gate", ["g", "g_gamma"])
@pytest.mark.parametrize("varlen", [False, True])
def test_reverse(gate, varlen):
    lengths = [5, 70, 1]
    cu = make_cu_seqlens(lengths) if varlen else None
    B, T = (1, sum(lengths)) if varlen else (2, 77)
    inp = make_inputs(B, T, 2, 16, 16, gate, N=3 if varlen else None, requires_grad=True)
    _check_grads(fused_recurrent_simple_gla, inp, kw={"reverse": True, "cu_seqlens": cu},
                 ref_kw={"reverse": True, "cu_seqlens": cu})
    # reverse really scans backwards: differs from the forward scan
    o_fwd, _ = fused_recurrent_simple_gla(**inp, cu_seqlens=cu)
    o_rev, _ = fused_recurrent_simple_gla(**inp, cu_seqlens=cu, reverse=True)
    assert (o_fwd - o_rev).abs().max() > 1e-2


@pytest.mark.parametrize("op", [chunk_simple_gla, fused_recurrent_simple_gla], ids=["chunk", "recurrent"])
def test_state_v_first(op):
    inp = make_inputs(2, 90, 2, 16, 8, "g")
    ro, rh = reference(inp, output_final_state=True)
    inp_t = dict(inp, initial_state=inp["initial_state"].transpose(-1, -2).contiguous())
    o, ht = op(**inp_t, output_final_state=True, state_v_first=True)
    assert ht.shape == (2, 2, 8, 16)
    assert_close("o", ro, o, 1e-5)
    assert_close("ht", rh.transpose(-1, -2), ht, 1e-5)
    with pytest.raises(ValueError, match="initial_state"):   # K-first state where V-first is expected
        op(**inp, state_v_first=True)
    if op is fused_recurrent_simple_gla:
        with pytest.warns(DeprecationWarning):
            o2, ht2 = op(**inp_t, output_final_state=True, transpose_state_layout=True)
        assert torch.equal(ht2, ht)
        with pytest.raises(ValueError, match="state_v_first"):
            op(**inp_t, state_v_first=True, transpose_state_layout=True)


@pytest.mark.parametrize("op", ALL_OPS, ids=_ids(ALL_OPS))
def test_bf16(op):
    inp = make_inputs(2, 300, 2, 64, 64, "g", dtype=torch.bfloat16, requires_grad=True,
                      state=op is not parallel_simple_gla)
    o, _ = call(op, inp, output_final_state=True)
    assert o.dtype == torch.bfloat16
    _check_grads(op, inp, ratio=1e-2)


@pytest.mark.parametrize("gate", ["g", "g_gamma"])
@pytest.mark.parametrize("op", ALL_OPS, ids=_ids(ALL_OPS))
def test_gradcheck(op, gate):
    torch.manual_seed(1)
    inp = make_inputs(1, 10, 2, 4, 6, gate, dtype=torch.float64, state=op is not parallel_simple_gla)
    inp = {n: (None if x is None else x.double().requires_grad_()) for n, x in inp.items()}
    names = [n for n, x in inp.items() if x is not None]
    kw = {"chunk_size": 4} if op is chunk_simple_gla else {}    # several chunks at T=10

    def f(*xs):
        o, ht = call(op, dict(inp, **dict(zip(names, xs))), output_final_state=True, **kw)
        return (o,) if ht is None else (o, ht)

    assert torch.autograd.gradcheck(f, [inp[n] for n in names])


@pytest.mark.parametrize("op", STATE_OPS, ids=_ids(STATE_OPS))
def test_extreme_gates(op):
    inp = make_inputs(1, 150, 2, 16, 16, "g", requires_grad=True)
    with torch.no_grad():
        inp["g"][0, 3, 0] = -1e4
        inp["g"][0, 70, 1] = float("-inf")
        inp["g"][0, 100:110, 0] = -1e4
        inp["g"][0, 120, :] = -50.0
    _check_grads(op, inp)


def test_chunk_torch_core_matches_reference():
    """The reusable chunkwise core: validated inputs, any chunk size, fp32 out on request."""
    inp = make_inputs(1, 50, 2, 8, 8, "g")
    for cs in (1, 16, 64):
        o, ht = simple_gla_chunk_torch(inp["q"], inp["k"], inp["v"], inp["g"], scale=0.5,
                                       initial_state=inp["initial_state"], output_final_state=True,
                                       chunk_size=cs, o_dtype=torch.float64)
        ro, rh = reference(inp, scale=0.5, output_final_state=True)
        assert o.dtype == torch.float64
        assert_close("o", ro, o, 1e-5)
        assert_close("ht", rh, ht, 1e-5)


def test_parallel_attentions():
    inp = make_inputs(2, 70, 2, 16, 8, "g", state=False)
    o, A = parallel_simple_gla(inp["q"], inp["k"], inp["v"], inp["g"], scale=0.3, output_attentions=True)
    ro, rA = simple_gla_attention_reference(inp["q"], inp["k"], inp["v"], inp["g"], scale=0.3)
    assert A.shape == (2, 2, 70, 70) and A.dtype == torch.float32
    assert_close("o", ro, o, 1e-5)
    assert_close("attn", rA, A, 1e-5)
    assert (A.triu(1) == 0).all()
    o2, A2 = parallel_simple_gla(inp["q"], inp["k"], inp["v"], inp["g"], scale=0.3)
    assert A2 is None
    assert_close("o (no attn)", ro, o2, 1e-5)
    ob, Ab = parallel_simple_gla(*(x.bfloat16() for x in (inp["q"], inp["k"], inp["v"])), inp["g"],
                                 output_attentions=True)
    assert Ab.dtype == torch.bfloat16 and ob.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="output_attentions"):
        parallel_simple_gla(inp["q"][:1], inp["k"][:1], inp["v"][:1], output_attentions=True,
                            cu_seqlens=make_cu_seqlens([30, 40]))


def test_cuda_dispatch_plumbing(monkeypatch):
    """The CUDA branch of fused_recurrent_simple_gla (checked with a fake kernel module):
    g_gamma is expanded to an fp32 [B,T,H] g, states are K-first, reverse/cu_seqlens pass through."""
    calls = fake_recurrent_kernel(monkeypatch, "fused_recurrent_simple_gla")
    lengths = [3, 9]
    cu = make_cu_seqlens(lengths)
    inp = make_inputs(1, 12, 2, 4, 6, "g_gamma", N=2)
    h0_vk = inp["initial_state"].transpose(-1, -2).contiguous()
    o, ht = fused_recurrent_simple_gla(**dict(inp, initial_state=h0_vk), output_final_state=True,
                                       reverse=True, state_v_first=True, cu_seqlens=cu)
    assert len(calls) == 1
    c = calls[0]
    assert c["g"].shape == (1, 12, 2) and c["g"].dtype == torch.float32
    assert torch.equal(c["h0"], inp["initial_state"]) and c["reverse"] and c["cu_seqlens"] is cu
    assert not c["kw"]
    ro, rh = reference(inp, output_final_state=True, reverse=True, cu_seqlens=cu)
    assert_close("o", ro, o, 1e-5)
    assert_close("ht", rh.transpose(-1, -2), ht, 1e-5)
    chunk_simple_gla(**inp, cu_seqlens=cu)     # other ops stay on the PyTorch path
    assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["g", "g_gamma"])
def test_fused_recurrent_cuda(gate):
    inp = make_inputs(2, 300, 2, 64, 64, gate, requires_grad=True)
    inp = {n: (None if x is None else x.detach().cuda().requires_grad_()) for n, x in inp.items()}
    _check_grads(fused_recurrent_simple_gla, inp, kw={"reverse": True}, ref_kw={"reverse": True})


def test_cpu_speed():
    """B=1, H=4, T=8192, K=V=64 forward+backward stays in seconds (no per-token loop)."""
    inp = make_inputs(1, 8192, 4, 64, 64, "g", requires_grad=True, state=False)
    t = time.perf_counter()
    o, _ = chunk_simple_gla(**inp)
    o.sum().backward()
    assert time.perf_counter() - t < 30


# ------------------------------------------------------------------------------ bad inputs

def _bad_cases():
    B, T, H, K, V = 2, 8, 2, 4, 4
    cu = make_cu_seqlens([3, 5])
    ok = lambda: make_inputs(B, T, H, K, V, "g")  # noqa: E731
    one = lambda: make_inputs(1, T, H, K, V, "g", N=2)  # noqa: E731
    return [
        ("q rank", lambda: dict(ok(), q=randn(B, T, H * K)), ValueError, "q"),
        ("k shape", lambda: dict(ok(), k=randn(B, T, H, K + 1)), ValueError, "k"),
        ("v heads", lambda: dict(ok(), v=randn(B, T, H + 1, V)), ValueError, "v"),
        ("v length", lambda: dict(ok(), v=randn(B, T + 1, H, V)), ValueError, "v"),
        ("q int", lambda: dict(ok(), q=torch.ones(B, T, H, K, dtype=torch.int32)), TypeError, "q"),
        ("dtype mix", lambda: dict(ok(), k=randn(B, T, H, K, dtype=torch.bfloat16)), TypeError, "k"),
        ("q not tensor", lambda: dict(ok(), q=[[1.0]]), TypeError, "q"),
        ("g shape", lambda: dict(ok(), g=log_gate(B, T, H, K)), ValueError, "g"),
        ("g heads", lambda: dict(ok(), g=log_gate(B, T, H + 1)), ValueError, "g"),
        ("g int", lambda: dict(ok(), g=torch.zeros(B, T, H, dtype=torch.int64)), TypeError, "g"),
        ("g_gamma shape", lambda: dict(ok(), g=None, g_gamma=torch.zeros(H + 1)), ValueError, "g_gamma"),
        ("g and g_gamma", lambda: dict(ok(), g_gamma=torch.full((H,), -0.1)), ValueError, "g_gamma"),
        ("h0 shape", lambda: dict(ok(), initial_state=randn(B, H, K, V + 1)), ValueError, "initial_state"),
        ("h0 N", lambda: dict(ok(), initial_state=randn(B + 1, H, K, V)), ValueError, "initial_state"),
        ("h0 dtype", lambda: dict(ok(), initial_state=randn(B, H, K, V).bfloat16()), TypeError, "initial_state"),
        ("scale type", lambda: dict(ok(), scale="1"), TypeError, "scale"),
        ("scale nan", lambda: dict(ok(), scale=float("nan")), ValueError, "scale"),
        ("flag type", lambda: dict(ok(), output_final_state=1), TypeError, "output_final_state"),
        ("cu B>1", lambda: dict(ok(), initial_state=None, cu_seqlens=cu), ValueError, "cu_seqlens"),
        ("cu float", lambda: dict(one(), cu_seqlens=cu.float()), TypeError, "cu_seqlens"),
        ("cu start", lambda: dict(one(), cu_seqlens=torch.tensor([1, 3, 8])), ValueError, "cu_seqlens"),
        ("cu end", lambda: dict(one(), cu_seqlens=torch.tensor([0, 3, 7])), ValueError, "cu_seqlens"),
        ("cu decreasing", lambda: dict(one(), cu_seqlens=torch.tensor([0, 5, 3, 8])), ValueError, "cu_seqlens"),
        ("cu vs h0", lambda: dict(one(), cu_seqlens=torch.tensor([0, 2, 5, 8])), ValueError, "initial_state"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("op", ALL_OPS, ids=_ids(ALL_OPS))
def test_bad_inputs(op, case):
    _, make, exc, name = case
    args = make()
    if op is parallel_simple_gla:
        if "initial_state" in case[0] or "h0" in case[0] or "g_gamma" in case[0] or "flag" in case[0]:
            pytest.skip("parallel_simple_gla has no such argument")
        args.pop("initial_state")
        args.pop("g_gamma")
    with pytest.raises(exc, match=name):
        op(**args)


def test_op_specific_kwargs():
    inp = make_inputs(1, 8, 2, 4, 4, "g")
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_simple_gla(**inp, chunk_size=48)
    with pytest.raises(DeprecationWarning):
        chunk_simple_gla(**inp, head_first=False)
    chunk_simple_gla(**inp, some_unknown_kwarg=1)         # FLA's **kwargs swallows it
    with pytest.raises(TypeError):
        fused_chunk_simple_gla(**inp, some_unknown_kwarg=1)   # no **kwargs in FLA
    with pytest.raises(TypeError, match="output_attentions"):
        parallel_simple_gla(inp["q"], inp["k"], inp["v"], output_attentions=None)
    with pytest.raises(TypeError, match="reverse"):
        fused_recurrent_simple_gla(**inp, reverse="yes")
