"""GLA: chunk_gla and fused_recurrent_gla against the fp64 step-by-step oracle."""
from __future__ import annotations

import warnings

import pytest
import torch

import fla_cuda.ops.gla as gla_mod
from fla_cuda.ops.gla import chunk_gla, fused_recurrent_gla, gla_chunk_torch
from fla_cuda.reference.gla import gla_reference
from tests.utils import assert_close, grads, log_gate, make_cu_seqlens

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


def run_case(op, *, B=2, T=50, H=2, K=32, V=32, dtype=F32, gk=True, gv=False, gate_dtype=None,
             divisor=1.0, h0=True, final=True, scale=None, reverse=False, state_v_first=False,
             lengths=None, grad=True, tol=None, gate_edit=None, device="cpu"):
    """Run `op` ('chunk' or 'fused') and the fp64 oracle on the same random inputs; compare all."""
    gate_dtype = gate_dtype or dtype
    if lengths is not None:
        B, T = 1, sum(lengths)
    cu = None if lengths is None else make_cu_seqlens(lengths, device=device)
    N = B if lengths is None else len(lengths)
    x = dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, H, V))
    x = {n: t.to(device=device, dtype=dtype) for n, t in x.items()}
    if gk:
        x["gk"] = log_gate(B, T, H, K, divisor=divisor).to(device=device, dtype=gate_dtype)
    if gv:
        x["gv"] = log_gate(B, T, H, V, divisor=divisor).to(device=device, dtype=gate_dtype)
    if gate_edit is not None:
        gate_edit(x)
    if h0:
        shape = (N, H, V, K) if state_v_first else (N, H, K, V)
        x["initial_state"] = torch.randn(*shape, device=device, dtype=F64 if dtype == F64 else F32)
    for t in x.values():
        t.requires_grad_(grad)
    ref_x = {n: t.detach().to(F64).requires_grad_(grad) for n, t in x.items()}

    common = dict(scale=scale, output_final_state=final, state_v_first=state_v_first, cu_seqlens=cu)
    if op == "chunk":
        assert not gv and not reverse
        o, ht = chunk_gla(x["q"], x["k"], x["v"], x["gk"], initial_state=x.get("initial_state"), **common)
    else:
        o, ht = fused_recurrent_gla(x["q"], x["k"], x["v"], gk=x.get("gk"), gv=x.get("gv"),
                                    initial_state=x.get("initial_state"), reverse=reverse, **common)
    ro, rht = gla_reference(ref_x["q"], ref_x["k"], ref_x["v"], ref_x.get("gk"), ref_x.get("gv"),
                            initial_state=ref_x.get("initial_state"), reverse=reverse, **common)

    if tol is None:
        tol = 1e-2 if dtype == BF16 or gate_dtype == BF16 else 2e-5
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    assert_close("o", ro, o, tol)
    if final:
        assert ht.dtype == (F64 if dtype == F64 else F32)
        assert_close("ht", rht, ht, tol)
    else:
        assert ht is None
    if grad:
        do = torch.randn_like(ro)
        outs, refs, cots = [o], [ro], [do.to(dtype)]
        if final:
            dht = torch.randn_like(rht)
            outs.append(ht), refs.append(rht), cots.append(dht.to(ht.dtype))
        names = list(x)
        g_out = grads(outs, [x[n] for n in names], cots)
        g_ref = grads(refs, [ref_x[n] for n in names], [do] + ([dht] if final else []))
        # the chunk kernels' gate gradient is a sum of cancelling terms q dq - k dk from bf16
        # tensor-core operands: held to the chunk-kernel bound (tests/test_gla_chunk_cuda.py)
        kernel_dg = op == "chunk" and device == "cuda" and dtype in (BF16, torch.float16)
        for n, a, r in zip(names, g_out, g_ref):
            assert a is not None and a.dtype == x[n].dtype, n
            t = tol if dtype != F32 else 5 * tol
            assert_close(f"d{n}", r, a, max(t, 5e-2) if (kernel_dg and n == "gk") else t)
    return o, ht


