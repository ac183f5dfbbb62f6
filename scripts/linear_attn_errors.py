"""Relative RMS errors against fp64 of chunk_linear_attn(normalize=True) on three paths: the
fused CUDA op, the two kernels it replaced (chunk pass, then the normaliser op), and the
PyTorch composition; per output and gradient, at the shapes of tests/test_normalize_cuda.py.
GPU only.

    python scripts/linear_attn_errors.py
"""
import pytest

from tests.test_normalize_cuda import _public_args, _public_run, _two_op_run
from tests.utils import err_ratio

NAMES = ["o", "ht", "z", "dq", "dk", "dv", "dh0", "dz0"]


def main():
    mp = pytest.MonkeyPatch()
    for T, K, V in [(1, 128, 128), (300, 64, 64), (2049, 128, 64)]:
        args = _public_args(T, K, V, 2)
        ref = _public_run(lambda t: t.double(), args, mp)
        paths = {"fused": _public_run(lambda t: t, args, mp), "two ops": _two_op_run(args, None),
                 "torch": _public_run(lambda t: t, args, mp, torch_path=True)}
        print(f"T={T} K={K} V={V}")
        for name, outs in paths.items():
            print(f"  {name:8s}" + " ".join(f"{n}={err_ratio(r, o):.2e}" for n, r, o in zip(NAMES, ref, outs)))
    mp.undo()


if __name__ == "__main__":
    main()
