"""The scalar-gate chunk pass on Hopper wgmma (csrc/chunk/chunk_pass_sm90.cuh) against the SM80
pass (FLA_CUDA_CHUNK_SM90=0) and the fp64 reference, on the same inputs: outputs, final states
and every gradient (the backward runs the pass three times: reversed, transposed states, the
per-token dots of dg), over gates, odd lengths, split walks (B=1), varlen and head dims. The
wgmma pass's error must be no worse than 1.25x the SM80 pass's (plus a floor at bf16 noise).
sm_90 GPUs only.
"""
import pytest
import torch

from tests.test_chunk_cuda import TOL, make_inputs, run_pair
from tests.utils import (assert_no_worse_than_sm80, cuda_kernel_names, make_cu_seqlens, sm90_or_skip,
                         wgmma_and_sm80)

pytestmark = pytest.mark.gpu


def test_env_selects_the_kernel(monkeypatch):
    """The comparisons below mean something only if FLA_CUDA_CHUNK_SM90 switches kernels (the
    two can agree bit for bit: without gates both sum the same bf16 products in the same order)."""
    sm90_or_skip()
    x = make_inputs(1, 200, 2, 128, 128, torch.bfloat16, "g")
    monkeypatch.delenv("FLA_CUDA_CHUNK_SM90", raising=False)
    names = cuda_kernel_names(lambda: run_pair(x))
    assert any("chunk_pass_sm90_kernel" in n for n in names), names
    assert not any("chunk_pass_kernel" in n for n in names), names
    monkeypatch.setenv("FLA_CUDA_CHUNK_SM90", "0")
    names = cuda_kernel_names(lambda: run_pair(x))
    assert not any("chunk_pass_sm90_kernel" in n for n in names), names
    assert any("chunk_pass_kernel" in n for n in names), names


@pytest.mark.parametrize("gate", ["g", "g_gamma", None])
@pytest.mark.parametrize("T", [1, 63, 500, 2049])
def test_gates_and_lengths(gate, T, monkeypatch):
    sm90_or_skip()
    x = make_inputs(2, T, 3, 128, 128, torch.bfloat16, gate)
    assert_no_worse_than_sm80(*wgmma_and_sm80(run_pair, x, monkeypatch), 0.05 * TOL[torch.bfloat16])


@pytest.mark.parametrize("K,V", [(64, 64), (128, 64), (64, 128), (128, 256), (256, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_dims_and_dtypes(K, V, dtype, monkeypatch):
    """K=256 keeps the SM80 pass for the forward and the dv pass; V=256 for the dq, dk passes."""
    sm90_or_skip()
    x = make_inputs(2, 300, 2, K, V, dtype, "g")
    assert_no_worse_than_sm80(*wgmma_and_sm80(run_pair, x, monkeypatch), 0.05 * TOL[dtype])


@pytest.mark.parametrize("T", [4100, 20000])
def test_split_walk(T, monkeypatch):
    """B=1, few heads: segments walked in parallel after a state-only launch."""
    sm90_or_skip()
    x = make_inputs(1, T, 2, 128, 128, torch.bfloat16, "g")
    assert_no_worse_than_sm80(*wgmma_and_sm80(run_pair, x, monkeypatch), 0.05 * TOL[torch.bfloat16])


@pytest.mark.parametrize("gate", ["g", "g_gamma", None])
@pytest.mark.parametrize("K,V", [(128, 128), (64, 64), (128, 256), (64, 128)])
def test_split_walk_segment_pieces(gate, K, V, monkeypatch):
    """B=1, one head: the states kernel writes each segment's state in pieces (for V = 64 one of
    its two warpgroups has no value columns) and seg_fold folds them, in every pass of the
    forward and the backward (reversed, transposed states)."""
    sm90_or_skip()
    x = make_inputs(1, 9000, 1, K, V, torch.bfloat16, gate)
    monkeypatch.delenv("FLA_CUDA_CHUNK_SM90", raising=False)
    names = cuda_kernel_names(lambda: run_pair(x))
    assert any("chunk_states_sm90_kernel" in n for n in names), names
    assert any("chunk_seg_fold_kernel" in n for n in names), names
    assert_no_worse_than_sm80(*wgmma_and_sm80(run_pair, x, monkeypatch), 0.05 * TOL[torch.bfloat16])


def test_wide_batch(monkeypatch):
    sm90_or_skip()
    x = make_inputs(4, 700, 40, 128, 128, torch.bfloat16, "g")
    assert_no_worse_than_sm80(*wgmma_and_sm80(run_pair, x, monkeypatch), 0.05 * TOL[torch.bfloat16])


def test_varlen_with_empty_sequence(monkeypatch):
    sm90_or_skip()
    lengths = [1, 130, 0, 64, 257, 1000]
    x = make_inputs(1, sum(lengths), 3, 64, 128, torch.bfloat16, "g", N=len(lengths))
    cu = make_cu_seqlens(lengths, device="cuda")
    assert_no_worse_than_sm80(*wgmma_and_sm80(run_pair, x, monkeypatch, cu_seqlens=cu), 0.05 * TOL[torch.bfloat16])


def test_deterministic():
    sm90_or_skip()
    x = make_inputs(1, 3000, 2, 128, 128, torch.bfloat16, "g")
    a, _ = run_pair(x)
    b, _ = run_pair(x)
    for n in a:
        assert torch.equal(a[n], b[n]), f"{n} differs between two identical runs"