# --------------------------------------------------------------------------------------
# chunk_gla
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,K,V,dtype,gate_dtype,divisor,h0,final,scale", [
    (1, 32, 32, F32, F32, 1.0, True, True, None),
    (63, 32, 16, F32, F32, 1.0, True, True, 0.3),
    (500, 32, 32, F32, F32, 1.0, False, True, None),
    (500, 16, 32, F32, F32, 16.0, True, False, None),
    (130, 64, 64, F32, F32, 1.0, True, True, None),
    (70, 128, 128, F32, F32, 1.0, True, True, None),
    (200, 64, 64, BF16, F32, 1.0, True, True, None),
    (200, 64, 64, BF16, BF16, 1.0, True, True, None),
    (63, 32, 32, BF16, BF16, 16.0, False, True, 0.5),
    (100, 16, 16, F64, F64, 1.0, True, True, None),
])
def test_chunk_gla_matches_reference(T, K, V, dtype, gate_dtype, divisor, h0, final, scale):
    run_case("chunk", T=T, K=K, V=V, dtype=dtype, gate_dtype=gate_dtype, divisor=divisor,
             h0=h0, final=final, scale=scale)


@pytest.mark.parametrize("KV", [64, 128])
def test_forward_long(KV):
    """T = 2049: many chunks plus a ragged tail, head dims 64 and 128 (forward only)."""
    run_case("chunk", B=1, T=2049, H=1, K=KV, V=KV, grad=False)
    run_case("fused", B=1, T=2049, H=1, K=KV, V=KV, gv=True, grad=False)


@pytest.mark.parametrize("op,lengths,reverse,state_v_first", [
    ("chunk", [1, 63, 200, 17], False, False),
    ("chunk", [130, 1, 5], False, True),
    ("fused", [1, 63, 200, 17], False, False),
    ("fused", [64, 0, 1, 90], True, False),
])
def test_varlen(op, lengths, reverse, state_v_first):
    run_case(op, lengths=lengths, K=32, V=16, gv=(op == "fused"), reverse=reverse,
             state_v_first=state_v_first)


def test_varlen_equals_separate_calls():
    torch.manual_seed(1)
    lengths = [7, 100, 1]
    T, H, K, V = sum(lengths), 2, 16, 8
    q, k, v = torch.randn(1, T, H, K), torch.randn(1, T, H, K), torch.randn(1, T, H, V)
    g = log_gate(1, T, H, K)
    h0 = torch.randn(3, H, K, V)
    o, ht = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                      cu_seqlens=make_cu_seqlens(lengths))
    s = 0
    for i, n in enumerate(lengths):
        oi, hi = chunk_gla(q[:, s:s + n], k[:, s:s + n], v[:, s:s + n], g[:, s:s + n],
                           initial_state=h0[i:i + 1], output_final_state=True)
        torch.testing.assert_close(o[:, s:s + n], oi, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ht[i:i + 1], hi, rtol=1e-5, atol=1e-5)
        s += n


# --------------------------------------------------------------------------------------
# fused_recurrent_gla: gate combinations, reverse, dtypes
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("gk,gv", [(True, False), (False, True), (True, True), (False, False)])
@pytest.mark.parametrize("reverse", [False, True])
def test_fused_recurrent_gates(gk, gv, reverse):
    run_case("fused", T=100, K=32, V=16, gk=gk, gv=gv, reverse=reverse)


@pytest.mark.parametrize("dtype,gate_dtype,divisor", [
    (BF16, F32, 1.0), (BF16, BF16, 1.0), (BF16, F32, 16.0), (F32, F32, 16.0),
])
def test_fused_recurrent_gk_gv_dtypes(dtype, gate_dtype, divisor):
    run_case("fused", T=150, K=64, V=32, gv=True, dtype=dtype, gate_dtype=gate_dtype, divisor=divisor,
             scale=0.2)


def test_fused_gv_only_long_reverse_no_state():
    run_case("fused", T=300, K=16, V=64, gk=False, gv=True, reverse=True, h0=False, final=False)


# --------------------------------------------------------------------------------------
# exactness for strong gates
# --------------------------------------------------------------------------------------

