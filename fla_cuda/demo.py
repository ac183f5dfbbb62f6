"""``make demo`` / ``python -m fla_cuda demo``: the library's main job on a default shape.

For a few families: a model-sized chunked forward+backward (training / prefill), then a
prefill + token-by-token decode loop that carries the recurrent state, checked against the
one-shot chunked output. Runs on the GPU if there is one, else on the CPU, and prints which
backend each op used and how fast it ran.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import fla_cuda
from fla_cuda import backend


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, reps):
    fn()  # warm-up (also the first-call cost, which for us is just the launch)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps * 1e3


def _inputs(B, T, H, K, V, dtype, device):
    q = torch.randn(B, T, H, K, device=device, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, device=device, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, device=device))
    gk = F.logsigmoid(torch.randn(B, T, H, K, device=device)) / 16
    beta = torch.rand(B, T, H, device=device).sigmoid()
    return q, k, v, g, gk, beta


# (chunk op, recurrent op, how to call either from the shared inputs)
FAMILIES = {
    "simple_gla": ("chunk_simple_gla", "fused_recurrent_simple_gla",
                   lambda f, q, k, v, g, gk, beta, **kw: f(q, k, v, g=g, **kw)),
    "gla": ("chunk_gla", "fused_recurrent_gla",
            lambda f, q, k, v, g, gk, beta, **kw: f(q, k, v, gk, **kw)),
    "gated_delta_rule": ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule",
                         lambda f, q, k, v, g, gk, beta, **kw: f(q, k, v, g=g, beta=beta, **kw)),
}


def main(shape: tuple | None = None, decode_steps: int = 32) -> dict[str, float]:
    """Run the demo; ``shape`` (B, T, H, K, V) overrides the default. Returns the decode errors."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    B, T, H, K, V = shape or ((2, 2048, 8, 128, 128) if on_gpu else (1, 1024, 4, 64, 64))
    where = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    print(f"fla_cuda {fla_cuda.__version__} demo on {where}: B={B} T={T} H={H} K={K} V={V} {dtype}")
    print(f"(extension {'loaded' if fla_cuda.HAS_EXTENSION else 'not built: PyTorch paths only'})\n")
    torch.manual_seed(0)
    q, k, v, g, gk, beta = _inputs(B, T, H, K, V, dtype, device)
    reps = 10 if on_gpu else 2
    print(f"{'family':<18} {'op':<46} {'backend':<9} {'ms':>9}  note")
    errors = {}
    for fam, (chunk_name, rec_name, call) in FAMILIES.items():
        chunk_op, rec_op = getattr(fla_cuda, chunk_name), getattr(fla_cuda, rec_name)
        chunk_backend = "cuda" if backend.use_cuda(chunk_name, q, K, V) else "pytorch"
        rec_backend = "cuda" if backend.use_cuda(rec_name, q, K, V) else "pytorch"

        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in (q, k, v, g, gk, beta)]

        def fwd_bwd():
            o, _ = call(chunk_op, *leaves)
            o.backward(torch.ones_like(o))

        ms_fwd = _time(lambda: call(chunk_op, q, k, v, g, gk, beta), device, reps)
        ms_fb = _time(fwd_bwd, device, reps)
        print(f"{fam:<18} {chunk_name + ' fwd':<46} {chunk_backend:<9} {ms_fwd:9.3f}")
        print(f"{'':<18} {chunk_name + ' fwd+bwd':<46} {chunk_backend:<9} {ms_fb:9.3f}")

        # Prefill T - decode_steps tokens in one chunked call, then decode token by token.
        with torch.no_grad():
            o_full, _ = call(chunk_op, q, k, v, g, gk, beta)
            P = T - decode_steps
            _, state = call(chunk_op, *(t[:, :P] for t in (q, k, v, g, gk, beta)), output_final_state=True)
            outs = []
            _sync(device)
            t0 = time.perf_counter()
            for t in range(P, T):
                step = [x[:, t:t + 1] for x in (q, k, v, g, gk, beta)]
                o_t, state = call(rec_op, *step, initial_state=state, output_final_state=True)
                outs.append(o_t)
            _sync(device)
            ms_step = (time.perf_counter() - t0) / decode_steps * 1e3
            o_dec = torch.cat(outs, dim=1).float()
            ref = o_full[:, P:].float()
            err = ((o_dec - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
        print(f"{'':<18} {rec_name + ' decode step':<46} {rec_backend:<9} {ms_step:9.3f}  "
              f"decode vs one-shot rel. RMS error {err:.1e}")
        errors[fam] = err
    print("\n`python -m fla_cuda info` lists the backend of every op.")
    return errors


if __name__ == "__main__":
    main()
