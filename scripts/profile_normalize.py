"""Time the fused linear-attention normaliser alone (forward, forward+backward) next to the
chunk pass it follows, at one shape; the vector paths against the per-channel / per-element
ones (inputs 2 bytes past a 16-byte boundary take those: q, k for the key-dim kernels, o_raw
for the value rows). GPU only.

    python scripts/profile_normalize.py [--shape BxTxHxD]
"""
import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import fla_cuda
from fla_cuda.ops.normalize_cuda import normalize_cuda


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4x4096x16x128")
    B, T, H, D = map(int, ap.parse_args().shape.split("x"))
    dev, dt = "cuda", torch.bfloat16
    q = (F.elu(torch.randn(B, T, H, D, device=dev)) + 1).to(dt).requires_grad_()
    k = (F.elu(torch.randn(B, T, H, D, device=dev)) + 1).to(dt).requires_grad_()
    v = torch.randn(B, T, H, D, device=dev, dtype=dt).requires_grad_()

    def shifted(x):
        """x's values in a contiguous tensor 2 bytes past a 16-byte boundary."""
        buf = torch.empty(x.numel() + 1, device=dev, dtype=dt)
        out = buf[1:].view(x.shape)
        out.copy_(x.detach())
        return out.requires_grad_()

    o_aligned = torch.randn(B, T, H, D, device=dev, dtype=dt).requires_grad_()
    variants = {"vector": (o_aligned, q, k),
                "per-channel keys": (o_aligned, shifted(q), shifted(k)),
                "scalar": (shifted(o_aligned), shifted(q), shifted(k))}
    do = torch.randn(B, T, H, D, device=dev, dtype=dt)

    def fwd(o_raw, qq, kk):
        return normalize_cuda(o_raw, qq, kk, D ** -0.5, None, None)[0]

    def fwdbwd(o_raw, qq, kk):
        torch.autograd.grad(fwd(o_raw, qq, kk), (o_raw, qq, kk), do)

    rows = [("chunk_simple_gla fwd", lambda: fla_cuda.chunk_simple_gla(q, k, v)[0]),
            ("chunk_linear_attn(normalize) fwd", lambda: fla_cuda.chunk_linear_attn(q, k, v, normalize=True)[0])]
    for name, args in variants.items():
        rows.append((f"normalise fwd, {name}", lambda args=args: fwd(*args)))
        rows.append((f"normalise fwd+bwd, {name}", lambda args=args: fwdbwd(*args)))
    for name, fn in rows:
        print(f"{name:40s} {do_bench(fn):.4f} ms (eager: includes launch overhead)")
    # device time per kernel (eager timings of small ops can be host-bound)
    for name in ("vector", "per-channel keys"):
        fwdbwd(*variants[name])
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fwdbwd(*variants[name])
            torch.cuda.synchronize()
        print(f"--- {name}: 10 calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


if __name__ == "__main__":
    main()
