"""chunk_gated_delta_rule and fused_recurrent_gated_delta_rule against the fp64 oracle."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fla_cuda.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from fla_cuda.reference.delta_rule import gated_delta_rule_reference as ref
from tests.utils import assert_close, log_gate, make_cu_seqlens

OPS = {"chunk": chunk_gated_delta_rule, "fused": fused_recurrent_gated_delta_rule}


def call(op, q, k, v, g, beta, **kw):
    """Both ops with one calling convention (fused takes g and beta by keyword: gk, gv sit between)."""
    if op == "chunk":
        return chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    return fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, **kw)


def make(B, T, H, HV, K, V, *, dtype=torch.float32, l2=True, h0=True, N=None):
    q = torch.randn(B, T, H, K)
    k = torch.randn(B, T, H, K)
    if l2:
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, HV, V)
    g = log_gate(B, T, HV)
    beta = torch.randn(B, T, HV).sigmoid()
    s = torch.randn(N or B, HV, K, V) if h0 else None
    return [x.to(dtype) for x in (q, k, v, g, beta)] + [s]


def leaves(xs, dtype=None):
    return [None if x is None else (x.detach().to(dtype or x.dtype)).requires_grad_() for x in xs]


def check_fwd_bwd(fn, ref_fn, inputs, *, ratio=1e-5, grad_ratio=1e-4, final_state=True, names=None):
    """Outputs, final states and the gradients of every input of fn vs ref_fn in fp64."""
    ours = leaves(inputs)
    refs = leaves(inputs, torch.float64)
    o, ht = fn(*ours)
    ro, rht = ref_fn(*refs)
    assert o.dtype == inputs[2].dtype          # output in the dtype of v (the inputs' dtype)
    assert_close("o", ro, o, ratio)
    outs, routs, cots = [o], [ro], [torch.randn_like(ro)]
    if final_state:
        assert ht.dtype in (torch.float32, torch.float64)
        assert_close("ht", rht, ht, ratio)
        outs.append(ht)
        routs.append(rht)
        cots.append(torch.randn_like(rht))
    else:
        assert ht is None
    live = [i for i, x in enumerate(ours) if x is not None]
    gs = torch.autograd.grad(outs, [ours[i] for i in live], [c.to(x.dtype) for c, x in zip(cots, outs)])
    rgs = torch.autograd.grad(routs, [refs[i] for i in live], cots)
    names = names or NAMES
    for i, a, b in zip(live, gs, rgs):
        assert a.dtype == ours[i].dtype
        assert_close(f"d{names[i]}", b, a, grad_ratio)


NAMES = ["q", "k", "v", "g", "beta", "h0", "x6", "x7"]


def plain(op, **kw):
    return (lambda q, k, v, g, b, s: call(op, q, k, v, g, b, initial_state=s, output_final_state=True, **kw))


def plain_ref(**kw):
    return (lambda q, k, v, g, b, s: ref(q, k, v, g, b, initial_state=s, output_final_state=True, **kw))


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("B,T,H,HV,K,V,scale", [
    (2, 1, 2, 2, 64, 64, None),
    (2, 63, 1, 2, 64, 128, 0.3),
    (1, 500, 2, 4, 128, 64, None),
    (1, 2049, 1, 1, 64, 64, None),
])
def test_forward(op, B, T, H, HV, K, V, scale):
    q, k, v, g, beta, h0 = make(B, T, H, HV, K, V)
    o, ht = call(op, q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True)
    ro, rht = ref(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.float32 and ht.dtype == torch.float32 and o.is_contiguous()
    assert_close("o", ro, o, 1e-5)
    assert_close("ht", rht, ht, 1e-5)


# ----------------------------------------------------------------------------- backward

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("T,H,HV", [(63, 2, 2), (130, 1, 2)])
def test_backward(op, T, H, HV):
    check_fwd_bwd(plain(op, scale=0.2), plain_ref(scale=0.2), make(2, T, H, HV, 32, 48))


@pytest.mark.parametrize("op", OPS)
def test_backward_no_final_state(op):
    check_fwd_bwd(lambda q, k, v, g, b, s: call(op, q, k, v, g, b, initial_state=s),
                  lambda q, k, v, g, b, s: ref(q, k, v, g, b, initial_state=s),
                  make(1, 40, 1, 2, 16, 16), final_state=False)


@pytest.mark.parametrize("op", OPS)
def test_varlen(op):
    lengths = [1, 63, 70, 17]
    cu = make_cu_seqlens(lengths)
    check_fwd_bwd(plain(op, cu_seqlens=cu), plain_ref(cu_seqlens=cu),
                  make(1, sum(lengths), 1, 2, 32, 32, N=len(lengths)))


@pytest.mark.parametrize("op", OPS)
def test_bf16(op):
    q, k, v, g, beta, h0 = make(2, 100, 1, 2, 64, 64, dtype=torch.bfloat16)
    g = g.float()                                       # models keep gates in fp32
    check_fwd_bwd(plain(op), plain_ref(), [q, k, v, g, beta, h0], ratio=1e-2, grad_ratio=1e-2)


@pytest.mark.parametrize("op", OPS)
def test_qk_l2norm(op):
    check_fwd_bwd(plain(op, use_qk_l2norm_in_kernel=True), plain_ref(use_qk_l2norm=True),
                  make(2, 80, 1, 2, 32, 32, l2=False))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("neg", [False, True])
def test_beta_sigmoid(op, neg):
    inputs = make(1, 70, 2, 2, 32, 32)
    inputs[4] = torch.randn(1, 70, 2)                   # raw logits
    factor = 2.0 if neg else 1.0
    check_fwd_bwd(plain(op, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=neg),
                  lambda q, k, v, g, b, s: ref(q, k, v, g, factor * b.sigmoid(), initial_state=s,
                                               output_final_state=True),
                  inputs)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bias", [False, True])
def test_gate_in_kernel(op, bias):
    q, k, v, _, beta, h0 = make(1, 70, 1, 2, 32, 32)
    graw = torch.randn(1, 70, 2)
    A_log = torch.randn(2) * 0.5
    dt_bias = torch.randn(2) if bias else None

    def fn(q, k, v, g, b, s, A, dt):
        if op == "chunk":
            return chunk_gated_delta_rule(q, k, v, g, b, initial_state=s, output_final_state=True,
                                          use_gate_in_kernel=True, A_log=A, dt_bias=dt)
        return fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=b, initial_state=s, output_final_state=True,
                                                use_gate_in_kernel=True, A_log=A, dt_bias=dt)

    def ref_fn(q, k, v, g, b, s, A, dt):
        x = g if dt is None else g + dt
        return ref(q, k, v, -A.exp() * F.softplus(x), b, initial_state=s, output_final_state=True)

    check_fwd_bwd(fn, ref_fn, [q, k, v, graw, beta, h0, A_log, dt_bias],
                  names=["q", "k", "v", "g", "beta", "h0", "A_log", "dt_bias"])


def test_fused_ignores_A_log_without_gate_in_kernel():
    q, k, v, g, beta, h0 = make(1, 20, 1, 1, 8, 8)
    o, _ = fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, A_log=torch.randn(3), dt_bias=torch.randn(5))
    ro, _ = ref(q, k, v, g, beta)
    assert_close("o", ro, o, 1e-5)


@pytest.mark.parametrize("op", OPS)
def test_state_v_first(op):
    q, k, v, g, beta, h0 = make(1, 70, 1, 2, 16, 24)
    h0t = h0.transpose(-1, -2).contiguous()             # [N, HV, V, K]
    check_fwd_bwd(plain(op, state_v_first=True), plain_ref(state_v_first=True), [q, k, v, g, beta, h0t])
    o1, ht1 = call(op, q, k, v, g, beta, initial_state=h0t, output_final_state=True, state_v_first=True)
    assert ht1.shape == (1, 2, 24, 16) and ht1.is_contiguous()
    with pytest.warns(DeprecationWarning):
        o2, ht2 = call(op, q, k, v, g, beta, initial_state=h0t, output_final_state=True,
                       transpose_state_layout=True)
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(ht2, ht1)


# ----------------------------------------------------------------------------- fused-only gates

FUSED_CASES = {
    "g+gk": dict(g=True, gk=True),
    "gv": dict(gv=True),
    "g+gk+gv+beta_ch": dict(g=True, gk=True, gv=True, beta_ch=True),
    "beta_ch": dict(g=True, beta_ch=True),
    "no_gate": dict(),
}


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_gk_gv_beta_channel(case):
    c = FUSED_CASES[case]
    B, T, H, HV, K, V = 1, 45, 1, 2, 16, 24
    q, k, v, g, beta, h0 = make(B, T, H, HV, K, V)
    g = g if c.get("g") else None
    gk = log_gate(B, T, HV, K) if c.get("gk") else None
    gv = log_gate(B, T, HV, V) if c.get("gv") else None
    if c.get("beta_ch"):
        beta = torch.rand(B, T, HV, V)
    check_fwd_bwd(
        lambda q, k, v, g, b, s, gk, gv: fused_recurrent_gated_delta_rule(
            q, k, v, g=g, gk=gk, gv=gv, beta=b, initial_state=s, output_final_state=True),
        lambda q, k, v, g, b, s, gk, gv: ref(q, k, v, g, b, gk=gk, gv=gv, initial_state=s,
                                             output_final_state=True),
        [q, k, v, g, beta, h0, gk, gv], names=["q", "k", "v", "g", "beta", "h0", "gk", "gv"])


@pytest.mark.parametrize("sigmoid", [False, True])
def test_fused_beta_none(sigmoid):
    q, k, v, g, _, h0 = make(1, 30, 1, 2, 8, 8)
    o, ht = fused_recurrent_gated_delta_rule(q, k, v, g=g, initial_state=h0, output_final_state=True,
                                             use_beta_sigmoid_in_kernel=sigmoid)
    b = torch.ones(1, 30, 2) * (torch.sigmoid(torch.tensor(1.0)) if sigmoid else 1.0)   # FLA: ones, then sigmoid
    ro, rht = ref(q, k, v, g, b, initial_state=h0, output_final_state=True)
    assert_close("o", ro, o, 1e-5)
    assert_close("ht", rht, ht, 1e-5)


# ----------------------------------------------------------------------------- extreme gates

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("extreme", [-1e4, float("-inf")])
def test_extreme_gates(op, extreme):
    q, k, v, g, beta, h0 = make(1, 90, 1, 2, 16, 16)
    g[0, 5] = extreme
    g[0, 40:43] = extreme
    g[0, 89] = extreme
    o, ht = call(op, q, k, v, g, beta, initial_state=h0, output_final_state=True)
    ro, rht = ref(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert_close("o", ro, o, 1e-5)
    assert_close("ht", rht, ht, 1e-5, atol=1e-6)
    gl = g.clone().requires_grad_()
    ql = q.clone().requires_grad_()
    o, ht = call(op, ql, k, v, gl, beta, initial_state=h0, output_final_state=True)
    dq, dg = torch.autograd.grad((o.sum() + ht.sum()), [ql, gl])
    assert torch.isfinite(dq).all() and torch.isfinite(dg).all()


@pytest.mark.parametrize("extreme", [-1e4, float("-inf")])
def test_fused_extreme_gk_gv(extreme):
    B, T, H, HV, K, V = 1, 40, 1, 1, 8, 8
    q, k, v, g, beta, h0 = make(B, T, H, HV, K, V)
    gk, gv = log_gate(B, T, HV, K), log_gate(B, T, HV, V)
    gk[0, 3, 0, :4] = extreme
    gv[0, 20, 0, 2:] = extreme
    o, ht = fused_recurrent_gated_delta_rule(q, k, v, g=g, gk=gk, gv=gv, beta=beta, initial_state=h0,
                                             output_final_state=True)
    ro, rht = ref(q, k, v, g, beta, gk=gk, gv=gv, initial_state=h0, output_final_state=True)
    assert_close("o", ro, o, 1e-5)
    assert_close("ht", rht, ht, 1e-5)


# ----------------------------------------------------------------------------- gradcheck

def _gc(T=20, H=1, HV=2, K=4, V=4):
    return [x.double().requires_grad_() for x in make(1, T, H, HV, K, V, dtype=torch.float64)]


def test_gradcheck_chunk():
    assert torch.autograd.gradcheck(
        lambda *a: chunk_gated_delta_rule(*a[:5], initial_state=a[5], output_final_state=True, chunk_size=16),
        _gc())


def test_gradcheck_chunk_all_flags():
    q, k, v, g, beta, h0 = _gc(T=18, H=1, HV=1)
    A_log = torch.randn(1, dtype=torch.float64, requires_grad=True)
    dt = torch.randn(1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: chunk_gated_delta_rule(*a[:5], initial_state=a[5], output_final_state=True, chunk_size=16,
                                          use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                                          allow_neg_eigval=True, use_gate_in_kernel=True, A_log=a[6],
                                          dt_bias=a[7], state_v_first=True),
        [q, k, v, g, beta, h0, A_log, dt])


def test_gradcheck_fused():
    assert torch.autograd.gradcheck(
        lambda *a: fused_recurrent_gated_delta_rule(*a[:3], g=a[3], beta=a[4], initial_state=a[5],
                                                    output_final_state=True), _gc())


def test_gradcheck_fused_gk_gv_beta_channel():
    q, k, v, g, _, h0 = _gc(T=18, H=1, HV=1)
    gk = log_gate(1, 18, 1, 4, dtype=torch.float64).requires_grad_()
    gv = log_gate(1, 18, 1, 4, dtype=torch.float64).requires_grad_()
    beta = torch.rand(1, 18, 1, 4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, k, v, g, gk, gv, b, s: fused_recurrent_gated_delta_rule(
            q, k, v, g=g, gk=gk, gv=gv, beta=b, initial_state=s, output_final_state=True),
        [q, k, v, g, gk, gv, beta, h0])


# ----------------------------------------------------------------------------- bad inputs

def _base():
    q, k, v, g, beta, _ = make(1, 6, 1, 2, 4, 4)
    return dict(q=q, k=k, v=v, g=g, beta=beta)


BAD = [
    ("q rank", lambda d: d.update(q=d["q"][0]), ValueError, "`q`"),
    ("k shape", lambda d: d.update(k=torch.randn(1, 6, 2, 4)), ValueError, "`k`"),
    ("v heads", lambda d: d.update(v=torch.randn(1, 6, 3, 4), q=torch.randn(1, 6, 2, 4),
                                   k=torch.randn(1, 6, 2, 4)), ValueError, "`v`"),
    ("q int", lambda d: d.update(q=torch.ones(1, 6, 1, 4, dtype=torch.int32)), TypeError, "`q`"),
    ("dtype mix", lambda d: d.update(v=d["v"].double()), TypeError, "`v`"),
    ("g heads", lambda d: d.update(g=log_gate(1, 6, 1)), ValueError, "`g`"),
    ("g int", lambda d: d.update(g=torch.zeros(1, 6, 2, dtype=torch.int32)), TypeError, "`g`"),
    ("beta heads", lambda d: d.update(beta=torch.rand(1, 6, 1)), ValueError, "`beta`"),
    ("beta int", lambda d: d.update(beta=torch.ones(1, 6, 2, dtype=torch.int64)), TypeError, "`beta`"),
    ("scale str", lambda d: d.update(scale="x"), TypeError, "`scale`"),
    ("flag", lambda d: d.update(output_final_state=None), TypeError, "`output_final_state`"),
    ("sigmoid flag", lambda d: d.update(use_beta_sigmoid_in_kernel=1), TypeError, "`use_beta_sigmoid_in_kernel`"),
    ("neg eigval", lambda d: d.update(allow_neg_eigval=True), ValueError, "`allow_neg_eigval`"),
    ("A_log missing", lambda d: d.update(use_gate_in_kernel=True), ValueError, "`A_log`"),
    ("A_log shape", lambda d: d.update(use_gate_in_kernel=True, A_log=torch.randn(1)), ValueError, "`A_log`"),
    ("A_log int", lambda d: d.update(use_gate_in_kernel=True, A_log=torch.ones(2, dtype=torch.int32)),
     TypeError, "`A_log`"),
    ("dt_bias shape", lambda d: d.update(use_gate_in_kernel=True, A_log=torch.randn(2), dt_bias=torch.randn(1, 2)),
     ValueError, "`dt_bias`"),
    ("cu start", lambda d: d.update(cu_seqlens=torch.tensor([1, 6])), ValueError, "`cu_seqlens`"),
    ("cu end", lambda d: d.update(cu_seqlens=torch.tensor([0, 7])), ValueError, "`cu_seqlens`"),
    ("cu decreasing", lambda d: d.update(cu_seqlens=torch.tensor([0, 4, 3, 6])), ValueError, "`cu_seqlens`"),
    ("cu float", lambda d: d.update(cu_seqlens=torch.tensor([0.0, 6.0])), TypeError, "`cu_seqlens`"),
    ("cu batch", lambda d: d.update(**{n: x.expand(2, *x.shape[1:]) for n, x in d.items()},
                                    cu_seqlens=torch.tensor([0, 6])), ValueError, "`cu_seqlens`"),
    ("h0 heads", lambda d: d.update(initial_state=torch.randn(1, 1, 4, 4)), ValueError, "`initial_state`"),
    ("h0 dtype", lambda d: d.update(initial_state=torch.randn(1, 2, 4, 4).half()), TypeError, "`initial_state`"),
    ("h0 v-first", lambda d: d.update(v=torch.randn(1, 6, 2, 5), initial_state=torch.randn(1, 2, 4, 5),
                                      state_v_first=True), ValueError, "`initial_state`"),
    ("layout twice", lambda d: d.update(state_v_first=True, transpose_state_layout=True),
     ValueError, "`state_v_first`"),
    ("head_first", lambda d: d.update(head_first=False), ValueError, "`head_first`"),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case,mutate,exc,name", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(op, case, mutate, exc, name):
    if op == "fused" and case == "head_first":
        pytest.skip("FLA's fused_recurrent_gated_delta_rule ignores unknown kwargs")
    d = _base()
    mutate(d)
    with pytest.raises(exc, match=name):
        call(op, d.pop("q"), d.pop("k"), d.pop("v"), d.pop("g"), d.pop("beta"), **d)


@pytest.mark.parametrize("kw,name", [
    (dict(chunk_indices=torch.tensor([[0, 0]])), "`chunk_indices`"),
    (dict(cp_context=object()), "`cp_context`"),
    (dict(chunk_size=8), "`chunk_size`"),
])
def test_chunk_only_bad_args(kw, name):
    d = _base()
    with pytest.raises(ValueError, match=name):
        chunk_gated_delta_rule(d["q"], d["k"], d["v"], d["g"], d["beta"], **kw)


def test_chunk_g_required_and_beta_scalar():
    d = _base()
    with pytest.raises(ValueError, match="`g`"):
        chunk_gated_delta_rule(d["q"], d["k"], d["v"], None, d["beta"])
    with pytest.raises(ValueError, match="`beta`"):
        chunk_gated_delta_rule(d["q"], d["k"], d["v"], d["g"], torch.rand(1, 6, 2, 4))


@pytest.mark.parametrize("name,shape", [("gk", (1, 6, 1, 4)), ("gv", (1, 6, 2, 3))])
def test_fused_bad_gk_gv(name, shape):
    d = _base()
    with pytest.raises(ValueError, match=f"`{name}`"):
        fused_recurrent_gated_delta_rule(d["q"], d["k"], d["v"], g=d["g"], beta=d["beta"],
                                         **{name: log_gate(*shape)})


def test_fused_gate_in_kernel_needs_g():
    d = _base()
    with pytest.raises(ValueError, match="`g`"):
        fused_recurrent_gated_delta_rule(d["q"], d["k"], d["v"], beta=d["beta"], use_gate_in_kernel=True,
                                         A_log=torch.randn(2))
