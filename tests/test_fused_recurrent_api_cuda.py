"""Public fused_recurrent_* ops on the CUDA kernel: against the fp64 PyTorch path, and
against FLA 0.6's Triton kernels on the same inputs (no worse than FLA), GPU only."""
import pytest
import torch
import torch.nn.functional as F

import fla_cuda
from fla_cuda import backend
from tests.utils import assert_close, err_ratio, log_gate

pytestmark = pytest.mark.gpu

B, T, H, K, V = 2, 100, 2, 64, 64


def _inputs(dtype, seed=0):
    torch.manual_seed(seed)
    d = "cuda"
    kn = F.normalize(torch.randn(B, T, H, K, device=d), dim=-1)
    return dict(
        q=torch.randn(B, T, H, K, device=d).to(dtype),
        k=torch.randn(B, T, H, K, device=d).to(dtype),
        kn=kn.to(dtype),
        v=torch.randn(B, T, H, V, device=d).to(dtype),
        g=log_gate(B, T, H, device=d),
        g_gamma=log_gate(H, device=d),
        gk=log_gate(B, T, H, K, device=d),
        gv=log_gate(B, T, H, V, device=d),
        beta=torch.rand(B, T, H, device=d).sigmoid(),
        a=(-kn).to(dtype),
        b=(kn * torch.rand(B, T, H, 1, device=d)).to(dtype),
        h0=torch.randn(B, H, K, V, device=d),
    )


# op name -> (call(x) using the dict of inputs, whether FLA has a backward for it)
CASES = {
    "simple_gla_g": ("fused_recurrent_simple_gla", lambda f, x: f(x["q"], x["k"], x["v"], g=x["g"], **x["st"])),
    "simple_gla_gamma": ("fused_recurrent_simple_gla",
                         lambda f, x: f(x["q"], x["k"], x["v"], g_gamma=x["g_gamma"], **x["st"])),
    "linear_attn": ("fused_recurrent_linear_attn", lambda f, x: f(x["q"], x["k"], x["v"], **x["st"])),
    "retention": ("fused_recurrent_retention", lambda f, x: f(x["q"], x["k"], x["v"], **x["st"])),
    "gla_gk": ("fused_recurrent_gla", lambda f, x: f(x["q"], x["k"], x["v"], gk=x["gk"], **x["st"])),
    "gla_gk_gv": ("fused_recurrent_gla",
                  lambda f, x: f(x["q"], x["k"], x["v"], gk=x["gk"], gv=x["gv"], **x["st"])),
    "delta_rule": ("fused_recurrent_delta_rule",
                   lambda f, x: f(x["q"], x["k"], x["v"], beta=x["beta"], use_qk_l2norm_in_kernel=True, **x["st"])),
    "gated_delta_rule": ("fused_recurrent_gated_delta_rule",
                         lambda f, x: f(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"],
                                        use_qk_l2norm_in_kernel=True, **x["st"])),
    "iplr": ("fused_recurrent_iplr_delta_rule",
             lambda f, x: f(x["q"], x["kn"], x["v"], x["a"], x["b"], **x["st"])),
    "dplr": ("fused_recurrent_dplr_delta_rule",
             lambda f, x: f(x["q"], x["kn"], x["v"], x["a"], x["b"], x["gk"], **x["st"])),
}
GRAD_INPUTS = ("q", "k", "kn", "v", "g", "g_gamma", "gk", "gv", "beta", "a", "b", "h0")


def _run(case, x, force_torch, monkeypatch, grad=True, op=None):
    """Outputs (and gradients) of the case's op: ours on the CUDA kernel or the PyTorch path, or
    `op` (FLA's function of the same name) on the same inputs and cotangents."""
    name, call = CASES[case]
    if op is None and force_torch:
        monkeypatch.setenv("FLA_CUDA_BACKEND", "torch")
    elif op is None:
        monkeypatch.delenv("FLA_CUDA_BACKEND", raising=False)
        assert backend.use_cuda(name, x["q"], K, V), "the CUDA kernel must be what this test exercises"
    leaves = {n: t.detach().clone().requires_grad_(grad) for n, t in x.items() if n in GRAD_INPUTS}
    args = dict(leaves, st=dict(initial_state=leaves["h0"], output_final_state=True))
    o, ht = call(op if op is not None else getattr(fla_cuda, name), args)
    out = {"o": o, "ht": ht}
    if grad:
        # identical cotangents whatever the dtype: drawn in fp32 (randn in fp64 draws other
        # numbers) and rounded through bf16 so the low-precision run sees exactly them too
        gen = torch.Generator(device=o.device).manual_seed(1)
        do = torch.randn(o.shape, generator=gen, device=o.device).bfloat16().to(o.dtype)
        dht = torch.randn(ht.shape, generator=gen, device=o.device).bfloat16().to(ht.dtype)
        live = list(leaves)
        gs = torch.autograd.grad((o, ht), [leaves[n] for n in live], (do, dht), allow_unused=True)
        out.update({"d" + n: g for n, g in zip(live, gs) if g is not None})
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_fp64_torch_path(case, dtype, monkeypatch):
    x = _inputs(dtype)
    ours = _run(case, x, False, monkeypatch)
    ref = _run(case, {n: t.double() for n, t in x.items()}, True, monkeypatch)
    tol = 3e-5 if dtype == torch.float32 else 8e-3
    for n, r in ref.items():
        if n.startswith("d") and n not in ours:
            continue  # an input this case does not use
        assert_close(n, r, ours[n], tol)


