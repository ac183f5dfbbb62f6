"""The generic fused recurrent CUDA kernel against the fp64 step-by-step oracle.

Every family is a configuration of the one kernel; each is checked for outputs, final
states and all gradients, over odd lengths, varlen, states in/out, reverse, dtypes and
head dims. GPU only (skips elsewhere).
"""
import pytest
import torch
import torch.nn.functional as F

from fla_cuda.reference.recurrence import recurrence_reference
from tests.utils import assert_close, err_ratio, log_gate, make_cu_seqlens

pytestmark = pytest.mark.gpu

# name -> which inputs the family uses
FAMILIES = {
    "linear_attn": dict(),
    "simple_gla": dict(g=True),
    "gla": dict(gk=True),
    "gla_gv": dict(gk=True, gv=True),
    "delta_rule": dict(delta=True),
    "delta_rule_beta_v": dict(delta=True, beta_v=True),
    "gated_delta_rule": dict(delta=True, g=True),
    "gated_delta_rule_gk": dict(delta=True, gk=True, gv=True),
    "iplr": dict(lowrank=True),
    "dplr": dict(lowrank=True, gk=True),
}


def make_inputs(fam, B, T, H, K, V, dtype, HV=None, seed=0, device="cuda"):
    """Random inputs drawn the way models make them (never zeros)."""
    torch.manual_seed(seed)
    HV = HV or H
    cfg = FAMILIES[fam]
    x = {}
    x["q"] = torch.randn(B, T, H, K, device=device).to(dtype)
    k = torch.randn(B, T, H, K, device=device)
    if cfg.get("delta") or cfg.get("lowrank"):
        k = F.normalize(k, dim=-1)  # keeps the delta / low-rank transition contractive
    x["k"] = k.to(dtype)
    x["v"] = torch.randn(B, T, HV, V, device=device).to(dtype)
    if cfg.get("g"):
        x["g"] = log_gate(B, T, HV, device=device)
    if cfg.get("gk"):
        x["gk"] = log_gate(B, T, HV if cfg.get("delta") else H, K, device=device)
    if cfg.get("gv"):
        x["gv"] = log_gate(B, T, HV, V, device=device)
    if cfg.get("delta"):
        shape = (B, T, HV, V) if cfg.get("beta_v") else (B, T, HV)
        x["beta"] = torch.rand(*shape, device=device).sigmoid()
    if cfg.get("lowrank"):
        kk = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1)
        x["a"] = (-kk).to(dtype)
        x["b"] = (kk * torch.rand(B, T, H, 1, device=device)).to(dtype)
    return x


def run_both(fam, x, *, scale=None, h0=None, reverse=False, cu_seqlens=None, grad=True, final=True):
    """Ours and the fp64 reference on the same inputs: {name: (ref, ours)} for o, ht (when
    `final`; else ours must return None) and, with `grad`, every input's gradient."""
    from fla_cuda.ops.recurrent_cuda import fused_recurrent_cuda
    delta = FAMILIES[fam].get("delta", False)
    K = x["q"].shape[-1]
    scale = K ** -0.5 if scale is None else scale
    leaves = {n: t.detach().clone().requires_grad_(grad) for n, t in x.items()}
    if h0 is not None:
        # Without gradients h0 goes in as given (a clone would realign an offset view).
        leaves["h0"] = h0.detach().clone().requires_grad_(True) if grad else h0.detach()
    args = {n: t for n, t in leaves.items() if n not in ("q", "k", "v", "h0")}
    o, ht = fused_recurrent_cuda(leaves["q"], leaves["k"], leaves["v"], delta=delta, scale=scale,
                                 initial_state=leaves.get("h0"), output_final_state=final,
                                 reverse=reverse, cu_seqlens=cu_seqlens, **args)
    ref_leaves = {n: t.detach().double().requires_grad_(grad) for n, t in leaves.items()}
    rargs = {n: t for n, t in ref_leaves.items() if n not in ("q", "k", "v", "h0")}
    ro, rht = recurrence_reference(ref_leaves["q"], ref_leaves["k"], ref_leaves["v"], delta=delta,
                                   scale=scale, initial_state=ref_leaves.get("h0"), output_final_state=final,
                                   reverse=reverse, cu_seqlens=cu_seqlens, **rargs)
    out = {"o": (ro, o)}
    if final:
        out["ht"] = (rht, ht)
    else:
        assert ht is None, "output_final_state=False returned a state"
    if grad:
        outs, routs = ((o, ht), (ro, rht)) if final else ((o,), (ro,))
        grads = [torch.randn_like(t) for t in outs]
        ours = torch.autograd.grad(outs, list(leaves.values()), grads)
        refs = torch.autograd.grad(routs, list(ref_leaves.values()), [g.double() for g in grads])
        for n, r, g in zip(leaves, refs, ours):
            out["d" + n] = (r, g)
    return out


