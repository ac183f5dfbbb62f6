"""Generalized delta rule (IPLR / DPLR): the PyTorch chunkwise path against the fp64 step-by-step oracle.

Outputs, final states and all gradients (q, k, v, a, b, gk, initial_state), odd lengths, varlen,
reverse, custom scale, fp32 / bf16 / fp64, extreme gates, gradcheck, and input validation.
"""
import pytest
import torch
import torch.nn.functional as F

import fla_cuda.ops.generalized_delta_rule as gdr
from fla_cuda.ops.generalized_delta_rule import (
    chunk_dplr_delta_rule,
    chunk_iplr_delta_rule,
    fused_recurrent_dplr_delta_rule,
    fused_recurrent_iplr_delta_rule,
)
from fla_cuda.reference.generalized_delta_rule import dplr_reference, iplr_reference
from tests.utils import assert_close, grads, log_gate, make_cu_seqlens

# name -> (function, takes gk, takes reverse)
OPS = {
    "chunk_iplr": (chunk_iplr_delta_rule, False, False),
    "fused_recurrent_iplr": (fused_recurrent_iplr_delta_rule, False, False),
    "chunk_dplr": (chunk_dplr_delta_rule, True, False),
    "fused_recurrent_dplr": (fused_recurrent_dplr_delta_rule, True, True),
}
IPLR_OPS = ["chunk_iplr", "fused_recurrent_iplr"]
DPLR_OPS = ["chunk_dplr", "fused_recurrent_dplr"]


def make_inputs(op, B, T, H, K, V, *, dtype=torch.float32, divisor=1.0, device="cpu", grad=False):
    """Inputs drawn the way models draw them: a = -kk, b = kk * sigmoid (contractive transition)."""
    x = {
        "q": torch.randn(B, T, H, K, device=device),
        "k": F.normalize(torch.randn(B, T, H, K, device=device), dim=-1),
        "v": torch.randn(B, T, H, V, device=device),
    }
    kk = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1)
    x["a"] = -kk
    x["b"] = kk * torch.randn(B, T, H, 1, device=device).sigmoid()
    if OPS[op][1]:
        x["gk"] = log_gate(B, T, H, K, device=device, divisor=divisor)
    return {n: t.to(dtype).requires_grad_(grad) for n, t in x.items()}


def call(op, x, **kw):
    fn, has_gk, _ = OPS[op]
    args = [x["q"], x["k"], x["v"], x["a"], x["b"]] + ([x["gk"]] if has_gk else [])
    return fn(*args, **kw)


def reference(op, x, **kw):
    if OPS[op][1]:
        return dplr_reference(x["q"], x["k"], x["v"], x["a"], x["b"], x["gk"], **kw)
    kw.pop("reverse", None)
    return iplr_reference(x["q"], x["k"], x["v"], x["a"], x["b"], **kw)


def check_fwd(op, x, ratio, **kw):
    o, ht = call(op, x, **kw)
    ro, rh = reference(op, x, **kw)
    assert o.dtype == x["q"].dtype
    assert_close("o", ro, o, ratio)
    if kw.get("output_final_state"):
        assert ht.dtype == (torch.float64 if x["q"].dtype == torch.float64 else torch.float32)
        assert_close("ht", rh, ht, ratio)
    else:
        assert ht is None
    return o, ht


# --------------------------------------------------------------------------- forward

@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("T,K,V,divisor,scale", [
    (1, 64, 64, 1.0, None),
    (63, 64, 64, 1.0, 0.3),
    (500, 64, 128, 16.0, None),
    (100, 128, 64, 1.0, None),
])
def test_forward(op, T, K, V, divisor, scale):
    x = make_inputs(op, 2, T, 2, K, V, divisor=divisor)
    h0 = torch.randn(2, 2, K, V)
    check_fwd(op, x, 2e-5, scale=scale, initial_state=h0, output_final_state=True)


