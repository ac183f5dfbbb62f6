#!/usr/bin/env python
"""Benchmark fla_cuda against flash-linear-attention (FLA) 0.6 and torch SDPA.

Usage (from the repository root; FLA importable, e.g. PYTHONPATH=.:.fla_site):

    python bench/bench.py --quick --out out/bench              # the gpu_check default (< 4 min)
    python bench/bench.py --ops chunk_gla,chunk_delta_rule --modes fwd,fwdbwd
    python bench/bench.py --shapes 1x32768x16x128,8x2048x32x64 --modes fwd --fla-ops none
    python bench/bench.py --ops fused_recurrent_gla --modes fwd,fwdbwd --recurrent-shapes 4x1024x16x128
    python bench/bench.py --update-results                     # also bench/results/<gpu>.json + RESULTS.md
    python bench/bench.py --dry-run --out /tmp/b               # CPU smoke run: tiny shapes, no triton

Modes
    fwd      forward only, no states (the training forward): the chunk ops at ``--shapes``
             (4x4096x16x128 by default), the fused_recurrent ops at ``--recurrent-shapes``
             (8x256x16x128: they run step by step, so a short training-like T).
    fwdbwd   forward + backward of sum(o * do) w.r.t. every differentiable input, same shapes.
             FLA 0.6's fused_recurrent_gated_delta_rule and fused_recurrent_dplr_delta_rule are
             inference-only (their backward raises): their FLA column stays null, with a note.
    decode   fused_recurrent ops, one step (T=1) with an fp32 state read and the final state
             written (B=64, H=16, K=V=128 by default, ``--decode-shapes``).

Every row times our op (``fla_cuda.<op>``), FLA's op of the same name (``fla.ops.<op>``) and
torch SDPA causal (softmax attention, layout [B, H, T, D]) in the same process on the same
inputs, with ``triton.testing.do_bench(warmup=25, rep=100, return_mode="median")``, which
flushes L2 before every repetition; on top of that, inputs are rotated between several sets
whenever one set is smaller than 3x the 50 MB L2.

Eager timing includes Python launch overhead: FLA's chunk ops launch ~10 Triton kernels and
measured launch-bound on the GPU host's VM (FLA chunk_simple_gla fwd 0.26-0.49 ms eager between
runs, 0.26 ms as a CUDA-graph replay; FLA fused_recurrent_simple_gla decode 0.16 vs 0.058 ms).
``--cuda-graph`` times graph replays instead (every op, FLA's, ours and SDPA, fwd and fwdbwd,
captured fine on triton 3.6 / torch 2.11); rows record ``"timing": "eager" | "cuda_graph"``.

Floors (``floor_ms`` = max of the two; ``x_floor`` = ms / floor_ms)
    memory   every input read once and every output written once, at the tensors' own
             element sizes (bf16 2 B, fp32 gates and states 4 B); fwdbwd adds a backward that
             reads the inputs and ``do`` once and writes one gradient per differentiable
             input. Bytes over 3.02 TB/s (H100 device-to-device copy, read + write).
    compute  tensor-core FLOPs of the chunkwise algorithm at chunk size C (64), per token and
             head (see ``flops_per_token``), over 785 TFLOP/s (H100 dense bf16 matmul);
             backward = 2x forward (each matmul Y = A B needs dA and dB).
             fused_recurrent ops (decode, and their fwd / fwdbwd rows, which run step by step)
             count their per-step state matvecs / outer products instead (4KV / 6KV / 8KV).

First call: wall time of the very first call (forward, or forward + backward) at each op,
mode and shape, synchronised. For FLA that call is the warm-up call, which includes Triton's
compile + autotune (30-110 s per op on an H100; Triton 3.6 caches both compiled kernels and
autotune results in its cache dir). By default the run uses a fresh, empty TRITON_CACHE_DIR so
that number is a cold one; ``--skip-fla-first-call`` keeps the existing
Triton cache (faster reruns) and reports ``fla_first_call_s`` as null.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib
import json
import math
import os
import pkgutil
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Machine ceilings (BUILD_NOTES.md, measured on the H100 80GB HBM3 of the GPU host)
# ----------------------------------------------------------------------------------------------
COPY_BW = 3.02e12          # bytes/s, device-to-device copy counting bytes read + written (H100;
                           # a GPU run measures its own at the start: Runner.copy_bw)
MATMUL_FLOPS = 785e12      # flop/s, dense bf16 matmul
L2_BYTES = 50e6            # H100 L2
CHUNK = 64                 # chunk size of the chunkwise FLOP model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MODES = ("fwd", "fwdbwd", "decode")

ROW_KEYS = ("op", "mode", "B", "T", "H", "K", "V", "dtype", "ms", "fla_ms", "sdpa_ms", "floor_ms",
            "first_call_s", "fla_first_call_s", "peak_mb", "backend", "date", "gpu", "commit", "note")


# ----------------------------------------------------------------------------------------------
# Inputs of every op, as specs: the same list builds the tensors and computes the memory floor
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str                 # keyword (or positional slot) of the op
    shape: tuple
    dtype: torch.dtype
    init: str                 # randn | l2 | neg_l2 | l2_sig | sig | logsig | logsig16 | state
    grad: bool = True         # differentiable input (fwdbwd takes its gradient)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class OpSpec:
    name: str
    kind: str                 # "chunk" (fwd, fwdbwd) | "recurrent" (decode, fwd, fwdbwd)
    family: str               # FLOP model: linear | delta | dplr
    positional: tuple         # names passed positionally: q, k, v
    extra: tuple = ()         # ((FLA keyword, init, dtype_kind, shape_kind), ...) passed by keyword
    kwargs: dict = field(default_factory=dict)

    @property
    def modes(self) -> tuple:
        return ("fwd", "fwdbwd") if self.kind == "chunk" else ("decode", "fwd", "fwdbwd")


# extra tensor shape kinds: "h" -> [B,T,H], "hk" -> [B,T,H,K]; dtype kinds: "f32" or "in"
def _spec(name, kind, family, extra=(), **kwargs) -> OpSpec:
    return OpSpec(name, kind, family, ("q", "k", "v"), tuple(extra), kwargs)


_SIMPLE_G = (("g", "logsig", "f32", "h"),)
_GLA_G = (("g", "logsig16", "f32", "hk"),)          # chunk_gla calls it g
_GLA_GK = (("gk", "logsig16", "f32", "hk"),)        # fused_recurrent_gla calls it gk
_BETA = (("beta", "sig", "in", "h"),)
_GDN = (("g", "logsig", "f32", "h"), ("beta", "sig", "in", "h"))
_IPLR = (("a", "neg_l2", "in", "hk"), ("b", "l2_sig", "in", "hk"))
_DPLR = _IPLR + (("gk", "logsig16", "f32", "hk"),)

OPS: dict[str, OpSpec] = {s.name: s for s in [
    _spec("chunk_simple_gla", "chunk", "linear", _SIMPLE_G),
    _spec("chunk_linear_attn", "chunk", "linear"),
    _spec("chunk_gla", "chunk", "linear", _GLA_G),
    _spec("chunk_delta_rule", "chunk", "delta", _BETA),
    _spec("chunk_gated_delta_rule", "chunk", "delta", _GDN),
    _spec("chunk_dplr_delta_rule", "chunk", "dplr", _DPLR),
    _spec("fused_recurrent_simple_gla", "recurrent", "linear", _SIMPLE_G),
    _spec("fused_recurrent_gla", "recurrent", "linear", _GLA_GK),
    _spec("fused_recurrent_delta_rule", "recurrent", "delta", _BETA),
    _spec("fused_recurrent_gated_delta_rule", "recurrent", "delta", _GDN),
    _spec("fused_recurrent_dplr_delta_rule", "recurrent", "dplr", _DPLR),
    # not in the default set (``--ops all`` or by name)
    _spec("chunk_retention", "chunk", "linear"),
    _spec("chunk_iplr_delta_rule", "chunk", "dplr", _IPLR),
    _spec("fused_recurrent_linear_attn", "recurrent", "linear"),
    _spec("fused_recurrent_retention", "recurrent", "linear"),
    _spec("fused_recurrent_iplr_delta_rule", "recurrent", "dplr", _IPLR),
]}
DEFAULT_OPS = list(OPS)[:11]
# k is l2-normalised for the delta-rule family (as models feed it)
_L2_KEYS = {"delta", "dplr"}
# FLA ops benchmarked under --quick, in each of their modes. A chunk op's first FLA call costs
# 30-110 s of Triton autotuning, a fused_recurrent op's decode 0.5-2 s (DPLR 15-20 s: 36 configs).
# Their fwd / fwdbwd rows compile the stateless variants and the backward kernels (none for gated
# delta and DPLR): expected about as much again; they run after the chunk ops' rows of the same
# mode, so what the 150 s budget cuts first is theirs.
QUICK_FLA_OPS = ["chunk_simple_gla", "chunk_gated_delta_rule", "fused_recurrent_simple_gla",
                 "fused_recurrent_gla", "fused_recurrent_delta_rule", "fused_recurrent_gated_delta_rule",
                 "fused_recurrent_dplr_delta_rule"]
# FLA's first call of these did not finish within minutes: only run when named in --fla-ops
FLA_NEVER_BY_DEFAULT = {"chunk_dplr_delta_rule", "chunk_iplr_delta_rule"}
# FLA 0.6.0 raises in the backward of these (gated chunk_bwd_dqkwg) on Hopper with 3.4 <= triton < 3.7.1
FLA_GATED_BWD_REFUSED = {"chunk_simple_gla", "chunk_gated_delta_rule"}
# FLA 0.6.0's backward of these raises NotImplementedError on every device (inference-only
# kernels): skipped with a note saying so (--fla-try-refused runs it; the raise becomes the note)
FLA_NO_BWD = {"fused_recurrent_gated_delta_rule", "fused_recurrent_dplr_delta_rule"}


def input_specs(op: OpSpec, mode: str, B: int, T: int, H: int, K: int, V: int,
                dtype: torch.dtype) -> list[TensorSpec]:
    """The tensors one call of ``op`` in ``mode`` reads (decode: T is 1 and an fp32 state is read)."""
    if mode == "decode":
        T = 1
    grad = mode == "fwdbwd"
    k_init = "l2" if op.family in _L2_KEYS else "randn"
    specs = [TensorSpec("q", (B, T, H, K), dtype, "randn", grad),
             TensorSpec("k", (B, T, H, K), dtype, k_init, grad),
             TensorSpec("v", (B, T, H, V), dtype, "randn", grad)]
    for name, init, dkind, skind in op.extra:
        shape = (B, T, H) if skind == "h" else (B, T, H, K)
        specs.append(TensorSpec(name, shape, torch.float32 if dkind == "f32" else dtype, init, grad))
    if mode == "decode":
        specs.append(TensorSpec("initial_state", (B, H, K, V), torch.float32, "state", False))
    return specs


def output_bytes(mode: str, B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype) -> int:
    """o [B,T,H,V] in the input dtype; decode also writes the fp32 final state [B,H,K,V]."""
    es = torch.empty((), dtype=dtype).element_size()
    if mode == "decode":
        return B * H * V * es + B * H * K * V * 4
    return B * T * H * V * es


def traffic_bytes(op: OpSpec, mode: str, B: int, T: int, H: int, K: int, V: int,
                  dtype: torch.dtype) -> int:
    """Memory-traffic floor in bytes: inputs read once, outputs written once.

    fwdbwd = forward traffic + a backward that reads every input and ``do`` once and writes
    one gradient per differentiable input (same dtype as that input).
    """
    specs = input_specs(op, mode, B, T, H, K, V, dtype)
    fwd = sum(s.nbytes for s in specs) + output_bytes(mode, B, T, H, K, V, dtype)
    if mode != "fwdbwd":
        return fwd
    do = output_bytes("fwd", B, T, H, K, V, dtype)
    bwd = sum(s.nbytes for s in specs) + do + sum(s.nbytes for s in specs if s.grad)
    return fwd + bwd


def flops_per_token(family: str, K: int, V: int, C: int = CHUNK, recurrent: bool = False) -> float:
    """Forward FLOPs per token and head.

    Chunkwise (chunk size C; every C x C block counted in full, as tensor cores compute it):
      linear (linear attn, retention, simple GLA, GLA):
          q S (2KV) + state update K^T V (2KV) + intra-chunk Q K^T (2CK) and A V (2CV)
          = 4KV + 2C(K+V)
      delta (delta rule, gated delta rule; WY form):
          A = beta K K^T (2CK), (I+A)^-1 (C^2/3), W = T beta K (2CK), U = T beta V (2CV),
          V' = U - W S (2KV), o = Q S + (Q K^T) V' (2KV + 2CK + 2CV), S += K^T V' (2KV)
          = 6KV + 6CK + 4CV + C^2/3
      dplr (IPLR / DPLR delta rule):
          four intra-chunk products A_qk, A_qb, A_ak, A_ab (8CK), (I-A_ab)^-1 (C^2/3),
          w = T a (2CK), u = T (A_ak V) (4CV), v' = u + w S (2KV), o = q S + A_qk V + A_qb v'
          (2KV + 4CV), S = S + k^T V + b^T v' (4KV)
          = 8KV + 10CK + 8CV + C^2/3
    Recurrent (one step per token): linear 4KV (readout + outer-product update), delta 6KV
    (+ the S^T k prediction), dplr 8KV (+ S a and the b outer product).
    """
    if recurrent:
        return {"linear": 4, "delta": 6, "dplr": 8}[family] * K * V
    if family == "linear":
        return 4 * K * V + 2 * C * (K + V)
    if family == "delta":
        return 6 * K * V + 6 * C * K + 4 * C * V + C * C / 3
    if family == "dplr":
        return 8 * K * V + 10 * C * K + 8 * C * V + C * C / 3
    raise ValueError(f"unknown family {family!r}")


def op_flops(op: OpSpec, mode: str, B: int, T: int, H: int, K: int, V: int, C: int = CHUNK) -> float:
    """Floor FLOPs of one call: fused_recurrent ops by the per-step model in every mode (they
    walk the sequence one token at a time), chunk ops by the chunkwise one."""
    tokens = B * (1 if mode == "decode" else T) * H
    f = tokens * flops_per_token(op.family, K, V, C, recurrent=(op.kind == "recurrent"))
    return 3 * f if mode == "fwdbwd" else f


def floors(nbytes: float, flops: float, bw: float = COPY_BW, peak: float = MATMUL_FLOPS) -> dict:
    mem_ms = nbytes / bw * 1e3
    flop_ms = flops / peak * 1e3
    return {"mem_floor_ms": mem_ms, "flop_floor_ms": flop_ms, "floor_ms": max(mem_ms, flop_ms)}


def op_floor(op: OpSpec, mode: str, B, T, H, K, V, dtype, C: int = CHUNK, bw: float = COPY_BW) -> dict:
    nbytes = traffic_bytes(op, mode, B, T, H, K, V, dtype)
    fl = op_flops(op, mode, B, T, H, K, V, C)
    return {"bytes": nbytes, "flops": fl, **floors(nbytes, fl, bw)}


# ----------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------
def parse_shapes(text: str, decode: bool = False) -> list[tuple[int, int, int, int, int]]:
    """"BxTxHxD[,...]" (or BxTxHxKxV) -> [(B, T, H, K, V)]; decode: "BxHxD" or "BxHxKxV" (T = 1)."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            dims = [int(x) for x in item.split("x")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: expected integers joined by 'x'") from None
        if decode:
            if len(dims) == 3:
                dims = dims + [dims[2]]
            if len(dims) != 4:
                raise argparse.ArgumentTypeError(f"bad decode shape {item!r}: expected BxHxD or BxHxKxV")
            B, H, K, V = dims
            T = 1
        else:
            if len(dims) == 4:
                dims = dims + [dims[3]]
            if len(dims) != 5:
                raise argparse.ArgumentTypeError(f"bad shape {item!r}: expected BxTxHxD or BxTxHxKxV")
            B, T, H, K, V = dims
        if min(B, T, H, K, V) < 1:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: every dimension must be >= 1")
        out.append((B, T, H, K, V))
    if not out:
        raise argparse.ArgumentTypeError("empty shape list")
    return out