def tol(dtype):
    return {torch.float32: 2e-5, torch.bfloat16: 6e-3, torch.float16: 2e-3}[dtype]


def check(results, dtype, extra=1.0):
    for name, (ref, ours) in results.items():
        assert ours is not None, name
        assert_close(name, ref, ours, tol(dtype) * extra)


@pytest.mark.parametrize("fam", list(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 63, 200])
def test_families(fam, dtype, T):
    x = make_inputs(fam, 2, T, 2, 64, 64, dtype)
    h0 = torch.randn(2, 2, 64, 64, device="cuda")
    check(run_both(fam, x, h0=h0), dtype)


@pytest.mark.parametrize("fam", ["simple_gla", "gla_gv", "gated_delta_rule", "dplr"])
@pytest.mark.parametrize("K,V", [(128, 128), (256, 256), (100, 48), (32, 200)])
def test_head_dims(fam, K, V):
    x = make_inputs(fam, 1, 40, 2, K, V, torch.float32)
    check(run_both(fam, x, h0=torch.randn(1, 2, K, V, device="cuda")), torch.float32)


@pytest.mark.parametrize("fam", ["simple_gla", "gla", "delta_rule", "dplr"])
def test_long_sequence_fp16(fam):
    x = make_inputs(fam, 1, 500, 2, 64, 64, torch.float16)
    check(run_both(fam, x), torch.float16, extra=2)