@pytest.mark.parametrize("op", ["chunk_iplr", "chunk_dplr"])
def test_forward_long(op):
    x = make_inputs(op, 1, 2049, 1, 64, 64, divisor=16.0)
    check_fwd(op, x, 5e-5, output_final_state=True)


def test_forward_no_state_equals_zero_state():
    x = make_inputs("chunk_dplr", 1, 40, 2, 16, 8)
    o1, h1 = call("chunk_dplr", x, output_final_state=True)
    o2, h2 = call("chunk_dplr", x, initial_state=torch.zeros(1, 2, 16, 8), output_final_state=True)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(h1, h2)


def test_reverse_forward():
    op = "fused_recurrent_dplr"
    x = make_inputs(op, 2, 70, 2, 32, 16)
    h0 = torch.randn(2, 2, 32, 16)
    check_fwd(op, x, 2e-5, initial_state=h0, output_final_state=True, reverse=True)
    # reverse really reverses: differs from the forward scan
    o_f, _ = call(op, x, initial_state=h0)
    o_r, _ = call(op, x, initial_state=h0, reverse=True)
    assert (o_f - o_r).abs().max() > 1e-2
    # FLA's fused IPLR op has no `reverse` (and no **kwargs)
    with pytest.raises(TypeError):
        call("fused_recurrent_iplr", make_inputs("fused_recurrent_iplr", 1, 4, 1, 8, 8), reverse=True)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("lengths", [[1, 33, 70, 5], [40, 0, 1]])
def test_varlen(op, lengths):
    T = sum(lengths)
    x = make_inputs(op, 1, T, 2, 32, 16)
    cu = make_cu_seqlens(lengths)
    h0 = torch.randn(len(lengths), 2, 32, 16)
    kw = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu)
    if OPS[op][2]:
        kw["reverse"] = True
    check_fwd(op, x, 2e-5, **kw)


@pytest.mark.parametrize("op", DPLR_OPS)
def test_extreme_gates(op):
    """-inf and -1e4 gates zero the decay exactly; no NaN in outputs or gradients."""
    x = make_inputs(op, 1, 70, 2, 16, 8)
    gk = x["gk"].detach().clone()
    gk[:, 5, :, :3] = float("-inf")
    gk[:, 40, :, 3:] = -1e4
    gk[:, 41:45] = -1e5
    x["gk"] = gk.requires_grad_()
    x["q"].requires_grad_()
    o, ht = check_fwd(op, x, 2e-5, output_final_state=True)
    (o.sum() + ht.sum()).backward()
    assert torch.isfinite(x["gk"].grad).all() and torch.isfinite(x["q"].grad).all()


def test_fp64_exact():
    x = make_inputs("chunk_dplr", 2, 50, 2, 16, 8, dtype=torch.float64)
    h0 = torch.randn(2, 2, 16, 8, dtype=torch.float64)
    check_fwd("chunk_dplr", x, 1e-12, initial_state=h0, output_final_state=True)


