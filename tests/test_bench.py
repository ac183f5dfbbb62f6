"""CPU unit tests of bench/bench.py: floors, FLOP model, argument parsing, writers, a smoke run."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench.py")
_spec = importlib.util.spec_from_file_location("fla_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["fla_bench"] = bench          # dataclasses look their module up there
_spec.loader.exec_module(bench)

BF16 = torch.bfloat16
MiB = 2 ** 20


# ---------------------------------------------------------------------------------- floors
def test_forward_traffic_matches_build_notes():
    # q, k, v, o: 64 MiB each at B=4, T=4096, H=16, D=128 bf16 -> 268 MB, 0.089 ms at 3.02 TB/s
    op = bench.OPS["chunk_linear_attn"]
    nbytes = bench.traffic_bytes(op, "fwd", 4, 4096, 16, 128, 128, BF16)
    assert nbytes == 4 * 64 * MiB
    f = bench.op_floor(op, "fwd", 4, 4096, 16, 128, 128, BF16)
    assert f["mem_floor_ms"] == pytest.approx(0.08889, rel=1e-3)
    assert f["floor_ms"] == max(f["mem_floor_ms"], f["flop_floor_ms"])


def test_gate_bytes_use_fp32():
    B, T, H, D = 4, 4096, 16, 128
    X = B * T * H * D * 2                         # one bf16 [B,T,H,D] tensor
    simple = bench.traffic_bytes(bench.OPS["chunk_simple_gla"], "fwd", B, T, H, D, D, BF16)
    assert simple == 4 * X + B * T * H * 4       # + fp32 g [B,T,H]
    gla = bench.traffic_bytes(bench.OPS["chunk_gla"], "fwd", B, T, H, D, D, BF16)
    assert gla == 4 * X + 2 * X                  # + fp32 gk [B,T,H,K]
    gdn = bench.traffic_bytes(bench.OPS["chunk_gated_delta_rule"], "fwd", B, T, H, D, D, BF16)
    assert gdn == 4 * X + B * T * H * 4 + B * T * H * 2   # fp32 g, bf16 beta
    dplr = bench.traffic_bytes(bench.OPS["chunk_dplr_delta_rule"], "fwd", B, T, H, D, D, BF16)
    assert dplr == 4 * X + 2 * X + 2 * X         # a, b bf16 and gk fp32


def test_fwdbwd_traffic():
    # fwd: q k v (3X) + gk (2X) + o (X); bwd: inputs (5X) + do (X) + grads (5X)
    B, T, H, D = 2, 512, 4, 64
    X = B * T * H * D * 2
    got = bench.traffic_bytes(bench.OPS["chunk_gla"], "fwdbwd", B, T, H, D, D, BF16)
    assert got == 6 * X + 11 * X
    # K != V: o, do, v are [.., V]
    K, V = 64, 32
    got = bench.traffic_bytes(bench.OPS["chunk_linear_attn"], "fwdbwd", B, T, H, K, V, BF16)
    n = B * T * H * 2
    fwd = n * (2 * K + V) + n * V
    assert got == fwd + n * (2 * K + V) + n * V + n * (2 * K + V)


def test_decode_traffic_matches_build_notes():
    # fp32 state 64*16*128*128*4 = 64 MiB read + written dominates: floor 0.044 ms
    op = bench.OPS["fused_recurrent_simple_gla"]
    B, H, D = 64, 16, 128
    nbytes = bench.traffic_bytes(op, "decode", B, 1, H, D, D, BF16)
    state = B * H * D * D * 4
    small = 4 * B * H * D * 2 + B * H * 4        # q, k, v, o and g at T = 1
    assert nbytes == 2 * state + small
    assert bench.op_floor(op, "decode", B, 1, H, D, D, BF16)["floor_ms"] == pytest.approx(0.0444, abs=5e-4)
    # T given for decode is ignored (one step)
    assert bench.traffic_bytes(op, "decode", B, 999, H, D, D, BF16) == nbytes


def test_recurrent_fwd_floors_have_no_state_and_per_step_flops():
    """The fused_recurrent ops' fwd / fwdbwd rows: the same inputs and outputs as the chunk op of
    the same family (no state in or out), FLOPs by the per-step model."""
    B, T, H, D = 8, 256, 16, 128
    rec, chunk = bench.OPS["fused_recurrent_simple_gla"], bench.OPS["chunk_simple_gla"]
    assert rec.modes == ("decode", "fwd", "fwdbwd") and chunk.modes == ("fwd", "fwdbwd")
    specs = bench.input_specs(rec, "fwd", B, T, H, D, D, BF16)
    assert [s.name for s in specs] == ["q", "k", "v", "g"] and specs[0].shape == (B, T, H, D)
    for mode in ("fwd", "fwdbwd"):
        assert bench.traffic_bytes(rec, mode, B, T, H, D, D, BF16) == bench.traffic_bytes(chunk, mode, B, T, H, D, D, BF16)
    X = B * T * H * D * 2
    assert bench.traffic_bytes(rec, "fwd", B, T, H, D, D, BF16) == 4 * X + B * T * H * 4
    fwd = bench.op_flops(rec, "fwd", B, T, H, D, D)
    assert fwd == B * T * H * 4 * D * D
    assert bench.op_flops(rec, "fwdbwd", B, T, H, D, D) == 3 * fwd
    dplr = bench.OPS["fused_recurrent_dplr_delta_rule"]
    assert bench.op_flops(dplr, "fwd", B, T, H, D, D) == B * T * H * 8 * D * D
    assert bench.op_flops(dplr, "fwd", B, T, H, D, D, C=128) == bench.op_flops(dplr, "fwd", B, T, H, D, D)
    f = bench.op_floor(rec, "fwdbwd", B, T, H, D, D, BF16)
    assert f["floor_ms"] == f["mem_floor_ms"] == pytest.approx(f["bytes"] / 3.02e12 * 1e3)


def test_flops_per_token():
    K = V = 128
    C = 64
    assert bench.flops_per_token("linear", K, V, C) == 4 * K * V + 2 * C * (K + V) == 98304
    assert bench.flops_per_token("delta", K, V, C) == pytest.approx(6 * K * V + 6 * C * K + 4 * C * V + C * C / 3)
    assert bench.flops_per_token("dplr", K, V, C) == pytest.approx(8 * K * V + 10 * C * K + 8 * C * V + C * C / 3)
    assert bench.flops_per_token("delta", K, V, recurrent=True) == 6 * K * V
    # a larger chunk costs more intra-chunk work
    assert bench.flops_per_token("linear", K, V, 128) > bench.flops_per_token("linear", K, V, 64)
    with pytest.raises(ValueError):
        bench.flops_per_token("softmax", K, V)


def test_op_flops_modes():
    op = bench.OPS["chunk_simple_gla"]
    B, T, H, K = 4, 4096, 16, 128
    fwd = bench.op_flops(op, "fwd", B, T, H, K, K)
    assert fwd == B * T * H * 98304
    assert bench.op_flops(op, "fwdbwd", B, T, H, K, K) == 3 * fwd
    rec = bench.OPS["fused_recurrent_gla"]
    assert bench.op_flops(rec, "decode", 64, 1, 16, K, K) == 64 * 16 * 4 * K * K
    # this shape is memory bound for linear attention
    f = bench.op_floor(op, "fwd", B, T, H, K, K, BF16)
    assert f["flop_floor_ms"] == pytest.approx(fwd / 785e12 * 1e3)
    assert f["flop_floor_ms"] < f["mem_floor_ms"]


def test_floors_max():
    f = bench.floors(3.02e9, 785e9)              # 1 ms of traffic, 1 ms of math
    assert f["mem_floor_ms"] == pytest.approx(1.0) and f["flop_floor_ms"] == pytest.approx(1.0)
    f = bench.floors(3.02e9, 785e9 * 4)
    assert f["floor_ms"] == pytest.approx(4.0)


# ---------------------------------------------------------------------------------- inputs
def test_input_specs_and_tensors():
    gen = torch.Generator().manual_seed(0)
    specs = bench.input_specs(bench.OPS["chunk_dplr_delta_rule"], "fwdbwd", 2, 9, 3, 8, 4, BF16)
    names = [s.name for s in specs]
    assert names == ["q", "k", "v", "a", "b", "gk"]
    t = {s.name: bench.make_tensor(s, "cpu", gen) for s in specs}
    for name, x in t.items():
        assert x.requires_grad and (x != 0).all(), name
    assert t["gk"].dtype == torch.float32 and (t["gk"] < 0).all() and (t["gk"] > -1).all()
    assert t["q"].dtype == BF16 and t["v"].shape == (2, 9, 3, 4)
    assert torch.allclose(t["k"].float().norm(dim=-1), torch.ones(2, 9, 3), atol=1e-2)
    assert torch.allclose((-t["a"]).float().norm(dim=-1), torch.ones(2, 9, 3), atol=1e-2)
    bn = t["b"].float().norm(dim=-1)
    assert (bn > 0).all() and (bn < 1).all()
    gdn = {s.name: bench.make_tensor(s, "cpu", gen)
           for s in bench.input_specs(bench.OPS["fused_recurrent_gated_delta_rule"], "decode", 5, 77, 2, 8, 8, BF16)}
    assert gdn["q"].shape == (5, 1, 2, 8)                           # decode: T = 1
    assert gdn["initial_state"].shape == (5, 2, 8, 8) and gdn["initial_state"].dtype == torch.float32
    assert not gdn["q"].requires_grad
    assert ((gdn["beta"] > 0) & (gdn["beta"] < 1)).all() and (gdn["g"] < 0).all()


def test_n_rotations():
    assert bench.n_rotations(268 * 10 ** 6, "fwd") == 1
    assert bench.n_rotations(67 * 10 ** 6 + 10 ** 5, "decode") == 3      # >= 3x L2
    assert bench.n_rotations(10 ** 9, "decode") == 2                    # decode rotates anyway
    assert bench.n_rotations(10 ** 6, "fwd") == 64                       # capped
    assert bench.n_rotations(3 * 10 ** 9, "fwd", max_bytes=4e9) == 1


def test_make_call_passes_state_for_decode():
    seen = {}

    def fake(q, k, v, **kw):
        seen.update(kw, qkv=(q, k, v))
        return q, None
    op = bench.OPS["fused_recurrent_gated_delta_rule"]
    inputs = {"q": 1, "k": 2, "v": 3, "g": 4, "beta": 6, "initial_state": 5}
    bench.make_call(fake, op, "decode", inputs, None)()
    # extras by keyword: FLA's fused_recurrent_gated_delta_rule has gk, gv between g and beta
    assert seen == {"qkv": (1, 2, 3), "g": 4, "beta": 6, "initial_state": 5, "output_final_state": True}
    # fwd: the training call, no state in or out
    seen.clear()
    bench.make_call(fake, op, "fwd", {"q": 1, "k": 2, "v": 3, "g": 4, "beta": 6}, None)()
    assert seen == {"qkv": (1, 2, 3), "g": 4, "beta": 6}


def _fla_params(name):
    """Parameter names of FLA's ``name`` from its source (no import: FLA needs triton), or None."""
    import ast
    import glob
    spec = importlib.util.find_spec("fla") if "fla" not in sys.modules else None
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    roots += [d for d in (os.environ.get("FLA_SRC", ""), "/tmp/fla/fla") if d and os.path.isdir(d)]
    for root in roots:
        for path in glob.glob(os.path.join(root, "ops", "**", "*.py"), recursive=True):
            with open(path) as f:
                src = f.read()
            if f"def {name}(" not in src:
                continue
            for node in ast.parse(src).body:
                if isinstance(node, ast.FunctionDef) and node.name == name:
                    return [a.arg for a in node.args.args + node.args.kwonlyargs]
    return None


