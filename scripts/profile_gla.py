"""Time chunk_gla's CUDA forward and forward+backward at one shape: the whole op (eager) and
the device time of each kernel (torch.profiler), next to FLA's chunk_gla when importable.
GPU only.

    python scripts/profile_gla.py [--shape BxTxHxD] [--divisor 16] [--no-fla]
"""
import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import fla_cuda


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4x4096x16x128")
    ap.add_argument("--divisor", type=float, default=16.0)
    ap.add_argument("--no-fla", action="store_true")
    a = ap.parse_args()
    B, T, H, D = map(int, a.shape.split("x"))
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=dt) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, D, device=dev)) / a.divisor
    leaves = [t.detach().requires_grad_() for t in (q, k, v, g)]
    do = torch.randn_like(v)

    def ours():
        return fla_cuda.chunk_gla(q, k, v, g)

    def ours_fwdbwd():
        o, _ = fla_cuda.chunk_gla(*leaves)
        return torch.autograd.grad(o, leaves, do)

    print(f"chunk_gla fwd {a.shape} fla_cuda {do_bench(ours, warmup=25, rep=200):.4f} ms (eager)")
    print(f"chunk_gla fwd+bwd {a.shape} fla_cuda {do_bench(ours_fwdbwd, warmup=10, rep=100):.4f} ms (eager)")
    if not a.no_fla:
        try:
            from fla.ops import chunk_gla as fla_chunk_gla
            fla_chunk_gla(q, k, v, g)
            ms = do_bench(lambda: fla_chunk_gla(q, k, v, g), warmup=25, rep=200)
            print(f"chunk_gla fwd {a.shape} FLA      {ms:.4f} ms (eager)")
        except Exception as e:  # noqa: BLE001
            print(f"FLA: {type(e).__name__}: {e}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            ours_fwdbwd()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16))


if __name__ == "__main__":
    main()
