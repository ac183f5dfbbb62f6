"""Relative RMS error of chunk_gla's gradients against the fp64 chunkwise path, on the inputs of
tests/test_gla_chunk_cuda.py::fla_backward_errors (B=2, T=1000, H=4, K=V=128, bf16), without
FLA (whose first backward call autotunes for minutes). GPU only.

    python scripts/gla_grad_errors.py [--divisors 1,16]
"""
import argparse
import sys
import os


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fla_cuda  # noqa: E402
from tests.test_gla_chunk_cuda import GRAD_NAMES, fla_problem, gradients  # noqa: E402
from tests.utils import err_ratio  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--divisors", default="1,16")
    a = ap.parse_args()
    for divisor in map(float, a.divisors.split(",")):
        x, do, dht = fla_problem(divisor)
        ref = gradients(fla_cuda.chunk_gla, x, do, dht, lambda t: t.double())
        ours = gradients(fla_cuda.chunk_gla, x, do, dht)
        print(f"divisor {divisor:g}: " + "  ".join(f"d{n} {err_ratio(r, o):.3e}" for n, r, o in zip(GRAD_NAMES, ref, ours)))


if __name__ == "__main__":
    main()
