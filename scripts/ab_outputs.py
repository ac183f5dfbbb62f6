"""Outputs and gradients of a few ops at fixed seeds, saved for a bitwise comparison between
builds of the extension (an A/B of a kernel change that should not change any value).

    python scripts/ab_outputs.py save OUT.pt [--ops chunk_gla,...]   # with one build in place
    python scripts/ab_outputs.py compare A.pt B.pt                    # exit 1 if anything differs

Shapes cover the dense walks (4,512,4,128 with a state in and out), packed sequences with
cu_seqlens at K = 64, and B = 1, T = 8192 (split walks: their state-only launches); gates
logsigmoid(randn) (GLA: / 16). GPU only.
"""
import argparse
import sys

import torch
import torch.nn.functional as F

CASES = [  # (B, T, H, K, cu_seqlens)
    (4, 512, 4, 128, None),
    (1, 2049, 3, 64, [0, 700, 1400, 2049]),
    (1, 8192, 2, 128, None),
]


def run_op(name, B, T, H, K, cu, dev="cuda", seed=0):
    import fla_cuda
    torch.manual_seed(seed)
    dt = torch.bfloat16
    q, k, v = (torch.randn(B, T, H, K, device=dev, dtype=dt) for _ in range(3))
    N = len(cu) - 1 if cu else B
    h0 = torch.randn(N, H, K, K, device=dev)
    cu_t = torch.tensor(cu, device=dev) if cu else None
    if name == "chunk_gla":
        g = F.logsigmoid(torch.randn(B, T, H, K, device=dev)) / 16
        args, fn = [q, k, v, g, h0], lambda q, k, v, g, h0: fla_cuda.chunk_gla(
            q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu_t)
    elif name == "chunk_simple_gla":
        g = F.logsigmoid(torch.randn(B, T, H, device=dev))
        args, fn = [q, k, v, g, h0], lambda q, k, v, g, h0: fla_cuda.chunk_simple_gla(
            q, k, v, g=g, initial_state=h0, output_final_state=True, cu_seqlens=cu_t)
    else:
        raise SystemExit(f"unknown op {name}")
    leaves = [a.detach().requires_grad_() for a in args]
    o, ht = fn(*leaves)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    grads = torch.autograd.grad((o, ht), leaves, (do, dht))
    return {"o": o.detach(), "ht": ht.detach(), **{f"d{i}": gr for i, gr in enumerate(grads)}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["save", "compare"])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--ops", default="chunk_gla,chunk_simple_gla")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script on the PyTorch path")
    ap.add_argument("--cases", type=int, default=len(CASES), help="the first N cases")
    a = ap.parse_args()
    if a.cmd == "save":
        out = {}
        for name in a.ops.split(","):
            for case in CASES[:a.cases]:
                for key, t in run_op(name, *case, dev=a.device).items():
                    out[f"{name} {case[:4]} cu={case[4] is not None} {key}"] = t.cpu()
        torch.save(out, a.files[0])
        print(f"saved {len(out)} tensors to {a.files[0]}")
        return 0
    ref, other = (torch.load(f) for f in a.files[:2])
    bad = [k for k in ref if k not in other or not torch.equal(ref[k], other[k])]
    for k in bad:
        if k in other:
            d = (ref[k].double() - other[k].double()).abs().max().item()
            print(f"DIFFERS {k}: max |diff| {d:.3e}")
        else:
            print(f"MISSING {k}")
    print(f"{len(ref) - len(bad)} of {len(ref)} tensors bitwise equal")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