def _name_list(text: str, allowed, what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {sorted(allowed)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="default",
                   help="comma list of ops, 'default' (the 11 main ops) or 'all'")
    p.add_argument("--modes", default="decode,fwd,fwdbwd",
                   help="comma list of fwd,fwdbwd,decode, run in this order (decode first: cheap FLA "
                        "autotuning); within fwd and fwdbwd the chunk ops run before the fused_recurrent ops")
    p.add_argument("--shapes", default="4x4096x16x128", help="BxTxHxD[xV][,...] for the chunk ops' fwd/fwdbwd")
    p.add_argument("--recurrent-shapes", default="8x256x16x128",
                   help="BxTxHxD[xV][,...] for the fused_recurrent ops' fwd/fwdbwd (step by step: a short T)")
    p.add_argument("--decode-shapes", default="64x16x128", help="BxHxD[xV][,...] for decode")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--out", default="out/bench", help="directory for results.json, results.md, plots")
    p.add_argument("--update-results", action="store_true",
                   help="also merge the rows into bench/results/<gpu>.json and rewrite bench/RESULTS.md")
    p.add_argument("--results-name", default=None, help="name of bench/results/<name>.json (default: from GPU)")
    p.add_argument("--quick", action="store_true",
                   help=f"FLA only for {','.join(QUICK_FLA_OPS)} and an FLA time budget of 150 s")
    p.add_argument("--fla-ops", default=None,
                   help="ops that get the FLA baseline: comma list, 'all' or 'none' "
                        "(default: all but chunk_dplr/iplr, or the --quick set)")
    p.add_argument("--no-fla", action="store_true", help="same as --fla-ops none")
    p.add_argument("--no-sdpa", action="store_true", help="skip the torch SDPA baseline")
    p.add_argument("--fla-budget-s", type=float, default=None,
                   help="stop starting new FLA first calls once FLA calls took this long (quick: 150)")
    p.add_argument("--fla-try-refused", action="store_true",
                   help="run FLA backwards that the run skips: gated chunk ops where FLA 0.6 refuses them "
                        "(Hopper, triton<3.7.1), and the inference-only fused_recurrent_gated_delta_rule / "
                        "dplr_delta_rule (FLA 0.6 raises NotImplementedError: a note in the row)")
    p.add_argument("--skip-fla-first-call", action="store_true",
                   help="keep the existing Triton cache (no cold compile) and report fla_first_call_s null")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke run: tiny shapes, no FLA, no triton (checks the harness, not speed)")
    p.add_argument("--warmup", type=float, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=float, default=100, help="do_bench rep (ms)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time CUDA-graph replays (no Python launch overhead; falls back to eager per call "
                        "that cannot be captured) instead of eager calls")
    p.add_argument("--chunk-size", type=int, default=CHUNK, help="C of the FLOP floor model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        if a.ops == "default":
            a.ops = list(DEFAULT_OPS)
        elif a.ops == "all":
            a.ops = list(OPS)
        else:
            a.ops = _name_list(a.ops, OPS, "op")
        a.modes = _name_list(a.modes, MODES, "mode")
        if a.dry_run:
            a.device = "cpu"
            if a.shapes == p.get_default("shapes"):
                a.shapes = "1x70x2x16"
            if a.recurrent_shapes == p.get_default("recurrent_shapes"):
                a.recurrent_shapes = "2x9x2x16"    # the PyTorch path loops over T in Python
            if a.decode_shapes == p.get_default("decode_shapes"):
                a.decode_shapes = "3x2x16"
            a.no_fla = True
            a.warmup, a.rep = 0, 0     # CPU: one timed call after the first call
        a.shapes = parse_shapes(a.shapes)
        a.recurrent_shapes = parse_shapes(a.recurrent_shapes)
        a.decode_shapes = parse_shapes(a.decode_shapes, decode=True)
        if a.no_fla or a.fla_ops == "none":
            a.fla_ops = []
        elif a.fla_ops in (None, "all"):
            if a.quick and a.fla_ops is None:
                a.fla_ops = list(QUICK_FLA_OPS)
            else:
                a.fla_ops = [o for o in OPS if o not in FLA_NEVER_BY_DEFAULT]
        else:
            a.fla_ops = _name_list(a.fla_ops, OPS, "FLA op")
        if a.fla_budget_s is None:
            a.fla_budget_s = 150.0 if a.quick else math.inf
        if a.chunk_size < 1:
            raise argparse.ArgumentTypeError("--chunk-size must be >= 1")
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if a.device is None:
        if not torch.cuda.is_available():
            # The floors and the baselines are GPU numbers: a silent CPU run of the default
            # shapes would take many minutes and mean nothing.
            p.error("no CUDA device: run the benchmark on a GPU host (or --dry-run / --device cpu "
                    "for a CPU smoke run)")
        a.device = "cuda"
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available (use --device cpu or --dry-run)")
    if a.update_results and not a.device.startswith("cuda"):
        p.error("--update-results records GPU results: it needs --device cuda")
    return a


# ----------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------
def make_tensor(s: TensorSpec, device, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(s.shape, generator=gen, device=device, dtype=torch.float32)
    if s.init in ("l2", "neg_l2", "l2_sig"):
        x = F.normalize(x, p=2, dim=-1)
        if s.init == "neg_l2":
            x = -x
        elif s.init == "l2_sig":
            x = x * torch.randn(s.shape[:-1] + (1,), generator=gen, device=device).sigmoid()
    elif s.init == "sig":
        x = x.sigmoid()
    elif s.init == "logsig":
        x = F.logsigmoid(x)
    elif s.init == "logsig16":
        x = F.logsigmoid(x) / 16
    elif s.init == "state":
        x = x * s.shape[-2] ** -0.5
    elif s.init != "randn":
        raise ValueError(s.init)
    return x.to(s.dtype).requires_grad_(s.grad)


def n_rotations(set_bytes: int, mode: str, max_bytes: float = 4e9) -> int:
    """Input sets to cycle through so the working set is >= 3x L2 (decode: always >= 2)."""
    n = max(1, math.ceil(3 * L2_BYTES / max(set_bytes, 1)))
    if mode == "decode":
        n = max(n, 2)
    return int(max(1, min(n, 64, max_bytes // max(set_bytes, 1))))


class Rotator:
    """Cycles through input sets, one per call."""

    def __init__(self, sets):
        self.sets, self.i = sets, 0

    def next(self):
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s


# ----------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------
def resolve_ours(name: str):
    """fla_cuda.<name>, else fla_cuda.ops.<name>, else the first fla_cuda.ops.* module defining it."""
    try:
        import fla_cuda
    except Exception as e:  # noqa: BLE001
        return None, f"import fla_cuda failed: {type(e).__name__}: {e}"
    fn = getattr(fla_cuda, name, None)
    if fn is not None:
        return fn, None
    try:
        ops = importlib.import_module("fla_cuda.ops")
    except Exception as e:  # noqa: BLE001
        return None, f"import fla_cuda.ops failed: {type(e).__name__}: {e}"
    fn = getattr(ops, name, None)
    if fn is not None:
        return fn, None
    for m in pkgutil.iter_modules(ops.__path__):
        try:
            mod = importlib.import_module(f"fla_cuda.ops.{m.name}")
        except Exception:  # noqa: BLE001 - a broken sibling module must not hide the others
            continue
        if callable(getattr(mod, name, None)):
            return getattr(mod, name), None
    return None, f"fla_cuda has no {name}"


_FLA_OPS = None


def resolve_fla(name: str):
    global _FLA_OPS
    if _FLA_OPS is None:
        try:
            _FLA_OPS = importlib.import_module("fla.ops")
        except Exception as e:  # noqa: BLE001
            _FLA_OPS = e
    if isinstance(_FLA_OPS, Exception):
        return None, f"FLA not importable: {type(_FLA_OPS).__name__}: {_FLA_OPS}"
    fn = getattr(_FLA_OPS, name, None)
    return (fn, None) if fn is not None else (None, f"fla.ops has no {name}")


def backend_of(name: str, q: torch.Tensor, K: int, V: int, mode: str = "fwd"):
    """What ran our side: "cuda", "torch", or "cuda fwd + torch bwd" (a kernel without a backward)."""
    try:
        from fla_cuda import backend
        if not backend.use_cuda(name, q, K, V):
            return "torch"
        return "cuda" if mode != "fwdbwd" or backend.OPS[name].backward else "cuda fwd + torch bwd"
    except KeyError:
        return "torch"
    except Exception:  # noqa: BLE001
        return None


def make_call(fn: Callable, op: OpSpec, mode: str, inputs: dict, do: torch.Tensor | None):
    """A zero-argument closure running one benchmarked call of ``fn`` on ``inputs``."""
    args = [inputs[n] for n in op.positional]
    kw = dict(op.kwargs)
    kw.update((e[0], inputs[e[0]]) for e in op.extra)   # by keyword: FLA's positional orders differ
    if mode == "decode":
        kw.update(initial_state=inputs["initial_state"], output_final_state=True)
        return lambda: fn(*args, **kw)
    if mode == "fwd":
        return lambda: fn(*args, **kw)
    diff = [x for x in args + [kw[e[0]] for e in op.extra]
            if isinstance(x, torch.Tensor) and x.requires_grad]

    def fwdbwd():
        o = fn(*args, **kw)[0]
        return torch.autograd.grad(o, diff, do)
    return fwdbwd


def sdpa_call(inputs: dict, mode: str, do: torch.Tensor | None):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    if mode == "fwd":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwdbwd():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.autograd.grad(o, (q, k, v), do)
    return fwdbwd


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_first_call(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench_ms(fn, device, warmup: float, rep: float) -> float:
    """Median ms per call: triton do_bench on CUDA (CUDA events fallback), perf_counter on CPU."""
    if torch.device(device).type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        fn()
        torch.cuda.synchronize()
        times = []
        t_end = time.perf_counter() + rep / 1e3
        while time.perf_counter() < t_end or len(times) < 5:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        return statistics.median(times)
    t_end = time.perf_counter() + warmup / 1e3
    if warmup > 0:
        fn()
    while time.perf_counter() < t_end:
        fn()
    times = []
    t_end = time.perf_counter() + rep / 1e3
    while time.perf_counter() < t_end or len(times) < (3 if rep > 0 else 1):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graphed(fn):
    """``fn`` captured in a CUDA graph (after a warm-up on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g.replay


def peak_mb(fn, device) -> float | None:
    """Peak allocated memory of one call above what was allocated before it, in MB."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e6


def is_fatal(e: BaseException) -> bool:
    """A CUDA error that poisons the context (every later call would fail)."""
    msg = str(e)
    return isinstance(e, RuntimeError) and not isinstance(e, torch.cuda.OutOfMemoryError) and (
        "CUDA error" in msg or "illegal memory access" in msg or "device-side assert" in msg
        or "unspecified launch failure" in msg)


def _err(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}"


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------
def git_commit() -> str | None:
    env = os.environ.get("FLA_CUDA_COMMIT")
    if env:
        return env
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "triton": None, "fla": None,
         "fla_cuda": None, "cuda": torch.version.cuda}
    for key, mod in (("triton", "triton"), ("fla", "fla"), ("fla_cuda", "fla_cuda")):
        try:
            v[key] = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception:  # noqa: BLE001
            pass
    return v


def measure_copy_bw(device, nbytes: int = 1 << 29) -> float:
    """Bytes read + written per second by a device-to-device copy of nbytes (median of do_bench)."""
    from triton.testing import do_bench
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=100)
    return 2 * nbytes / (ms * 1e-3)


def gpu_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()})"


def triton_version_tuple() -> tuple | None:
    try:
        import triton
        return tuple(int(x) for x in triton.__version__.split("+")[0].split(".")[:3])
    except Exception:  # noqa: BLE001
        return None


def fla_refuses_bwd(op_name: str, device) -> bool:
    """FLA 0.6.0 raises in the backward of gated chunk ops on Hopper with 3.4.0 <= triton < 3.7.1 (#640)."""
    if op_name not in FLA_GATED_BWD_REFUSED or torch.device(device).type != "cuda":
        return False
    tv = triton_version_tuple()
    major, _ = torch.cuda.get_device_capability(torch.device(device))
    return major == 9 and tv is not None and (3, 4, 0) <= tv < (3, 7, 1)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def _fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isinf(x) or math.isnan(x):
            return str(x)
        if x != 0 and abs(x) < 10 ** -nd:
            return f"{x:.2e}"
        return f"{x:.{nd}f}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def _ratio(a, b):
    return None if a is None or b is None or a <= 0 else b / a


def derived(row: dict) -> dict:
    """x_floor and speedups (>1: ours faster) from a row's times."""
    return {"x_floor": _ratio(row.get("floor_ms"), row.get("ms")),
            "speedup_vs_fla": _ratio(row.get("ms"), row.get("fla_ms")),
            "speedup_vs_sdpa": _ratio(row.get("ms"), row.get("sdpa_ms"))}


TABLE_COLS = [("op", "op"), ("mode", "mode"), ("shape", "B,T,H,K,V"), ("backend", "ours ran"),
              ("ms", "ms"), ("fla_ms", "FLA ms"), ("sdpa_ms", "SDPA ms"), ("floor_ms", "floor ms"),
              ("copy_ms", "copy ms"), ("x_floor", "x floor"), ("speedup_vs_fla", "vs FLA"), ("speedup_vs_sdpa", "vs SDPA"),
              ("first_call_s", "1st call s"), ("fla_first_call_s", "FLA 1st call s"),
              ("peak_mb", "peak MB"), ("note", "note")]


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h in TABLE_COLS) + " |"
    sep = "|" + "|".join("---" for _ in TABLE_COLS) + "|"
    lines = [head, sep]
    for r in rows:
        r = {**r, **derived(r)}
        cells = []
        for key, _ in TABLE_COLS:
            if key == "shape":
                val = f"{r['B']},{r['T']},{r['H']},{r['K']},{r['V']}"
            elif key in ("x_floor", "speedup_vs_fla", "speedup_vs_sdpa"):
                val = "-" if r.get(key) is None else f"{r[key]:.2f}x"
            elif key in ("first_call_s", "fla_first_call_s"):
                val = _fmt(r.get(key), 2)
            elif key == "peak_mb":
                val = _fmt(r.get(key), 0)
            elif key == "note":
                val = (r.get("note") or "").replace("|", "/")
            else:
                val = _fmt(r.get(key))
            cells.append(val)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: str, rows: list[dict], meta: dict | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta or {}, "rows": rows} if meta is not None else rows, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def row_key(r: dict) -> tuple:
    return (r["op"], r["mode"], r["B"], r["T"], r["H"], r["K"], r["V"], r["dtype"])


def is_recurrent(r: dict) -> bool:
    op = OPS.get(r["op"])
    return op is not None and op.kind == "recurrent"


def table_group(r: dict) -> str:
    """The RESULTS.md table of a row: the fused_recurrent ops' fwd / fwdbwd rows get tables of
    their own (other shapes and FLOP model than the chunk ops'; decode is theirs alone)."""
    return f"fused_recurrent {r['mode']}" if r["mode"] != "decode" and is_recurrent(r) else r["mode"]


TABLE_GROUPS = ("fwd", "fwdbwd", "fused_recurrent fwd", "fused_recurrent fwdbwd", "decode")


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows of ``old`` replaced by rows of ``new`` with the same (op, mode, shape, dtype), new ones added."""
    merged = {row_key(r): r for r in old}
    for r in new:
        merged[row_key(r)] = r
    order = {name: i for i, name in enumerate(OPS)}
    return sorted(merged.values(), key=lambda r: (MODES.index(r["mode"]) if r["mode"] in MODES else 9,
                                                   is_recurrent(r), order.get(r["op"], 99),
                                                   r["T"], r["B"], r["H"], r["K"]))


FLOOR_DOC = """\
Floors: `floor ms` = max(memory floor, compute floor); `x floor` = ms / floor ms (1.00x is the
roofline). Memory floor: every input read once and every output written once at its own element
size (bf16 2 B, fp32 gates and states 4 B); fwdbwd adds a backward that reads the inputs and `do`
once and writes one gradient per differentiable input; bytes / the device-to-device copy
bandwidth measured at the start of the run (read + written; `copy bandwidth` above; 3.02 TB/s on
the H100) with a 512 MiB copy. `copy ms` (decode rows): an elementwise kernel that reads and
writes the floor's bytes (torch.neg in fp32), timed like the op, launch and ramp-up included:
what a plain memory-bound kernel achieves at the row's size. Compute floor: tensor-core FLOPs of the chunkwise algorithm, chunk C = 64,
per token and head: linear attention / simple GLA / GLA 4KV + 2C(K+V); (gated) delta rule
6KV + 6CK + 4CV + C^2/3; IPLR / DPLR 8KV + 10CK + 8CV + C^2/3; backward = 2x forward; the
fused_recurrent ops (decode and their fwd / fwdbwd tables; they run step by step) per step
4KV / 6KV / 8KV; FLOPs / 785 TFLOP/s (dense bf16 matmul). `vs FLA`, `vs SDPA` = their ms / our ms
(> 1: ours faster). `1st call s`: wall time of the first call (FLA's includes Triton compile +
autotune). `peak MB`: torch.cuda.max_memory_allocated during one call, above what was allocated
before it. Inputs: randn q, k, v (k l2-normalised for delta rules), gates logsigmoid(randn) in fp32
(GLA / DPLR gk divided by 16), beta sigmoid(randn); no states in fwd / fwdbwd; decode: T = 1, fp32
state in and out."""


def write_results_md(path: str, rows: list[dict], meta: dict, png: str | None = None) -> None:
    v = meta.get("versions", {})
    lines = ["# fla_cuda benchmark results", "",
             f"- date: {meta.get('date')}",
             f"- GPU: {meta.get('gpu')}",
             f"- torch {v.get('torch')} (CUDA {v.get('cuda')}), triton {v.get('triton')}, "
             f"FLA {v.get('fla')}, fla_cuda {v.get('fla_cuda')}, Python {v.get('python')}",
             f"- commit: {meta.get('commit')}",
             f"- copy bandwidth: {meta.get('copy_bw', COPY_BW) / 1e12:.2f} TB/s",
             f"- command: `{meta.get('command')}`",
             "", "Rows come from the latest run of each (op, mode, shape); each keeps its own date "
             "and commit in the JSON.", "",
             FLOOR_DOC, ""]
    for group in TABLE_GROUPS:
        sub = [r for r in rows if table_group(r) == group]
        if sub:
            lines += [f"## {group}", "", markdown_table(sub)]
    if png:
        lines += [f"![time vs T]({png})", ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot_time_vs_T(rows: list[dict], path: str) -> str | None:
    """PNG of ms vs T for chunk ops (ours solid, FLA dashed, SDPA black); None without matplotlib."""
    rows = [r for r in rows if not is_recurrent(r)]   # other shapes (and SDPA points) than the chunk rows
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    modes = [m for m in ("fwd", "fwdbwd") if any(r["mode"] == m and r.get("ms") for r in rows)]
    if not modes:
        return None
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sub = [r for r in rows if r["mode"] == mode]
        for op in dict.fromkeys(r["op"] for r in sub):
            ours = sorted((r["T"], r["ms"]) for r in sub if r["op"] == op and r.get("ms"))
            fla = sorted((r["T"], r["fla_ms"]) for r in sub if r["op"] == op and r.get("fla_ms"))
            color = None
            if ours:
                line, = ax.plot([p[0] for p in ours], [p[1] for p in ours], "o-", label=op)
                color = line.get_color()
            if fla:
                ax.plot([p[0] for p in fla], [p[1] for p in fla], "x--", color=color, label=f"FLA {op}")
        sd = sorted({(r["T"], r["sdpa_ms"]) for r in sub if r.get("sdpa_ms")})
        if sd:
            ax.plot([p[0] for p in sd], [p[1] for p in sd], "k^-", label="SDPA causal")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel("ms")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp"
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, args, log=None, argv=None):
        self.a = args
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.log = log or (lambda *x: print(*x, flush=True))
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        self.fla_spent = 0.0
        self.fatal: str | None = None
        self.ours_failed = 0
        self.sdpa_cache: dict = {}
        self.copy_cache: dict = {}
        self.copy_bw = COPY_BW   # the memory floors' bandwidth; measured by cuda_warmup on a GPU
        self.rows: list[dict] = []
        self.meta = {}

    # -- helpers -------------------------------------------------------------------------------
    def build_sets(self, op: OpSpec, mode, B, T, H, K, V, seed: int):
        specs = input_specs(op, mode, B, T, H, K, V, self.dtype)
        set_bytes = sum(s.nbytes for s in specs)
        n = n_rotations(set_bytes, mode) if self.device.type == "cuda" else 1
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        sets = [{s.name: make_tensor(s, self.device, gen) for s in specs} for _ in range(n)]
        do = None
        if mode == "fwdbwd":
            do = torch.randn((B, T, H, V), generator=gen, device=self.device).to(self.dtype)
        return sets, do

    def measure(self, who: str, make_one, sets, first: bool = True) -> dict:
        """first call (optional), timing and peak memory of one implementation; errors -> note."""
        res = {"ms": None, "first_call_s": None, "peak_mb": None, "error": None}
        if self.fatal:
            res["error"] = f"not run: {self.fatal}"
            return res
        try:
            one = make_one(sets[0])
            if first:
                res["first_call_s"] = time_first_call(one, self.device)
            else:
                one()
            res["peak_mb"] = peak_mb(one, self.device)
            calls = [one] + [make_one(s) for s in sets[1:]]
            if self.a.cuda_graph and self.device.type == "cuda":
                try:
                    calls = [graphed(c) for c in calls]
                except Exception as e:  # noqa: BLE001 - e.g. a host sync inside the op
                    if is_fatal(e):
                        raise
                    res["graph_error"] = f"{who}: no CUDA graph ({_err(e)[:120]}), eager timing"
                    torch.cuda.synchronize()
            rot = Rotator(calls)
            res["ms"] = bench_ms(lambda: rot.next()(), self.device, self.a.warmup, self.a.rep)
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{who} failed: {_err(e)}"
            if is_fatal(e):
                self.fatal = f"CUDA context lost after {who}: {_err(e)}"
            if isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
        return res

    def sdpa(self, mode, B, T, H, K, V, sets, do):
        key = (mode, B, T, H, K, V)
        if key in self.sdpa_cache:
            return self.sdpa_cache[key]
        if self.a.no_sdpa or mode == "decode":
            res = {"ms": None, "peak_mb": None, "error": None}
        else:
            grad = mode == "fwdbwd"

            def to_bhtd(x):
                return x.detach().transpose(1, 2).contiguous().requires_grad_(grad)
            ssets = [{n: to_bhtd(s[n]) for n in ("q", "k", "v")} for s in sets]
            sdo = do.transpose(1, 2).contiguous() if do is not None else None
            res = self.measure("SDPA", lambda s: sdpa_call(s, mode, sdo), ssets)
            del ssets
        self.sdpa_cache[key] = res
        return res

    def copy_ref(self, nbytes: float, n: int) -> dict:
        """An elementwise kernel (torch.neg, fp32) reading nbytes / 2 and writing as much, over
        n rotated buffer pairs. Not ``copy_``: captured in a graph, its memcpy node measured
        0.037 to 0.055 ms for the same 67 MB from one row to the next (H200)."""
        n_el = int(nbytes // 8)
        if n_el not in self.copy_cache:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(0)
            pairs = [(torch.randn(n_el, generator=gen, device=self.device), torch.empty(n_el, device=self.device))
                     for _ in range(max(n, 2))]
            self.copy_cache[n_el] = self.measure("copy", lambda pr: (lambda: torch.neg(pr[0], out=pr[1])), pairs,
                                                 first=False)
            del pairs
        return self.copy_cache[n_el]

    def fla_plan(self, op: OpSpec, mode: str) -> str | None:
        """None to run FLA, else the reason it is not run."""
        if op.name not in self.a.fla_ops:
            return "FLA not run (--quick / --fla-ops)" if self.a.fla_ops else None
        if self.device.type != "cuda":
            return "FLA needs CUDA"
        if mode == "fwdbwd" and not self.a.fla_try_refused:
            if op.name in FLA_NO_BWD:
                return "FLA 0.6 has no backward for this op (inference only: NotImplementedError)"
            if fla_refuses_bwd(op.name, self.device):
                return "FLA 0.6 refuses this backward on Hopper with triton<3.7.1 (#640)"
        if self.fla_spent > self.a.fla_budget_s:
            return f"FLA skipped: FLA calls took {self.fla_spent:.0f}s > --fla-budget-s {self.a.fla_budget_s:g}"
        return ""

    # -- one row -------------------------------------------------------------------------------
    def run_row(self, op: OpSpec, mode: str, shape, date, gpu, commit) -> dict:
        B, T, H, K, V = shape
        if mode == "decode":
            T = 1
        fl = op_floor(op, mode, B, T, H, K, V, self.dtype, self.a.chunk_size, self.copy_bw)
        row = {"op": op.name, "mode": mode, "B": B, "T": T, "H": H, "K": K, "V": V,
               "dtype": DTYPE_NAMES[self.dtype], "ms": None, "fla_ms": None, "sdpa_ms": None,
               "floor_ms": fl["floor_ms"], "first_call_s": None, "fla_first_call_s": None,
               "peak_mb": None, "backend": None, "date": date, "gpu": gpu, "commit": commit, "note": None,
               "mem_floor_ms": fl["mem_floor_ms"], "flop_floor_ms": fl["flop_floor_ms"],
               "bytes": fl["bytes"], "flops": fl["flops"], "fla_peak_mb": None, "sdpa_peak_mb": None,
               "device": str(self.device),
               "timing": "cuda_graph" if self.a.cuda_graph and self.device.type == "cuda" else "eager"}
        notes = []
        if self.fatal:
            row["note"] = f"not run: {self.fatal}"
            return row
        try:
            sets, dout = self.build_sets(op, mode, B, T, H, K, V, self.a.seed)
        except Exception as e:  # noqa: BLE001
            row["note"] = f"inputs failed: {_err(e)}"
            if isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            return row
        row["rotations"] = len(sets)

        # ours
        fn, why = resolve_ours(op.name)
        if fn is None:
            notes.append(why)
        else:
            row["backend"] = backend_of(op.name, sets[0]["q"], K, V, mode)
            r = self.measure("ours", lambda s: make_call(fn, op, mode, s, dout), sets)
            row.update(ms=r["ms"], first_call_s=r["first_call_s"], peak_mb=r["peak_mb"])
            if r["error"]:
                self.ours_failed += 1
            notes += [r[k] for k in ("error", "graph_error") if r.get(k)]

        # FLA
        why = self.fla_plan(op, mode)
        if why:
            notes.append(why)
        elif why == "":
            ffn, err = resolve_fla(op.name)
            if ffn is None:
                notes.append(err)
            else:
                t0 = time.perf_counter()
                r = self.measure("FLA", lambda s: make_call(ffn, op, mode, s, dout), sets)
                self.fla_spent += time.perf_counter() - t0
                row.update(fla_ms=r["ms"], fla_peak_mb=r["peak_mb"])
                if not self.a.skip_fla_first_call:
                    row["fla_first_call_s"] = r["first_call_s"]
                notes += [r[k] for k in ("error", "graph_error") if r.get(k)]

        # A plain memory-bound kernel over the floor's bytes, timed the same way: what the
        # floor's bandwidth gives at this size, launch and ramp-up included (decode rows only).
        if mode == "decode" and self.device.type == "cuda":
            c = self.copy_ref(fl["bytes"], len(sets))
            row["copy_ms"] = c.get("ms")
            notes += [c[k] for k in ("error", "graph_error") if c.get(k)]

        # SDPA
        s = self.sdpa(mode, B, T, H, K, V, sets, dout)
        row["sdpa_ms"] = s.get("ms")
        row["sdpa_peak_mb"] = s.get("peak_mb")
        notes += [s[k] for k in ("error", "graph_error") if s.get(k)]

        sets = dout = None   # (released before the collection)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        row["note"] = "; ".join(notes) or None
        row.update(derived(row))
        return row

    def cuda_warmup(self):
        """CUDA context, cuBLAS and SDPA kernels up before the first timed first call; the copy
        bandwidth of this GPU for the memory floors."""
        if self.device.type != "cuda":
            return
        self.copy_bw = measure_copy_bw(self.device)
        self.log(f"device-to-device copy: {self.copy_bw / 1e12:.2f} TB/s (read + written): the memory floors' bandwidth")
        x = torch.randn(256, 256, device=self.device, dtype=self.dtype)
        (x @ x).sum().item()
        q = torch.randn(1, 2, 128, 64, device=self.device, dtype=self.dtype, requires_grad=True)
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
        torch.cuda.synchronize()

    def plan(self) -> list[tuple]:
        """(op, mode, shape) in --modes order; within fwd and fwdbwd the chunk ops (at --shapes)
        before the fused_recurrent ops (at --recurrent-shapes): the FLA budget goes to the chunk
        ops' baselines first."""
        jobs = []
        for mode in self.a.modes:
            for kind in ("chunk", "recurrent"):
                if mode == "decode":
                    shapes = self.a.decode_shapes
                else:
                    shapes = self.a.recurrent_shapes if kind == "recurrent" else self.a.shapes
                ops = [OPS[n] for n in self.a.ops if OPS[n].kind == kind and mode in OPS[n].modes]
                jobs += [(op, mode, shape) for shape in shapes for op in ops]
        return jobs

    def run(self, on_row: Callable[[dict], None] | None = None) -> list[dict]:
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        gpu, commit = gpu_name(self.device), git_commit()
        torch.manual_seed(self.a.seed)
        self.cuda_warmup()
        self.meta = {"date": date, "gpu": gpu, "commit": commit, "versions": versions(),
                     "command": " ".join(["bench/bench.py"] + self.argv),
                     "device": str(self.device), "copy_bw": self.copy_bw, "matmul_flops": MATMUL_FLOPS,
                     "chunk_size": self.a.chunk_size, "quick": self.a.quick, "fla_ops": self.a.fla_ops,
                     "cuda_graph": self.a.cuda_graph, "warmup_ms": self.a.warmup, "rep_ms": self.a.rep}
        jobs = self.plan()
        if any(op.name in self.a.fla_ops for op, _, _ in jobs) and self.device.type == "cuda":
            self.log("note: FLA's first call of each op compiles and autotunes Triton kernels "
                     "(30-110 s per op on an H100).")
        for i, (op, mode, shape) in enumerate(jobs):
            t0 = time.perf_counter()
            row = self.run_row(op, mode, shape, date, gpu, commit)
            self.rows.append(row)
            self.log(f"[{i + 1}/{len(jobs)}] {op.name} {mode} {shape} ours={_fmt(row['ms'])} "
                     f"fla={_fmt(row['fla_ms'])} sdpa={_fmt(row['sdpa_ms'])} floor={_fmt(row['floor_ms'])} "
                     f"({time.perf_counter() - t0:.1f}s){'  ' + row['note'] if row['note'] else ''}")
            if on_row:
                on_row(row)
        return self.rows


def results_name(gpu: str) -> str:
    g = gpu.lower()
    for key in ("h100", "h200", "h20", "a100", "b200", "l40", "a10"):
        if key in g:
            return key
    return "".join(c if c.isalnum() else "_" for c in g).strip("_") or "unknown"


@contextlib.contextmanager
def triton_cache(cold: bool):
    """A fresh TRITON_CACHE_DIR for the run (cold first calls) unless the user set one."""
    if not cold or "TRITON_CACHE_DIR" in os.environ:
        yield None
        return
    d = tempfile.mkdtemp(prefix="fla_bench_triton_")
    os.environ["TRITON_CACHE_DIR"] = d
    try:
        yield d
    finally:
        os.environ.pop("TRITON_CACHE_DIR", None)
        shutil.rmtree(d, ignore_errors=True)


def main(argv=None) -> int:
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    cold = a.device.startswith("cuda") and bool(a.fla_ops) and not a.skip_fla_first_call
    with triton_cache(cold) as cache_dir:
        runner = Runner(a, argv=argv)
        if cache_dir:
            print(f"Triton cache: fresh {cache_dir} (first calls are cold)", flush=True)
        out_json = os.path.join(a.out, "results.json")

        def checkpoint(_row):  # partial results survive a timeout
            write_json(out_json, runner.rows)

        rows = runner.run(on_row=checkpoint)
    write_json(out_json, rows)
    with open(os.path.join(a.out, "meta.json"), "w") as f:
        json.dump(runner.meta, f, indent=1)
    table = markdown_table(rows)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(table)
    print()
    print(table, flush=True)
    png = None
    if not a.no_plot:
        png = plot_time_vs_T(rows, os.path.join(a.out, "time_vs_T.png"))
        if png:
            print(f"plot: {png}")
    if a.update_results:
        name = a.results_name or results_name(runner.meta["gpu"])
        res_dir = os.path.join(REPO, "bench", "results")
        path = os.path.join(res_dir, f"{name}.json")
        old = []
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            old = data["rows"] if isinstance(data, dict) else data
        merged = merge_rows(old, rows)
        write_json(path, merged)  # a plain list of rows; each row carries its date, gpu and commit
        rel_png = None
        if not a.no_plot:
            p = plot_time_vs_T(merged, os.path.join(res_dir, f"{name}_time_vs_T.png"))
            rel_png = os.path.relpath(p, os.path.join(REPO, "bench")) if p else None
        write_results_md(os.path.join(REPO, "bench", "RESULTS.md"), merged, runner.meta, rel_png)
        print(f"updated {os.path.relpath(path, REPO)} and bench/RESULTS.md")
    if runner.fatal:
        print(f"FATAL: {runner.fatal}", file=sys.stderr)
        return 2
    if runner.ours_failed:
        print(f"{runner.ours_failed} row(s): our op raised (see notes)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
