"""The chunk simple GLA blueprint (stages + explicit backward) against the step-by-step oracle
and autograd, in fp64: the reference the tensor-core chunk kernels are built and debugged on."""
import pytest
import torch

from fla_cuda.reference.chunk_simple_gla import chunk_simple_gla_bwd, chunk_simple_gla_fwd
from fla_cuda.reference.recurrence import recurrence_reference
from tests.utils import assert_close, log_gate

D64 = torch.float64


def _inputs(B, T, H, K, V, gated, seed=0):
    torch.manual_seed(seed)
    q, k = torch.randn(B, T, H, K, dtype=D64), torch.randn(B, T, H, K, dtype=D64)
    v = torch.randn(B, T, H, V, dtype=D64)
    g = log_gate(B, T, H, dtype=D64) if gated else None
    return q, k, v, g, torch.randn(B, H, K, V, dtype=D64)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T,C", [(1, 16), (63, 16), (130, 64), (64, 64)])
def test_forward_and_chunk_states(gated, T, C):
    q, k, v, g, h0 = _inputs(2, T, 2, 8, 6, gated)
    fwd = chunk_simple_gla_fwd(q, k, v, g, scale=0.3, initial_state=h0, chunk_size=C)
    ro, rht = recurrence_reference(q, k, v, g=g, scale=0.3, initial_state=h0, output_final_state=True)
    assert_close("o", ro, fwd["o"], 1e-12)
    assert_close("ht", rht, fwd["ht"], 1e-12)
    # h[c] is the state entering chunk c: the oracle's state after c*C steps
    for c in range(fwd["h"].shape[2]):
        if c == 0:
            ref = h0
        else:
            _, ref = recurrence_reference(q[:, :c * C], k[:, :c * C], v[:, :c * C],
                                          g=None if g is None else g[:, :c * C], scale=0.3,
                                          initial_state=h0, output_final_state=True)
        assert_close(f"h[{c}]", ref, fwd["h"][:, :, c], 1e-12)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T,C", [(1, 16), (63, 16), (130, 64)])
@pytest.mark.parametrize("with_dht", [False, True])
def test_explicit_backward_matches_autograd(gated, T, C, with_dht):
    q, k, v, g, h0 = _inputs(2, T, 2, 8, 6, gated, seed=1)
    leaves = [x.clone().requires_grad_() for x in (q, k, v) + ((g,) if gated else ()) + (h0,)]
    lq, lk, lv = leaves[:3]
    lg = leaves[3] if gated else None
    lh0 = leaves[-1]
    ro, rht = recurrence_reference(lq, lk, lv, g=lg, scale=0.3, initial_state=lh0, output_final_state=True)
    do = torch.randn_like(ro)
    dht = torch.randn_like(rht) if with_dht else None
    outs, cots = (ro, rht) if with_dht else (ro,), (do, dht) if with_dht else (do,)
    ref = torch.autograd.grad(outs, leaves, cots)
    fwd = chunk_simple_gla_fwd(q, k, v, g, scale=0.3, initial_state=h0, chunk_size=C)
    ours = chunk_simple_gla_bwd(q, k, v, g, do, dht, fwd, scale=0.3, chunk_size=C)
    names = ["dq", "dk", "dv"] + (["dg"] if gated else []) + ["dh0"]
    for name, r in zip(names, ref):
        assert_close(name, r, ours[name], 1e-10)
    assert (ours["dg"] is None) == (not gated)


def test_dh_is_the_gradient_of_each_chunk_state():
    """dh[c] = dL/dh_c: perturbing the state entering chunk c moves L by <dh[c], delta>."""
    q, k, v, g, h0 = _inputs(1, 48, 1, 4, 3, True, seed=2)
    C = 16
    fwd = chunk_simple_gla_fwd(q, k, v, g, scale=0.5, initial_state=h0, chunk_size=C)
    do = torch.randn_like(fwd["o"])
    dht = torch.randn_like(fwd["ht"])
    bwd = chunk_simple_gla_bwd(q, k, v, g, do, dht, fwd, scale=0.5, chunk_size=C)
    c = 2
    delta = torch.randn_like(h0) * 1e-6
    # running the rest of the sequence from the perturbed state: L = <o, do> + <ht, dht>
    def loss(state):
        t0 = c * C
        o_tail, ht = recurrence_reference(q[:, t0:], k[:, t0:], v[:, t0:], g=g[:, t0:], scale=0.5,
                                          initial_state=state, output_final_state=True)
        return (o_tail * do[:, t0:]).sum() + (ht * dht).sum()
    h_c = fwd["h"][:, :, c]
    change = loss(h_c + delta) - loss(h_c)
    assert torch.allclose(change, (bwd["dh"][:, :, c] * delta).sum(), rtol=1e-6, atol=1e-14)


def test_gate_gradient_scan_per_sequence():
    """The chunk kernels' dg assembly (in PyTorch: reference.chunk_simple_gla.gate_gradient): a
    reverse cumulative sum inside each packed sequence plus that sequence's sink term."""
    from fla_cuda.reference.chunk_simple_gla import gate_gradient as _gate_gradient
    x = torch.randn(1, 9, 3, dtype=torch.float64)
    cu = torch.tensor([0, 4, 4, 9])
    sink = torch.randn(3, 3, dtype=torch.float64)
    pieces = [x[:, a:b].flip(1).cumsum(1).flip(1) + sink[i] for i, (a, b) in enumerate([(0, 4), (4, 4), (4, 9)])]
    assert torch.allclose(_gate_gradient(x, cu, sink), torch.cat(pieces, 1))
    pieces = [x[:, a:b].flip(1).cumsum(1).flip(1) for a, b in [(0, 4), (4, 9)]]
    assert torch.allclose(_gate_gradient(x, cu, None), torch.cat(pieces, 1))
    xb, sb = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    assert torch.allclose(_gate_gradient(xb, None, sb), xb.flip(1).cumsum(1).flip(1) + sb[:, None])
