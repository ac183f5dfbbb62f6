"""Relative RMS error of chunk_gla's gradients against the fp64 chunkwise path, on the inputs of
tests/test_gla_chunk_cuda.py::fla_backward_errors (B=2, T=1000, H=4, K=V=128, bf16), without
FLA (whose first backward call autotunes for minutes). GPU only.

    python scripts/gla_grad_errors.py [--divisors 1,16]
"""
import argparse
import sys
import os

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fla_cuda  # noqa: E402
from tests.test_gla_chunk_cuda import make_inputs  # noqa: E402
from tests.utils import err_ratio  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--divisors", default="1,16")
    a = ap.parse_args()
    names = ("q", "k", "v", "g", "h0")
    for divisor in map(float, a.divisors.split(",")):
        x = make_inputs(2, 1000, 4, 128, 128, torch.bfloat16, divisor)
        gen = torch.Generator(device="cuda").manual_seed(1)
        do = torch.randn(x["v"].shape, generator=gen, device="cuda").to(torch.bfloat16)
        dht = torch.randn(x["h0"].shape, generator=gen, device="cuda")

        def grads_of(cast):
            leaves = [cast(x[n]).detach().requires_grad_() for n in names]
            o, ht = fla_cuda.chunk_gla(*leaves[:4], initial_state=leaves[4], output_final_state=True)
            return torch.autograd.grad((o, ht), leaves, (cast(do), cast(dht)))
        ref, ours = grads_of(lambda t: t.double()), grads_of(lambda t: t)
        print(f"divisor {divisor:g}: " + "  ".join(f"d{n} {err_ratio(r, o):.3e}" for n, r, o in zip(names, ref, ours)))


if __name__ == "__main__":
    main()