def _strong(x):
    """Gates of -1e4 and -inf on some steps/channels, very strong gates elsewhere."""
    with torch.no_grad():
        for name in ("gk", "gv"):
            if name in x:
                g = x[name]
                g.mul_(8.0)                          # per-step decays down to ~exp(-40)
                g[:, 3] = -1e4
                g[:, 70, :, :3] = float("-inf")
                g[:, 100:103, 0] = -1e4


@pytest.mark.parametrize("op,gv", [("chunk", False), ("fused", True)])
def test_extreme_gates_finite_and_exact(op, gv):
    o, ht = run_case(op, T=150, K=16, V=16, gv=gv, gate_edit=_strong)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()


def test_strong_gates_no_overflow_fp32_bf16():
    # cumulative log gates reach ~-1e4 per chunk: naive exp(-G) factorisations overflow here
    boost = lambda x: x["gk"].data.mul_(50.0)  # noqa: E731
    run_case("chunk", T=200, K=32, V=32, gate_edit=boost)
    run_case("chunk", T=200, K=32, V=32, dtype=BF16, gate_edit=boost)


# --------------------------------------------------------------------------------------
# layouts and kwargs
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["chunk", "fused"])
def test_state_v_first(op):
    o, ht = run_case(op, T=40, K=16, V=8, state_v_first=True)
    assert ht.shape == (2, 2, 8, 16)