@pytest.mark.parametrize("fam", ["simple_gla", "gla", "gated_delta_rule", "iplr"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_states_reverse(fam, reverse, dtype):
    lengths = [1, 17, 0, 40, 63]
    x = make_inputs(fam, 1, sum(lengths), 2, 64, 32, dtype)
    cu = make_cu_seqlens(lengths, device="cuda")
    h0 = torch.randn(len(lengths), 2, 64, 32, device="cuda")
    check(run_both(fam, x, h0=h0, reverse=reverse, cu_seqlens=cu, scale=0.3), dtype)


@pytest.mark.parametrize("fam", ["gated_delta_rule", "gated_delta_rule_gk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_value_heads(fam, dtype):
    x = make_inputs(fam, 2, 50, 2, 64, 64, dtype, HV=4)
    check(run_both(fam, x, h0=torch.randn(2, 4, 64, 64, device="cuda")), dtype)


@pytest.mark.parametrize("fam", ["simple_gla", "gla_gv", "delta_rule_beta_v", "dplr"])
@pytest.mark.parametrize("K,V", [(128, 50), (64, 20)])
def test_bf16_partial_value_tile(fam, K, V):
    """bf16 at the common head dims, reversed, with V not a whole number of 32-column tiles."""
    x = make_inputs(fam, 2, 37, 2, K, V, torch.bfloat16, seed=5)
    check(run_both(fam, x, h0=torch.randn(2, 2, K, V, device="cuda"), reverse=True), torch.bfloat16)


@pytest.mark.parametrize("fam", ["simple_gla", "gated_delta_rule", "gla", "dplr"])
def test_walk_kernel_choice(fam):
    """16-bit inputs at K = 64 / 128 without key gates or low-rank terms take the warp walk;
    GLA and DPLR (and q, k rows that are not 16-byte aligned) the block kernel. Both give
    the reference's results."""
    from fla_cuda.ops.recurrent_cuda import fused_recurrent_cuda
    from tests.utils import cuda_kernel_names
    x = make_inputs(fam, 2, 30, 2, 64, 64, torch.bfloat16, seed=6)
    h0 = torch.randn(2, 2, 64, 64, device="cuda")
    shifted = dict(x)
    for n in ("q", "k"):  # views one element into their storage: rows 2 bytes off 16
        flat = torch.empty(x[n].numel() + 1, device="cuda", dtype=x[n].dtype)
        flat[1:] = x[n].flatten()
        shifted[n] = flat[1:].view(x[n].shape)
    delta = FAMILIES[fam].get("delta", False)
    ref = {n: t.double() for n, t in x.items()}
    ro, rht = recurrence_reference(ref["q"], ref["k"], ref["v"], delta=delta, scale=0.125,
                                   initial_state=h0.double(), output_final_state=True,
                                   **{n: t for n, t in ref.items() if n not in ("q", "k", "v")})
    warp = fam in ("simple_gla", "gated_delta_rule")
    for inputs, want in ((x, "recurrent_fwd_warp_kernel" if warp else "recurrent_fwd_kernel"),
                         (shifted, "recurrent_fwd_kernel")):
        def call():
            return fused_recurrent_cuda(inputs["q"], inputs["k"], inputs["v"], delta=delta, scale=0.125,
                                        initial_state=h0, output_final_state=True,
                                        **{n: t for n, t in inputs.items() if n not in ("q", "k", "v")})
        o, ht = call()
        assert_close("o", ro, o, tol(torch.bfloat16))
        assert_close("ht", rht, ht, tol(torch.bfloat16))
        names = cuda_kernel_names(call)
        assert any(want in n for n in names) and not any(
            "recurrent_fwd_warp_kernel" in n for n in names if want != "recurrent_fwd_warp_kernel"), names


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_decode_step(fam):
    """T = 1 with a large batch and a state in and out: the decoding shape."""
    x = make_inputs(fam, 64, 1, 4, 128, 128, torch.bfloat16)
    h0 = torch.randn(64, 4, 128, 128, device="cuda")
    check(run_both(fam, x, h0=h0, grad=False), torch.bfloat16)


@pytest.mark.parametrize("fam", ["simple_gla", "gla_gv", "delta_rule_beta_v", "dplr"])
@pytest.mark.parametrize("K,V,HV,with_h0,dtype", [
    (64, 64, 4, True, torch.float32),     # K = 64 layout, grouped value heads
    (128, 100, 2, True, torch.float16),   # V % 32 != 0: a partial last value tile
    (128, 128, 2, False, torch.bfloat16), # no initial state
    (128, 50, 2, True, torch.float32),    # V % 4 != 0: not the decode kernel (the walk kernel)
    (256, 64, 2, True, torch.float32),    # K = 256: the walk kernel
])
def test_decode_kernel_edges(fam, K, V, HV, with_h0, dtype):
    """The persistent decode kernel (dense T = 1 without autograd; each block does many
    tiles) across layouts, partial tiles, state in or not, and the shapes that fall back."""
    x = make_inputs(fam, 300, 1, 2, K, V, dtype, HV=HV if "delta" in fam else None, seed=3)
    HV = x["v"].shape[2]
    h0 = torch.randn(300, HV, K, V, device="cuda") if with_h0 else None
    check(run_both(fam, x, h0=h0, grad=False, scale=0.3), dtype)


@pytest.mark.parametrize("fam", ["simple_gla", "gated_delta_rule", "dplr"])
@pytest.mark.parametrize("case", ["no_final_state", "unaligned_h0", "fp32_k64"])
def test_decode_state_io(fam, case):
    """The decode step with a state in and none out, with an h0 the decode kernel's 16-byte
    copies cannot read (a 4-byte offset: the walk kernel takes it), and at K = 64 in fp32."""
    K, dtype = (64, torch.float32) if case == "fp32_k64" else (128, torch.bfloat16)
    x = make_inputs(fam, 150, 1, 2, K, 64, dtype, seed=7)
    h0 = torch.randn(150 * 2 * K * 64 + 1, device="cuda")
    h0 = h0[1:].view(150, 2, K, 64) if case == "unaligned_h0" else h0[:-1].view(150, 2, K, 64)
    check(run_both(fam, x, scale=0.3, h0=h0, grad=False, final=case != "no_final_state"), dtype)


def test_decode_kernel_choice():
    """The decode step runs the persistent decode kernel; an h0 its 16-byte copies cannot read
    (a 4-byte offset) goes to a walk (here the warp walk: bf16, K = 128, no key gates)."""
    from fla_cuda.ops.recurrent_cuda import fused_recurrent_cuda
    from tests.utils import cuda_kernel_names
    x = make_inputs("simple_gla", 8, 1, 2, 128, 128, torch.bfloat16)
    h0 = torch.randn(8 * 2 * 128 * 128 + 1, device="cuda")

    def names(state):
        return cuda_kernel_names(lambda: fused_recurrent_cuda(x["q"], x["k"], x["v"], g=x["g"], scale=0.1,
                                                              initial_state=state, output_final_state=True))
    aligned, unaligned = names(h0[:-1].view(8, 2, 128, 128)), names(h0[1:].view(8, 2, 128, 128))
    assert any("recurrent_decode_kernel" in n for n in aligned), aligned
    assert not any("recurrent_decode_kernel" in n for n in unaligned), unaligned
    assert any("recurrent_fwd_warp_kernel" in n for n in unaligned), unaligned


def test_decode_kernel_l2norm():
    from fla_cuda.ops.recurrent_cuda import fused_recurrent_cuda
    x = make_inputs("gated_delta_rule", 200, 1, 4, 128, 128, torch.bfloat16, seed=5)
    x["k"] = (x["k"].float() * 3).to(torch.bfloat16)
    h0 = torch.randn(200, 4, 128, 128, device="cuda")
    o, ht = fused_recurrent_cuda(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], delta=True, scale=0.2,
                                 initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    ref = {n: t.double() for n, t in x.items()}
    qn = ref["q"] / (ref["q"].square().sum(-1, keepdim=True) + 1e-6).sqrt()
    kn = ref["k"] / (ref["k"].square().sum(-1, keepdim=True) + 1e-6).sqrt()
    ro, rht = recurrence_reference(qn, kn, ref["v"], g=ref["g"], beta=ref["beta"], delta=True, scale=0.2,
                                   initial_state=h0.double(), output_final_state=True)
    assert_close("o", ro, o, tol(torch.bfloat16))
    assert_close("ht", rht, ht, tol(torch.bfloat16))


def test_backward_deterministic():
    x = make_inputs("dplr", 2, 100, 2, 64, 64, torch.bfloat16)
    g1 = run_both("dplr", x, h0=torch.randn(2, 2, 64, 64, device="cuda"))
    torch.manual_seed(0)
    from fla_cuda.ops.recurrent_cuda import fused_recurrent_cuda

    def grads_once():
        leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
        o, _ = fused_recurrent_cuda(leaves["q"], leaves["k"], leaves["v"], a=leaves["a"], b=leaves["b"],
                                    gk=leaves["gk"], scale=0.125)
        torch.manual_seed(1)
        return torch.autograd.grad(o, list(leaves.values()), torch.randn_like(o))

    first, second = grads_once(), grads_once()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert g1  # the comparison above ran on real gradients


def test_strong_gates_finite():
    """Gates of -1e4 and -inf zero the state without NaN."""
    x = make_inputs("gla", 1, 40, 2, 64, 64, torch.float32)
    x["gk"][:, 5] = -1e4
    x["gk"][:, 20, :, :8] = float("-inf")
    res = run_both("gla", x, grad=False)
    for name, (ref, ours) in res.items():
        assert torch.isfinite(ours).all(), name
        assert err_ratio(ref, ours) < 1e-5, name


def test_torch_compile_fullgraph():
    from fla_cuda.ops.recurrent_cuda import fused_recurrent_cuda
    x = make_inputs("gated_delta_rule", 2, 20, 2, 64, 64, torch.bfloat16)

    def f(q, k, v, g, beta):
        o, ht = fused_recurrent_cuda(q, k, v, g=g, beta=beta, delta=True, scale=0.125, output_final_state=True)
        return o.float().sum() + ht.sum()

    leaves = [x[n].clone().requires_grad_() for n in ("q", "k", "v", "g", "beta")]
    compiled = torch.compile(f, fullgraph=True)
    loss_c = compiled(*leaves)
    grads_c = torch.autograd.grad(loss_c, leaves)
    loss_e = f(*leaves)
    grads_e = torch.autograd.grad(loss_e, leaves)
    assert torch.allclose(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        assert torch.equal(a, b)


def test_opcheck():
    x = make_inputs("dplr", 1, 20, 2, 64, 32, torch.float32)
    h0 = torch.randn(1, 2, 64, 32, device="cuda")
    args = (x["q"], x["k"], x["v"], None, x["gk"], None, None, x["a"], x["b"], h0, None,
            0.125, False, False, False, True, True)
    torch.library.opcheck(torch.ops.fla_cuda.recurrent_fwd.default, args)
    cu = make_cu_seqlens([3, 0, 17], device="cuda")
    args = (x["q"], x["k"], x["v"], None, x["gk"], None, None, x["a"], x["b"], torch.randn(3, 2, 64, 32, device="cuda"),
            cu, 0.125, True, False, False, True, True)
    torch.library.opcheck(torch.ops.fla_cuda.recurrent_fwd.default, args)


@pytest.mark.parametrize("fam", ["delta_rule", "gated_delta_rule"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_kernel_l2norm(fam, dtype):
    """use_qk_l2norm: the kernel normalises q, k in fp32; gradients reach the raw q, k."""
    from fla_cuda.ops.recurrent_cuda import fused_recurrent_cuda
    x = make_inputs(fam, 2, 70, 2, 64, 64, dtype)
    x["k"] = (x["k"].float() * 3).to(dtype)  # not unit norm: the normalisation matters
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    extra = {n: leaves[n] for n in ("g", "beta") if n in leaves}
    o, ht = fused_recurrent_cuda(leaves["q"], leaves["k"], leaves["v"], delta=True, scale=0.2,
                                 output_final_state=True, use_qk_l2norm=True, **extra)
    ref = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    qn = ref["q"] / (ref["q"].square().sum(-1, keepdim=True) + 1e-6).sqrt()
    kn = ref["k"] / (ref["k"].square().sum(-1, keepdim=True) + 1e-6).sqrt()
    rextra = {n: ref[n] for n in ("g", "beta") if n in ref}
    ro, rht = recurrence_reference(qn, kn, ref["v"], delta=True, scale=0.2, output_final_state=True, **rextra)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    gs = torch.autograd.grad((o, ht), list(leaves.values()), (do, dht))
    rgs = torch.autograd.grad((ro, rht), list(ref.values()), (do.double(), dht.double()))
    assert_close("o", ro, o, tol(dtype))
    assert_close("ht", rht, ht, tol(dtype))
    for n, r, g in zip(leaves, rgs, gs):
        assert_close("d" + n, r, g, tol(dtype))


@pytest.mark.parametrize("beta_v", [False, True])
def test_beta_in_input_dtype(beta_v):
    """beta in q's dtype is read as is by the kernel (no cast), gradients come back in it."""
    fam = "delta_rule_beta_v" if beta_v else "gated_delta_rule"
    x = make_inputs(fam, 2, 40, 2, 64, 64, torch.bfloat16)
    x["beta"] = x["beta"].bfloat16()
    res = run_both(fam, x, h0=torch.randn(2, 2, 64, 64, device="cuda"))
    assert res["dbeta"][1].dtype == torch.bfloat16
    check(res, torch.bfloat16)


@pytest.mark.parametrize("beta_v", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_beta_in_input_dtype(beta_v, dtype):
    """The decode kernel holds a beta in q's dtype (per head or per value column) as loaded, two
    tiles ahead, and widens it when its tile runs."""
    fam = "delta_rule_beta_v" if beta_v else "gated_delta_rule"
    x = make_inputs(fam, 200, 1, 2, 128, 128, dtype, seed=11)
    x["beta"] = x["beta"].to(dtype)
    check(run_both(fam, x, h0=torch.randn(200, 2, 128, 128, device="cuda"), grad=False, scale=0.3), dtype)