@pytest.mark.parametrize("name", list(bench.OPS))
def test_call_keywords_match_signatures(name):
    """Every keyword the bench passes is a named parameter of ours and of FLA (a **kwargs catch-all
    would swallow a misspelt one silently)."""
    import inspect
    op = bench.OPS[name]
    keys = [e[0] for e in op.extra] + list(op.kwargs)
    if op.kind == "recurrent":
        keys += ["initial_state", "output_final_state"]
    checked = 0
    fn, _ = bench.resolve_ours(name)
    if fn is not None:
        params = inspect.signature(fn).parameters
        named = [p for p, v in params.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
        assert named[:3] == ["q", "k", "v"]
        assert set(keys) <= set(named), (name, set(keys) - set(named))
        checked += 1
    fla = _fla_params(name)
    if fla is not None:
        assert fla[:3] == ["q", "k", "v"] and set(keys) <= set(fla), (name, set(keys) - set(fla))
        checked += 1
    if not checked:
        pytest.skip(f"neither fla_cuda nor FLA source has {name}")


# ---------------------------------------------------------------------------------- CLI
def test_parse_shapes():
    assert bench.parse_shapes("1x32768x16x128,8x2048x32x64") == [(1, 32768, 16, 128, 128), (8, 2048, 32, 64, 64)]
    assert bench.parse_shapes("2x100x4x64x32") == [(2, 100, 4, 64, 32)]
    assert bench.parse_shapes("64x16x128", decode=True) == [(64, 1, 16, 128, 128)]
    assert bench.parse_shapes("8X4X64X32", decode=True) == [(8, 1, 4, 64, 32)]
    for bad in ("4x4096x16", "4x4096x16x1x2x3", "4xTx16x128", "0x10x2x8", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_shapes(bad)
    for bad in ("64x16", "4x1x16x128x128"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_shapes(bad, decode=True)


def test_parse_args_defaults_and_quick():
    a = bench.parse_args(["--device", "cpu"])
    assert a.ops == bench.DEFAULT_OPS and len(a.ops) == 11
    assert a.modes == ["decode", "fwd", "fwdbwd"]
    assert a.shapes == [(4, 4096, 16, 128, 128)] and a.decode_shapes == [(64, 1, 16, 128, 128)]
    assert a.recurrent_shapes == [(8, 256, 16, 128, 128)]
    r = bench.parse_args(["--device", "cpu", "--recurrent-shapes", "2x512x4x64x32,1x128x8x128"])
    assert r.recurrent_shapes == [(2, 512, 4, 64, 32), (1, 128, 8, 128, 128)] and r.shapes == a.shapes
    assert "chunk_dplr_delta_rule" not in a.fla_ops and "chunk_gla" in a.fla_ops
    assert math.isinf(a.fla_budget_s) and (a.warmup, a.rep) == (25, 100)
    q = bench.parse_args(["--device", "cpu", "--quick"])
    assert q.fla_ops == bench.QUICK_FLA_OPS and q.fla_budget_s == 150
    assert all(o.startswith("fused_recurrent") for o in q.fla_ops if o not in ("chunk_simple_gla", "chunk_gated_delta_rule"))
    assert bench.parse_args(["--device", "cpu", "--quick", "--no-fla"]).fla_ops == []
    assert bench.parse_args(["--device", "cpu", "--fla-ops", "chunk_dplr_delta_rule"]).fla_ops == ["chunk_dplr_delta_rule"]
    assert bench.parse_args(["--device", "cpu", "--ops", "all"]).ops == list(bench.OPS)
    d = bench.parse_args(["--dry-run"])
    assert d.device == "cpu" and d.fla_ops == [] and d.shapes[0][1] < 128
    assert d.recurrent_shapes[0][1] < 16 and d.recurrent_shapes[0][3] < 128
    # a shape given with --dry-run is kept
    assert bench.parse_args(["--dry-run", "--recurrent-shapes", "1x3x1x8"]).recurrent_shapes == [(1, 3, 1, 8, 8)]


@pytest.mark.parametrize("argv", [["--ops", "chunk_nope"], ["--modes", "bwd"], ["--shapes", "4x4096"],
                                  ["--recurrent-shapes", "8x16x128"],
                                  ["--fla-ops", "x"], ["--dtype", "fp8"], ["--chunk-size", "0"]])
def test_parse_args_rejects(argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu"] + argv)


def test_results_name():
    assert bench.results_name("NVIDIA H100 80GB HBM3") == "h100"
    assert bench.results_name("NVIDIA H200") == "h200"
    assert bench.results_name("Some GPU 9") == "some_gpu_9"


def test_fla_refusal_only_on_cuda():
    assert not bench.fla_refuses_bwd("chunk_simple_gla", "cpu")
    assert not bench.fla_refuses_bwd("chunk_gla", "cpu")


def test_plan_order_and_shapes():
    a = bench.parse_args(["--dry-run", "--ops", "fused_recurrent_gla,chunk_gla", "--shapes", "1x64x2x16",
                          "--recurrent-shapes", "2x8x2x16,1x16x2x16", "--decode-shapes", "3x2x16"])
    jobs = [(op.name, mode, shape) for op, mode, shape in bench.Runner(a).plan()]
    rec = [(2, 8, 2, 16, 16), (1, 16, 2, 16, 16)]
    assert jobs == [("fused_recurrent_gla", "decode", (3, 1, 2, 16, 16)),
                    ("chunk_gla", "fwd", (1, 64, 2, 16, 16))] + [("fused_recurrent_gla", "fwd", s) for s in rec] + [
                    ("chunk_gla", "fwdbwd", (1, 64, 2, 16, 16))] + [("fused_recurrent_gla", "fwdbwd", s) for s in rec]
    a = bench.parse_args(["--dry-run", "--ops", "fused_recurrent_gla", "--modes", "fwd"])
    assert [(m, s) for _, m, s in bench.Runner(a).plan()] == [("fwd", a.recurrent_shapes[0])]


def test_fla_plan_skips_inference_only_backwards():
    """FLA 0.6's fused_recurrent gated delta / DPLR backward raises NotImplementedError: their
    fwdbwd row says so instead of running it; their fwd runs; --fla-try-refused runs it anyway."""
    a = bench.parse_args(["--dry-run", "--fla-ops", "all"])
    a.fla_ops = list(bench.OPS)             # --dry-run drops FLA; the plan is what is checked here
    runner = bench.Runner(a)
    runner.device = torch.device("cuda")    # a device object only (no CUDA call for these ops)
    for name in ("fused_recurrent_gated_delta_rule", "fused_recurrent_dplr_delta_rule"):
        assert "no backward" in runner.fla_plan(bench.OPS[name], "fwdbwd")
        assert runner.fla_plan(bench.OPS[name], "fwd") == ""
    for name in ("fused_recurrent_simple_gla", "fused_recurrent_gla", "fused_recurrent_delta_rule",
                 "fused_recurrent_iplr_delta_rule"):
        assert runner.fla_plan(bench.OPS[name], "fwdbwd") == ""
    a.fla_try_refused = True
    assert runner.fla_plan(bench.OPS["fused_recurrent_dplr_delta_rule"], "fwdbwd") == ""


# ---------------------------------------------------------------------------------- writers
def _row(op="chunk_gla", mode="fwd", T=4096, ms=1.0, **kw):
    r = {k: None for k in bench.ROW_KEYS}
    r.update(op=op, mode=mode, B=4, T=T, H=16, K=128, V=128, dtype="bf16", ms=ms, floor_ms=0.25,
             fla_ms=2.0, sdpa_ms=0.5)
    r.update(kw)
    return r


def test_derived_and_markdown_table():
    d = bench.derived(_row())
    assert d == {"x_floor": 4.0, "speedup_vs_fla": 2.0, "speedup_vs_sdpa": 0.5}
    assert bench.derived(_row(ms=None))["x_floor"] is None
    table = bench.markdown_table([_row(), _row(op="chunk_delta_rule", fla_ms=None, note="a|b")])
    lines = table.strip().split("\n")
    assert len(lines) == 4 and lines[1].startswith("|---")
    assert all(line.count("|") == len(bench.TABLE_COLS) + 1 for line in lines)
    assert "| 4.00x | 2.00x | 0.50x |" in lines[2]
    assert "a/b" in lines[3] and "| - |" in lines[3]
    # decode rows carry the time of a device copy of the floor's bytes, after the floor
    dec = bench.markdown_table([_row(mode="decode", T=1, floor_ms=0.033, copy_ms=0.0374)]).strip().split("\n")
    cols = [h for _, h in bench.TABLE_COLS]
    assert cols.index("copy ms") == cols.index("floor ms") + 1
    assert "| 0.033 | 0.037 |" in dec[2]


def test_merge_rows():
    old = [_row(ms=5.0), _row(op="chunk_delta_rule", ms=7.0), _row(mode="decode", op="fused_recurrent_gla", T=1)]
    new = [_row(ms=1.0), _row(T=8192, ms=2.0)]
    m = bench.merge_rows(old, new)
    assert len(m) == 4
    by = {(r["op"], r["mode"], r["T"]): r["ms"] for r in m}
    assert by[("chunk_gla", "fwd", 4096)] == 1.0 and by[("chunk_gla", "fwd", 8192)] == 2.0
    assert by[("chunk_delta_rule", "fwd", 4096)] == 7.0
    assert m[-1]["mode"] == "decode"
    # a recurrent op's fwd rows at two T and its decode row are three rows; a rerun replaces one;
    # within a mode the chunk ops' rows come first (chunk_retention is listed after the recurrent ops)
    rec = [_row(op="fused_recurrent_gla", B=8, T=256, ms=3.0), _row(op="fused_recurrent_gla", B=8, T=512, ms=6.0)]
    m2 = bench.merge_rows(m, rec + [_row(op="chunk_retention", ms=0.5)])
    m2 = bench.merge_rows(m2, [_row(op="fused_recurrent_gla", B=8, T=256, ms=2.5)])
    by = {(r["op"], r["mode"], r["T"]): r["ms"] for r in m2}
    assert len(m2) == 7 and by[("fused_recurrent_gla", "fwd", 256)] == 2.5
    assert by[("fused_recurrent_gla", "fwd", 512)] == 6.0 and by[("fused_recurrent_gla", "decode", 1)] is not None
    assert [r["op"] for r in m2 if r["mode"] == "fwd"] == ["chunk_gla", "chunk_gla", "chunk_delta_rule", "chunk_retention",
                                                           "fused_recurrent_gla", "fused_recurrent_gla"]


def test_write_json_and_results_md(tmp_path):
    rows = [_row(), _row(mode="decode", op="fused_recurrent_gla", T=1)]
    meta = {"date": "2026-01-01T00:00:00Z", "gpu": "NVIDIA H100 80GB HBM3", "commit": "abc123",
            "versions": {"torch": "2.11.0", "triton": "3.6.0", "fla": "0.6.0"}, "command": "bench.py --quick"}
    p = tmp_path / "r" / "h100.json"
    bench.write_json(str(p), rows, meta=meta)
    data = json.loads(p.read_text())
    assert data["meta"]["gpu"] == meta["gpu"] and data["rows"] == rows
    bench.write_json(str(tmp_path / "plain.json"), rows)
    assert json.loads((tmp_path / "plain.json").read_text()) == rows
    md = tmp_path / "RESULTS.md"
    bench.write_results_md(str(md), rows, meta, png="results/h100_time_vs_T.png")
    text = md.read_text()
    for s in ("NVIDIA H100 80GB HBM3", "torch 2.11.0", "triton 3.6.0", "FLA 0.6.0", "abc123", "## fwd",
              "## decode", "chunk_gla", "fused_recurrent_gla", "h100_time_vs_T.png", "3.02 TB/s"):
        assert s in text, s
    assert "## fwdbwd" not in text
    assert "## fused_recurrent" not in text
    # the recurrent ops' fwd / fwdbwd rows: tables of their own, after the chunk ones, before decode
    rows += [_row(op="fused_recurrent_gla", B=8, T=256), _row(op="fused_recurrent_gla", mode="fwdbwd", B=8, T=256),
             _row(op="chunk_gla", mode="fwdbwd")]
    bench.write_results_md(str(md), rows, meta)
    text = md.read_text()
    heads = [line for line in text.split("\n") if line.startswith("## ")]
    assert heads == ["## fwd", "## fwdbwd", "## fused_recurrent fwd", "## fused_recurrent fwdbwd", "## decode"]
    sections = text.split("\n## ")
    assert "fused_recurrent" not in sections[1] and "fused_recurrent" not in sections[2]
    assert "| fused_recurrent_gla | fwd | 8,256,16,128,128 |" in sections[3]
    assert "| fused_recurrent_gla | fwdbwd | 8,256,16,128,128 |" in sections[4]


def test_plot_keeps_recurrent_rows_out(tmp_path):
    pytest.importorskip("matplotlib")
    rec = [_row(op="fused_recurrent_gla", B=8, T=256)]
    assert bench.plot_time_vs_T(rec, str(tmp_path / "rec.png")) is None
    assert bench.plot_time_vs_T(rec + [_row()], str(tmp_path / "both.png")) == str(tmp_path / "both.png")


# ---------------------------------------------------------------------------------- smoke run
def _fake_ops(calls):
    """Tiny differentiable stand-ins with FLA signatures (o = v * sigmoid(<q, k>)), one that raises."""
    def op(q, k, v, initial_state=None, output_final_state=False, **rest):
        calls.append((q.shape, len(rest), initial_state is not None, output_final_state, q.requires_grad))
        o = v * torch.sigmoid((q * k).sum(-1, keepdim=True).float()).to(v.dtype)
        for x in rest.values():             # make every input differentiable
            o = o + 0 * x.float().sum().to(o.dtype)
        return o, (initial_state * 0.5 if output_final_state else None)

    def broken(*a, **kw):
        raise RuntimeError("kernel exploded")

    def resolve(name):
        if name == "chunk_delta_rule":
            return broken, None
        if name == "chunk_linear_attn":
            return None, "fla_cuda has no chunk_linear_attn"
        return op, None
    return resolve


def test_dry_run_end_to_end(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench, "resolve_ours", _fake_ops(calls))
    out = tmp_path / "out"
    rc = bench.main(["--dry-run", "--out", str(out), "--no-plot",
                     "--ops", "chunk_simple_gla,chunk_linear_attn,chunk_delta_rule,fused_recurrent_dplr_delta_rule"])
    assert rc == 1                                   # chunk_delta_rule raised
    rows = json.loads((out / "results.json").read_text())
    assert [(r["op"], r["mode"]) for r in rows] == [
        ("fused_recurrent_dplr_delta_rule", "decode"), ("chunk_simple_gla", "fwd"), ("chunk_linear_attn", "fwd"), ("chunk_delta_rule", "fwd"),
        ("fused_recurrent_dplr_delta_rule", "fwd"),
        ("chunk_simple_gla", "fwdbwd"), ("chunk_linear_attn", "fwdbwd"), ("chunk_delta_rule", "fwdbwd"),
        ("fused_recurrent_dplr_delta_rule", "fwdbwd")]
    for r in rows:
        assert set(bench.ROW_KEYS) <= set(r), r
        assert r["fla_ms"] is None and r["fla_first_call_s"] is None and r["floor_ms"] > 0
    by = {(r["op"], r["mode"]): r for r in rows}
    ok = by[("chunk_simple_gla", "fwdbwd")]
    assert ok["ms"] > 0 and ok["first_call_s"] > 0 and ok["backend"] == "torch" and ok["sdpa_ms"] > 0
    assert ok["note"] is None
    assert by[("chunk_linear_attn", "fwd")]["ms"] is None
    assert "no chunk_linear_attn" in by[("chunk_linear_attn", "fwd")]["note"]
    assert by[("chunk_delta_rule", "fwd")]["ms"] is None
    assert "kernel exploded" in by[("chunk_delta_rule", "fwd")]["note"]
    dec = by[("fused_recurrent_dplr_delta_rule", "decode")]
    assert dec["T"] == 1 and dec["sdpa_ms"] is None and dec["ms"] > 0
    # the recurrent op's fwd / fwdbwd rows: the dry-run's --recurrent-shapes, per-step floors
    (B, T, H, K, V), = bench.parse_args(["--dry-run"]).recurrent_shapes
    op = bench.OPS["fused_recurrent_dplr_delta_rule"]
    for mode in ("fwd", "fwdbwd"):
        r = by[("fused_recurrent_dplr_delta_rule", mode)]
        assert (r["B"], r["T"], r["H"], r["K"], r["V"]) == (B, T, H, K, V) and r["note"] is None
        assert r["ms"] > 0 and r["sdpa_ms"] > 0 and r["backend"] == "torch"
        fl = bench.op_floor(op, mode, B, T, H, K, V, BF16)
        assert r["flops"] == bench.op_flops(op, mode, B, T, H, K, V) == (3 if mode == "fwdbwd" else 1) * B * T * H * 8 * K * V
        assert r["bytes"] == fl["bytes"] and r["floor_ms"] == pytest.approx(fl["floor_ms"]) and r["floor_ms"] > 0
    # decode called with a state and output_final_state; fwd / fwdbwd without (and fwdbwd with
    # grad-requiring inputs)
    assert any(c[2] and c[3] and c[1] == 3 for c in calls)
    assert any(c[4] and c[1] == 1 for c in calls)
    rec = [c for c in calls if c[1] == 3 and c[0][1] == T]
    assert rec and not any(c[2] or c[3] for c in rec)
    assert any(c[4] for c in rec) and any(not c[4] for c in rec)
    assert (out / "results.md").read_text().count("\n") == len(rows) + 2
    assert json.loads((out / "meta.json").read_text())["device"] == "cpu"
    assert "| chunk_simple_gla | fwd |" in capsys.readouterr().out


def test_raising_fla_backward_is_a_note(tmp_path, monkeypatch):
    """FLA's inference-only recurrent ops raise NotImplementedError in backward: where one runs
    (--fla-try-refused) its row records fla_ms null and the error, and the run goes on."""
    monkeypatch.setattr(bench, "resolve_ours", _fake_ops([]))
    fake = _fake_ops([])("fused_recurrent_gla")[0]

    class NoBwd(torch.autograd.Function):
        @staticmethod
        def forward(ctx, o):
            return o.clone()

        @staticmethod
        def backward(ctx, do):
            raise NotImplementedError("Backward pass is not implemented yet")

    def fla_op(*args, **kw):
        o, s = fake(*args, **kw)
        return NoBwd.apply(o), s
    monkeypatch.setattr(bench, "resolve_fla",
                        lambda name: (fla_op if name == "fused_recurrent_gated_delta_rule" else fake, None))
    # FLA needs CUDA (and --dry-run drops it): here the plan runs it everywhere
    monkeypatch.setattr(bench.Runner, "fla_plan", lambda self, op, mode: "")
    out = tmp_path / "out"
    rc = bench.main(["--dry-run", "--out", str(out), "--no-plot", "--modes", "fwd,fwdbwd",
                     "--ops", "fused_recurrent_gated_delta_rule,fused_recurrent_gla"])
    assert rc == 0
    rows = {(r["op"], r["mode"]): r for r in json.loads((out / "results.json").read_text())}
    assert len(rows) == 4
    bad = rows[("fused_recurrent_gated_delta_rule", "fwdbwd")]
    assert bad["fla_ms"] is None and bad["ms"] > 0
    assert "FLA failed: NotImplementedError: Backward pass is not implemented yet" in bad["note"]
    for key in [("fused_recurrent_gated_delta_rule", "fwd"), ("fused_recurrent_gla", "fwd"), ("fused_recurrent_gla", "fwdbwd")]:
        assert rows[key]["fla_ms"] > 0 and rows[key]["note"] is None, key


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU guard")
def test_no_silent_cpu_benchmark():
    """Without a GPU the default run refuses (GPU floors would be meaningless), and CPU numbers
    never overwrite the recorded GPU results."""
    with pytest.raises(SystemExit):
        bench.parse_args([])
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--update-results"])
    assert bench.parse_args(["--dry-run"]).device == "cpu"


def test_backend_of_names_a_forward_only_kernel(monkeypatch):
    """A row whose op has a forward kernel but a PyTorch backward says so in fwdbwd mode."""
    from fla_cuda import backend
    monkeypatch.setattr(backend, "use_cuda", lambda *a, **k: True)
    monkeypatch.setitem(backend.OPS, "chunk_gla", backend.KernelSpec("chunk_gla_fwd", backward=False))
    q = torch.zeros(1)
    assert bench.backend_of("chunk_gla", q, 64, 64, "fwd") == "cuda"
    assert bench.backend_of("chunk_gla", q, 64, 64, "fwdbwd") == "cuda fwd + torch bwd"
    assert bench.backend_of("chunk_simple_gla", q, 64, 64, "fwdbwd") == "cuda"
    monkeypatch.setattr(backend, "use_cuda", lambda *a, **k: False)
    assert bench.backend_of("chunk_gla", q, 64, 64, "fwdbwd") == "torch"
