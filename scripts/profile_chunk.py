"""Time the chunk kernels at one shape; --table prints the CUDA kernels of one call (torch
profiler), for finding what else a public op spends time on. Run under ncu for stall reasons.

    python scripts/profile_chunk.py [--op chunk_simple_gla] [--shape BxTxHxD] [--bwd] [--table] [--launches]

--launches prints every kernel launch of one call with its device time, in order (--table
merges launches of the same kernel: the split walk's state-only and full launches).
FLA_CUDA_CHUNK_SM90=0 selects the SM80 chunk pass on Hopper.
"""
import argparse

import torch

import fla_cuda


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", default="chunk_simple_gla")
    ap.add_argument("--shape", default="4x4096x16x128")
    ap.add_argument("--bwd", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--launches", action="store_true")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    B, T, H, D = map(int, a.shape.split("x"))
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    gate = {}
    if a.op == "chunk_simple_gla":   # per-step head-wise gates
        gate["g"] = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda"))
    elif a.op == "chunk_gla":   # per-step key-wise gates, the strength (/16)
        gate["g"] = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, device="cuda")) / 16
    leaves = [t.requires_grad_(a.bwd) for t in (q, k, v, *gate.values())]
    do = torch.randn_like(v)
    fn = getattr(fla_cuda, a.op)

    def step():
        o = fn(q, k, v, **gate)[0]
        if a.bwd:
            torch.autograd.grad(o, leaves, do)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(a.iters):
        step()
    end.record()
    torch.cuda.synchronize()
    print(f"{a.op} {a.shape} {'fwd+bwd' if a.bwd else 'fwd'}: {start.elapsed_time(end) / a.iters:.3f} ms")
    if a.table:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    if a.launches:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                print(f"{e.name[:70]:70s} {e.device_time:9.1f} us")


if __name__ == "__main__":
    main()
