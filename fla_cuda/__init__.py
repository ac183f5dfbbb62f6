"""fla_cuda: CUDA kernels for linear attention and its gated and delta-rule relatives.

Drop-in for flash-linear-attention 0.6: ``from fla_cuda import chunk_gla`` replaces
``from fla.ops.gla import chunk_gla``. ``python -m fla_cuda info`` shows which ops run
a CUDA kernel on this machine and which run the PyTorch path.
"""
from ._extension import HAS_EXTENSION, build_info

__version__ = "0.1.0"
__all__ = ["HAS_EXTENSION", "build_info", "__version__"]
