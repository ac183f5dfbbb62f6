"""``python -m fla_cuda info``: version, build, devices, and the backend of every op."""
from __future__ import annotations

import argparse
import sys

import torch


def info() -> None:
    import fla_cuda
    from fla_cuda import _extension, backend

    b = _extension.build_info()
    print(f"fla_cuda {fla_cuda.__version__}")
    print(f"torch {torch.__version__} (built against {b['built_with_torch'] or 'n/a'}), "
          f"python {sys.version.split()[0]}")
    if _extension.HAS_EXTENSION:
        print(f"CUDA extension: loaded; compiled for {', '.join('sm_' + a for a in b['cuda_archs'])}")
    else:
        print(f"CUDA extension: not available ({_extension.LOAD_ERROR})")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            d = torch.device("cuda", i)
            major, minor = torch.cuda.get_device_capability(d)
            ok = _extension.cuda_arch_supported(d)
            print(f"cuda:{i}: {torch.cuda.get_device_name(d)} (sm_{major}{minor}; "
                  f"{'kernels run here' if ok else 'no machine code for it: PyTorch path'})")
        devices.append(torch.device("cuda", 0))
    else:
        print("CUDA device: none")
    if backend.forced_torch():
        print("FLA_CUDA_BACKEND=torch: every op uses its PyTorch path")
    tables = {str(d): backend.describe(d) for d in devices}
    width = max(len(op) for op in backend.OPS)
    print()
    print(f"{'op':<{width}}  " + "  ".join(f"{name:<14}" for name in tables))
    for op in backend.OPS:
        print(f"{op:<{width}}  " + "  ".join(f"{tables[name][op]:<14}" for name in tables))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fla_cuda")
    parser.add_argument("command", choices=["info", "demo"], nargs="?", default="info")
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
    else:
        from fla_cuda import demo
        demo.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