def _fla_op(name):
    """FLA's function of that name, or a skip without FLA (or without the op in FLA)."""
    fla_ops = pytest.importorskip("fla.ops")
    op = getattr(fla_ops, name, None)
    if op is None:
        pytest.skip(f"FLA has no {name}")
    return op


def _assert_no_worse(ref, ours, theirs, names):
    """Our error vs fp64 at most FLA's (x1.5 + rounding floor), FLA's get_err_ratio."""
    for n in names:
        e_ours, e_fla = err_ratio(ref[n], ours[n]), err_ratio(ref[n], theirs[n])
        assert e_ours <= 1.5 * e_fla + 1e-6, f"{n}: ours {e_ours:.2e} vs FLA {e_fla:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_no_worse_than_fla(case, monkeypatch):
    """Forward output and final state against FLA's forward on the same inputs."""
    fla_fn = _fla_op(CASES[case][0])
    x = _inputs(torch.bfloat16)
    theirs = _run(case, x, False, monkeypatch, grad=False, op=fla_fn)
    ours = _run(case, x, False, monkeypatch, grad=False)
    ref = _run(case, {n: t.double() for n, t in x.items()}, True, monkeypatch, grad=False)
    _assert_no_worse(ref, ours, theirs, ("o", "ht"))


@pytest.mark.parametrize("case", list(CASES))
def test_backward_no_worse_than_fla(case, monkeypatch):
    """Every gradient FLA's backward gives (bf16 inputs, state in and out). Skips where FLA 0.6
    has no backward (gated delta rule, DPLR: inference-only kernels that raise)."""
    name = CASES[case][0]
    fla_fn = _fla_op(name)
    x = _inputs(torch.bfloat16)
    try:
        theirs = _run(case, x, False, monkeypatch, op=fla_fn)
    except NotImplementedError as e:
        pytest.skip(f"FLA 0.6 has no backward for {name}: {e}")
    ours = _run(case, x, False, monkeypatch)
    ref = _run(case, {n: t.double() for n, t in x.items()}, True, monkeypatch)
    compared = [n for n in theirs if n.startswith("d") and n in ours]
    assert compared, "FLA's backward gave no gradient to compare"
    _assert_no_worse(ref, ours, theirs, compared)


def test_state_v_first_and_varlen_through_api(monkeypatch):
    x = _inputs(torch.float32)
    cu = torch.tensor([0, 7, 7, 60, 100], device="cuda")
    h0 = torch.randn(4, H, V, K, device="cuda")  # state_v_first layout [N, H, V, K]
    q, k, v, gk = (x[n][:1] for n in ("q", "k", "v", "gk"))
    o, ht = fla_cuda.fused_recurrent_gla(q, k, v, gk=gk, initial_state=h0, output_final_state=True,
                                         state_v_first=True, cu_seqlens=cu)
    monkeypatch.setenv("FLA_CUDA_BACKEND", "torch")
    ro, rht = fla_cuda.fused_recurrent_gla(q.double(), k.double(), v.double(), gk=gk.double(),
                                           initial_state=h0.double(), output_final_state=True,
                                           state_v_first=True, cu_seqlens=cu)
    assert_close("o", ro, o, 3e-5)
    assert_close("ht", rht, ht, 3e-5)


def test_public_op_under_torch_compile():
    x = _inputs(torch.float32)

    def f(q, k, v, g, beta, h0):
        o, ht = fla_cuda.fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=h0,
                                                          output_final_state=True, use_qk_l2norm_in_kernel=True)
        return o.float().square().sum() + ht.square().sum()

    leaves = [x[n].clone().requires_grad_() for n in ("q", "k", "v", "g", "beta", "h0")]
    compiled = torch.compile(f, fullgraph=True)
    gc = torch.autograd.grad(compiled(*leaves), leaves)
    ge = torch.autograd.grad(f(*leaves), leaves)
    for a, b in zip(gc, ge):
        assert_close("grad", b, a, 1e-4)