def test_state_v_first_is_transpose_and_deprecated_alias():
    q, k, v = torch.randn(1, 20, 2, 8), torch.randn(1, 20, 2, 8), torch.randn(1, 20, 2, 4)
    gk, h0 = log_gate(1, 20, 2, 8), torch.randn(1, 2, 8, 4)
    o1, h1 = fused_recurrent_gla(q, k, v, gk, initial_state=h0, output_final_state=True)
    o2, h2 = fused_recurrent_gla(q, k, v, gk, initial_state=h0.transpose(-1, -2).contiguous(),
                                 output_final_state=True, state_v_first=True)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(h1.transpose(-1, -2), h2)
    with pytest.warns(DeprecationWarning):
        o3, h3 = fused_recurrent_gla(q, k, v, gk, initial_state=h0.transpose(-1, -2).contiguous(),
                                     output_final_state=True, transpose_state_layout=True)
    torch.testing.assert_close(h3, h2)
    with pytest.raises(ValueError, match="state_v_first"):
        fused_recurrent_gla(q, k, v, gk, state_v_first=True, transpose_state_layout=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o4, _ = fused_recurrent_gla(q, k, v, gk, initial_state=h0, some_unknown_kwarg=1)
    torch.testing.assert_close(o4, o1)


def test_fused_and_chunk_agree_and_default_scale():
    q, k, v = torch.randn(2, 33, 2, 16), torch.randn(2, 33, 2, 16), torch.randn(2, 33, 2, 8)
    g = log_gate(2, 33, 2, 16)
    o1, _ = chunk_gla(q, k, v, g)
    o2, _ = fused_recurrent_gla(q, k, v, gk=g)
    o3, _ = chunk_gla(q, k, v, g, scale=0.25)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(o1, o3)  # 16 ** -0.5 == 0.25
    assert not torch.allclose(o1, chunk_gla(q, k, v, g, scale=0.3)[0])


def test_gla_chunk_torch_building_block():
    q, k, v = torch.randn(1, 77, 2, 8), torch.randn(1, 77, 2, 8), torch.randn(1, 77, 2, 4)
    gk, gv = log_gate(1, 77, 2, 8), log_gate(1, 77, 2, 4)
    o, ht = gla_chunk_torch(q, k, v, gk, gv, scale=0.5, output_final_state=True)
    ro, rht = gla_reference(q, k, v, gk, gv, scale=0.5, output_final_state=True)
    assert_close("o", ro, o, 1e-5)
    assert_close("ht", rht, ht, 1e-5)


# --------------------------------------------------------------------------------------
# gradcheck (fp64, tiny)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_chunk", [1, 2, 8, 32])
def test_chunk_sizes(monkeypatch, max_chunk):
    """Every chunk size of the binary-split scheme (C = 1 is the pure state loop)."""
    monkeypatch.setattr(gla_mod, "MAX_CHUNK", max_chunk)
    run_case("fused", T=45, K=8, V=8, gv=True)
    run_case("fused", lengths=[3, 1, 20], K=8, V=4, gv=True, reverse=True)


def test_gradcheck_chunk_gla(monkeypatch):
    monkeypatch.setattr(gla_mod, "MAX_CHUNK", 4)   # several chunks and split levels at T = 10
    torch.manual_seed(2)
    B, T, H, K, V = 2, 10, 1, 4, 4
    q, k, v = (torch.randn(B, T, H, d, dtype=F64, requires_grad=True) for d in (K, K, V))
    g = log_gate(B, T, H, K, dtype=F64).requires_grad_()
    h0 = torch.randn(B, H, K, V, dtype=F64, requires_grad=True)

    def f(q, k, v, g, h0):
        return chunk_gla(q, k, v, g, scale=0.7, initial_state=h0, output_final_state=True)

    assert torch.autograd.gradcheck(f, (q, k, v, g, h0))


@pytest.mark.parametrize("reverse,varlen", [(False, False), (True, True)])
def test_gradcheck_fused_recurrent_gla(monkeypatch, reverse, varlen):
    monkeypatch.setattr(gla_mod, "MAX_CHUNK", 4)
    torch.manual_seed(3)
    B, T, H, K, V = (1, 11, 1, 4, 5) if varlen else (1, 10, 1, 4, 5)
    cu = make_cu_seqlens([4, 1, 6]) if varlen else None
    N = 3 if varlen else B
    q, k, v = (torch.randn(B, T, H, d, dtype=F64, requires_grad=True) for d in (K, K, V))
    gk = log_gate(B, T, H, K, dtype=F64).requires_grad_()
    gv = log_gate(B, T, H, V, dtype=F64).requires_grad_()
    h0 = torch.randn(N, H, K, V, dtype=F64, requires_grad=True)

    def f(q, k, v, gk, gv, h0):
        return fused_recurrent_gla(q, k, v, gk, gv, initial_state=h0, output_final_state=True,
                                   reverse=reverse, cu_seqlens=cu)

    assert torch.autograd.gradcheck(f, (q, k, v, gk, gv, h0), fast_mode=varlen)


# --------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------

def _base():
    return dict(q=torch.randn(1, 8, 2, 4), k=torch.randn(1, 8, 2, 4), v=torch.randn(1, 8, 2, 3),
                g=log_gate(1, 8, 2, 4))


BAD = [
    # (name, edit(kw) -> None, exception, argument named in the message)
    ("q rank", lambda kw: kw.update(q=kw["q"][0]), ValueError, "`q`"),
    ("k shape", lambda kw: kw.update(k=torch.randn(1, 8, 2, 5)), ValueError, "`k`"),
    ("v heads", lambda kw: kw.update(v=torch.randn(1, 8, 4, 3)), ValueError, "`v`"),
    ("v length", lambda kw: kw.update(v=torch.randn(1, 7, 2, 3)), ValueError, "`v`"),
    ("q int", lambda kw: kw.update(q=kw["q"].long()), TypeError, "`q`"),
    ("dtype mix", lambda kw: kw.update(k=kw["k"].double()), TypeError, "`k`"),
    ("gate shape", lambda kw: kw.update(g=torch.zeros(1, 8, 2, 3)), ValueError, "`gk?`"),
    ("gate rank", lambda kw: kw.update(g=torch.zeros(1, 8, 2)), ValueError, "`gk?`"),
    ("gate int", lambda kw: kw.update(g=torch.zeros(1, 8, 2, 4, dtype=torch.int32)), TypeError, "`gk?`"),
    ("gate fp16", lambda kw: kw.update(g=kw["g"].half()), TypeError, "`gk?`"),
    ("cu start", lambda kw: kw.update(cu_seqlens=torch.tensor([1, 4, 8])), ValueError, "cu_seqlens"),
    ("cu end", lambda kw: kw.update(cu_seqlens=torch.tensor([0, 4, 7])), ValueError, "cu_seqlens"),
    ("cu decreasing", lambda kw: kw.update(cu_seqlens=torch.tensor([0, 5, 3, 8])), ValueError, "cu_seqlens"),
    ("cu float", lambda kw: kw.update(cu_seqlens=torch.tensor([0., 8.])), TypeError, "cu_seqlens"),
    ("cu B>1", lambda kw: kw.update(q=torch.randn(2, 4, 2, 4), k=torch.randn(2, 4, 2, 4),
                                    v=torch.randn(2, 4, 2, 3), g=log_gate(2, 4, 2, 4),
                                    cu_seqlens=torch.tensor([0, 4])), ValueError, "cu_seqlens"),
    ("h0 shape", lambda kw: kw.update(initial_state=torch.zeros(1, 2, 3, 4)), ValueError, "initial_state"),
    ("h0 N vs cu", lambda kw: kw.update(initial_state=torch.zeros(1, 2, 4, 3),
                                        cu_seqlens=torch.tensor([0, 3, 8])), ValueError, "initial_state"),
    ("h0 dtype", lambda kw: kw.update(initial_state=torch.zeros(1, 2, 4, 3, dtype=BF16)), TypeError,
     "initial_state"),
    ("h0 rank", lambda kw: kw.update(initial_state=torch.zeros(2, 4, 3)), ValueError, "initial_state"),
    ("scale str", lambda kw: kw.update(scale="0.5"), TypeError, "scale"),
    ("scale nan", lambda kw: kw.update(scale=float("nan")), ValueError, "scale"),
    ("final flag", lambda kw: kw.update(output_final_state=1), TypeError, "output_final_state"),
    ("v-first flag", lambda kw: kw.update(state_v_first="yes"), TypeError, "state_v_first"),
]


@pytest.mark.parametrize("name,edit,exc,match", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("op", ["chunk", "fused"])
def test_bad_inputs(op, name, edit, exc, match):
    kw = _base()
    edit(kw)
    g = kw.pop("g")
    with pytest.raises(exc, match=match):
        if op == "chunk":
            chunk_gla(kw.pop("q"), kw.pop("k"), kw.pop("v"), g, **kw)
        else:
            fused_recurrent_gla(kw.pop("q"), kw.pop("k"), kw.pop("v"), gk=g, **kw)


def test_bad_inputs_op_specific():
    kw = _base()
    q, k, v, g = kw["q"], kw["k"], kw["v"], kw["g"]
    with pytest.raises(TypeError, match="`g`"):
        chunk_gla(q, k, v, None)
    with pytest.raises(ValueError, match="`gv`"):
        fused_recurrent_gla(q, k, v, gv=torch.zeros(1, 8, 2, 4))   # gv is [B, T, H, V]
    with pytest.raises(TypeError, match="`gv`"):
        fused_recurrent_gla(q, k, v, gv=torch.zeros(1, 8, 2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="reverse"):
        fused_recurrent_gla(q, k, v, gk=g, reverse=None)
    with pytest.raises(ValueError, match="cu_seqlens_cpu"):
        chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 3, 8]), cu_seqlens_cpu=torch.tensor([0, 4, 8]))
    with pytest.raises(ValueError, match="initial_state"):  # [N, H, K, V] given where V-first expected
        chunk_gla(q, k, v, g, initial_state=torch.zeros(1, 2, 4, 3), state_v_first=True)
    # a matching host copy is accepted
    chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 3, 8]), cu_seqlens_cpu=torch.tensor([0, 3, 8]))


# --------------------------------------------------------------------------------------
# GPU (skipped without CUDA + extension): the kernel dispatch against the oracle
# --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_fused_recurrent_gla_cuda(dtype):
    run_case("fused", T=300, K=64, V=64, gv=True, dtype=dtype, device="cuda")
    run_case("fused", lengths=[1, 100, 63], K=64, V=64, gv=True, reverse=True, dtype=dtype, device="cuda")
    run_case("chunk", T=300, K=128, V=128, dtype=dtype, device="cuda")
