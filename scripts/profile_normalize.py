"""Time the fused linear-attention normaliser alone (forward, forward+backward) next to the
chunk pass it follows, at one shape; the vectorised path against the scalar one (an o_raw
that is not 16-byte aligned takes the scalar path). GPU only.

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
    buf = torch.randn(B * T * H * D + 1, device=dev, dtype=dt)
    aligned = buf[:-1].view(B, T, H, D).clone().requires_grad_()
    misaligned = buf[1:].view(B, T, H, D).detach().requires_grad_()   # storage offset 2 bytes
    do = torch.randn(B, T, H, D, device=dev, dtype=dt)

    def fwd(o_raw):
        return normalize_cuda(o_raw, q, k, D ** -0.5, None, None)[0]

    def fwdbwd(o_raw):
        torch.autograd.grad(fwd(o_raw), (o_raw, q, k), do)

    rows = [("chunk_simple_gla fwd", lambda: fla_cuda.chunk_simple_gla(q, k, v)[0]),
            ("chunk_linear_attn(normalize) fwd", lambda: fla_cuda.chunk_linear_attn(q, k, v, normalize=True)[0])]
    for name, o_raw in (("vectorised", aligned), ("scalar", misaligned)):
        rows.append((f"normalise fwd, {name}", lambda o_raw=o_raw: fwd(o_raw)))
        rows.append((f"normalise fwd+bwd, {name}", lambda o_raw=o_raw: fwdbwd(o_raw)))
    for name, fn in rows:
        print(f"{name:40s} {do_bench(fn):.4f} ms (eager: includes launch overhead)")
    # device time per kernel (eager timings of small ops can be host-bound)
    fwdbwd(aligned)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fwdbwd(aligned)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
