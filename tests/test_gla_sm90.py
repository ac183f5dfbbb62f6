"""GLA mode of the wgmma chunk pass (csrc/chunk/chunk_pass_gla_sm90.cuh, the default on sm_90;
FLA_CUDA_CHUNK_SM90=0 selects the SM80 pass) against the SM80 pass and the fp64 reference on
the same inputs: outputs, final states and every gradient (the GLA backward runs the pass
three times: reversed with A^T and A_lo, transposed states with column decays and fp32
outputs, states_out / state_dots). The wgmma pass's error must be no
worse than 1.25x the SM80 pass's (plus a floor). sm_90 GPUs only.
"""
import pytest
import torch

from tests.test_gla_chunk_cuda import TOL, make_inputs, run_pair
from tests.utils import (assert_no_worse_than_sm80, cuda_kernel_names, make_cu_seqlens, sm90_or_skip,
                         wgmma_and_sm80)

pytestmark = pytest.mark.gpu


def test_env_selects_the_kernel(monkeypatch):
    sm90_or_skip()
    x = make_inputs(1, 200, 2, 128, 128, torch.bfloat16)
    monkeypatch.delenv("FLA_CUDA_CHUNK_SM90", raising=False)
    names = cuda_kernel_names(lambda: run_pair(x))
    assert any("chunk_pass_gla_sm90_kernel" in n for n in names), names
    assert not any("chunk_pass_kernel" in n for n in names), names
    monkeypatch.setenv("FLA_CUDA_CHUNK_SM90", "0")
    # (the fp64 reference's cuBLAS kernels also carry "sm90" in their names)
    names = cuda_kernel_names(lambda: run_pair(x))
    assert not any("chunk_pass_gla_sm90" in n for n in names), names
    assert any("chunk_pass_kernel" in n for n in names), names


def test_deterministic():
    sm90_or_skip()
    x = make_inputs(2, 700, 3, 128, 128, torch.bfloat16)
    a, _ = run_pair(x)
    b, _ = run_pair(x)
    for n in a:
        assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("divisor", [1.0, 16.0])
@pytest.mark.parametrize("T", [1, 63, 500, 2049])
def test_lengths_and_gate_strengths(T, divisor, monkeypatch):
    sm90_or_skip()
    x = make_inputs(2, T, 3, 128, 128, torch.bfloat16, divisor)
    assert_no_worse_than_sm80(*wgmma_and_sm80(run_pair, x, monkeypatch), 0.05 * TOL[torch.bfloat16])


@pytest.mark.parametrize("K,V", [(64, 64), (128, 64), (64, 128), (128, 256), (256, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_dims_and_dtypes(K, V, dtype, monkeypatch):
    sm90_or_skip()
    x = make_inputs(2, 300, 2, K, V, dtype)
    assert_no_worse_than_sm80(*wgmma_and_sm80(run_pair, x, monkeypatch), 0.05 * TOL[dtype])


@pytest.mark.parametrize("T", [4100, 20000])
def test_split_walk(T, monkeypatch):
    sm90_or_skip()
    x = make_inputs(1, T, 2, 128, 128, torch.bfloat16)
    assert_no_worse_than_sm80(*wgmma_and_sm80(run_pair, x, monkeypatch), 0.05 * TOL[torch.bfloat16])


def test_varlen_with_empty_sequence(monkeypatch):
    sm90_or_skip()
    lengths = [1, 130, 0, 64, 257, 1000]
    x = make_inputs(1, sum(lengths), 3, 64, 128, torch.bfloat16, N=len(lengths))
    cu = make_cu_seqlens(lengths, device="cuda")
    assert_no_worse_than_sm80(*wgmma_and_sm80(run_pair, x, monkeypatch, cu_seqlens=cu), 0.05 * TOL[torch.bfloat16])