@pytest.mark.parametrize("op", ["chunk_iplr", "chunk_dplr", "fused_recurrent_dplr"])
def test_bf16(op):
    x = make_inputs(op, 1, 100, 2, 64, 64, dtype=torch.bfloat16, grad=True)
    h0 = torch.randn(1, 2, 64, 64, requires_grad=True)
    o, ht = call(op, x, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    ro, rh = reference(op, x, initial_state=h0, output_final_state=True)
    assert_close("o", ro, o, 1e-2)
    assert_close("ht", rh, ht, 1e-2)
    do, dht = torch.randn_like(ro), torch.randn_like(rh)
    names = list(x) + ["h0"]
    inputs = list(x.values()) + [h0]
    g = grads((o, ht), inputs, (do.to(o.dtype), dht))
    rg = grads((ro, rh), inputs, (do, dht))
    for n, a, b in zip(names, rg, g):
        assert_close(f"d{n}", a, b, 2e-2)


# --------------------------------------------------------------------------- backward

@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("T,divisor,varlen", [(45, 1.0, False), (63, 16.0, True)])
def test_backward(op, T, divisor, varlen):
    K, V, H = 16, 8, 2
    B = 1 if varlen else 2
    x = make_inputs(op, B, T, H, K, V, divisor=divisor, grad=True)
    kw = dict(output_final_state=True, scale=0.5)
    N = B
    if varlen:
        kw["cu_seqlens"] = make_cu_seqlens([1, 29, T - 30])
        N = 3
    if OPS[op][2]:
        kw["reverse"] = True
    h0 = torch.randn(N, H, K, V, requires_grad=True)
    o, ht = call(op, x, initial_state=h0, **kw)
    ro, rh = reference(op, x, initial_state=h0, **kw)
    assert_close("o", ro, o, 2e-5)
    assert_close("ht", rh, ht, 2e-5)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    names = list(x) + ["h0"]
    inputs = list(x.values()) + [h0]
    g = grads((o, ht), inputs, (do, dht))
    rg = grads((ro, rh), inputs, (do.double(), dht.double()))
    for n, a, b in zip(names, rg, g):
        assert_close(f"d{n}", a, b, 1e-4)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("small_chunks", [False, True])
def test_gradcheck(op, small_chunks, monkeypatch):
    if small_chunks:  # several chunks and several sub-blocks inside a tiny problem
        monkeypatch.setattr(gdr, "CHUNK", 4)
        monkeypatch.setattr(gdr, "SUB", 2)
    x = make_inputs(op, 1, 10, 1, 4, 5, dtype=torch.float64, grad=True)
    h0 = torch.randn(1, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    fn, has_gk, has_rev = OPS[op]
    kw = dict(output_final_state=True, scale=0.7)
    if has_rev and small_chunks:
        kw["reverse"] = True
    names = list(x)

    def f(*args):
        d = dict(zip(names, args[:-1]))
        return call(op, d, initial_state=args[-1], **kw)

    assert torch.autograd.gradcheck(f, tuple(x.values()) + (h0,))


# --------------------------------------------------------------------------- options

def test_dplr_kernel_knobs_do_not_change_result():
    x = make_inputs("chunk_dplr", 1, 50, 2, 16, 8)
    o, ht = call("chunk_dplr", x, output_final_state=True)
    o2, ht2 = call("chunk_dplr", x, output_final_state=True, safe_gate=True, chunk_size=64,
                   disable_recompute=True, lower_bound=-5.0, cu_seqlens_cpu=None, unknown_kwarg=1)
    torch.testing.assert_close(o, o2)
    torch.testing.assert_close(ht, ht2)
    o3, _ = call("chunk_iplr", make_inputs("chunk_iplr", 1, 5, 1, 8, 8), chunk_size=32, foo=3)
    assert o3.shape == (1, 5, 1, 8)


def test_varlen_cu_seqlens_cpu():
    x = make_inputs("chunk_dplr", 1, 20, 1, 8, 8)
    cu = make_cu_seqlens([7, 13])
    o, _ = call("chunk_dplr", x, cu_seqlens=cu, cu_seqlens_cpu=cu.clone())
    ro, _ = reference("chunk_dplr", x, cu_seqlens=cu)
    assert_close("o", ro, o, 2e-5)


# --------------------------------------------------------------------------- bad inputs

def _bad_cases(op):
    B, T, H, K, V = 2, 8, 2, 8, 4
    has_gk, has_rev = OPS[op][1], OPS[op][2]
    chunk = op.startswith("chunk")

    def base():
        return make_inputs(op, B, T, H, K, V), {}

    cases = []

    def case(name, mutate):
        cases.append(pytest.param(mutate, id=name))

    case("q_rank", lambda x, kw: x.update(q=x["q"][0]) or "q")
    case("k_shape", lambda x, kw: x.update(k=x["k"][:, :, :, :4]) or "k")
    case("v_heads", lambda x, kw: x.update(v=torch.randn(B, T, 4, V)) or "v")
    case("q_int", lambda x, kw: x.update(q=x["q"].long()) or "q")
    case("qkv_dtype_mix", lambda x, kw: x.update(k=x["k"].double()) or "k")
    case("a_shape", lambda x, kw: x.update(a=x["a"][:, :, :1]) or "a")
    case("a_int", lambda x, kw: x.update(a=x["a"].int()) or "a")
    case("b_none", lambda x, kw: x.update(b=None) or "b")
    case("b_shape", lambda x, kw: x.update(b=torch.randn(B, T, H, K + 1)) or "b")
    if has_gk:
        case("gk_shape", lambda x, kw: x.update(gk=x["gk"][..., 0]) or "gk")
        case("gk_none", lambda x, kw: x.update(gk=None) or "gk")
        case("gk_int", lambda x, kw: x.update(gk=x["gk"].int()) or "gk")
    case("scale_str", lambda x, kw: kw.update(scale="1") or "scale")
    case("ofs_int", lambda x, kw: kw.update(output_final_state=1) or "output_final_state")
    case("h0_shape", lambda x, kw: kw.update(initial_state=torch.randn(B, H, V, K)) or "initial_state")
    case("h0_N", lambda x, kw: kw.update(initial_state=torch.randn(3, H, K, V)) or "initial_state")
    case("h0_bf16", lambda x, kw: kw.update(initial_state=torch.randn(B, H, K, V).bfloat16()) or "initial_state")

    def varlen(cu, name="cu_seqlens"):
        def m(x, kw):
            for n in list(x):
                x[n] = x[n][:1]
            kw["cu_seqlens"] = cu
            return name
        return m

    case("cu_start", varlen(torch.tensor([1, 4, T])))
    case("cu_end", varlen(torch.tensor([0, 4, T - 1])))
    case("cu_decreasing", varlen(torch.tensor([0, 5, 3, T])))
    case("cu_float", varlen(torch.tensor([0.0, 4.0, T])))
    case("cu_batch", lambda x, kw: kw.update(cu_seqlens=torch.tensor([0, 4, T])) or "cu_seqlens")
    if has_rev:
        case("reverse_int", lambda x, kw: kw.update(reverse=1) or "reverse")
    if chunk:
        case("head_first", lambda x, kw: kw.update(head_first=False) or "head_first")
        case("chunk_size", lambda x, kw: kw.update(chunk_size=48) or "chunk_size")
        case("cu_cpu_float", lambda x, kw: kw.update(cu_seqlens_cpu=torch.tensor([0.0, 8.0])) or "cu_seqlens_cpu")
    if op == "chunk_dplr":
        case("cp_context", lambda x, kw: kw.update(cp_context=object()) or "cp_context")
        case("lower_bound_pos", lambda x, kw: kw.update(lower_bound=0.5) or "lower_bound")
        case("safe_gate_int", lambda x, kw: kw.update(safe_gate=1) or "safe_gate")
    return base, cases


@pytest.mark.parametrize("op,mutate", [
    pytest.param(op, c.values[0], id=f"{op}-{c.id}") for op in OPS for c in _bad_cases(op)[1]
])
def test_bad_inputs(op, mutate):
    base = _bad_cases(op)[0]
    x, kw = base()
    name = mutate(x, kw)
    with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
        call(op, x, **kw)


# --------------------------------------------------------------------------- GPU dispatch

@pytest.mark.gpu
@pytest.mark.parametrize("op", ["fused_recurrent_iplr", "fused_recurrent_dplr"])
@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
def test_gpu_fused(op, dtype, ratio):
    x = make_inputs(op, 1, 300, 2, 64, 64, dtype=dtype, device="cuda")
    cu = make_cu_seqlens([100, 1, 199], device="cuda")
    h0 = torch.randn(3, 2, 64, 64, device="cuda")
    kw = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu)
    if OPS[op][2]:
        kw["reverse"] = True
    check_fwd(op, x, ratio, **kw)
