"""chunk_delta_rule and fused_recurrent_delta_rule against the fp64 step-by-step oracle."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fla_cuda.ops.delta_rule import chunk_delta_rule, delta_chunk_forward, fused_recurrent_delta_rule
from fla_cuda.reference.delta_rule import delta_rule_reference
from tests.utils import assert_close, make_cu_seqlens

OPS = {"chunk": chunk_delta_rule, "fused": fused_recurrent_delta_rule}


def make(B, T, H, K, V, *, dtype=torch.float32, l2=True, beta_channel=False, h0=True, N=None):
    """Random inputs; k l2-normalised (||k|| = 1 keeps the delta rule stable) unless ``l2`` is off."""
    q = torch.randn(B, T, H, K)
    k = torch.randn(B, T, H, K)
    if l2:
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V)
    beta = torch.randn(B, T, H, V).sigmoid() if beta_channel else torch.randn(B, T, H).sigmoid()
    s = torch.randn(N or B, H, K, V) if h0 else None
    return [x.to(dtype) for x in (q, k, v, beta)] + [s]


def leaves(xs, dtype=None):
    return [None if x is None else (x.detach().to(dtype or x.dtype)).requires_grad_() for x in xs]


def check_fwd_bwd(fn, ref_fn, inputs, *, ratio, grad_ratio=None, final_state=True, names=None):
    """Outputs, final states and all gradients of fn (on ``inputs``) vs ref_fn in fp64."""
    grad_ratio = grad_ratio or ratio
    ours = leaves(inputs)
    refs = leaves(inputs, torch.float64)
    o, ht = fn(*ours)
    ro, rht = ref_fn(*refs)
    assert o.dtype == inputs[2].dtype          # output in the dtype of v (the inputs' dtype)
    assert_close("o", ro, o, ratio)
    if final_state:
        assert ht.dtype in (torch.float32, torch.float64)
        assert_close("ht", rht, ht, ratio)
    else:
        assert ht is None
    do = torch.randn_like(ro)
    outs, routs, cots = [o], [ro], [do]
    if final_state:
        dht = torch.randn_like(rht)
        outs.append(ht)
        routs.append(rht)
        cots.append(dht)
    live = [i for i, x in enumerate(ours) if x is not None]
    g = torch.autograd.grad(outs, [ours[i] for i in live], [c.to(x.dtype) for c, x in zip(cots, outs)])
    rg = torch.autograd.grad(routs, [refs[i] for i in live], cots)
    names = names or [f"arg{i}" for i in range(len(inputs))]
    for i, a, b in zip(live, g, rg):
        assert a.dtype == ours[i].dtype
        assert_close(f"d{names[i]}", b, a, grad_ratio)


NAMES = ["q", "k", "v", "beta", "h0"]


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("B,T,H,K,V,scale", [
    (2, 1, 2, 64, 64, None),
    (2, 63, 2, 64, 128, 0.3),
    (1, 500, 2, 128, 64, None),
    (1, 2049, 1, 64, 64, None),
])
def test_forward(op, B, T, H, K, V, scale):
    q, k, v, beta, h0 = make(B, T, H, K, V)
    o, ht = OPS[op](q, k, v, beta, scale=scale, initial_state=h0, output_final_state=True)
    ro, rht = delta_rule_reference(q, k, v, beta, scale=scale, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.float32 and ht.dtype == torch.float32 and o.is_contiguous()
    assert_close("o", ro, o, 1e-5)
    assert_close("ht", rht, ht, 1e-5)


@pytest.mark.parametrize("op", OPS)
def test_no_state(op):
    q, k, v, beta, _ = make(2, 70, 2, 32, 32, h0=False)
    o, ht = OPS[op](q, k, v, beta)
    assert ht is None
    ro, _ = delta_rule_reference(q, k, v, beta)
    assert_close("o", ro, o, 1e-5)


# ----------------------------------------------------------------------------- backward

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("T", [63, 130])
def test_backward(op, T):
    inputs = make(2, T, 2, 32, 48)
    check_fwd_bwd(lambda q, k, v, b, s: OPS[op](q, k, v, b, scale=0.2, initial_state=s, output_final_state=True),
                  lambda q, k, v, b, s: delta_rule_reference(q, k, v, b, scale=0.2, initial_state=s,
                                                             output_final_state=True),
                  inputs, ratio=1e-5, grad_ratio=1e-4, names=NAMES)


@pytest.mark.parametrize("op", OPS)
def test_backward_no_final_state(op):
    inputs = make(1, 40, 2, 16, 16)
    check_fwd_bwd(lambda q, k, v, b, s: OPS[op](q, k, v, b, initial_state=s),
                  lambda q, k, v, b, s: delta_rule_reference(q, k, v, b, initial_state=s),
                  inputs, ratio=1e-5, grad_ratio=1e-4, final_state=False, names=NAMES)


@pytest.mark.parametrize("op", OPS)
def test_varlen(op):
    lengths = [1, 63, 70, 17]
    cu = make_cu_seqlens(lengths)
    inputs = make(1, sum(lengths), 2, 32, 32, N=len(lengths))
    check_fwd_bwd(lambda q, k, v, b, s: OPS[op](q, k, v, b, initial_state=s, output_final_state=True,
                                                cu_seqlens=cu),
                  lambda q, k, v, b, s: delta_rule_reference(q, k, v, b, initial_state=s,
                                                             output_final_state=True, cu_seqlens=cu),
                  inputs, ratio=1e-5, grad_ratio=1e-4, names=NAMES)


@pytest.mark.parametrize("op", OPS)
def test_bf16(op):
    q, k, v, beta, h0 = make(2, 100, 2, 64, 64, dtype=torch.bfloat16)
    check_fwd_bwd(lambda q, k, v, b, s: OPS[op](q, k, v, b, initial_state=s, output_final_state=True),
                  lambda q, k, v, b, s: delta_rule_reference(q, k, v, b, initial_state=s,
                                                             output_final_state=True),
                  [q, k, v, beta, h0], ratio=1e-2, grad_ratio=1e-2, names=NAMES)


@pytest.mark.parametrize("op", OPS)
def test_qk_l2norm(op):
    inputs = make(2, 80, 2, 32, 32, l2=False)
    q, k = inputs[0], inputs[1]
    check_fwd_bwd(lambda q, k, v, b, s: OPS[op](q, k, v, b, initial_state=s, output_final_state=True,
                                                use_qk_l2norm_in_kernel=True),
                  lambda q, k, v, b, s: delta_rule_reference(q, k, v, b, initial_state=s,
                                                             output_final_state=True, use_qk_l2norm=True),
                  inputs, ratio=1e-5, grad_ratio=1e-4, names=NAMES)
    # the flag must act: raw k (norm ~ sqrt(K)) gives a different result
    o1, _ = OPS[op](q, k, *inputs[2:4], use_qk_l2norm_in_kernel=True)
    o0, _ = OPS[op](F.normalize(q, dim=-1), F.normalize(k, dim=-1), *inputs[2:4])
    assert_close("o(l2norm in kernel vs outside)", o0, o1, 1e-5)


def test_fused_beta_per_channel():
    inputs = make(2, 50, 2, 16, 24, beta_channel=True)
    check_fwd_bwd(lambda q, k, v, b, s: fused_recurrent_delta_rule(q, k, v, b, initial_state=s,
                                                                   output_final_state=True),
                  lambda q, k, v, b, s: delta_rule_reference(q, k, v, b, initial_state=s,
                                                             output_final_state=True),
                  inputs, ratio=1e-5, grad_ratio=1e-4, names=NAMES)


def test_fused_beta_none():
    q, k, v, _, h0 = make(2, 40, 2, 16, 16)
    o, ht = fused_recurrent_delta_rule(q, k, v, initial_state=h0, output_final_state=True)
    ro, rht = delta_rule_reference(q, k, v, torch.ones(2, 40, 2), initial_state=h0, output_final_state=True)
    assert_close("o", ro, o, 1e-5)
    assert_close("ht", rht, ht, 1e-5)


@pytest.mark.parametrize("chunk_size", [16, 32])
def test_chunk_size_kwarg(chunk_size):
    q, k, v, beta, h0 = make(1, 75, 2, 32, 32)
    o, ht = chunk_delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True,
                             chunk_size=chunk_size, some_unknown_kwarg=1)
    ro, rht = delta_rule_reference(q, k, v, beta, initial_state=h0, output_final_state=True)
    assert_close("o", ro, o, 1e-5)
    assert_close("ht", rht, ht, 1e-5)


def test_empty_sequence_keeps_state():
    cu = make_cu_seqlens([5, 0, 7])
    q, k, v, beta, h0 = make(1, 12, 2, 8, 8, N=3)
    for op in OPS.values():
        o, ht = op(q, k, v, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        torch.testing.assert_close(ht[1], h0[1])
        _, rht = delta_rule_reference(q, k, v, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        assert_close("ht", rht, ht, 1e-5)


def test_fp64_stays_fp64():
    q, k, v, beta, h0 = make(1, 20, 1, 8, 8, dtype=torch.float64)
    o, ht = chunk_delta_rule(q, k, v, beta, initial_state=h0.double(), output_final_state=True)
    assert o.dtype == torch.float64 and ht.dtype == torch.float64
    ro, _ = delta_rule_reference(q, k, v, beta, initial_state=h0)
    assert_close("o", ro, o, 1e-12)


# ----------------------------------------------------------------------------- gradcheck

def _gc_inputs(T=20, K=4, V=4, beta_channel=False):
    q, k, v, beta, h0 = make(1, T, 1, K, V, dtype=torch.float64, beta_channel=beta_channel)
    return [x.double().requires_grad_() for x in (q, k, v, beta, h0)]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("l2", [False, True])
def test_gradcheck(op, l2):
    kw = dict(chunk_size=16) if op == "chunk" else {}
    inputs = _gc_inputs()
    assert torch.autograd.gradcheck(
        lambda *a: OPS[op](*a[:4], initial_state=a[4], output_final_state=True,
                           use_qk_l2norm_in_kernel=l2, **kw), inputs)


def test_gradcheck_fused_beta_per_channel():
    inputs = _gc_inputs(beta_channel=True)
    assert torch.autograd.gradcheck(
        lambda *a: fused_recurrent_delta_rule(*a[:4], initial_state=a[4], output_final_state=True), inputs)


def test_gradcheck_core_small_chunks():
    """Several chunks of 4 in the core (the public ops' chunks are >= 16)."""
    inputs = _gc_inputs(T=10)
    assert torch.autograd.gradcheck(
        lambda *a: delta_chunk_forward(*a[:4], scale=0.5, initial_state=a[4], output_final_state=True,
                                       chunk_size=4), inputs)


# ----------------------------------------------------------------------------- bad inputs

def _base():
    q, k, v, beta, _ = make(1, 6, 2, 4, 4)
    return dict(q=q, k=k, v=v, beta=beta)


BAD = [
    ("q rank", lambda d: d.update(q=d["q"][0]), ValueError, "`q`"),
    ("k shape", lambda d: d.update(k=d["k"][:, :, :, :3]), ValueError, "`k`"),
    ("v heads", lambda d: d.update(v=torch.randn(1, 6, 4, 4)), ValueError, "`v`"),
    ("v length", lambda d: d.update(v=torch.randn(1, 5, 2, 4)), ValueError, "`v`"),
    ("q int", lambda d: d.update(q=torch.ones(1, 6, 2, 4, dtype=torch.int32)), TypeError, "`q`"),
    ("dtype mix", lambda d: d.update(k=d["k"].double()), TypeError, "`k`"),
    ("beta rank", lambda d: d.update(beta=torch.rand(1, 6)), ValueError, "`beta`"),
    ("beta shape", lambda d: d.update(beta=torch.rand(1, 6, 3)), ValueError, "`beta`"),
    ("beta int", lambda d: d.update(beta=torch.ones(1, 6, 2, dtype=torch.int64)), TypeError, "`beta`"),
    ("beta list", lambda d: d.update(beta=[1.0]), TypeError, "`beta`"),
    ("scale str", lambda d: d.update(scale="x"), TypeError, "`scale`"),
    ("scale nan", lambda d: d.update(scale=float("nan")), ValueError, "`scale`"),
    ("flag", lambda d: d.update(output_final_state=1), TypeError, "`output_final_state`"),
    ("l2 flag", lambda d: d.update(use_qk_l2norm_in_kernel="yes"), TypeError, "`use_qk_l2norm_in_kernel`"),
    ("cu start", lambda d: d.update(cu_seqlens=torch.tensor([1, 6])), ValueError, "`cu_seqlens`"),
    ("cu end", lambda d: d.update(cu_seqlens=torch.tensor([0, 5])), ValueError, "`cu_seqlens`"),
    ("cu decreasing", lambda d: d.update(cu_seqlens=torch.tensor([0, 4, 3, 6])), ValueError, "`cu_seqlens`"),
    ("cu float", lambda d: d.update(cu_seqlens=torch.tensor([0.0, 6.0])), TypeError, "`cu_seqlens`"),
    ("cu batch", lambda d: d.update(q=d["q"].expand(2, -1, -1, -1), k=d["k"].expand(2, -1, -1, -1),
                                    v=d["v"].expand(2, -1, -1, -1), beta=d["beta"].expand(2, -1, -1),
                                    cu_seqlens=torch.tensor([0, 6])), ValueError, "`cu_seqlens`"),
    ("h0 shape", lambda d: d.update(initial_state=torch.randn(2, 2, 4, 4)), ValueError, "`initial_state`"),
    ("h0 varlen N", lambda d: d.update(initial_state=torch.randn(1, 2, 4, 4),
                                       cu_seqlens=torch.tensor([0, 3, 6])), ValueError, "`initial_state`"),
    ("h0 dtype", lambda d: d.update(initial_state=torch.randn(1, 2, 4, 4, dtype=torch.bfloat16)),
     TypeError, "`initial_state`"),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case,mutate,exc,name", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(op, case, mutate, exc, name):
    d = _base()
    mutate(d)
    with pytest.raises(exc, match=name):
        OPS[op](**d)


@pytest.mark.parametrize("kw,name", [(dict(chunk_size=48), "`chunk_size`"), (dict(head_first=True), "`head_first`")])
def test_bad_chunk_kwargs(kw, name):
    with pytest.raises(ValueError, match=name):
        chunk_delta_rule(**_base(), **kw)


def test_chunk_rejects_beta_per_channel():
    d = _base()
    d["beta"] = torch.rand(1, 6, 2, 4)
    with pytest.raises(ValueError, match="`beta`"):
        chunk_delta_rule(**d)


def test_fused_bad_beta_per_channel_shape():
    d = _base()
    d["beta"] = torch.rand(1, 6, 2, 5)
    with pytest.raises(ValueError, match="`beta`"):
        fused_recurrent_delta_rule(**d)
