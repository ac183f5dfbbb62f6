"""fla_cuda: CUDA kernels for linear attention and its gated and delta-rule relatives.

Drop-in for flash-linear-attention 0.6: ``from fla_cuda import chunk_gla`` replaces
``from fla.ops.gla import chunk_gla``. ``python -m fla_cuda info`` shows which ops run
a CUDA kernel on this machine and which run the PyTorch path.
"""
from ._extension import HAS_EXTENSION, build_info
from .ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule
from .ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from .ops.generalized_delta_rule import (
    chunk_dplr_delta_rule,
    chunk_iplr_delta_rule,
    fused_recurrent_dplr_delta_rule,
    fused_recurrent_iplr_delta_rule,
)
from .ops.gla import chunk_gla, fused_recurrent_gla
from .ops.linear_attn import chunk_linear_attn, fused_chunk_linear_attn, fused_recurrent_linear_attn
from .ops.retention import chunk_retention, fused_chunk_retention, fused_recurrent_retention, parallel_retention
from .ops.simple_gla import (
    chunk_simple_gla,
    fused_chunk_simple_gla,
    fused_recurrent_simple_gla,
    parallel_simple_gla,
)

__version__ = "0.1.0"

__all__ = [
    "HAS_EXTENSION", "build_info", "__version__",
    "chunk_simple_gla", "fused_chunk_simple_gla", "fused_recurrent_simple_gla", "parallel_simple_gla",
    "chunk_linear_attn", "fused_chunk_linear_attn", "fused_recurrent_linear_attn",
    "chunk_retention", "fused_chunk_retention", "fused_recurrent_retention", "parallel_retention",
    "chunk_gla", "fused_recurrent_gla",
    "chunk_delta_rule", "fused_recurrent_delta_rule",
    "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule",
    "chunk_iplr_delta_rule", "fused_recurrent_iplr_delta_rule",
    "chunk_dplr_delta_rule", "fused_recurrent_dplr_delta_rule",
]
