"""The chunk ops' fake (meta) implementations on the CPU, under FakeTensorMode with fake CUDA
tensors: the shapes and dtypes torch.compile traces with (the GPU tests' opcheck compares them
with the kernels' real outputs)."""
import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fla_cuda import _extension

pytestmark = pytest.mark.skipif(not (_extension.HAS_EXTENSION and hasattr(torch.ops.fla_cuda, "chunk_gla_bwd")),
                                reason="the CUDA extension is not built")


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16])
def test_chunk_gla_fakes(packed, g_dtype):
    importlib.import_module("fla_cuda.ops.gla_cuda")   # registers the fakes
    B, T, H, K, V = (1, 300, 3, 64, 128) if packed else (2, 100, 3, 64, 128)
    with FakeTensorMode():
        q = torch.empty(B, T, H, K, device="cuda", dtype=torch.bfloat16)
        v = torch.empty(B, T, H, V, device="cuda", dtype=torch.bfloat16)
        g = torch.empty(B, T, H, K, device="cuda", dtype=g_dtype)
        cu = torch.empty(4, device="cuda", dtype=torch.int64) if packed else None
        offsets = torch.empty(4, device="cuda", dtype=torch.int64) if packed else None
        N = 3 if packed else B
        h0 = torch.empty(N, H, K, V, device="cuda")
        o, ht, q_gated, k_gated, A, A_lo, key_decay = torch.ops.fla_cuda.chunk_gla_fwd(
            q, q, v, g, h0, cu, offsets, 0.1, True, True)
        chunks = (T + 63) // 64
        assert o.shape == v.shape and o.dtype == torch.bfloat16
        assert ht.shape == (N, H, K, V) and ht.dtype == torch.float32
        assert q_gated.shape == k_gated.shape == q.shape
        assert A.shape == A_lo.shape == (B, T, H, 64) and A.dtype == torch.bfloat16
        assert key_decay.shape == ((chunks + N) if packed else B * chunks, H, K) and key_decay.dtype == torch.float32
        dq, dk, dv, dg, dh0 = torch.ops.fla_cuda.chunk_gla_bwd(
            q, q, v, g, h0, cu, offsets, q_gated, k_gated, A, A_lo, key_decay, o, ht, 0.1, True)
        assert dq.shape == dk.shape == q.shape and dv.shape == v.shape
        assert dg.shape == g.shape and dg.dtype == g_dtype
        assert dh0.shape == (N, H, K, V) and dh0.dtype == torch.float32
        *_, dh0_none = torch.ops.fla_cuda.chunk_gla_bwd(
            q, q, v, g, None, cu, offsets, q_gated, k_gated, A, A_lo, key_decay, o, None, 0.1, False)
        assert dh0_none.numel() == 0
        *_, A_lo_none, _ = torch.ops.fla_cuda.chunk_gla_fwd(q, q, v, g, h0, cu, offsets, 0.1, True, False)
        assert A_lo_none.numel() == 0   # inference: no A_lo
