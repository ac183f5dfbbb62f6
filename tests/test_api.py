"""Cross-family API checks: exports, FLA 0.6 signatures, strided inputs, backend reporting."""
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

import fla_cuda
from fla_cuda import backend
from tests.utils import log_gate

B, T, H, K, V = 2, 20, 2, 16, 16


def _inputs(strided: bool, device="cpu"):
    """The same values, either contiguous or as views with non-unit strides (heads-first storage)."""
    torch.manual_seed(0)

    def make(*shape):
        x = torch.randn(shape[0], shape[2], shape[1], *shape[3:], device=device).transpose(1, 2)  # [B,T,H,..]
        return x if strided else x.contiguous()

    kn = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1)
    x = dict(q=make(B, T, H, K), k=make(B, T, H, K), v=make(B, T, H, V),
             g=log_gate(B, T, H, device=device), gk=log_gate(B, T, H, K, device=device) / 4,
             beta=torch.rand(B, T, H, device=device).sigmoid(), kn=kn, a=-kn,
             b=kn * torch.rand(B, T, H, 1, device=device), h0=torch.randn(B, H, K, V, device=device))
    if strided:
        assert not x["q"].is_contiguous()
        x["gk"] = x["gk"].transpose(1, 2).contiguous().transpose(1, 2)
        x["h0"] = x["h0"].transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


CALLS = {
    "chunk_simple_gla": lambda f, x: f(x["q"], x["k"], x["v"], g=x["g"], initial_state=x["h0"], output_final_state=True),
    "fused_chunk_simple_gla": lambda f, x: f(x["q"], x["k"], x["v"], g=x["g"]),
    "fused_recurrent_simple_gla": lambda f, x: f(x["q"], x["k"], x["v"], g=x["g"], initial_state=x["h0"],
                                                 output_final_state=True),
    "parallel_simple_gla": lambda f, x: f(x["q"], x["k"], x["v"], g=x["g"]),
    "chunk_linear_attn": lambda f, x: f(x["q"], x["k"], x["v"], normalize=False),
    "fused_chunk_linear_attn": lambda f, x: f(x["q"], x["k"], x["v"], normalize=False),
    "fused_recurrent_linear_attn": lambda f, x: f(x["q"], x["k"], x["v"]),
    "chunk_retention": lambda f, x: f(x["q"], x["k"], x["v"]),
    "fused_chunk_retention": lambda f, x: f(x["q"], x["k"], x["v"]),
    "fused_recurrent_retention": lambda f, x: f(x["q"], x["k"], x["v"]),
    "parallel_retention": lambda f, x: f(x["q"], x["k"], x["v"]),
    "chunk_gla": lambda f, x: f(x["q"], x["k"], x["v"], x["gk"], initial_state=x["h0"], output_final_state=True),
    "fused_recurrent_gla": lambda f, x: f(x["q"], x["k"], x["v"], gk=x["gk"]),
    "chunk_delta_rule": lambda f, x: f(x["q"], x["kn"], x["v"], x["beta"]),
    "fused_recurrent_delta_rule": lambda f, x: f(x["q"], x["kn"], x["v"], x["beta"]),
    "chunk_gated_delta_rule": lambda f, x: f(x["q"], x["k"], x["v"], x["g"], x["beta"], use_qk_l2norm_in_kernel=True),
    "fused_recurrent_gated_delta_rule": lambda f, x: f(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"],
                                                       use_qk_l2norm_in_kernel=True),
    "chunk_iplr_delta_rule": lambda f, x: f(x["q"], x["kn"], x["v"], x["a"], x["b"]),
    "fused_recurrent_iplr_delta_rule": lambda f, x: f(x["q"], x["kn"], x["v"], x["a"], x["b"]),
    "chunk_dplr_delta_rule": lambda f, x: f(x["q"], x["kn"], x["v"], x["a"], x["b"], x["gk"]),
    "fused_recurrent_dplr_delta_rule": lambda f, x: f(x["q"], x["kn"], x["v"], x["a"], x["b"], x["gk"]),
}


def test_every_op_is_exported_and_listed():
    assert set(CALLS) == set(backend.OPS)
    for name in CALLS:
        assert callable(getattr(fla_cuda, name)), name
        assert name in fla_cuda.__all__


def _run(name, x):
    out = CALLS[name](getattr(fla_cuda, name), x)
    return [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", list(CALLS))
def test_strided_inputs_give_the_same_result(name):
    """Non-contiguous views are accepted (as FLA's input_guard does) and change nothing."""
    ref = _run(name, _inputs(False))
    out = _run(name, _inputs(True))
    assert len(ref) == len(out) > 0
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n in CALLS if n.startswith("fused_recurrent")])
def test_strided_inputs_on_the_kernel(name):
    assert backend.use_cuda(name, torch.empty(1, device="cuda", dtype=torch.float32), K, V)
    ref = _run(name, _inputs(False, "cuda"))
    out = _run(name, _inputs(True, "cuda"))
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_signatures_match_fla():
    """Same parameter names, order and defaults as FLA 0.6 (when FLA is importable)."""
    fla_ops = pytest.importorskip("fla.ops")
    for name in CALLS:
        theirs = inspect.signature(getattr(fla_ops, name))
        ours = inspect.signature(getattr(fla_cuda, name))
        tp = [(p.name, p.default) for p in theirs.parameters.values() if p.kind != p.VAR_KEYWORD]
        op = [(p.name, p.default) for p in ours.parameters.values() if p.kind != p.VAR_KEYWORD]
        assert op[:len(tp)] == tp, name


def test_describe_reports_every_op():
    table = backend.describe("cpu")
    assert set(table) == set(backend.OPS)
    assert all(v.startswith("pytorch") for v in table.values())


def test_gpu_without_machine_code_warns_once(monkeypatch):
    """A GPU the extension has no code for runs the PyTorch path, and says so once."""
    class FakeCudaTensor:
        is_cuda = True
        device = torch.device("cuda", 0)
        dtype = torch.bfloat16

    monkeypatch.setattr(backend, "kernel_available", lambda op: True)
    monkeypatch.setattr(backend._extension, "cuda_arch_supported", lambda device: False)
    monkeypatch.setattr(backend._extension, "build_info", lambda: {"cuda_archs": []})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
    monkeypatch.setattr(backend, "_warned", set())
    with pytest.warns(UserWarning, match=r"no machine code for this GPU \(sm_120; .*_build_info.py.*missing"):
        assert not backend.use_cuda("fused_recurrent_gla", FakeCudaTensor(), K, V)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not backend.use_cuda("chunk_gla", FakeCudaTensor(), K, V)


def test_forced_torch_backend(monkeypatch):
    monkeypatch.setenv("FLA_CUDA_BACKEND", "torch")
    assert backend.forced_torch()
    assert not backend.use_cuda("fused_recurrent_gla", torch.empty(1), K, V)
